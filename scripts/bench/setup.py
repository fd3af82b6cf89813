#!/usr/bin/python3
"""Setup latency: time to the first byte of the camera's web page, through beckon's exposures
and through the routers' static port-forwards, measured side by side (run inside the server's
namespace). curl -w '%{time_starttransfer}': from the start of the client's connection to the
first response byte. Targets are interleaved (order rotated per round)."""
import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402


def curl(url: str, timeout: float):
    fmt = "%{http_code} %{time_connect} %{time_starttransfer} %{size_download}"
    p = subprocess.run(["curl", "-s", "-o", "/dev/null", "-m", str(timeout), "-w", fmt, url],
                       capture_output=True, text=True, timeout=timeout + 5)
    parts = p.stdout.split()
    if p.returncode != 0 or len(parts) != 4 or parts[0] != "200" or int(parts[3]) == 0:
        return None, f"curl exit {p.returncode}, out {p.stdout!r}"
    return float(parts[2]) * 1000.0, None


def rtt_ms(host: str, count: int):
    p = subprocess.run(["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", host],
                       capture_output=True, text=True, timeout=count * 3 + 10)
    xs = [float(m) for m in re.findall(r"time=([0-9.]+) ms", p.stdout)]
    return bl.median(xs), len(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--beckon", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--delay-ms", type=int, required=True)
    ap.add_argument("--ping", required=True, help="address whose RTT is the WAN round trip")
    ap.add_argument("--server-log", required=True)
    ap.add_argument("target", nargs="+", help="NAME=URL")
    a = ap.parse_args()

    targets = [t.split("=", 1) for t in a.target]
    rtt, got = rtt_ms(a.ping, 20)
    if rtt is None:
        sys.exit(f"setup: no ping answer from {a.ping}")
    log_off = os.path.getsize(a.server_log)
    c0 = bl.counters(a.beckon)
    n0 = bl.net_snapshot()
    times = {name: [] for name, _ in targets}
    errors = {name: [] for name, _ in targets}
    for i in range(a.n):
        k = i % len(targets)
        for name, url in targets[k:] + targets[:k]:
            ms, err = curl(url, 15 + 10 * a.delay_ms / 1000.0)
            if ms is None:
                errors[name].append(err)
            else:
                times[name].append(ms)
    c1 = bl.counters(a.beckon)
    net = bl.delta(n0, bl.net_snapshot())
    with open(a.server_log, errors="replace") as f:
        f.seek(log_off)
        log = f.read()
    setup_ms, rts, timed, strategies, warm = [], [], [], {}, 0
    for line in log.splitlines():
        if "direct TCP connection up" not in line:
            continue
        if "warm=true" in line:
            warm += 1
            continue
        m = re.search(r"setup_ms=(\d+)", line)
        r = re.search(r"round_trips=(\d+)", line)
        t = re.search(r"timed_steps=(\d+)", line)
        s = re.search(r"strategy=(\S+)", line)
        if m:
            setup_ms.append(int(m.group(1)))
        if r:
            rts.append(int(r.group(1)))
        if t:
            timed.append(int(t.group(1)))
        if s:
            strategies[s.group(1)] = strategies.get(s.group(1), 0) + 1
    res = {
        "delay_ms": a.delay_ms, "n": a.n, "rtt_ms": rtt, "pings": got,
        "median_ms": {k: bl.median(v) for k, v in times.items()},
        "min_ms": {k: (min(v) if v else None) for k, v in times.items()},
        "max_ms": {k: (max(v) if v else None) for k, v in times.items()},
        "ok": {k: len(v) for k, v in times.items()},
        "errors": {k: v[:3] for k, v in errors.items() if v},
        "counters": bl.delta(c0, c1), "net": net,
        "server_setup_ms_median": bl.median(setup_ms),
        "server_round_trips": sorted(set(rts)),
        "server_timed_steps": sorted(set(timed)),
        "strategies": strategies,
        "warm_connections": warm,
    }
    bl.write_json(a.out, res)
    print(f"setup delay {a.delay_ms} ms: RTT {rtt:.2f} ms; median ms "
          + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in res["median_ms"].items())
          + f"; direct {res['counters'].get('tcp_connections_direct')} assisted {res['counters'].get('tcp_connections_assisted')}"
          + f" fallbacks {res['counters'].get('tcp_direct_fallbacks')}; server setup_ms median {res['server_setup_ms_median']}"
          + f" round_trips {res['server_round_trips']} timed_steps {res['server_timed_steps']} {strategies}", file=sys.stderr)


if __name__ == "__main__":
    main()
