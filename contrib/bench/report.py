"""From raw measurements to the summary rows, the text tables and the results JSON."""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from loadgen import LoadResult
from proctree import ProcessUsage, workers
from servers import CACHE, NOCACHE

DIRECT = "direct"


@dataclass(frozen=True)
class Point:
    """One wrk run against one target. ``cpu_s`` is the target's process-tree CPU time during
    the run (None for direct runs); ``received`` is what the upstream counted meanwhile."""

    upstream: str
    concurrency: int
    target: str
    round: int
    load: LoadResult
    cpu_s: float | None
    received: int
    other_cpu: float  # busy CPU share (1.0 = one core) of everything but target, upstream and wrk


@dataclass(frozen=True)
class Row:
    """All rounds of one (upstream, concurrency, target): medians of rps and latency, sums of
    requests, errors, upstream receipts and CPU."""

    upstream: str
    concurrency: int
    target: str
    rounds: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    received: int
    cpu_per_1k: float | None
    vs_direct: float | None = None  # rps ratio to the direct run
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    vs_bare: float | None = None  # rps ratio to the bare forwarder
    other_cpu: float = 0.0  # mean busy share of other processes on the machine (noise)

    @property
    def short_circuited(self) -> bool:
        """The upstream got fewer requests than the client got successful answers."""
        return self.received < self.requests - self.errors


@dataclass(frozen=True)
class MemoryReport:
    """Peaks (VmHWM) of one target's processes over one phase of the run."""

    target: str
    phase: str  # "load": start-up and the wrk runs; "streams": the streaming tests
    processes: list[ProcessUsage]
    worker_peaks_mb: list[float]
    worker_peak_sum_mb: float
    total_peak_mb: float  # every process, supervisors included
    total_pss_mb: float  # shared pages split between the processes that share them


def combine(points: list[Point]) -> Row:
    first = points[0]
    loads = [p.load for p in points]
    requests = sum(l.requests for l in loads)
    cpu = [p.cpu_s for p in points if p.cpu_s is not None]
    return Row(first.upstream, first.concurrency, first.target, len(points),
               rps=statistics.median(l.rps for l in loads),
               p50_ms=statistics.median(l.p50_ms for l in loads),
               p99_ms=statistics.median(l.p99_ms for l in loads),
               requests=requests, errors=sum(l.errors for l in loads),
               received=sum(p.received for p in points),
               cpu_per_1k=sum(cpu) / requests * 1000 if cpu and requests else None,
               other_cpu=statistics.mean(p.other_cpu for p in points))


def with_ratios(row: Row, direct: Row | None, bare: Row | None) -> Row:
    if row.target == DIRECT or direct is None:
        return row
    return dataclasses.replace(
        row, vs_direct=row.rps / direct.rps if direct.rps else None,
        added_p50_ms=row.p50_ms - direct.p50_ms, added_p99_ms=row.p99_ms - direct.p99_ms,
        vs_bare=row.rps / bare.rps if bare is not None and bare.rps and row.target != "bare" else None)


def summarise(points: list[Point]) -> list[Row]:
    groups: dict[tuple[str, int, str], list[Point]] = {}
    for p in points:
        groups.setdefault((p.upstream, p.concurrency, p.target), []).append(p)
    rows = {key: combine(ps) for key, ps in groups.items()}
    return [with_ratios(row, rows.get((u, c, DIRECT)), rows.get((u, c, "bare")))
            for (u, c, _), row in rows.items()]


@dataclass(frozen=True)
class CacheComparison:
    """The cache-hit scenario for one cached gateway: its rows against the uncached gateway
    with the same worker count (same request, upstream and concurrency, same run)."""

    target: str    # "gateway-cache-w1" (local) or "gateway-rcache-w1" (redis)
    baseline: str  # "gateway-w1"
    concurrency: int
    cached_rps: float
    cached_p50_ms: float
    uncached_rps: float
    uncached_p50_ms: float
    rps_ratio: float | None   # cached / uncached
    p50_ratio: float | None   # uncached / cached: how many times lower the hit's median latency is
    upstream_received: int    # what reached the upstream during the cached runs (misses)
    errors: int               # both sides


def cache_comparisons(rows: list[Row]) -> list[CacheComparison]:
    out = []
    for r in rows:
        if r.upstream != CACHE:
            continue
        baseline = "gateway-w" + r.target.rsplit("-w", 1)[1]
        base = next((b for b in rows if (b.upstream, b.concurrency, b.target) == (NOCACHE, r.concurrency, baseline)),
                    None)
        if base is None:
            continue
        out.append(CacheComparison(r.target, baseline, r.concurrency, r.rps, r.p50_ms, base.rps, base.p50_ms,
                                   r.rps / base.rps if base.rps else None,
                                   base.p50_ms / r.p50_ms if r.p50_ms else None, r.received, r.errors + base.errors))
    return out


def cache_table(comparisons: list[CacheComparison]) -> str:
    headers = ["cached gateway", "vs", "conc", "uncached req/s", "p50 ms", "hits req/s", "p50 ms", "req/s ratio",
               "p50 ratio", "upstream got", "errors"]
    lines = [[c.target, c.baseline, str(c.concurrency), fmt(c.uncached_rps, ".0f"), fmt(c.uncached_p50_ms, ".2f"),
              fmt(c.cached_rps, ".0f"), fmt(c.cached_p50_ms, ".2f"), fmt(c.rps_ratio, ".1f") + "x",
              fmt(c.p50_ratio, ".1f") + "x", str(c.upstream_received), str(c.errors)] for c in comparisons]
    return table(headers, lines, left=(0, 1))


def memory_report(target: str, phase: str, processes: list[ProcessUsage]) -> MemoryReport:
    peaks = [m.peak_kb / 1024 for m in workers(processes)]
    return MemoryReport(target, phase, processes, peaks, sum(peaks),
                        sum(m.peak_kb for m in processes) / 1024, sum(m.pss_kb for m in processes) / 1024)


def fmt(value, spec: str = ".1f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return none
    return format(value, spec)


def table(headers: list[str], lines: list[list[str]], left: tuple[int, ...] = ()) -> str:
    """Columns padded to fit; numbers right-aligned, the columns in ``left`` left-aligned."""
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(headers)]

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([render(headers), render(["-" * w for w in widths])] + [render(line) for line in lines])


def load_table(rows: list[Row]) -> str:
    headers = ["upstream", "conc", "target", "req/s", "p50 ms", "p99 ms", "errors", "upstream/ok",
               "vs direct", "+p50 ms", "+p99 ms", "vs bare", "CPU s/1k", "other load"]
    lines = []
    for r in rows:
        ok = r.requests - r.errors
        lines.append([r.upstream, str(r.concurrency), r.target, fmt(r.rps, ".0f"), fmt(r.p50_ms, ".2f"),
                      fmt(r.p99_ms, ".2f"), str(r.errors),
                      f"{r.received}/{ok}" + (" SHORT" if r.short_circuited and r.upstream != CACHE else ""),
                      fmt(r.vs_direct, ".3f"), fmt(r.added_p50_ms, "+.2f"), fmt(r.added_p99_ms, "+.2f"),
                      fmt(r.vs_bare, ".2f"), fmt(r.cpu_per_1k, ".3f"), f"{r.other_cpu:.0%}"])
    return table(headers, lines, left=(0, 2))


def memory_table(reports: list[MemoryReport]) -> str:
    headers = ["target", "phase", "processes", "peak RSS per worker MB", "workers sum MB", "all procs MB",
               "PSS now MB"]
    lines = [[m.target, m.phase, str(len(m.processes)), " ".join(fmt(p, ".1f") for p in m.worker_peaks_mb),
              fmt(m.worker_peak_sum_mb), fmt(m.total_peak_mb), fmt(m.total_pss_mb)] for m in reports]
    return table(headers, lines, left=(0, 1))


def streaming_table(ttft: dict[str, dict], bursts: dict[str, dict]) -> str:
    headers = ["target", "TTFT p50 ms", "TTFT p99 ms", "+TTFT p50 ms", "burst streams", "complete",
               "stalled", "errors", "burst TTFT p50", "burst TTFT p99", "max gap ms", "wall s"]
    base = ttft.get(DIRECT, {}).get("ttft_p50_ms")
    lines = []
    for name in ttft:
        t, b = ttft[name], bursts.get(name, {})
        lines.append([name, fmt(t["ttft_p50_ms"], ".3f"), fmt(t["ttft_p99_ms"], ".3f"),
                      fmt(t["ttft_p50_ms"] - base if base is not None and name != DIRECT else None, "+.3f"),
                      str(b.get("streams", "-")), str(b.get("complete", "-")), str(b.get("stalled", "-")),
                      str(b.get("errors", "-")), fmt(b.get("ttft_p50_ms"), ".1f"), fmt(b.get("ttft_p99_ms"), ".1f"),
                      fmt(b.get("max_gap_ms"), ".1f"), fmt(b.get("wall_s"), ".2f")])
    return table(headers, lines, left=(0,))


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        data = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for prop in ("rps", "errors", "short_circuited"):
            if hasattr(type(obj), prop) and isinstance(getattr(type(obj), prop), property):
                data[prop] = getattr(obj, prop)
        return data
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(document), indent=2) + "\n")
