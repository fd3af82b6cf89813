#!/usr/bin/python3
"""Bulk TCP throughput through beckon's exposures and through the routers' static
port-forwards (the kernel-to-kernel limit of the same NAT), with 1 and K parallel streams
(run inside the server's namespace). Each stream: curl GET /bulk?bytes=N from the camera's
cam_http.py. Throughput = all bytes / wall time from the first start to the last end."""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402


def run(url: str, k: int, nbytes: int, timeout: float):
    t0 = time.monotonic()
    procs = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-m", str(int(timeout)), "-w",
                               "%{http_code} %{size_download}", f"{url}/bulk?bytes={nbytes}"],
                              stdout=subprocess.PIPE, text=True) for _ in range(k)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outs.append((p.returncode, out.split()))
    wall = time.monotonic() - t0
    got = sum(int(o[1]) for rc, o in outs if len(o) == 2 and o[1].isdigit())
    complete = all(rc == 0 and len(o) == 2 and o[0] == "200" and int(o[1]) == nbytes for rc, o in outs)
    return wall, got, complete


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--beckon", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bytes", type=int, required=True, help="bytes per stream")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--reps", default="3,1", help="repetitions per stream count (median taken)")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--pid", action="append", default=[], help="NAME=PID whose CPU is recorded")
    ap.add_argument("target", nargs="+", help="NAME=BASEURL")
    a = ap.parse_args()
    pids = dict(p.split("=", 1) for p in a.pid)
    targets = [t.split("=", 1) for t in a.target]
    streams = [int(x) for x in a.streams.split(",")]
    reps = [int(x) for x in a.reps.split(",")]
    res = {"bytes_per_stream": a.bytes, "runs": []}
    for k, r in zip(streams, reps):
        for rep in range(r):
            for name, url in targets:
                c0 = bl.counters(a.beckon)
                n0 = bl.net_snapshot()
                probe = bl.CpuProbe(pids)
                probe.start()
                wall, got, complete = run(url, k, a.bytes, a.timeout)
                cpu = probe.stop()
                c1 = bl.counters(a.beckon)
                net = bl.delta(n0, bl.net_snapshot())
                mbps = got / wall / 1e6
                run_ = {"target": name, "streams": k, "rep": rep, "wall_s": round(wall, 3),
                        "bytes": got, "complete": complete, "MBps": round(mbps, 1), "cpu": cpu,
                        "counters": bl.delta(c0, c1), "net": net}
                res["runs"].append(run_)
                bl.write_json(a.out, res)
                print(f"throughput {name} x{k} rep {rep}: {mbps:.1f} MB/s ({got / 1e6:.0f} MB in {wall:.2f} s"
                      f"{'' if complete else ', INCOMPLETE'}); cpu "
                      + " ".join(f"{n} {cpu.get(n + '_cpu_pct')}%" for n in pids)
                      + f", machine {cpu['machine_busy_pct']}%; "
                      + " ".join(f"{k}={v}" for k, v in net.items() if v), file=sys.stderr)
    # medians per (target, streams)
    summary = {}
    for name, _ in targets:
        for k in streams:
            rs = [x for x in res["runs"] if x["target"] == name and x["streams"] == k]
            summary[f"{name}/{k}"] = {
                # median over the complete runs; a run cut short (connection reset) says little
                "MBps": bl.median([x["MBps"] for x in rs if x["complete"]] or [x["MBps"] for x in rs]),
                "runs": len(rs), "incomplete_runs": sum(1 for x in rs if not x["complete"]),
                "bytes_expected": sum(k * a.bytes for x in rs), "bytes_got": sum(x["bytes"] for x in rs),
                "complete": all(x["complete"] for x in rs),
                "server_cpu_pct": bl.median([x["cpu"].get("server_cpu_pct") for x in rs
                                             if x["cpu"].get("server_cpu_pct") is not None
                                             and (x["complete"] or not any(y["complete"] for y in rs))]),
                "machine_busy_pct": bl.median([x["cpu"]["machine_busy_pct"] for x in rs]),
                "counters": rs[-1]["counters"] if rs else {},
                "net": {key: sum(x["net"].get(key, 0) for x in rs) for key in (rs[0]["net"] if rs else {})},
                "cpu": rs[-1]["cpu"] if rs else {},
            }
    res["summary"] = summary
    bl.write_json(a.out, res)


if __name__ == "__main__":
    main()
