#!/usr/bin/env bash
# beckon demo: two camera sites whose LANs use the SAME subnet and camera IP (198.18.1.10), each
# behind its own strict Linux NAT router (nftables masquerade + conntrack, `ct state invalid drop`;
# site b with `random,fully-random` ports), a trigger on each LAN, a server on the "internet".
# Unchanged clients on the server host (curl, ffmpeg, a SIP client) reach both cameras through
# beckon; then both triggers are killed, one after the other, and the live streams go on: the
# triggers only sent a few packets per connection.
#   sudo ./scripts/demo.sh            (snapshots are left in ./beckon-demo/)
# Everything runs in network namespaces named bk-demo-*; all of it is removed on exit or Ctrl-C.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=bk-demo
WORK=$(mktemp -d /tmp/beckon-demo.XXXXXX)
OUT=${BECKON_DEMO_OUT:-$PWD/beckon-demo}
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
for c in nft:nftables conntrack:conntrack ip:iproute2 ping:iputils-ping curl:curl ffmpeg:ffmpeg; do
  command -v "${c%%:*}" >/dev/null || need="$need ${c#*:}"
done
/usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0")' 2>/dev/null \
  || need="$need python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly"
if [ -n "$need" ]; then
  echo "installing:$need"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
command -v cargo >/dev/null || { echo "demo.sh: cargo not found; install Rust with rustup" >&2; exit 1; }
echo "building beckon (release)…"
(cd "$ROOT" && cargo build --release --quiet)
BECKON=$ROOT/target/release/beckon

say "2/6 lab: two sites, same camera IP 198.18.1.10, each behind a strict Linux NAT; RTSP + web cameras; a WAN with delay"
"$ROOT/scripts/lab/lab.sh" up "$PREFIX" --mode-a invdrop --mode-b random-invdrop --rtsp --delay-ms 10
nsx() { local ns=$1; shift; ip netns exec "$PREFIX-$ns" "$@"; }
WAN_RTT=$(nsx srv ping -c 3 -i 0.2 -q 203.0.113.2 | awk -F/ '/^rtt/ { printf "%.0f", $5 }')
export WAN_RTT
echo "WAN: 10 ms each way between the server and the site routers (ping server -> site a's router: ${WAN_RTT} ms)"
status_json() { nsx srv "$BECKON" status --json; }
cat >"$WORK/show.py" <<'EOT'
# Renders parts of `beckon status --json` (stdin) for the demo.
import json, os, re, sys
s = json.load(sys.stdin)
what = sys.argv[1]
if what == "ready":
    print(sum(1 for x in s["sites"] if x["profile"]))
elif what == "profiles":
    for x in s["sites"]:
        p = x["profile"]
        u = p.get("udp") or {}
        print("  %s: %s" % (x["name"], p["summary"]))
        for r in p["tcp"]:
            print("      %-20s %s  (%s)" % (r["strategy"], "works" if r["works"] else "fails", r["detail"]))
        print("      udp: port preserved %s, mapping %s, filtering %s" % (u.get("port_preserved"), u.get("mapping"), u.get("filtering")))
elif what == "connections":
    for c in s["connections"]:
        if c["path"] == "direct":
            via = "direct via %s%s, NAT mapping %s" % (c.get("strategy") or "?", "/" + c["steering"] if c.get("steering") else "",
                                                     c.get("public_endpoint") or "?")
        else:  # assisted (the trigger carries the bytes) or still connecting
            via = c["path"]
        print("  %s %s: %s, setup %s ms (%s WAN round trips), %s trigger packets, %s bytes so far"
              % (c["camera"], c["service"], via, c.get("setup_ms"), c.get("round_trips"), c.get("trigger_packets"), c.get("bytes_from_camera")))
elif what == "summary":
    c = s["counters"]
    # Every TCP connection of the run, from the server's log lines "direct TCP connection up"
    # and "assisted TCP connection up" (key=value fields of tracing's format).
    ups = {}
    for line in open(sys.argv[2], errors="replace"):
        m = re.search(r"(direct|assisted) TCP connection up", line)
        if m:
            f = {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', line)}
            ups.setdefault(f.get("camera", "?"), []).append((m.group(1), f))
    for x in s["sites"]:
        p = x["profile"] or {}
        print("  %s: trigger %s, last seen from %s; profile's direct strategy: %s"
              % (x["name"], "connected" if x["connected"] else "offline", x["trigger_public"], p.get("direct_strategy")))
        for cam, conns in sorted(ups.items()):
            if not cam.startswith(x["name"] + "/"):
                continue
            setup = sorted(int(f.get("setup_ms", "0")) for _, f in conns)
            trips = sorted(int(f.get("round_trips", "0")) for _, f in conns)
            strategies = sorted({f.get("strategy", path) for path, f in conns})
            mappings = sorted({f["public"] for path, f in conns if f.get("public", "-") != "-"})
            print("    %s: %d TCP connections (%s); setup %d-%d ms (median %d) from the client's connect until the camera"
                  " connection was up; WAN round trip %s ms, %d-%d of them waited for (the rest timed)"
                  % (cam, len(conns), ", ".join(strategies), setup[0], setup[-1], setup[len(setup) // 2],
                     os.environ.get("WAN_RTT", "?"), trips[0], trips[-1]))
            print("      NAT mappings learned from the cameras' answers: %s" % ", ".join(mappings or ["none"]))
    delivered = c["tcp_bytes_direct"] + c["tcp_bytes_assisted"]
    print("  TCP connections: %d direct, %d trigger-assisted, %d failed" % (c["tcp_connections_direct"], c["tcp_connections_assisted"], c["tcp_connections_failed"]))
    print("  bytes delivered: %d (%d direct); bytes the triggers carried: %d" % (delivered, c["tcp_bytes_direct"], c["tcp_bytes_assisted"]))
    print("  UDP mappings learned: %d; trigger packets injected: %d (%d bytes, NAT profiles included)"
          % (c["mappings_learned"], c["trigger_packets_injected"], c["bytes_injected_by_triggers"]))
EOT
show() { status_json | /usr/bin/python3 "$WORK/show.py" "$1" "$WORK/server.log"; }

cat >"$WORK/server.toml" <<EOT
control_listen = "203.0.113.1:7443"
public_ip      = "203.0.113.100"
wan_interface  = "eth0"
state_dir      = "$WORK/state"
keepalive_secs = 5
[[site]]
name = "site-a"
token = "demo-token-a-5f1c9e"
[[site]]
name = "site-b"
token = "demo-token-b-77ad20"
[[expose]]
camera = "site-a/cam1"
port = 554
proto = "tcp"
listen = "127.0.0.1:15541"
[[expose]]
camera = "site-b/cam1"
port = 554
proto = "tcp"
listen = "127.0.0.1:15542"
[[expose]]
camera = "site-a/cam1"
port = 80
proto = "tcp"
listen = "127.0.0.1:18081"
[[expose]]
camera = "site-b/cam1"
port = 80
proto = "tcp"
listen = "127.0.0.1:18082"
[[expose]]
camera = "site-a/cam1"
port = 5060
proto = "udp"
listen = "127.0.0.1:15061"
[[expose]]
camera = "site-b/cam1"
port = 5060
proto = "udp"
listen = "127.0.0.1:15062"
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
device_type = "hikvision"
ports = ["udp/5060"]
EOT
done

say "3/6 server on 203.0.113.1 (public_ip 203.0.113.100 served by its own TUN + userspace TCP/IP), triggers on both LANs"
t0=$(date +%s.%N)
# (ip netns exec execs beckon, so $! is beckon's own PID)
ip netns exec "$PREFIX-srv" "$BECKON" server --config "$WORK/server.toml" 2>"$WORK/server.log" & PIDS+=($!)
for _ in $(seq 1 50); do nsx srv "$BECKON" status >/dev/null 2>&1 && break; sleep 0.1; done
ip netns exec "$PREFIX-trg-a" "$BECKON" trigger --config "$WORK/trigger-a.toml" 2>"$WORK/trigger-a.log" & PIDS+=($!); TRG_A=$!
ip netns exec "$PREFIX-trg-b" "$BECKON" trigger --config "$WORK/trigger-b.toml" 2>"$WORK/trigger-b.log" & PIDS+=($!); TRG_B=$!
for _ in $(seq 1 300); do
  [ "$(show ready 2>/dev/null)" = 2 ] && break; sleep 0.1
done
awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "triggers registered, cameras reported and both NATs profiled %.1f s after the server started\n", b - a }'
grep -h -E "trigger registered|camera reported" "$WORK/server.log" | sed -e 's/^[^ ]* *INFO [^ ]* /  /'
show profiles

say "4/6 each camera's web page and SIP service through beckon (curl, a UDP client on the server host)"
for p in 18081 18082; do
  body=$(nsx srv curl -s -m 10 "http://127.0.0.1:$p/")
  printf '  127.0.0.1:%s -> %s; the camera saw its peer as %s\n' "$p" \
    "$(echo "$body" | grep -o '<h1>[^<]*</h1>' | sed 's/<[^>]*>//g')" "$(echo "$body" | grep -o 'you are [0-9.:]*' | cut -d' ' -f3)"
done
echo "  (203.0.113.100 = the server's public IP: the connection crossed the NAT directly, not via the trigger)"
echo "  SIP OPTIONS over UDP (the patent's signalling form):"
for p in 15061 15062; do
  ans=$(nsx srv /usr/bin/python3 - "$p" <<'EOT'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
s.sendto(b"OPTIONS sip:cam SIP/2.0\r\nCall-ID: demo-1\r\nCSeq: 1 OPTIONS\r\n\r\n", ("127.0.0.1", int(sys.argv[1])))
try: print(s.recv(2048).split(b"\r\n")[0].decode())
except socket.timeout: print("no answer")
EOT
)
  echo "  127.0.0.1:$p -> $ans"
done


say "5/6 a snapshot from each RTSP camera (ffmpeg, H.264 over RTSP/TCP)"
mkdir -p "$OUT"
for s in a b; do
  p=$([ $s = a ] && echo 15541 || echo 15542)
  nsx srv ffmpeg -nostdin -loglevel error -rtsp_transport tcp -i "rtsp://127.0.0.1:$p/stream" -frames:v 1 -y "$OUT/snapshot-site-$s.png"
  echo "  $OUT/snapshot-site-$s.png ($(stat -c %s "$OUT/snapshot-site-$s.png") bytes)"
done

say "6/6 live streams from both sites; site a's trigger is killed 4 s in, site b's 7 s in"
for p in 15541 15542; do
  # (bounded: a stream that stalled would otherwise keep ffmpeg waiting)
  ip netns exec "$PREFIX-srv" timeout 40 ffmpeg -nostdin -rtsp_transport tcp -i "rtsp://127.0.0.1:$p/stream" -t 12 -f null \
    -progress "$WORK/progress-$p.txt" - >"$WORK/ff-$p.log" 2>&1 &
  eval "FF_$p=\$!"
done
# Frames ffmpeg has decoded so far (its -progress file, updated every 0.5 s).
frames() { { grep -o '^frame=[0-9]*' "$WORK/progress-$1.txt" 2>/dev/null || echo frame=0; } | tail -1 | cut -d= -f2; }
sleep 4
show connections
kill "$TRG_A"
KILLED_15541=$(frames 15541)
echo "  site-a's trigger killed (its stream had $KILLED_15541 frames)"
sleep 3
kill "$TRG_B"
KILLED_15542=$(frames 15542)
echo "  site-b's trigger killed (its stream had $KILLED_15542 frames)"
FF_OK=1
for p in 15541 15542; do
  site=$([ $p = 15541 ] && echo a || echo b)
  eval "pid=\$FF_$p killed=\$KILLED_$p"
  rc=0; wait "$pid" || rc=$?
  total=$(frames $p)
  echo "  site-$site: $total frames decoded in 12 s of stream (25 fps camera), $((total - killed)) of them after its trigger was killed; ffmpeg exit $rc"
  # 12 s at 25 fps is 301 frames: the stream must have run to its end after its trigger died.
  if [ "$rc" != 0 ] || [ "$total" -lt 290 ] || [ "$total" -le "$killed" ]; then FF_OK=0; fi
done

say "summary"
show summary
echo
if [ "$FF_OK" != 1 ]; then
  echo "demo FAILED: a stream stopped after its trigger was killed (see above); server log:" >&2
  tail -20 "$WORK/server.log" >&2
  exit 1
fi
echo "demo done; cleaning up (namespaces $PREFIX-*); snapshots stay in $OUT"
