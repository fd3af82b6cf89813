#!/usr/bin/env bash
# bench.sh - beckon benchmark (issue 4): setup latency, throughput, concurrent paced streams,
# UDP mapping scale and trigger share, measured side by side on ONE lab (scripts/lab/lab.sh)
# against the same NAT with a static port-forward (DNAT), which is what beckon replaces.
#
#   sudo scripts/bench.sh [--quick] [--no-build | --binary PATH] [--label TEXT] [--keep-lab]
#
#   --quick     smaller sizes and fewer levels (a smoke run, ~4 min; numbers less stable)
#   --no-build  use target/release/beckon as it is
#   --binary P  measure this beckon binary instead (e.g. one built from another commit)
#   --label T   what is measured, for the report's title (default: git commit, or the binary)
#   --keep-lab  leave the lab and processes up on success (for poking around; `lab.sh down bk-bench`)
#   BENCH_PHASES="setup throughput streams diag udp" (environment): run only these phases
#   BENCH_CAMERA_CC=NAME (environment): the TCP congestion control the emulated cameras send
#               with (default cubic: Linux's default, what camera firmware runs)
#
# Progress goes to stderr; the report (method + table) to stdout and target/bench/report.md
# (and a dated copy, target/bench/report-<UTC time>.md).
# Raw results (JSON per phase) and logs: target/bench/run/. Everything runs in network
# namespaces bk-bench-*; all of it is removed on exit, Ctrl-C or failure. Needs root, curl,
# nftables, conntrack, iproute2, ping, /usr/bin/python3, cargo; perf (optional: profiles).
# Takes about 11 minutes (--quick: about 4).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB=$ROOT/scripts/lab/lab.sh
BDIR=$ROOT/scripts/bench
PY=/usr/bin/python3
PREFIX=bk-bench
OUT=$ROOT/target/bench
RUN=$OUT/run
BECKON=$ROOT/target/release/beckon
SRV_NS=$PREFIX-srv
export PYTHONDONTWRITEBYTECODE=1 BK_PREFIX=$PREFIX

QUICK=0 BUILD=1 KEEP=0 BINARY="" LABEL=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --binary)
      [ $# -ge 2 ] || { echo "bench: --binary needs a path" >&2; exit 2; }
      BINARY=$(realpath -e "$2" 2>/dev/null) || { echo "bench: --binary: no such file '$2'" >&2; exit 2; }
      BUILD=0
      shift ;;
    --keep-lab) KEEP=1 ;;
    --label)
      [ $# -ge 2 ] || { echo "bench: --label needs a text" >&2; exit 2; }
      LABEL=$2
      shift ;;
    -h | --help) awk 'NR > 1 && /^set -euo/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "bench: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ------------------------------------------------------------------ parameters
SETUP_N=20                      # curl samples per target and delay
SETUP_DELAY_MS=20               # one-way WAN delay of the second setup measurement
TPUT_BYTES=300000000            # per stream, single-stream runs (>= 200 MB)
TPUT_BYTES_MULTI=200000000      # per stream, 8-stream runs
TPUT_REPS="5,4"                 # repetitions for 1 and 8 streams (median)
STREAM_RATE=500000              # bytes/s per paced stream = 4 Mbit/s
# The cameras' congestion control sets the port-forward's pace: a BBR sender paces itself to
# its estimate of the path (this project's lab machines default to bbr: the port-forward
# measured 1.1-1.9 GB/s with one stream from bbr cameras, 4.3-4.6 GB/s from cubic ones).
CAMERA_CC=${BENCH_CAMERA_CC:-cubic}
export BK_CAMERA_CC=$CAMERA_CC  # scripts/lab/lab.sh: the cameras' web services
STREAM_LEVELS="50 100 200 400 800 1600 3200"
STREAM_BUDGET=300               # seconds for the whole concurrent-streams phase
STREAM_MEASURE=10               # seconds measured per level (after 2 s warm-up)
UDP_FLOWS=10000
UDP_BUDGET=150
WAN_BYTES=100000000             # per transfer, throughput through the delayed WAN
WAN_REPS=3
if [ "$QUICK" = 1 ]; then
  WAN_BYTES=50000000 WAN_REPS=1
  SETUP_N=8 TPUT_BYTES=200000000 TPUT_BYTES_MULTI=200000000 TPUT_REPS="1,1"
  STREAM_LEVELS="50 100 200 400" STREAM_BUDGET=120 STREAM_MEASURE=6 UDP_FLOWS=2000 UDP_BUDGET=60
fi

PHASES=" ${BENCH_PHASES:-setup throughput streams diag udp} "
phase() { [[ $PHASES == *" $1 "* ]]; }

T_START=$(date +%s)
log() { printf 'bench: [%4ss] %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ processes and cleanup
PIDS=()      # every background process this script started (killed by PID on exit)
PACED_PIDS=()
SERVER_PID="" TRG_A_PID="" TRG_B_PID=""
alive() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
stop_pids() {
  local p i left
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for i in $(seq 1 30); do
    left=0
    for p in "$@"; do alive "$p" && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  for p in "$@"; do kill -9 "$p" 2>/dev/null || true; done
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM ERR
  if [ "$KEEP" = 1 ] && [ "$rc" = 0 ]; then
    log "--keep-lab: lab $PREFIX left up (pids ${PIDS[*]:-}); remove with: $LAB down $PREFIX"
    exit 0
  fi
  [ "${#PIDS[@]}" -gt 0 ] && stop_pids "${PIDS[@]}"
  "$LAB" down "$PREFIX" >/dev/null 2>&1
  [ "$rc" = 0 ] || log "failed (exit $rc); logs and partial results in $RUN"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "command failed (line $LINENO): $BASH_COMMAND"' ERR

# bg NAME NS CMD... : start CMD in namespace NS in the background, log to RUN/NAME.log
bg() {
  local name=$1 ns=$2
  shift 2
  # ip netns exec and env exec (no fork): $! is CMD's own pid
  ip netns exec "$ns" env "$@" </dev/null >"$RUN/$name.log" 2>&1 &
  BG_PID=$!
  PIDS+=("$BG_PID")
}
# in_ns NS SECS CMD... : run CMD in namespace NS, killed after SECS
in_ns() {
  local ns=$1 secs=$2
  shift 2
  timeout -k 5 "$secs" ip netns exec "$ns" "$@"
}
# wait_for SECS WHAT CMD... : poll CMD every 0.2 s until it succeeds, at most SECS
wait_for() {
  local secs=$1 what=$2 i
  shift 2
  for i in $(seq 1 $((secs * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "timed out after ${secs}s waiting for $what"
}
status_json() { in_ns "$SRV_NS" 30 "$BECKON" status --json; }
jq_py() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
need_alive() {
  local name=$1 pid=$2
  alive "$pid" || die "$name (pid $pid) exited; last log lines: $(tail -n5 "$RUN/$name.log" 2>/dev/null | tr '\n' ' ')"
}
check_procs() {
  need_alive server "$SERVER_PID"
  need_alive trigger-a "$TRG_A_PID"
  need_alive trigger-b "$TRG_B_PID"
}

# ------------------------------------------------------------------ prerequisites
[ "$(id -u)" = 0 ] || die "run as root (network namespaces, TUN, nftables): sudo $0"
for t in ip nft conntrack curl ping timeout setsid awk socat openssl; do
  command -v "$t" >/dev/null || die "missing tool: $t"
done
[ -x "$PY" ] || die "missing $PY"
[ -c /dev/net/tun ] || die "missing /dev/net/tun"
[ "$(ulimit -n)" -ge 12000 ] || ulimit -n 65536 2>/dev/null || die "cannot raise the open-file limit to 12000+ (UDP flows, streams)"

mkdir -p "$OUT"
rm -rf -- "${RUN:?}"
mkdir -p "$RUN"

# other work on the host skews CPU-bound results: sample the machine's busy share before
# anything of the benchmark runs (and again after it ended)
background() { # KEY
  "$PY" - "$BDIR" "$RUN/background.json" "$1" <<'EOF'
import json, sys, time
sys.path.insert(0, sys.argv[1])
import benchlib as bl
try:
    d = json.load(open(sys.argv[2]))
except (OSError, ValueError):
    d = {}
a = bl.machine_ticks(); time.sleep(2); b = bl.machine_ticks()
d[sys.argv[3]] = round(100.0 * (b[0] - a[0]) / max(b[1] - a[1], 1), 1)
json.dump(d, open(sys.argv[2], "w"))
EOF
}
background busy_before_pct

if [ "$BUILD" = 1 ]; then
  command -v cargo >/dev/null || die "cargo not found"
  log "building beckon (cargo build --release)"
  (cd "$ROOT" && cargo build --release 2>"$RUN/build.log") \
    || die "cargo build --release failed: $(tail -n 20 "$RUN/build.log")"
fi
[ -z "$BINARY" ] || BECKON=$BINARY
[ -x "$BECKON" ] || die "no $BECKON (build it, or drop --no-build)"
# run a private copy: other builds may replace target/release/beckon while the benchmark runs
cp "$BECKON" "$RUN/beckon"
BECKON=$RUN/beckon

# ------------------------------------------------------------------ lab, server, triggers
log "lab $PREFIX: two strict NAT sites (masquerade + ct state invalid drop), port-forward 8080->camera:80 on both"
# site b also forwards 8443/8444 to its trigger host: the relay-pair references (throughput)
"$LAB" up "$PREFIX" --dnat-a 8080:80 --dnat-b 8080:80 --dnat-b 8443:trigger:8443 --dnat-b 8444:trigger:8444 \
  >"$RUN/lab-up.log" 2>&1 \
  || die "lab.sh up failed: $(tail -n 5 "$RUN/lab-up.log")"

STATE=$RUN/state
cat >"$RUN/server.toml" <<EOF
control_listen = "203.0.113.1:7443"
public_ip = "203.0.113.100"
wan_interface = "eth0"
state_dir = "$STATE"
keepalive_secs = 20
# The streams phase looks for the host's limit, not for the configured one.
max_tcp_clients = 100000
[[site]]
name = "site-a"
token = "bench-token-a-4c1d"
direct_tcp = true
[[site]]
name = "site-b"
token = "bench-token-b-92fe"
direct_tcp = false
[[expose]]
camera = "site-a/cam1"
port = 80
proto = "tcp"
listen = "127.0.0.1:18090"
[[expose]]
camera = "site-b/cam1"
port = 80
proto = "tcp"
listen = "127.0.0.1:18091"
[[expose]]
camera = "site-a/cam1"
port = 80
proto = "tcp"
listen = "127.0.0.1:18092"
warm = 1
[[expose]]
camera = "site-a/cam1"
port = 80
proto = "tcp"
listen = "127.0.0.1:18093"
rate_mbit = 10000
[[expose]]
camera = "site-a/cam1"
port = 8554
proto = "tcp"
listen = "127.0.0.1:18554"
[[expose]]
camera = "site-b/cam1"
port = 8554
proto = "tcp"
listen = "127.0.0.1:18555"
[[expose]]
camera = "site-a/cam1"
port = 5060
proto = "udp"
listen = "127.0.0.1:15060"
EOF
for s in a b; do
  tok=$([ $s = a ] && echo bench-token-a-4c1d || echo bench-token-b-92fe)
  cat >"$RUN/trigger-$s.toml" <<EOF
server = "203.0.113.1:7443"
ca = "$STATE/ca.pem"
site = "site-$s"
token = "$tok"
[[camera]]
name = "cam1"
ip = "198.18.1.10"
device_type = "generic"
ports = ["tcp/80", "tcp/8554", "udp/5060"]
EOF
done

log "starting beckon server and triggers"
bg server "$SRV_NS" RUST_LOG=info "$BECKON" server --config "$RUN/server.toml"
SERVER_PID=$BG_PID
wait_for 15 "the server's admin endpoint" status_json
need_alive server "$SERVER_PID"
[ "$(cat "/proc/$SERVER_PID/comm")" = beckon ] || die "pid $SERVER_PID is not beckon"
bg trigger-a "$PREFIX-trg-a" RUST_LOG=info "$BECKON" trigger --config "$RUN/trigger-a.toml"
TRG_A_PID=$BG_PID
bg trigger-b "$PREFIX-trg-b" RUST_LOG=info "$BECKON" trigger --config "$RUN/trigger-b.toml"
TRG_B_PID=$BG_PID
for s in a b; do
  bg "paced-cam-$s" "$PREFIX-cam-$s" "$PY" "$BDIR/paced_cam.py" --bind 198.18.1.10 --port 8554 --rate "$STREAM_RATE" --cc "$CAMERA_CC"
  PACED_PIDS+=("$BG_PID")
done
profiles_ready() {
  status_json | jq_py "all(s['connected'] and s['cameras'] and s['profile'] for s in d['sites']) or sys.exit(1)"
}
wait_for 60 "both sites registered and profiled" profiles_ready
check_procs
status_json >"$RUN/status-start.json"
STRATEGY=$(jq_py "[s for s in d['sites'] if s['name']=='site-a'][0]['profile']['direct_strategy'] or ''" <"$RUN/status-start.json")
log "site-a profile: $(jq_py "[s for s in d['sites'] if s['name']=='site-a'][0]['profile']['summary']" <"$RUN/status-start.json")"
case $STRATEGY in
  steered-resync*) ;;
  *) die "site-a's direct strategy is '${STRATEGY:-none}', expected steered-resync (see $RUN/status-start.json)" ;;
esac
for s in a b; do
  page=$(in_ns "$SRV_NS" 10 curl -s -m 5 "http://127.0.0.1:1809$([ $s = a ] && echo 0 || echo 1)/" || true)
  [[ $page == *"camera cam-$s"* ]] || die "no camera page from cam-$s through beckon (got: ${page:0:200})"
  page=$(in_ns "$SRV_NS" 10 curl -s -m 5 "http://203.0.113.$([ $s = a ] && echo 2 || echo 3):8080/" || true)
  [[ $page == *"camera cam-$s"* ]] || die "no camera page from cam-$s through the port-forward (got: ${page:0:200})"
done
"$PY" - "$RUN/meta.json" "$STRATEGY" "$QUICK" "$ROOT" "$BINARY" "$BECKON" "$LABEL" <<'EOF'
import hashlib, json, os, subprocess, sys
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
git = lambda *a: subprocess.run(["git", "-C", sys.argv[4], *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
sha = hashlib.sha256(open(sys.argv[6], "rb").read()).hexdigest()[:12]
if sys.argv[7]:
    what = f"{sys.argv[7]} (sha256 {sha})"
elif sys.argv[5]:
    what = f"binary {sys.argv[5]} (sha256 {sha})"
else:
    diff = git("diff", "HEAD", "--", "src", "Cargo.toml", "Cargo.lock")
    what = "beckon " + git("rev-parse", "--short", "HEAD") + (
        f" + uncommitted src changes (diff sha256 {hashlib.sha256(diff.encode()).hexdigest()[:12]})" if diff else "")
json.dump({"cores": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release, "strategy": sys.argv[2],
           "camera_cc": os.environ["BK_CAMERA_CC"],
           "host_cc": open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip(),
           "quick": sys.argv[3] == "1", "git": what,
           "date": subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()},
          open(sys.argv[1], "w"))
EOF

# tput_run FILE STREAMS BYTES REPS TARGET... : one throughput.py run
tput_run() {
  local file=$1 k=$2 bytes=$3 reps=$4
  shift 4
  in_ns "$SRV_NS" 1800 "$PY" "$BDIR/throughput.py" --beckon "$BECKON" --out "$RUN/$file" \
    --bytes "$bytes" --streams "$k" --reps "$reps" \
    --pid server="$SERVER_PID" --pid trigger_a="$TRG_A_PID" --pid trigger_b="$TRG_B_PID" "$@" \
    || die "throughput ($file) failed"
  check_procs
}
# ------------------------------------------------------------------ 1. setup latency
setup_phase() { # DELAY_MS
  local d=$1
  log "setup: $SETUP_N x time-to-first-byte per target, one-way WAN delay $d ms"
  in_ns "$SRV_NS" $((120 + SETUP_N * 8)) "$PY" "$BDIR/setup.py" --beckon "$BECKON" \
    --out "$RUN/setup-$d.json" --n "$SETUP_N" --delay-ms "$d" --ping 203.0.113.2 \
    --server-log "$RUN/server.log" \
    direct=http://127.0.0.1:18090/ dnat-a=http://203.0.113.2:8080/ direct-warm=http://127.0.0.1:18092/ \
    assisted=http://127.0.0.1:18091/ dnat-b=http://203.0.113.3:8080/ \
    || die "setup measurement ($d ms) failed"
  check_procs
}
if phase setup; then
  setup_phase 0
  log "WAN delay -> $SETUP_DELAY_MS ms (userspace relay)"
  "$LAB" delay "$PREFIX" "$SETUP_DELAY_MS" >>"$RUN/lab-up.log" 2>&1 || die "lab.sh delay failed"
  delay_on=$(date +%s)
  sleep 1
  setup_phase "$SETUP_DELAY_MS"
  # Throughput through the delayed WAN: do the windows carry the path? (yamux re-measures the
  # assist link's round trip every 10 s: give it that long since the delay came on.)
  while [ $(($(date +%s) - delay_on)) -lt 11 ]; do sleep 1; done
  log "throughput at $SETUP_DELAY_MS ms one-way: /bulk ${WAN_BYTES} B x1 (reps $WAN_REPS)"
  tput_run throughput-wan.json 1 "$WAN_BYTES" "$WAN_REPS" dnat-a=http://203.0.113.2:8080 direct=http://127.0.0.1:18090 \
    direct-rate=http://127.0.0.1:18093 dnat-b=http://203.0.113.3:8080 assisted=http://127.0.0.1:18091
  "$LAB" delay "$PREFIX" 0 >>"$RUN/lab-up.log" 2>&1 || die "lab.sh delay 0 failed"
  log "WAN delay -> 0 ms (relay out of the path)"
  sleep 1
fi

# ------------------------------------------------------------------ 2. throughput
TARGETS_ALL=(dnat-a=http://203.0.113.2:8080 direct=http://127.0.0.1:18090 direct-rate=http://127.0.0.1:18093
  relay=http://127.0.0.1:18190 dnat-b=http://203.0.113.3:8080 assisted=http://127.0.0.1:18091
  relay-pair=http://127.0.0.1:18191 tls-pair=http://127.0.0.1:18192)
if phase throughput; then
  # A second reference: the kernel's own sockets terminating the camera's TCP on the server and
  # sending the bytes on to the client (socat, read/write, 256 KiB buffer), through the same
  # port-forward. That is the shape of beckon's direct path (the server's stack ends the camera's
  # connection) without beckon: what terminating and re-sending costs on this machine.
  bg relay "$SRV_NS" socat -b 262144 TCP-LISTEN:18190,bind=127.0.0.1,reuseaddr,fork TCP:203.0.113.2:8080
  RELAY_PIDS=("$BG_PID")
  # Two references of the assisted path's shape (site b): a relay on the trigger host and one
  # on the server, the camera's bytes crossing the NAT between them: what a reverse tunnel does
  # at least. relay-pair: plain TCP between the two; tls-pair: TLS 1.3 with AES-128-GCM (the
  # assist link's cipher; OpenSSL, one connection per client, no multiplexing). The server-side
  # relay reaches the trigger host through site b's port-forward 8443/8444 (a reverse tunnel is
  # dialled from the trigger; which side dials does not change the work per byte).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-relay \
    -keyout "$RUN/relay-key.pem" -out "$RUN/relay-cert.pem" >"$RUN/relay-cert.log" 2>&1 \
    || die "openssl could not make the relay pair's certificate: $(tail -n 3 "$RUN/relay-cert.log")"
  cat "$RUN/relay-key.pem" "$RUN/relay-cert.pem" >"$RUN/relay.pem"
  printf '%s\n' 'openssl_conf = oc' '[oc]' 'ssl_conf = sc' '[sc]' 'system_default = sd' '[sd]' \
    'Ciphersuites = TLS_AES_128_GCM_SHA256' >"$RUN/relay-openssl.cnf"
  bg relay-pair-trg "$PREFIX-trg-b" socat -b 262144 TCP-LISTEN:8444,reuseaddr,fork TCP:198.18.1.10:80
  RELAY_PIDS+=("$BG_PID")
  bg relay-pair-srv "$SRV_NS" socat -b 262144 TCP-LISTEN:18191,bind=127.0.0.1,reuseaddr,fork TCP:203.0.113.3:8444
  RELAY_PIDS+=("$BG_PID")
  bg tls-pair-trg "$PREFIX-trg-b" OPENSSL_CONF="$RUN/relay-openssl.cnf" socat -b 262144 \
    "OPENSSL-LISTEN:8443,cert=$RUN/relay.pem,verify=0,reuseaddr,fork" TCP:198.18.1.10:80
  RELAY_PIDS+=("$BG_PID")
  bg tls-pair-srv "$SRV_NS" OPENSSL_CONF="$RUN/relay-openssl.cnf" socat -b 262144 \
    TCP-LISTEN:18192,bind=127.0.0.1,reuseaddr,fork OPENSSL:203.0.113.3:8443,verify=0
  RELAY_PIDS+=("$BG_PID")
  for port in 18190 18191 18192; do
    wait_for 10 "the socat relay on $port" in_ns "$SRV_NS" 5 curl -sf -m 2 -o /dev/null "http://127.0.0.1:$port/"
  done
  log "throughput: /bulk ${TPUT_BYTES} B x1 (reps ${TPUT_REPS%%,*}) and ${TPUT_BYTES_MULTI} B x8; direct (two exposures), assisted, kernel relays, port-forward"
  tput_run throughput-1.json 1 "$TPUT_BYTES" "${TPUT_REPS%%,*}" "${TARGETS_ALL[@]}"
  tput_run throughput-8.json 8 "$TPUT_BYTES_MULTI" "${TPUT_REPS##*,}" "${TARGETS_ALL[@]}"
  stop_pids "${RELAY_PIDS[@]}"
fi

# ------------------------------------------------------------------ 3. concurrent paced streams
open_conns() { status_json | jq_py "len(d['connections'])"; }
# The server's overload guard refuses new TCP clients while it drops camera packets (and for
# 5 s after): a level that collapsed leaves the next one refused unless it waits.
not_overloaded() { [ "$(status_json | jq_py "d.get('overloaded', False)")" = False ]; }
no_conns() { [ "$(open_conns)" = 0 ]; }
# The kernel's orphaned TCP sockets (closed by their process, still sending: a stalled level
# leaves thousands, each holding its unsent data) count against the one TCP memory budget
# (`tcp_mem`) of every namespace on this host; left over, they push the next measurement into
# memory pressure (a port-forward run after a collapsed level measured 176 MB/s instead of
# 1.8 GB/s). Wait, at most 120 s, until fewer than 50 are left and the host's TCP memory is
# below `tcp_mem`'s low mark (where the kernel leaves memory pressure).
settle_tcp() {
  local i orphans mem low
  low=$(awk '{ print $1 }' /proc/sys/net/ipv4/tcp_mem)
  for i in $(seq 1 120); do
    orphans=$(awk '/^TCP:/ { for (i = 2; i < NF; i++) if ($i == "orphan") print $(i + 1) }' /proc/net/sockstat)
    mem=$(awk '/^TCP:/ { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat)
    [ "${orphans:-0}" -lt 50 ] && [ "${mem:-0}" -lt "$low" ] && return 0
    [ "$i" = 1 ] && log "waiting for $orphans orphaned TCP sockets to go and TCP memory ($mem pages) to fall below $low pages (the whole host's)"
    sleep 1
  done
  log "still $orphans orphaned TCP sockets and $mem pages of TCP memory (low mark $low) after 120 s; measuring on"
}
# streams_phase LABEL PORT BUDGET LEVELS : N paced streams through one exposure, N from LEVELS
# while they hold, then one midpoint; results in RUN/streams-LABEL*.json
streams_phase() {
  local label=$1 port=$2 budget=$3 levels=$4 t0 n last_ok=0 first_bad=""
  t0=$(date +%s)
  run_level() {
    local n=$1 f="$RUN/streams-$label-$1.json"
    local w
    for w in $(seq 1 120); do
      not_overloaded && break
      [ "$w" = 1 ] && log "waiting (at most 120 s) for the server to leave overload (its guard refuses new TCP clients)"
      [ "$w" = 120 ] && log "the server still reports overload after 120 s (or its status failed); measuring on"
      sleep 1
    done
    status_json >"$RUN/streams-$label-$n.c0.json"
    in_ns "$SRV_NS" $((90 + n / 5)) "$PY" "$BDIR/streams.py" --port "$port" --n "$n" \
      --rate "$STREAM_RATE" --measure "$STREAM_MEASURE" --setup-timeout 20 \
      --pid server="$SERVER_PID" --pid trigger_a="$TRG_A_PID" --pid trigger_b="$TRG_B_PID" \
      --pid cam_a="${PACED_PIDS[0]}" --pid cam_b="${PACED_PIDS[1]}" --out "$f" \
      || { log "streams $label n=$n: client failed"; return 2; }
    # an overloaded level closes slowly (FINs and resets queue behind retransmissions)
    wait_for $((60 + n / 20)) "the $n stream connections to close" no_conns
    settle_tcp
    status_json >"$RUN/streams-$label-$n.c1.json"
    check_procs
    jq_py "0 if d['ok'] else sys.exit(1)" <"$f" >/dev/null
  }
  for n in $levels; do
    if [ $(($(date +%s) - t0)) -gt "$budget" ]; then log "streams $label: time budget reached before n=$n"; break; fi
    log "streams $label: n=$n at $STREAM_RATE B/s each"
    if run_level "$n"; then last_ok=$n; else first_bad=$n; break; fi
  done
  # two bisection steps between the last level that held and the first that failed
  local step
  for step in 1 2; do
    [ -n "$first_bad" ] && [ "$last_ok" -gt 0 ] && [ $(($(date +%s) - t0)) -lt "$budget" ] || break
    n=$(((last_ok + first_bad) / 2 / 10 * 10))
    [ "$n" -gt "$last_ok" ] && [ "$n" -lt "$first_bad" ] || break
    log "streams $label: bisecting, n=$n"
    if run_level "$n"; then last_ok=$n; else first_bad=$n; fi
  done
  echo "{\"path\": \"$label\", \"max_ok\": $last_ok, \"first_stall\": ${first_bad:-null}, \"levels\": \"$levels\"}" \
    >"$RUN/streams-$label.json"
  log "streams $label: largest N without stall = $last_ok${first_bad:+ (failed at $first_bad)}"
}
if phase streams; then
  streams_phase direct 18554 "$STREAM_BUDGET" "$STREAM_LEVELS"
  streams_phase assisted 18555 $((STREAM_BUDGET / 2)) "$STREAM_LEVELS"
fi

# ------------------------------------------------------------------ 4. diagnosis: conntrack window tracking
# The direct path's steered-resync leaves site a's conntrack entry with a different idea of the
# TCP window than the real endpoints (see the notes of the report); repeat the direct runs with
# window tracking off in that router (nf_conntrack_tcp_be_liberal=1) to size the effect.
if phase diag; then
  settle_tcp
  log "diagnosis: site a's router with nf_conntrack_tcp_be_liberal=1"
  "$LAB" liberal "$PREFIX" a 1 >>"$RUN/lab-up.log" 2>&1 || die "lab.sh liberal failed"
  tput_run throughput-liberal-1.json 1 "$TPUT_BYTES" 1 dnat-a=http://203.0.113.2:8080 direct=http://127.0.0.1:18090
  tput_run throughput-liberal-8.json 8 "$TPUT_BYTES_MULTI" 1 dnat-a=http://203.0.113.2:8080 direct=http://127.0.0.1:18090
  # up to the level where the strict-NAT run failed: the diagnosis compares, it does not explore
  levels=$STREAM_LEVELS
  stall=""
  [ -f "$RUN/streams-direct.json" ] && stall=$(jq_py "d['first_stall'] or ''" <"$RUN/streams-direct.json" || true)
  if [ -n "$stall" ]; then
    levels=""
    for n in $STREAM_LEVELS; do
      if [ "$n" -lt "$stall" ]; then levels="$levels $n"; fi
    done
    levels="$levels $stall"
  fi
  streams_phase direct-liberal 18554 $((STREAM_BUDGET / 2)) "$levels"
  log "diagnosis: perf profile of the server during a direct transfer (window tracking still off)"
  timeout -k 5 200 "$PY" "$BDIR/profile.py" --pid "$SERVER_PID" --url http://127.0.0.1:18090 \
    --bytes 8000000000 --secs 4 --perf-data "$RUN/perf-direct.data" --out "$RUN/profile-direct.json" \
    || log "profile failed (reported without it)"
  check_procs
  "$LAB" liberal "$PREFIX" a 0 >>"$RUN/lab-up.log" 2>&1 || die "lab.sh liberal 0 failed"
fi

# ------------------------------------------------------------------ 5. UDP mappings (last: the
# keepalives of 10,000 mappings keep beckon's stack task busy and would skew later TCP phases)
if phase udp; then
  settle_tcp
  log "udp: $UDP_FLOWS flows (one client socket each) to one exposure, budget ${UDP_BUDGET}s + 30 s keepalive-only"
  in_ns "$SRV_NS" $((UDP_BUDGET + 120)) "$PY" "$BDIR/udp_flows.py" --beckon "$BECKON" --port 15060 \
    --flows "$UDP_FLOWS" --budget "$UDP_BUDGET" --idle 60 --pid server="$SERVER_PID" --pid trigger_a="$TRG_A_PID" \
    --perf-pid "$SERVER_PID" --perf-data "$RUN/perf-udp.data" \
    --out "$RUN/udp.json" || log "udp flows: client failed (reported as not measured)"
  if [ -f "$RUN/udp.json" ]; then
    "$PY" - "$RUN/udp.json" "$(ip netns exec "$PREFIX-nat-a" conntrack -C 2>/dev/null || echo 0)" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
r["nat_a_conntrack_entries"] = int(sys.argv[2])
json.dump(r, open(sys.argv[1], "w"), indent=1, sort_keys=True)
EOF
  fi
fi
check_procs
status_json >"$RUN/status-end.json"
echo "{\"duration_s\": $(($(date +%s) - T_START))}" >"$RUN/duration.json"
if [ "$KEEP" != 1 ]; then
  log "stopping beckon and removing the lab"
  stop_pids "${PIDS[@]}"
  PIDS=()
  "$LAB" down "$PREFIX" >/dev/null 2>&1 || log "lab.sh down $PREFIX reported a problem"
  background busy_after_pct
fi

# ------------------------------------------------------------------ report
log "writing the report"
"$PY" "$BDIR/report.py" "$RUN" >"$OUT/report.md" || die "report.py failed"
# A dated copy too: the next run (also a partial one, BENCH_PHASES) overwrites report.md.
KEPT="$OUT/report-$(date -u +%Y%m%dT%H%M%SZ).md"
cp "$OUT/report.md" "$KEPT"
cat "$OUT/report.md"
log "done in $(($(date +%s) - T_START)) s; report: $OUT/report.md (kept as $KEPT), raw results: $RUN"
