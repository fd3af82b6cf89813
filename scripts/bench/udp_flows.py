#!/usr/bin/python3
"""Many UDP mappings through one exposure (run inside the server's namespace): --flows UDP
sockets, each its own platform client, so each gets its own server port and its own NAT
mapping at the camera's router (an emulated camera each, seen from the server). Round 1: each
flow's first datagram (carried to the camera by a trigger packet, at most --window waiting at
once, retried after --timeout s up to --tries times). Round 2: one more datagram on every
mapped flow (one retry after --timeout), which goes directly to the mapping. Then --idle seconds with no client traffic (the server's keepalives
only). Rounds are bounded by --budget seconds."""
import argparse
import os
import resource
import select
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402


def round_(socks, idx, port, rnd, window, timeout, tries, deadline):
    """Send one datagram on each socket in idx (window-limited), wait for its answer."""
    ep = select.epoll()
    pending = {}  # fd -> (i, sent_at, tries)
    todo = list(idx)
    done, failed, lat = set(), [], []
    fd2i = {}
    buf = bytearray(2048)
    tag = f" round {rnd}".encode()
    nxt = 0
    while (nxt < len(todo) or pending) and time.monotonic() < deadline:
        while nxt < len(todo) and len(pending) < window:
            i = todo[nxt]
            nxt += 1
            s = socks[i]
            s.send(f"bench flow {i} round {rnd}".encode())
            pending[s.fileno()] = (i, time.monotonic(), 1)
            fd2i[s.fileno()] = i
            ep.register(s.fileno(), select.EPOLLIN)
        for fd, _ in ep.poll(0.05):
            s = socks[fd2i[fd]]
            ours = False
            try:
                while True:
                    n = s.recv_into(buf)
                    ours = ours or tag in bytes(buf[:n])
            except (BlockingIOError, OSError):
                pass
            if not ours or fd not in pending:
                continue  # a late answer of an earlier round
            i, t, _n = pending.pop(fd)
            ep.unregister(fd)
            done.add(i)
            lat.append(time.monotonic() - t)
        now = time.monotonic()
        for fd, (i, t, n) in list(pending.items()):
            if now - t > timeout:
                if n >= tries:
                    pending.pop(fd)
                    ep.unregister(fd)
                    failed.append(i)
                else:
                    socks[i].send(f"bench flow {i} round {rnd} retry {n}".encode())
                    pending[fd] = (i, now, n + 1)
    ep.close()
    lat.sort()
    return done, failed, lat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--beckon", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--flows", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--budget", type=float, default=150)
    ap.add_argument("--perf-pid", type=int, help="perf record this pid during round 2")
    ap.add_argument("--perf-data", default="/tmp/beckon-bench-udp.perf")
    ap.add_argument("--idle", type=float, default=30, help="seconds of keepalive-only load measured after round 2")
    ap.add_argument("--pid", action="append", default=[])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.flows + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    deadline = time.monotonic() + a.budget
    socks = []
    for _ in range(a.flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.1", a.port))
        s.setblocking(False)
        socks.append(s)
    pids = dict(p.split("=", 1) for p in a.pid)
    c0 = bl.counters(a.beckon)
    n0 = bl.net_snapshot()
    probe = bl.CpuProbe(pids)
    probe.start()
    t0 = time.monotonic()
    done1, failed1, lat1 = round_(socks, range(a.flows), a.port, 1, a.window, a.timeout, a.tries, deadline)
    t1 = time.monotonic()
    cpu1 = probe.stop()
    c1 = bl.counters(a.beckon)
    print(f"udp round 1: {len(done1)} of {a.flows} flows mapped in {t1 - t0:.1f} s ({len(failed1)} failed)",
          file=sys.stderr)
    probe.start()
    perf = bl.perf_start(a.perf_pid, 3, a.perf_data) if a.perf_pid else None
    done2, failed2, lat2 = round_(socks, sorted(done1), a.port, 2, a.window, a.timeout, 2, deadline)
    t2 = time.monotonic()
    cpu2 = probe.stop()
    c2 = bl.counters(a.beckon)
    perf_sum = {}
    if perf is not None:
        try:
            perf.wait(timeout=30)
            perf_sum = bl.perf_summary(a.perf_data)
        except Exception as e:  # noqa: BLE001
            perf_sum = {"error": str(e)}
    print(f"udp round 2: {len(done2)} of {len(done1)} mapped flows answered directly in {t2 - t1:.1f} s",
          file=sys.stderr)
    # keepalive cost: all mappings go silent now; each gets a keepalive keepalive_secs after
    # its camera last spoke, so this window holds one keepalive round of every mapping.
    # Counted: the server's own per-mapping `keepalives_sent` / `keepalives_answered` of
    # `beckon status --json` (a keepalive is counted when the server queues its datagram for
    # the camera's mapping), between two snapshots (each at the midpoint of its status call),
    # summed over the mappings of the second one (a mapping dropped in between takes its count
    # with it: mappings_idle_start/_end show whether any was). The CPU window lies inside
    # (the status calls, which serialise every mapping, are not keepalive cost). Cross-check:
    # packets beckon wrote into its TUN over the CPU window (keepalives and anything else).
    def ka_snapshot():
        ts = time.monotonic()
        st = bl.beckon_status(a.beckon)
        te = time.monotonic()
        m = {x["server_port"]: (x.get("keepalives_sent", 0), x.get("keepalives_answered", 0))
             for x in st.get("mappings", [])}
        return (ts + te) / 2, te - ts, m, st.get("counters", {}), st.get("keepalive_secs")

    ka_t0, ka_d0, ka0, ci0, ka_every = ka_snapshot()
    ni0 = bl.net_snapshot()
    ni_t0 = time.monotonic()
    probe.start()
    time.sleep(max(0.0, min(a.idle, deadline + 60 - time.monotonic())))
    cpu_idle = probe.stop()
    ni_t1 = time.monotonic()
    ni1 = bl.net_snapshot()
    ka_t1, ka_d1, ka1, ci1, _ = ka_snapshot()
    ka_sent = ka_ans = 0
    for port, (s1, a1) in ka1.items():
        s0, a0 = ka0.get(port, (0, 0))
        if s1 < s0 or a1 < a0:  # the port went to a new flow in between: all of its count is new
            s0 = a0 = 0
        ka_sent += s1 - s0
        ka_ans += a1 - a0
    ka_win = ka_t1 - ka_t0
    print(f"udp idle {ka_win:.1f} s with {len(ka0)}..{len(ka1)} mappings: {ka_sent} keepalives sent "
          f"({ka_sent / ka_win:.0f}/s), {ka_ans} answered; server {cpu_idle.get('server_cpu_s')} CPU s "
          f"in {cpu_idle['wall_s']:.1f} s", file=sys.stderr)
    pct = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2) if xs else None  # noqa: E731
    res = {
        "flows": a.flows, "mapped": len(done1), "failed_round1": len(failed1),
        "round1_s": round(t1 - t0, 2), "round1_ms_p50": pct(lat1, 0.5), "round1_ms_p99": pct(lat1, 0.99),
        "answered_round2": len(done2), "round2_s": round(t2 - t1, 2),
        "round2_ms_p50": pct(lat2, 0.5), "round2_ms_p99": pct(lat2, 0.99),
        "budget_exceeded": time.monotonic() >= deadline,
        "counters_round1": bl.delta(c0, c1), "counters_round2": bl.delta(c1, c2),
        "cpu_round1": cpu1, "cpu_round2": cpu2, "cpu_idle": cpu_idle,
        "keepalives_idle": ka_sent, "keepalives_answered_idle": ka_ans,
        "keepalive_window_s": round(ka_win, 3), "keepalives_per_s_idle": round(ka_sent / ka_win, 1),
        "status_call_s": [round(ka_d0, 3), round(ka_d1, 3)], "keepalive_secs": ka_every,
        "mappings_idle_start": len(ka0), "mappings_idle_end": len(ka1),
        "mappings_idle_both": len(ka0.keys() & ka1.keys()),
        "counters_idle": bl.delta(ci0, ci1), "net_idle": bl.delta(ni0, ni1),
        "net_idle_window_s": round(ni_t1 - ni_t0, 3),
        "perf_round2": perf_sum, "net": bl.delta(n0, bl.net_snapshot()),
    }
    bl.write_json(a.out, res)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
