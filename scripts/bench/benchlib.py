"""Shared helpers of the beckon benchmark (stdlib only): process CPU and RSS from /proc,
machine CPU, beckon status counters, medians."""
import json
import os
import statistics
import subprocess

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_ticks(pid: int) -> int:
    """utime + stime of PID (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # fields 14, 15 of stat(5)


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_ticks():
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


class CpuProbe:
    """CPU seconds used by some processes, and the machine's busy share, between start() and stop()."""

    def __init__(self, pids):
        self.pids = {k: int(v) for k, v in pids.items() if v}

    def _sample(self):
        s = {}
        for k, pid in self.pids.items():
            try:
                s[k] = proc_ticks(pid)
            except OSError:
                s[k] = None
        return s, machine_ticks()

    def start(self):
        self.t0 = _now()
        self.s0, self.m0 = self._sample()

    def stop(self):
        t1 = _now()
        s1, m1 = self._sample()
        wall = max(t1 - self.t0, 1e-9)
        out = {"wall_s": round(wall, 3)}
        for k in self.pids:
            if self.s0.get(k) is not None and s1.get(k) is not None:
                secs = (s1[k] - self.s0[k]) / CLK_TCK
                out[f"{k}_cpu_s"] = round(secs, 3)
                out[f"{k}_cpu_pct"] = round(100.0 * secs / wall, 1)  # % of one core
            try:
                out[f"{k}_rss_mb"] = round(proc_rss_kb(self.pids[k]) / 1024.0, 1)
            except OSError:
                pass
        busy, total = m1[0] - self.m0[0], m1[1] - self.m0[1]
        out["machine_busy_pct"] = round(100.0 * busy / total, 1) if total else None
        return out


def _now():
    import time
    return time.monotonic()


def beckon_status(beckon: str) -> dict:
    out = subprocess.run([beckon, "status", "--json"], capture_output=True, timeout=30, check=True)
    return json.loads(out.stdout)


def counters(beckon: str) -> dict:
    return beckon_status(beckon)["counters"]


def delta(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in b if isinstance(b.get(k), int)}


def median(xs):
    return statistics.median(xs) if xs else None


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
