#!/bin/bash
# lab.sh - the beckon network-namespace lab: a server on the "internet" and two camera
# LANs (same subnet on both) behind real Linux NAT routers (nftables masquerade + conntrack).
# Everything lives in network namespaces named PREFIX-*; nothing is configured in the root
# namespace. See README.md next to this file for the topology.
#
#   lab.sh up PREFIX [--mode-a MODE] [--mode-b MODE] [--liberal-a] [--liberal-b]
#                    [--udp-timeout SECS] [--delay-ms MS] [--loss PCT] [--rtsp]
#                    [--dnat-a PORT:[trigger:]HOSTPORT]... [--dnat-b PORT:[trigger:]HOSTPORT]...
#   lab.sh down PREFIX
#   lab.sh router PREFIX SITE MODE        MODE: plain | invdrop | random | random-invdrop
#   lab.sh delay PREFIX MS                change the WAN delay of a running lab (0 = no relay)
#   lab.sh liberal PREFIX SITE 0|1        nf_conntrack_tcp_be_liberal of PREFIX-nat-SITE, at runtime
#   lab.sh flush PREFIX SITE              conntrack -F in PREFIX-nat-SITE
#   lab.sh counters PREFIX SITE           forward counters + conntrack -L of PREFIX-nat-SITE
#   lab.sh status PREFIX                  namespaces and background processes of a lab
#
# PREFIX must start with "bk-" (e.g. bk-t1). Must run as root.
# BK_CAMERA_CC (environment): the TCP congestion control the cameras' web services send with
# (default cubic, Linux's default and camera firmware's; the host's own may be another).
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=/usr/bin/python3
RUN_BASE=${BECKON_LAB_RUN:-/tmp/beckon-lab}
NETNS_DIR=/var/run/netns
SITES="a b"

SRV_IP=203.0.113.1
NAT_IP_a=203.0.113.2
NAT_IP_b=203.0.113.3
WAN_LEN=24
GW_IP=198.18.1.1
CAM_IP=198.18.1.10
TRG_IP=198.18.1.20
LAN_LEN=24
CAM_UDP_PORT=5060
CAM_HTTP_PORT=80
CAM_RTSP_PORT=554

say() { echo "lab: $*"; }
warn() { echo "lab: $*" >&2; }
die() { echo "lab: error: $*" >&2; exit 1; }

usage() {
  sed -n '7,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

check_prefix() {
  [[ ${1:-} =~ ^bk-[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$ ]] \
    || die "PREFIX must look like bk-NAME (letters, digits, _ . -), got '${1:-}'"
}
check_site() { [[ ${1:-} == a || ${1:-} == b ]] || die "SITE must be a or b, got '${1:-}'"; }
check_mode() {
  case ${1:-} in plain | invdrop | random | random-invdrop) ;;
    *) die "MODE must be plain, invdrop, random or random-invdrop, got '${1:-}'" ;;
  esac
}
# PORT:CAMPORT (to the camera) or PORT:trigger:TRGPORT (to the trigger host), ports 1-65535
check_dnat() {
  [[ ${1:-} =~ ^([1-9][0-9]{0,4}):(trigger:)?([1-9][0-9]{0,4})$ ]] \
    && [ "${BASH_REMATCH[1]}" -le 65535 ] && [ "${BASH_REMATCH[3]}" -le 65535 ] \
    || die "--dnat-SITE wants PORT:CAMPORT or PORT:trigger:TRGPORT (1-65535 each), got '${1:-}'"
}
check_dnat_unique() {
  local f seen=" "
  for f in $1; do
    case $seen in *" ${f%%:*} "*) die "--dnat: port ${f%%:*} forwarded twice on one site" ;; esac
    seen="$seen${f%%:*} "
  done
}
need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

# All namespaces of a lab, in creation order.
lab_ns() {
  local p=$1 s
  echo "$p-wan $p-srv"
  for s in $SITES; do echo "$p-lan-$s $p-nat-$s $p-cam-$s $p-trg-$s"; done
}
ns_exists() { [ -e "$NETNS_DIR/$1" ]; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# ---------------------------------------------------------------- background processes
# pidfile NAME.pid holds the pid; NAME.start the process start time (field 22 of
# /proc/PID/stat) so a recycled pid is never killed by mistake.
proc_start() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  echo "${20}"
}

# bg_start RUN NAME NS CMD... : run CMD in namespace NS, detached, log to RUN/NAME.log
bg_start() {
  local run=$1 name=$2 ns=$3 pid
  shift 3
  # ip netns exec and setsid both exec (no fork) here, so $! is CMD's pid.
  ip netns exec "$ns" setsid "$@" </dev/null >>"$run/$name.log" 2>&1 &
  pid=$!
  echo "$pid" >"$run/$name.pid"
  proc_start "$pid" >"$run/$name.start" 2>/dev/null || true
}

# pid_ours RUN NAME : print the recorded pid if that process is still the one we started
pid_ours() {
  local run=$1 name=$2 pid st
  [ -f "$run/$name.pid" ] || return 1
  pid=$(cat "$run/$name.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  if [ -s "$run/$name.start" ]; then
    st=$(proc_start "$pid") || return 1
    [ "$st" = "$(cat "$run/$name.start")" ] || return 1
  fi
  echo "$pid"
}

# alive PID : the process exists and is not a zombie
alive() {
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ "${st:0:1}" != Z ]
}

# kill_pids PID... : SIGTERM, wait up to 2 s, then SIGKILL what is left
kill_pids() {
  local pid i left
  [ $# -gt 0 ] || return 0
  kill "$@" 2>/dev/null || true
  for i in $(seq 1 20); do
    left=""
    for pid in "$@"; do alive "$pid" && left="$left $pid"; done
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  # shellcheck disable=SC2086
  kill -9 $left 2>/dev/null || true
}

# ---------------------------------------------------------------- router configuration
# router_apply NS MODE [DNATS] : (re)install the router's nftables tables atomically.
#   plain          : nat postrouting  oifname "wan0" masquerade
#   invdrop        : + filter forward "ct state invalid drop" (what OpenWrt fw4 does)
#   random         : masquerade random,fully-random
#   random-invdrop : both
# DNATS ("PORT:CAMPORT ..."): static port-forwards in chain prerouting of ip bk_nat.
# The forward chain always counts packets per ct state. Conntrack entries are kept
# (use "lab.sh flush" to drop them).
router_apply() {
  local ns=$1 mode=$2 dnats=${3:-} masq="masquerade" inv="" fwd rules=""
  case $mode in *random*) masq="masquerade random,fully-random" ;; esac
  case $mode in *invdrop*) inv="drop" ;; esac
  # static port-forwards (--dnat-SITE PORT:CAMPORT): wan0:PORT -> camera:CAMPORT, TCP and UDP
  # (PORT:trigger:TRGPORT: to the trigger host instead; the bench's relay references use it)
  local host
  for fwd in $dnats; do
    host=$CAM_IP
    case $fwd in *:trigger:*) host=$TRG_IP ;; esac
    rules="$rules    iifname \"wan0\" meta l4proto { tcp, udp } th dport ${fwd%%:*} counter dnat to $host:${fwd##*:} comment \"dnat $fwd\"
"
  done
  nsx "$ns" nft -f - <<EOF
add table ip bk_nat
delete table ip bk_nat
add table inet bk_filter
delete table inet bk_filter
table ip bk_nat {
  comment "mode $mode"
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
$rules  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" counter $masq comment "masquerade"
  }
}
table inet bk_filter {
  chain forward {
    type filter hook forward priority filter; policy accept;
    ct state invalid counter $inv comment "ct-invalid"
    ct state new counter comment "ct-new"
    ct state established counter comment "ct-established"
    ct state related counter comment "ct-related"
  }
}
EOF
}

# ---------------------------------------------------------------- WAN delay relay
# The kernel of the lab host has no sch_netem (and no fq qdisc / nft queue), so the WAN
# delay is a small userspace L2 relay in PREFIX-wan: the server hangs off bridge br1, the
# routers off br0, and this relay copies frames between tap0 (in br0) and tap1 (in br1)
# after the configured delay (FIFO per direction, so no reordering).
write_relay() {
  cat >"$1" <<'PYEOF'
#!/usr/bin/python3
"""L2 delay relay between two persistent TAP devices (beckon lab, stdlib only)."""
import collections, fcntl, os, select, signal, struct, sys, time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
LIMIT = 50000  # frames in flight per direction (like netem's limit)

def open_tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd

def main():
    tap_a, tap_b, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    delay = delay_ms / 1000.0
    fa, fb = open_tap(tap_a), open_tap(tap_b)
    peer = {fa: fb, fb: fa}
    queue = {fa: collections.deque(), fb: collections.deque()}
    stats = {"fwd": 0, "drop": 0}

    def stop(signum, _frame):
        print(f"{time.time():.6f} relay stop: forwarded {stats['fwd']} dropped {stats['drop']}", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{time.time():.6f} relay ready {tap_a}<->{tap_b} delay {delay_ms} ms", flush=True)

    poll = select.poll()
    poll.register(fa, select.POLLIN)
    poll.register(fb, select.POLLIN)
    mono = time.monotonic
    while True:
        now = mono()
        nxt = None
        for src, dq in queue.items():
            dst = peer[src]
            while dq and dq[0][0] <= now:
                try:
                    os.write(dst, dq.popleft()[1])
                    stats["fwd"] += 1
                except OSError:
                    stats["drop"] += 1
            if dq and (nxt is None or dq[0][0] < nxt):
                nxt = dq[0][0]
        timeout = 1000 if nxt is None else max(0.0, (nxt - now) * 1000.0)
        for fd, _ev in poll.poll(timeout):
            dq = queue[fd]
            t = mono() + delay
            for _ in range(512):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if len(dq) < LIMIT:
                    dq.append((t, frame))
                else:
                    stats["drop"] += 1

if __name__ == "__main__":
    main()
PYEOF
}

# relay_links PREFIX : the second bridge br1 and the relay's taps (tap0 in br0, tap1 in br1)
relay_links() {
  local w="$1-wan"
  ip -n "$w" link add br1 type bridge stp_state 0
  ip -n "$w" link set br1 up
  ip -n "$w" tuntap add dev tap0 mode tap
  ip -n "$w" tuntap add dev tap1 mode tap
  ip -n "$w" link set tap0 txqueuelen 10000 master br0 up
  ip -n "$w" link set tap1 txqueuelen 10000 master br1 up
}

# relay_start PREFIX MS : start the delay relay (pidfile wan-delay) and wait until it is ready
relay_start() {
  local p=$1 ms=$2 run="$RUN_BASE/$1" n
  write_relay "$run/wan_delay.py"
  n=$(grep -c "relay ready" "$run/wan-delay.log" 2>/dev/null) || n=0
  bg_start "$run" wan-delay "$p-wan" "$PY" "$run/wan_delay.py" tap0 tap1 "$ms"
  wait_until 50 relay_ready "$run/wan-delay.log" "$n" \
    || die "WAN delay relay did not start: $(tail -3 "$run/wan-delay.log" 2>/dev/null)"
}
relay_ready() { [ "$(grep -c "relay ready" "$1" 2>/dev/null)" -gt "$2" ]; }

# ---------------------------------------------------------------- delay (running lab)
# cmd_delay PREFIX MS : MS > 0: (re)start the relay with MS and hang the server's port on br1
# behind it; MS = 0: stop the relay and put the server's port back on br0 (no relay in the
# path, full veth speed). Established connections survive (a short pause while the port moves).
cmd_delay() {
  local p=$1 ms=$2 run="$RUN_BASE/$1" w="$1-wan" pid
  [[ $ms =~ ^[0-9]+$ ]] || die "delay wants whole milliseconds, got '$ms'"
  ns_exists "$w" && [ -f "$run/lab.env" ] || die "lab $p is not up"
  if pid=$(pid_ours "$run" wan-delay); then kill_pids "$pid"; fi
  rm -f "$run/wan-delay.pid" "$run/wan-delay.start"
  if [ "$ms" = 0 ]; then
    ip -n "$w" link set p-srv master br0
  else
    ip -n "$w" link show br1 >/dev/null 2>&1 || relay_links "$p"
    relay_start "$p" "$ms"
    ip -n "$w" link set p-srv master br1
  fi
  sed -i "s/^DELAY_MS=.*/DELAY_MS=$ms/" "$run/lab.env"
  say "delay $p: ${ms} ms one way"
}

# ---------------------------------------------------------------- down
do_down() {
  local p=$1 run="$RUN_BASE/$1" f name pid ns pids="" alive
  set +e
  # 1. processes we recorded
  if [ -d "$run" ]; then
    for f in "$run"/*.pid; do
      [ -f "$f" ] || continue
      name=$(basename "$f" .pid)
      pid=$(pid_ours "$run" "$name") && pids="$pids $pid"
    done
    # shellcheck disable=SC2086
    kill_pids $pids
  fi
  # 2. anything else still running inside the lab's namespaces
  pids=""
  for ns in $(lab_ns "$p"); do
    ns_exists "$ns" || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      [ "$pid" = "$$" ] || [ "$pid" = "${BASHPID:-$$}" ] || pids="$pids $pid"
    done
  done
  if [ -n "$pids" ]; then
    say "stopping processes left in $p namespaces:$pids"
    # shellcheck disable=SC2086
    kill_pids $pids
  fi
  # 3. the namespaces (their veths, bridges, taps go with them)
  alive=0
  for ns in $(lab_ns "$p"); do
    ns_exists "$ns" || continue
    ip netns del "$ns" 2>/dev/null || { warn "could not delete namespace $ns"; alive=1; }
  done
  rm -rf -- "${run:?}"
  [ "$alive" = 0 ] && say "down $p"
  return 0
}

# ---------------------------------------------------------------- up
UP_PREFIX=""
UP_DONE=0
on_up_exit() {
  local rc=$?
  if [ -n "$UP_PREFIX" ] && [ "$UP_DONE" != 1 ]; then
    trap - ERR
    warn "up $UP_PREFIX failed (exit $rc); tearing down what was built"
    do_down "$UP_PREFIX" >&2
    [ "$rc" = 0 ] && rc=1
  fi
  exit "$rc"
}

# wait_until TRIES CMD... : run CMD every 0.1 s until it succeeds, at most TRIES times
wait_until() {
  local n=$1 i
  shift
  for i in $(seq 1 "$n"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
ns_listens() { [ -n "$(ip netns exec "$1" ss -Hln "$2" "sport = :$3" 2>/dev/null)" ]; }
svc_ready() { # NS RTSP(0|1)
  ns_listens "$1" -u "$CAM_UDP_PORT" && ns_listens "$1" -t "$CAM_HTTP_PORT" \
    && { [ "$2" != 1 ] || ns_listens "$1" -t "$CAM_RTSP_PORT"; }
}
# ping_ok NS DST TRIES WAIT : at least one echo reply within TRIES single pings
ping_ok() {
  local i
  for i in $(seq 1 "$3"); do
    ip netns exec "$1" ping -n -q -c1 -W"$4" "$2" >/dev/null 2>&1 && return 0
  done
  return 1
}

cmd_up() {
  local p=$1
  shift
  local mode_a=invdrop mode_b=invdrop lib_a=0 lib_b=0 udp_to="" delay=0 loss=0 rtsp=0
  local dnat_a="" dnat_b=""
  while [ $# -gt 0 ]; do
    case $1 in
      --mode-a) mode_a=${2:-}; shift 2 || die "--mode-a needs a value" ;;
      --mode-b) mode_b=${2:-}; shift 2 || die "--mode-b needs a value" ;;
      --liberal-a) lib_a=1; shift ;;
      --liberal-b) lib_b=1; shift ;;
      --udp-timeout) udp_to=${2:-}; shift 2 || die "--udp-timeout needs a value" ;;
      --delay-ms) delay=${2:-}; shift 2 || die "--delay-ms needs a value" ;;
      --loss) loss=${2:-}; shift 2 || die "--loss needs a value" ;;
      --rtsp) rtsp=1; shift ;;
      --dnat-a) check_dnat "${2:-}"; dnat_a="${dnat_a:+$dnat_a }$2"; shift 2 ;;
      --dnat-b) check_dnat "${2:-}"; dnat_b="${dnat_b:+$dnat_b }$2"; shift 2 ;;
      *) die "unknown option '$1' (see lab.sh without arguments)" ;;
    esac
  done
  check_mode "$mode_a"
  check_mode "$mode_b"
  check_dnat_unique "$dnat_a"
  check_dnat_unique "$dnat_b"
  [ -z "$udp_to" ] || [[ $udp_to =~ ^[1-9][0-9]*$ ]] || die "--udp-timeout wants whole seconds > 0"
  [[ $delay =~ ^[0-9]+$ ]] || die "--delay-ms wants whole milliseconds"
  [[ $loss =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v l="$loss" 'BEGIN{exit !(l <= 100)}' \
    || die "--loss wants a percentage 0..100"
  local loss_n
  loss_n=$(awk -v l="$loss" 'BEGIN{printf "%d", l * 100 + 0.5}')   # per 10000
  local t
  for t in ip nft conntrack ss ping setsid "$PY"; do
    command -v "$t" >/dev/null || die "missing tool: $t"
  done
  [ "$delay" = 0 ] || [ -c /dev/net/tun ] || die "--delay-ms needs /dev/net/tun"
  if [ "$rtsp" = 1 ]; then
    # also warms GStreamer's plugin registry cache before the cameras start
    "$PY" "$HERE/cam_rtsp.py" --check >/dev/null \
      || die "--rtsp needs python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-{base,good,ugly}"
  fi

  local ns s run="$RUN_BASE/$p" stale=0
  for ns in $(lab_ns "$p"); do ns_exists "$ns" && stale=1; done
  if [ "$stale" = 1 ] || [ -d "$run" ]; then
    say "stale lab $p found, tearing it down first"
    do_down "$p"
    set -e
  fi

  UP_PREFIX=$p
  trap on_up_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'warn "command failed (line $LINENO): $BASH_COMMAND"' ERR

  mkdir -p "$run"
  say "up $p: mode-a=$mode_a mode-b=$mode_b liberal-a=$lib_a liberal-b=$lib_b" \
    "udp-timeout=${udp_to:-default} delay-ms=$delay loss=$loss% rtsp=$rtsp" \
    "dnat-a=${dnat_a:-none} dnat-b=${dnat_b:-none}"
  cat >"$run/lab.env" <<EOF
PREFIX=$p
MODE_A=$mode_a
MODE_B=$mode_b
LIBERAL_A=$lib_a
LIBERAL_B=$lib_b
UDP_TIMEOUT=$udp_to
DELAY_MS=$delay
LOSS_PCT=$loss
RTSP=$rtsp
DNAT_A="$dnat_a"
DNAT_B="$dnat_b"
EOF

  # namespaces: lo up, IPv6 off
  for ns in $(lab_ns "$p"); do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    nsx "$ns" sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  done

  # switches: a bridge in PREFIX-wan and in each PREFIX-lan-s; br_netfilter off there
  local sw
  for sw in "$p-wan" "$p-lan-a" "$p-lan-b"; do
    ip -n "$sw" link add br0 type bridge stp_state 0
    ip -n "$sw" link set br0 up
    nsx "$sw" sysctl -q -w net.bridge.bridge-nf-call-iptables=0 \
      net.bridge.bridge-nf-call-arptables=0 net.bridge.bridge-nf-call-ip6tables=0 2>/dev/null || true
  done
  # veth pair created directly between two namespaces (never in the root namespace)
  vlink() { ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"; }
  local srv_sw=br0
  if [ "$delay" != 0 ]; then
    srv_sw=br1
    relay_links "$p"
  fi
  vlink "$p-wan" p-srv "$p-srv" eth0
  ip -n "$p-wan" link set p-srv master "$srv_sw" up
  for s in $SITES; do
    vlink "$p-wan" "p-nat-$s" "$p-nat-$s" wan0
    ip -n "$p-wan" link set "p-nat-$s" master br0 up
    vlink "$p-lan-$s" p-cam "$p-cam-$s" eth0
    vlink "$p-lan-$s" p-trg "$p-trg-$s" eth0
    vlink "$p-lan-$s" p-nat "$p-nat-$s" lan0
    for t in p-cam p-trg p-nat; do ip -n "$p-lan-$s" link set "$t" master br0 up; done
  done

  # server: only the on-link public /24 (no default route, no route to 198.18.0.0/15)
  ip -n "$p-srv" addr add "$SRV_IP/$WAN_LEN" dev eth0
  ip -n "$p-srv" link set eth0 up

  # sites (identical LAN addressing on purpose)
  local nat_ip mode lib dnats
  for s in $SITES; do
    eval "nat_ip=\$NAT_IP_$s mode=\$mode_$s lib=\$lib_$s dnats=\$dnat_$s"
    ip -n "$p-nat-$s" addr add "$GW_IP/$LAN_LEN" dev lan0
    ip -n "$p-nat-$s" addr add "$nat_ip/$WAN_LEN" dev wan0
    ip -n "$p-nat-$s" link set lan0 up
    ip -n "$p-nat-$s" link set wan0 up
    nsx "$p-nat-$s" sysctl -q -w net.ipv4.ip_forward=1
    router_apply "$p-nat-$s" "$mode" "$dnats"
    # conntrack sysctls are per namespace; set them after the ct rules are loaded
    if [ -n "$udp_to" ]; then
      nsx "$p-nat-$s" sysctl -q -w net.netfilter.nf_conntrack_udp_timeout="$udp_to" \
        net.netfilter.nf_conntrack_udp_timeout_stream="$udp_to"
    fi
    if [ "$lib" = 1 ]; then
      nsx "$p-nat-$s" sysctl -q -w net.netfilter.nf_conntrack_tcp_be_liberal=1
    fi

    ip -n "$p-cam-$s" addr add "$CAM_IP/$LAN_LEN" dev eth0
    ip -n "$p-cam-$s" link set eth0 up
    ip -n "$p-cam-$s" route add default via "$GW_IP"
    # camera: strict reverse-path filtering (typical hardened Linux)
    nsx "$p-cam-$s" sysctl -q -w net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.eth0.rp_filter=1

    ip -n "$p-trg-$s" addr add "$TRG_IP/$LAN_LEN" dev eth0
    ip -n "$p-trg-$s" link set eth0 up
    ip -n "$p-trg-$s" route add default via "$GW_IP"
  done

  # WAN impairments, applied once per frame entering the internet switch
  if [ "$loss_n" != 0 ]; then
    nsx "$p-wan" nft -f - <<EOF
table bridge bk_wan {
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname { "p-srv", "p-nat-a", "p-nat-b" } ether type ip numgen random mod 10000 < $loss_n counter drop comment "loss $loss%"
  }
}
EOF
  fi
  if [ "$delay" != 0 ]; then
    relay_start "$p" "$delay"
  fi

  # camera services
  for s in $SITES; do
    bg_start "$run" "cam-$s-udp" "$p-cam-$s" "$PY" "$HERE/cam_udp.py" \
      --bind "$CAM_IP" --port "$CAM_UDP_PORT" --name "cam-$s"
    bg_start "$run" "cam-$s-http" "$p-cam-$s" "$PY" "$HERE/cam_http.py" \
      --bind "$CAM_IP" --port "$CAM_HTTP_PORT" --name "cam-$s" --cc "${BK_CAMERA_CC:-cubic}"
    if [ "$rtsp" = 1 ]; then
      bg_start "$run" "cam-$s-rtsp" "$p-cam-$s" "$PY" "$HERE/cam_rtsp.py" \
        --bind "$CAM_IP" --port "$CAM_RTSP_PORT" --name "cam-$s"
    fi
  done
  local i svc ready svcs="udp http" tries=50
  [ "$rtsp" = 0 ] || { svcs="$svcs rtsp"; tries=150; }
  for i in $(seq 1 "$tries"); do
    ready=1
    for s in $SITES; do
      for svc in $svcs; do
        pid_ours "$run" "cam-$s-$svc" >/dev/null \
          || die "camera service cam-$s-$svc exited: $(tail -n2 "$run/cam-$s-$svc.log" 2>/dev/null | tr '\n' ' ')"
      done
      svc_ready "$p-cam-$s" "$rtsp" || ready=0
    done
    [ "$ready" = 1 ] && break
    sleep 0.1
  done
  [ "$ready" = 1 ] || die "camera services not listening after $((tries / 10)) s (logs in $run)"

  # sanity: LAN reachability, trigger -> server through NAT, server cannot reach the LANs
  local w=$((1 + 2 * delay / 1000)) tries=3
  [ "$loss_n" = 0 ] || tries=20
  for s in $SITES; do
    ping_ok "$p-trg-$s" "$CAM_IP" 3 1 || die "sanity: $p-trg-$s cannot ping the camera $CAM_IP"
    ping_ok "$p-trg-$s" "$SRV_IP" "$tries" "$w" \
      || die "sanity: $p-trg-$s cannot ping the server $SRV_IP through the NAT"
  done
  if ip -n "$p-srv" route get "$CAM_IP" >/dev/null 2>&1; then
    die "sanity: $p-srv has a route to $CAM_IP"
  fi

  UP_DONE=1
  trap - EXIT INT TERM ERR
  say "up $p ok (run dir $run)"
}

# ---------------------------------------------------------------- small commands
# lab_env PREFIX KEY : a value from the lab's lab.env (empty if absent)
lab_env() {
  local f="$RUN_BASE/$1/lab.env" v
  [ -f "$f" ] || return 0
  v=$(sed -n "s/^$2=//p" "$f" | tail -n1)
  v=${v#\"}; v=${v%\"}
  echo "$v"
}

router_ns() { # PREFIX SITE
  local ns="$1-nat-$2"
  ns_exists "$ns" || die "namespace $ns does not exist (is lab $1 up?)"
  echo "$ns"
}

cmd_status() {
  local p=$1 run="$RUN_BASE/$1" ns f name pid
  for ns in $(lab_ns "$p"); do
    if ns_exists "$ns"; then echo "$ns: $(ip netns pids "$ns" 2>/dev/null | wc -l) processes"; else echo "$ns: absent"; fi
  done
  if [ -d "$run" ]; then
    for f in "$run"/*.pid; do
      [ -f "$f" ] || continue
      name=$(basename "$f" .pid)
      if pid=$(pid_ours "$run" "$name"); then echo "$name: pid $pid"; else echo "$name: not running"; fi
    done
  fi
}

main() {
  local cmd=${1:-}
  [ -n "$cmd" ] || usage
  shift
  case $cmd in
    up)
      [ $# -ge 1 ] || usage
      check_prefix "$1"; need_root
      cmd_up "$@"
      ;;
    down)
      [ $# -eq 1 ] || usage
      check_prefix "$1"; need_root
      do_down "$1"
      ;;
    router)
      [ $# -eq 3 ] || usage
      check_prefix "$1"; check_site "$2"; check_mode "$3"; need_root
      local rns dn=""
      rns=$(router_ns "$1" "$2")
      dn=$(lab_env "$1" "DNAT_${2^^}")
      router_apply "$rns" "$3" "$dn"
      say "router $1-nat-$2 mode $3"
      ;;
    delay)
      [ $# -eq 2 ] || usage
      check_prefix "$1"; need_root
      cmd_delay "$1" "$2"
      ;;
    liberal)
      [ $# -eq 3 ] || usage
      check_prefix "$1"; check_site "$2"; need_root
      [[ $3 == 0 || $3 == 1 ]] || die "liberal wants 0 or 1, got '$3'"
      local lns
      lns=$(router_ns "$1" "$2")
      nsx "$lns" sysctl -q -w net.netfilter.nf_conntrack_tcp_be_liberal="$3"
      [ ! -f "$RUN_BASE/$1/lab.env" ] || sed -i "s/^LIBERAL_${2^^}=.*/LIBERAL_${2^^}=$3/" "$RUN_BASE/$1/lab.env"
      say "liberal $1-nat-$2: nf_conntrack_tcp_be_liberal=$3"
      ;;
    flush)
      [ $# -eq 2 ] || usage
      check_prefix "$1"; check_site "$2"; need_root
      local fns
      fns=$(router_ns "$1" "$2")
      nsx "$fns" conntrack -F >/dev/null 2>&1 || true
      say "flushed conntrack in $1-nat-$2"
      ;;
    counters)
      [ $# -eq 2 ] || usage
      check_prefix "$1"; check_site "$2"; need_root
      local ns
      ns=$(router_ns "$1" "$2")
      echo "---- $ns forward counters ----"
      nsx "$ns" nft list chain inet bk_filter forward | grep -E "counter" | sed 's/^[[:space:]]*//'
      echo "---- $ns nat counters ----"
      nsx "$ns" nft list table ip bk_nat | grep -E "counter" | sed 's/^[[:space:]]*//'
      echo "---- $ns conntrack -L ----"
      nsx "$ns" conntrack -L 2>/dev/null || true
      ;;
    status)
      [ $# -eq 1 ] || usage
      check_prefix "$1"
      cmd_status "$1"
      ;;
    -h | --help | help) usage ;;
    *) usage ;;
  esac
}

main "$@"
