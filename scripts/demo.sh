#!/usr/bin/env bash
# beckon demo: two camera sites whose LANs use the SAME subnet and camera IP (198.18.1.10),
# each behind its own real Linux NAT router (nftables masquerade + conntrack, invalid drop),
# a trigger on each LAN, a server on the "internet". A platform client on the server host
# talks UDP to both cameras through beckon; then one trigger is killed and its camera keeps
# answering, because the trigger is not in the data path.
#   sudo ./scripts/demo.sh
# Everything runs in network namespaces named bk-demo-*; all of it is removed on exit/Ctrl-C.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=bk-demo
WORK=$(mktemp -d /tmp/beckon-demo.XXXXXX)
PIDS=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; kill -9 "$p" 2>/dev/null; done
  "$ROOT/scripts/lab/lab.sh" down "$PREFIX" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it builds network namespaces): sudo $0" >&2; exit 1; }

say "1/6 prerequisites"
need=""
for c in nft:nftables conntrack:conntrack ip:iproute2 ping:iputils-ping; do
  command -v "${c%%:*}" >/dev/null || need="$need ${c#*:}"
done
[ -x /usr/bin/python3 ] || need="$need python3"
if [ -n "$need" ]; then
  echo "installing:$need"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
command -v cargo >/dev/null || { echo "demo.sh: cargo not found; install Rust with rustup" >&2; exit 1; }
echo "building beckon (release)…"
(cd "$ROOT" && cargo build --release --quiet)
BECKON=$ROOT/target/release/beckon

say "2/6 lab: two sites, same camera IP 198.18.1.10, each behind a Linux NAT (UDP timeouts 5 s)"
"$ROOT/scripts/lab/lab.sh" up "$PREFIX" --udp-timeout 5
nsx() { local ns=$1; shift; ip netns exec "$PREFIX-$ns" "$@"; }

cat >"$WORK/server.toml" <<EOT
control_listen = "203.0.113.1:7443"
public_ip      = "203.0.113.100"
wan_interface  = "eth0"
state_dir      = "$WORK/state"
keepalive_secs = 2
[[site]]
name = "site-a"
token = "demo-token-a-5f1c9e"
[[site]]
name = "site-b"
token = "demo-token-b-77ad20"
[[expose]]
camera = "site-a/cam1"
port = 5060
proto = "udp"
listen = "127.0.0.1:15060"
[[expose]]
camera = "site-b/cam1"
port = 5060
proto = "udp"
listen = "127.0.0.1:15061"
EOT
for s in a b; do
  tok=$([ $s = a ] && echo demo-token-a-5f1c9e || echo demo-token-b-77ad20)
  cat >"$WORK/trigger-$s.toml" <<EOT
server = "203.0.113.1:7443"
ca     = "$WORK/state/ca.pem"
site   = "site-$s"
token  = "$tok"
[[camera]]
name = "cam1"
ip = "198.18.1.10"
device_type = "gb28181"
EOT
done

say "3/6 server on 203.0.113.1 (public_ip 203.0.113.100 served by its own TUN + smoltcp stack)"
t0=$(date +%s.%N)
# (ip netns exec execs beckon, so $! is beckon's own PID)
ip netns exec "$PREFIX-srv" "$BECKON" server --config "$WORK/server.toml" 2>"$WORK/server.log" & PIDS+=($!)
for _ in $(seq 1 50); do nsx srv "$BECKON" status >/dev/null 2>&1 && break; sleep 0.1; done
for s in a b; do
  ip netns exec "$PREFIX-trg-$s" "$BECKON" trigger --config "$WORK/trigger-$s.toml" 2>"$WORK/trigger-$s.log" & PIDS+=($!)
done
for _ in $(seq 1 100); do
  [ "$(nsx srv "$BECKON" status --json | grep -o '"connected":true' | wc -l)" = 2 ] && break; sleep 0.1
done
awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "triggers registered and cameras reported %.2f s after the server started\n", b - a }'
grep -h -E "trigger registered|camera reported" "$WORK/server.log" | sed 's/^[^ ]* */  /'

say "4/6 a platform client (SIP OPTIONS over UDP) reaches both cameras through beckon"
cat >"$WORK/client.py" <<'EOT'
import socket, sys, time
def options(n):
    return (f"OPTIONS sip:cam SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK{n}\r\n"
            f"From: <sip:vms@platform>;tag=1\r\nTo: <sip:cam>\r\nCall-ID: demo-{n}\r\nCSeq: {n} OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode()
socks = {p: socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for p in (15060, 15061)}
for s in socks.values(): s.settimeout(2)
def ask(port, n, quiet=False):
    t = time.time(); socks[port].sendto(options(n), ("127.0.0.1", port))
    try:
        d, _ = socks[port].recvfrom(4096)
    except socket.timeout:
        print(f"  127.0.0.1:{port}: no answer"); return False
    lines = d.decode(errors="replace").split("\r\n")
    server = [l[8:] for l in lines if l.startswith("Server:")] or ["?"]
    if not quiet:
        print(f"  127.0.0.1:{port} -> {lines[0]} from {server[0]} in {(time.time()-t)*1000:.1f} ms")
    return True
work = sys.argv[1]
for p in (15060, 15061): ask(p, 1); ask(p, 2)
open(f"{work}/phase1", "w").close()
for _ in range(600):                      # wait (bounded) for the shell to kill a trigger
    try: open(f"{work}/go").close(); break
    except FileNotFoundError: time.sleep(0.1)
ok = sum(ask(p, 100 + i, quiet=True) for i in range(100) for p in (15060, 15061))
print(f"  same two clients, same mappings: {ok} of 200 requests answered")
for p in (15060, 15061): ask(p, 999)
EOT
ip netns exec "$PREFIX-srv" /usr/bin/python3 -u "$WORK/client.py" "$WORK" & CLIENT=$!
for _ in $(seq 1 100); do [ -e "$WORK/phase1" ] && break; sleep 0.1; done
nsx srv "$BECKON" status

say "5/6 kill site-a's trigger; its camera keeps answering over the learned mapping"
kill "${PIDS[1]}"; wait "${PIDS[1]}" 2>/dev/null || true
echo "  trigger of site-a stopped; waiting 12 s (> 2x the NATs' 5 s UDP timeout; server keepalives hold the mappings)"
sleep 12
touch "$WORK/go"
wait "$CLIENT"

say "6/6 summary"
nsx srv "$BECKON" status --json >"$WORK/status.json"
/usr/bin/python3 - "$WORK/status.json" <<'EOT'
import json, sys
s = json.load(open(sys.argv[1])); c = s["counters"]
for site in s["sites"]:
    print(f"  {site['name']}: trigger {'connected' if site['connected'] else 'offline'} (last seen from {site['trigger_public']})")
for m in s["mappings"]:
    print(f"  {m['camera']} {m['service']} <- NAT mapping {m['public_endpoint']} via {m['reached_by']}: "
          f"{m['indications']} trigger packet(s), {m['datagrams_to_camera']}/{m['datagrams_from_camera']} datagrams direct, "
          f"keepalives {m['keepalives_sent']} sent / {m['keepalives_answered']} answered")
direct = c["bytes_direct_to_cameras"] + c["bytes_direct_from_cameras"]
print(f"  triggers injected {c['trigger_packets_injected']} packets ({c['bytes_injected_by_triggers']} bytes); "
      f"server and cameras exchanged {direct} bytes directly")
EOT
echo
echo "demo done; cleaning up (namespaces bk-demo-*)"
