"""``--soak``: a long run at concurrency 64 on the instant upstream per gateway, sampling the
workers' RSS; growth is measured from the first sample (taken after a warm-up) to the last."""

from __future__ import annotations

import time

import loadgen
from proctree import tree_usage, workers
from report import fmt, table

SOAK_CONCURRENCY = 64
WARMUP_SHARE = 0.05  # the first sample is taken this far into the run


def worker_rss_mb(pid: int) -> float:
    return sum(m.rss_kb for m in workers(tree_usage(pid))) / 1024


def sample_rss(pid: int, process, duration_s: float, interval_s: float) -> list[tuple[float, float]]:
    """(seconds since start, workers' summed RSS in MB) until wrk exits."""
    started = time.monotonic()
    samples = []
    next_at = max(interval_s, duration_s * WARMUP_SHARE)
    while process.poll() is None:
        now = time.monotonic() - started
        if now >= next_at:
            samples.append((round(now, 1), worker_rss_mb(pid)))
            next_at += interval_s
        time.sleep(0.2)
    return samples


def soak_one(server, endpoint, upstream, duration_s: float, interval_s: float) -> dict:
    received_before = upstream.received()
    process = loadgen.start_wrk(endpoint.url, endpoint.script, SOAK_CONCURRENCY, duration_s)
    samples = sample_rss(server.pid, process, duration_s, interval_s)
    samples.append((round(duration_s, 1), worker_rss_mb(server.pid)))  # after the load stopped
    load = loadgen.finish_wrk(process)
    start_mb, end_mb = samples[0][1], samples[-1][1]
    return {"duration_s": load.duration_s, "requests": load.requests, "rps": load.rps,
            "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "errors": load.errors,
            "upstream_received": upstream.received() - received_before,
            "start_mb": start_mb, "end_mb": end_mb, "peak_mb": max(mb for _, mb in samples),
            "growth": (end_mb - start_mb) / start_mb if start_mb else float("nan"), "samples": samples}


def run_soaks(running, ends, upstream, duration_s: float, interval_s: float) -> dict[str, dict]:
    results = {}
    for server in running:
        print(f"soak: {server.name}, {duration_s:.0f} s at c={SOAK_CONCURRENCY} ...", flush=True)
        results[server.name] = soak_one(server, ends[(server.name, upstream.name)], upstream,
                                        duration_s, interval_s)
    return results


def soak_table(results: dict[str, dict]) -> str:
    headers = ["target", "seconds", "req/s", "p50 ms", "p99 ms", "errors", "RSS start MB", "RSS end MB",
               "RSS peak MB", "growth"]
    lines = [[name, fmt(s["duration_s"], ".0f"), fmt(s["rps"], ".0f"), fmt(s["p50_ms"], ".2f"),
              fmt(s["p99_ms"], ".2f"), str(s["errors"]), fmt(s["start_mb"]), fmt(s["end_mb"]),
              fmt(s["peak_mb"]), fmt(s["growth"] * 100, "+.1f") + "%"] for name, s in results.items()]
    return table(headers, lines, left=(0,))
