#!/usr/bin/python3
"""Concurrent paced streams through one exposure (run inside the server's namespace): opens N
connections to the exposure (at most --setup-parallel waiting for their first byte at once),
waits --warmup s, then counts each stream's bytes in 1 s buckets for --measure s. A stream
keeps its rate if every sliding --window-s window (1 s steps) carries >= --keep of
rate * window: a stall of about (1 - keep) * window seconds fails it, delivery jitter well
below that does not. Also records CPU
seconds and RSS of the given PIDs and the machine's busy share during the measurement."""
import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402


class Client(asyncio.Protocol):
    def __init__(self, st):
        self.st = st
        self.first = asyncio.get_running_loop().create_future()
        self.total = 0
        self.windows = [0] * st.nwin
        self.t = None
        self.last = None
        self.max_gap = 0.0
        self.lost = False

    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        now = time.monotonic()
        self.total += len(data)
        if not self.first.done():
            self.first.set_result(now)
        st = self.st
        if st.t0 is not None and now >= st.t0:
            i = int((now - st.t0) / st.window)
            if i < len(self.windows):
                self.windows[i] += len(data)
            if self.last is not None and self.last >= st.t0 and now < st.t_end:
                self.max_gap = max(self.max_gap, now - self.last)
        self.last = now

    def connection_lost(self, exc):
        self.lost = True
        if not self.first.done():
            self.first.set_result(None)  # closed before any data


class State:
    nwin = 0
    t0 = None
    t_end = None
    window = 2.0


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--rate", type=float, default=500_000)
    ap.add_argument("--keep", type=float, default=0.9)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--measure", type=float, default=10.0)
    ap.add_argument("--window-s", type=int, default=5)
    ap.add_argument("--setup-parallel", type=int, default=32)
    ap.add_argument("--setup-timeout", type=float, default=15.0)
    ap.add_argument("--pid", action="append", default=[])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    loop = asyncio.get_running_loop()
    st = State()
    st.window = 1.0
    nwin = st.nwin = int(round(a.measure))  # 1 s buckets
    if a.window_s > nwin:
        sys.exit("streams: --window-s must not exceed --measure")
    sem = asyncio.Semaphore(a.setup_parallel)
    clients, failures = [], []
    t_setup0 = time.monotonic()
    n0 = bl.net_snapshot()

    async def open_one(i):
        async with sem:
            t = time.monotonic()
            c = None
            try:
                _, c = await asyncio.wait_for(
                    loop.create_connection(lambda: Client(st), a.host, a.port), a.setup_timeout)
                t_first = await asyncio.wait_for(asyncio.shield(c.first), a.setup_timeout)
                if t_first is None:
                    raise ConnectionError("closed before any data")
                c.setup_s = t_first - t
                clients.append(c)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{type(e).__name__}: {e}")
                if c is not None and c.t is not None:
                    c.t.abort()

    await asyncio.gather(*(open_one(i) for i in range(a.n)))
    setup_wall = time.monotonic() - t_setup0
    print(f"streams n={a.n}: {len(clients)} up, {len(failures)} failed in {setup_wall:.1f} s", file=sys.stderr)
    await asyncio.sleep(a.warmup)
    probe = bl.CpuProbe({**dict(p.split("=", 1) for p in a.pid), "client": os.getpid()})
    st.t0 = time.monotonic()
    st.t_end = st.t0 + nwin
    probe.start()
    await asyncio.sleep(nwin + 0.05)
    cpu = probe.stop()
    net = bl.delta(n0, bl.net_snapshot())
    per_win = a.rate * a.window_s
    w = a.window_s

    def slide(b):
        return min(sum(b[i:i + w]) for i in range(len(b) - w + 1)) / per_win

    worst = [slide(c.windows) for c in clients]
    below = sum(1 for w in worst if w < a.keep)
    lost = sum(1 for c in clients if c.lost)
    total = sum(sum(c.windows) for c in clients)
    res = {
        "n": a.n, "up": len(clients), "setup_failed": len(failures), "failures": failures[:5],
        "setup_wall_s": round(setup_wall, 2),
        "setup_s_median": bl.median([c.setup_s for c in clients]),
        "setup_s_max": max([c.setup_s for c in clients], default=None),
        "streams_below_keep": below, "lost": lost,
        "worst_window_ratio": round(min(worst), 3) if worst else None,
        "median_rate_ratio": bl.median([sum(c.windows) / (a.rate * nwin) for c in clients]),
        "worst_1s_ratio": round(min((min(c.windows) / a.rate for c in clients), default=0.0), 3),
        "window_s": w,
        "max_gap_s": round(max([c.max_gap for c in clients], default=0.0), 3),
        "aggregate_MBps": round(total / nwin / 1e6, 1),
        "cpu": cpu, "net": net,
    }
    res["ok"] = res["up"] == a.n and below == 0 and lost == 0
    for c in clients:
        c.t.close()
    bl.write_json(a.out, res)
    print(f"streams n={a.n}: {'OK' if res['ok'] else 'STALL'} worst window {res['worst_window_ratio']}, "
          f"{below} below {a.keep:.0%}, {lost} lost, max gap {res['max_gap_s']} s, {res['aggregate_MBps']} MB/s; "
          + " ".join(f"{k}={v}" for k, v in cpu.items() if k.startswith(("server", "machine")))
          + "; " + " ".join(f"{k}={v}" for k, v in net.items() if v), file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
