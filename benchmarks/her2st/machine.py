"""How busy other processes kept the machine while a benchmark ran.

Wall times are only comparable when the benchmark had the cores to itself: the same HER2ST
grid, with the same epochs and the same figures, once measured 95 min and, alone, 72 min.
Linux's /proc/stat counts every CPU's busy time; subtracting this process's own CPU time
leaves what others used, so a table can say whether its timings read high.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat's cpu line: user nice system [idle iowait] irq softirq steal
SHARED_ABOVE = 0.1  # CPUs kept busy by others on average beyond which the timings are flagged


@dataclass(frozen=True)
class CpuSnapshot:
    busy_s: float  # every CPU's busy time since boot (steal included: a hypervisor's other guests count as others)
    own_s: float  # this process's CPU time, and that of the children it waited for
    wall_s: float

    @classmethod
    def now(cls, stat: Path = Path("/proc/stat")) -> CpuSnapshot | None:
        """None where the system keeps no /proc/stat (not Linux)."""
        try:
            ticks = [int(v) for v in stat.read_text().splitlines()[0].split()[1:9]]
        except (OSError, ValueError, IndexError):
            return None
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system
        return cls(sum(ticks[i] for i in BUSY_FIELDS) / os.sysconf("SC_CLK_TCK"), own, time.monotonic())


def others_busy(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """The mean number of CPUs other processes kept busy between two snapshots (None if either is missing)."""
    if before is None or after is None or after.wall_s <= before.wall_s:
        return None
    others = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / (after.wall_s - before.wall_s))


def mean_busy(runs: list[dict]) -> float | None:
    """`others_busy` of the timed runs, weighted by their `seconds` (None if none recorded it)."""
    timed = [(r["seconds"], r["others_busy"]) for r in runs if r.get("others_busy") is not None and r.get("seconds")]
    total = sum(seconds for seconds, _ in timed)
    return sum(seconds * busy for seconds, busy in timed) / total if total > 0 else None


def reads_high(busy: float) -> bool:
    """Whether others kept the machine busy enough that the timings cannot be taken as the benchmark's own."""
    return busy > SHARED_ABOVE


def load_line(busy: float) -> str:
    """The results' sentence on how busy others kept the machine during the timed runs."""
    cpus = os.cpu_count() or 1
    verdict = ("the timings above read high: run the benchmark alone to time it" if reads_high(busy)
               else "the timings are the benchmark's own")
    return f"Other processes kept {busy:.2f} of the {cpus} CPUs busy on average during the timed runs; {verdict}."
