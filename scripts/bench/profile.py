#!/usr/bin/python3
"""Where the beckon server spends its CPU on the direct TCP path: one bulk transfer through an
exposure (curl in the server namespace) while `perf record -g` samples the server process
(run from the root namespace; perf attaches by pid). Also counts the packets beckon read from
and wrote to its TUN during the transfer. Writes a JSON summary; skips (with a reason) without
perf."""
import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--url", required=True, help="exposure base URL (from the server namespace)")
    ap.add_argument("--bytes", type=int, default=1_000_000_000)
    ap.add_argument("--secs", type=float, default=4)
    ap.add_argument("--perf-data", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not shutil.which("perf"):
        bl.write_json(a.out, {"skipped": "perf not installed"})
        return
    n0 = bl.net_snapshot()
    # The camera serves at most 1 GiB per request: enough requests, one after the other, to
    # outlast the perf window.
    per = min(a.bytes, 1 << 30)
    urls = [f"{a.url}/bulk?bytes={per}"] * max(1, -(-a.bytes // per))
    t0 = time.monotonic()
    curl = subprocess.Popen(["ip", "netns", "exec", f"{bl.PREFIX}-srv", "curl", "-s", "-m", "120",
                             "-w", "%{size_download}\n"] + [x for u in urls for x in ("-o", "/dev/null", u)],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    perf = bl.perf_start(a.pid, a.secs, a.perf_data)
    try:
        perf.wait(timeout=a.secs + 30)
    except subprocess.TimeoutExpired:
        perf.kill()
    try:
        out, _ = curl.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        curl.kill()
        out, _ = curl.communicate()
    wall = time.monotonic() - t0
    net = bl.delta(n0, bl.net_snapshot())
    got = sum(int(x) for x in out.split() if x.isdigit())
    res = {"bytes": got, "MBps": round(got / wall / 1e6, 1) if got else None,
           "net": net, "perf": bl.perf_summary(a.perf_data)}
    bl.write_json(a.out, res)
    p = res["perf"]
    print(f"profile: {res['MBps']} MB/s; server samples by dso {p.get('dso')}; inclusive {p.get('inclusive')}; "
          f"TUN packets to beckon {net.get('server_tun_to_beckon_packets')}, from beckon "
          f"{net.get('server_tun_from_beckon_packets')}", file=sys.stderr)


if __name__ == "__main__":
    main()
