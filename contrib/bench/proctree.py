"""CPU time and memory of a process and all its descendants, read from /proc (Linux only)."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessUsage:
    """One process: ``peak_kb`` is VmHWM (peak RSS over its life), ``pss_kb`` splits shared
    (copy-on-write) pages between their sharers, ``cpu_s`` is its CPU time so far."""

    pid: int
    is_root: bool
    rss_kb: int
    peak_kb: int
    pss_kb: int
    cpu_s: float


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the ``(comm)`` field (index 0 is the state), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def parents() -> dict[int, int]:
    """pid -> parent pid for every live process."""
    result = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(int(name))
            if fields is not None:
                result[int(name)] = int(fields[1])
    return result


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants, root first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # stat fields 14 and 15


def tree_cpu(root: int) -> dict[int, float]:
    """pid -> CPU seconds for the tree; diff two snapshots with ``cpu_delta``."""
    return {pid: cpu_seconds(pid) for pid in process_tree(root)}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots; a process born in between counts in full."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent in processes since boot (/proc/stat user, nice, system).
    Interrupt time is left out: the kernel does not charge it to any process either."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values[:3]) / CLOCK_TICKS


def status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    values[name] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def reset_peaks(root: int) -> bool:
    """Restart VmHWM from the current RSS for the whole tree (Linux >= 4.0, our own processes)."""
    try:
        for pid in process_tree(root):
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return False
    return True


def tree_usage(root: int) -> list[ProcessUsage]:
    result = []
    for pid in process_tree(root):
        kb = status_kb(pid, ("VmRSS", "VmHWM"))
        if kb:
            result.append(ProcessUsage(pid, pid == root, kb.get("VmRSS", 0), kb.get("VmHWM", 0),
                                       pss_kb(pid), cpu_seconds(pid)))
    return result


def workers(usage: list[ProcessUsage]) -> list[ProcessUsage]:
    """The serving processes: those that did the work (at least a quarter of the busiest
    one's CPU time). That leaves out supervisors and helpers such as a resource tracker."""
    busiest = max((u.cpu_s for u in usage), default=0.0)
    return [u for u in usage if u.cpu_s >= busiest / 4]
