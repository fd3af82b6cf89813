#!/usr/bin/python3
"""Concurrent paced streams through one exposure (run inside the server's namespace): opens N
connections to the exposure (at most --setup-parallel waiting for their first byte at once),
waits --warmup s, then counts each stream's bytes in --window-s windows for --measure s. A
stream keeps its rate if every window carries >= --keep of rate * window. Also records CPU
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
        self.windows = None
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
            self.first.set_exception(ConnectionError(str(exc) if exc else "closed before data"))


class State:
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
    ap.add_argument("--window-s", type=float, default=2.0)
    ap.add_argument("--setup-parallel", type=int, default=32)
    ap.add_argument("--setup-timeout", type=float, default=15.0)
    ap.add_argument("--pid", action="append", default=[])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    loop = asyncio.get_running_loop()
    st = State()
    st.window = a.window_s
    nwin = int(round(a.measure / a.window_s))
    sem = asyncio.Semaphore(a.setup_parallel)
    clients, failures = [], []
    t_setup0 = time.monotonic()

    async def open_one(i):
        async with sem:
            t = time.monotonic()
            try:
                _, c = await asyncio.wait_for(
                    loop.create_connection(lambda: Client(st), a.host, a.port), a.setup_timeout)
                await asyncio.wait_for(asyncio.shield(c.first), a.setup_timeout)
                c.windows = [0] * nwin
                c.setup_s = c.first.result() - t
                clients.append(c)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(open_one(i) for i in range(a.n)))
    setup_wall = time.monotonic() - t_setup0
    print(f"streams n={a.n}: {len(clients)} up, {len(failures)} failed in {setup_wall:.1f} s", file=sys.stderr)
    await asyncio.sleep(a.warmup)
    probe = bl.CpuProbe(dict(p.split("=", 1) for p in a.pid))
    st.t0 = time.monotonic()
    st.t_end = st.t0 + nwin * a.window_s
    probe.start()
    await asyncio.sleep(nwin * a.window_s + 0.05)
    cpu = probe.stop()
    per_win = a.rate * a.window_s
    worst = [min(c.windows) / per_win if c.windows else 0.0 for c in clients]
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
        "median_window_ratio": bl.median([sum(c.windows) / (per_win * nwin) for c in clients]),
        "max_gap_s": round(max([c.max_gap for c in clients], default=0.0), 3),
        "aggregate_MBps": round(total / (nwin * a.window_s) / 1e6, 1),
        "cpu": cpu,
    }
    res["ok"] = res["up"] == a.n and below == 0 and lost == 0
    for c in clients:
        c.t.close()
    bl.write_json(a.out, res)
    print(f"streams n={a.n}: {'OK' if res['ok'] else 'STALL'} worst window {res['worst_window_ratio']}, "
          f"{below} below {a.keep:.0%}, {lost} lost, max gap {res['max_gap_s']} s, {res['aggregate_MBps']} MB/s; "
          + " ".join(f"{k}={v}" for k, v in cpu.items()), file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
