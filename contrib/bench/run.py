"""``make bench``: the gateway against no proxy, a bare Tornado + pycurl forwarder and
(``--compare litellm``) the LiteLLM proxy, on loopback upstreams that count what they receive.

    .venv/bin/python contrib/bench/run.py [--workers 1,2] [--rounds 2] [--duration 8]
        [--concurrency 1,16,64] [--compare litellm] [--quick] [--soak] [--scenarios cache,...]

Prints the tables and issue 5's targets (PASS/MISS) and writes contrib/bench/results/<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import deps
import environment
import loadgen
import report
import servers
import soak
import streams
import targets
from netutil import LOOPBACK, redis_answers
from proctree import cpu_delta, cpu_seconds, machine_busy_seconds, reset_peaks, tree_cpu, tree_usage
from upstreams import CHAT_PATH, Upstream, Upstreams, UpstreamSpec, quiesce, settle

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
PROXYCTL = Path(sys.executable).parent / "proxyctl"
NOISY = 0.10  # other processes' CPU share (of one core) above which a run is flagged
# What a run measures (--scenarios picks some): the load points on the instant and slow upstreams
# (direct, every target), the router's two-deployment group, the virtual key + spend log, cache
# hits against the uncached gateway, and the streaming tests.
SCENARIOS = ("load", "pair", "vkey", "cache", "streams")


@dataclasses.dataclass(frozen=True)
class Plan:
    workers: list[int]
    rounds: int
    duration_s: float
    concurrency: list[int]
    compare_litellm: bool
    litellm_version: str | None
    warmup_s: float
    ttft_samples: int
    burst_streams: int
    stall_s: float
    log_level: str
    soak: bool
    soak_duration_s: float
    soak_interval_s: float
    scenarios: tuple[str, ...] = SCENARIOS


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def scenario_list(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)}; got {text!r}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the gateway (issue 5).")
    p.add_argument("--workers", type=int_list, default=[1, 2], help="gateway worker counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every load point (default 2)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (default 8)")
    p.add_argument("--concurrency", type=int_list, default=[1, 16, 64], help="default 1,16,64")
    p.add_argument("--compare", choices=["litellm"], default=None,
                   help="also run the LiteLLM proxy (installed into contrib/bench/.venvs/litellm)")
    p.add_argument("--litellm-version", default=None, help="pin litellm[proxy] (default: latest)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round, 2 s per point")
    p.add_argument("--soak", action="store_true", help="only the soak: c=64 on the instant upstream, RSS growth")
    p.add_argument("--soak-duration", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--ttft-samples", type=int, default=20, help="sequential streams per target (default 20)")
    p.add_argument("--streams", type=int, default=500, help="concurrent streams in the burst (default 500)")
    p.add_argument("--stall", type=float, default=1.0, help="a gap between events longer than this "
                                                            "(seconds) is a stall (default 1)")
    p.add_argument("--scenarios", type=scenario_list, default=SCENARIOS,
                   help=f"comma-separated, a subset of {','.join(SCENARIOS)} (default: all); e.g. "
                        "--quick --scenarios cache runs only the cache-hit comparison")
    p.add_argument("--log-level", default="INFO", help="gateway log level; INFO keeps the request log on, "
                                                       "written to a file (default INFO)")
    return p.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    quick = args.quick
    return Plan(workers=args.workers, rounds=1 if quick else args.rounds,
                duration_s=min(args.duration, 2.0) if quick else args.duration,
                concurrency=args.concurrency, compare_litellm=args.compare == "litellm",
                litellm_version=args.litellm_version, warmup_s=1.0 if quick else 2.0,
                ttft_samples=5 if quick else args.ttft_samples, burst_streams=args.streams,
                stall_s=args.stall, log_level=args.log_level.upper(), soak=args.soak,
                soak_duration_s=60.0 if quick else args.soak_duration,
                soak_interval_s=5.0 if quick else 15.0, scenarios=args.scenarios)


def raise_open_files_limit() -> None:
    """500 streams through a proxy need ~1,000 sockets in it; children inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 65536):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def start_servers(plan: Plan, config: Path, logdir: Path, litellm_bin: Path | None,
                  stack: contextlib.ExitStack) -> list[servers.Server]:
    started = []

    def keep(server: servers.Server) -> None:
        stack.callback(servers.stop, server)
        started.append(server)

    for w in plan.workers:
        keep(servers.start_gateway(PROXYCTL, config, w, plan.log_level, logdir))
    if not plan.soak and {"load", "streams"} & set(plan.scenarios):
        keep(servers.start_bare(logdir))
    if litellm_bin is not None:
        for w in plan.workers:
            keep(servers.start_litellm(litellm_bin, config, w, logdir))
    return started


ROUTER_CONCURRENCY = 64  # the router scenario runs at c=64 and is compared with instant c=64
VKEY_CONCURRENCY = 64    # the virtual-key scenario: c=64, virtual key vs master key on one gateway
CACHE_CONCURRENCY = 64   # the cache-hit scenario: c=64, cached gateway vs gateway-wN, slow upstream
CACHE_TTL_S = 3600       # longer than any run: after the warm-up every measured request is a hit


def start_keyed(plan: Plan, ups: dict[str, Upstream], workdir: Path, stack: contextlib.ExitStack
                ) -> list[tuple[servers.Server, str]]:
    """Per worker count, a gateway with database storage (embedded PostgreSQL) and a virtual
    key made on it: the "virtual key + spend log" scenario."""
    keyed = []
    for w in plan.workers:
        folder = workdir / f"keys-w{w}"
        folder.mkdir()
        config = folder / "config.yaml"
        config.write_text(servers.keyed_config_yaml(ups, folder))
        server = servers.start_gateway(PROXYCTL, config, w, plan.log_level, workdir, name=f"gateway-keys-w{w}")
        stack.callback(servers.stop, server)
        servers.wait_ready(server, ups["instant"], timeout=120)
        keyed.append((server, servers.generate_key(server)))
    return keyed


def keyed_endpoints(workdir: Path, keyed: list[tuple[servers.Server, str]]) -> dict[tuple[str, str], Endpoint]:
    result = {}
    body = request_body(servers.MODEL_PREFIX + "instant")
    for s, key in keyed:
        for label, bearer in ((servers.KEYS, servers.MASTER_KEY), (servers.VKEY, key)):
            script = loadgen.write_script(workdir / f"{s.name}-{label}.lua", body, bearer)
            result[(s.name, label)] = Endpoint(s.name, f"http://127.0.0.1:{s.port}{CHAT_PATH}", script, s)
    return result


def start_cached(plan: Plan, ups: dict[str, Upstream], workdir: Path, stack: contextlib.ExitStack
                 ) -> list[servers.Server]:
    """Per worker count, the gateways' config with the response cache on: ``local`` and, when a
    Redis answers on 127.0.0.1:6379, ``redis`` under a namespace of this run's own."""
    stores = [("cache", {"type": "local", "ttl": CACHE_TTL_S})]
    if redis_answers(6379):
        stores.append(("rcache", {"type": "redis", "host": LOOPBACK, "port": 6379, "ttl": CACHE_TTL_S,
                                  "namespace": f"bench-{uuid.uuid4().hex[:12]}"}))
    cached = []
    for w in plan.workers:
        for kind, params in stores:
            name = f"gateway-{kind}-w{w}"
            config = workdir / f"{name}.yaml"
            config.write_text(servers.cached_config_yaml(ups, params))
            server = servers.start_gateway(PROXYCTL, config, w, plan.log_level, workdir, name=name)
            stack.callback(servers.stop, server)
            servers.wait_ready(server, ups["instant"], timeout=60)
            cached.append(server)
    return cached


def cache_endpoints(workdir: Path, running: list[servers.Server], cached: list[servers.Server]
                    ) -> dict[tuple[str, str], Endpoint]:
    """The same request (one prompt, the slow upstream's group) to each cached gateway and, as
    the baseline, to each uncached gateway-wN."""
    if not cached:
        return {}
    body = request_body(servers.MODEL_PREFIX + servers.CACHE_UPSTREAM)
    result = {}
    pairs = [(s, servers.CACHE) for s in cached] + [(s, servers.NOCACHE) for s in running if s.kind == "gateway"]
    for s, label in pairs:
        script = loadgen.write_script(workdir / f"{s.name}-{label}.lua", body, s.key())
        result[(s.name, label)] = Endpoint(s.name, f"http://127.0.0.1:{s.port}{CHAT_PATH}", script, s)
    return result


def request_body(model: str) -> bytes:
    """A typical small chat request: system + user message, a few parameters."""
    return (b'{"model":"' + model.encode() + b'","messages":[{"role":"system","content":"You are a '
            b'helpful assistant. Answer briefly."},{"role":"user","content":"What is the capital of '
            b'France? Answer in one word."}],"temperature":0.2,"max_tokens":64,"user":"bench"}')


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """How a wrk run reaches one upstream: directly or through one server."""

    target: str
    url: str
    script: Path
    server: servers.Server | None


def endpoints(workdir: Path, ups: dict[str, Upstream], running: list[servers.Server]) -> dict[tuple[str, str], Endpoint]:
    result = {}
    for u in ups.values():
        direct = loadgen.write_script(workdir / f"direct-{u.name}.lua", request_body(f"bench-{u.name}"),
                                      servers.UPSTREAM_KEY)
        result[(report.DIRECT, u.name)] = Endpoint(report.DIRECT, f"http://127.0.0.1:{u.port}{CHAT_PATH}",
                                                   direct, None)
        for s in running:
            script = loadgen.write_script(workdir / f"{s.name}-{u.name}.lua", request_body(s.model_for(u)), s.key())
            result[(s.name, u.name)] = Endpoint(s.name, f"http://127.0.0.1:{s.port}{s.path_for(u)}", script, s)
    for s in running:
        if s.kind == "gateway":
            script = loadgen.write_script(workdir / f"{s.name}-{servers.PAIR}.lua", request_body(servers.PAIR_MODEL),
                                          s.key())
            result[(s.name, servers.PAIR)] = Endpoint(s.name, f"http://127.0.0.1:{s.port}{CHAT_PATH}", script, s)
    return result


def own_cpu_seconds() -> float:
    """This process and its reaped children (wrk) so far."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def measure(endpoint: Endpoint, upstream: Upstream, nginx_pid: int, concurrency: int, duration_s: float,
            round_no: int, label: str | None = None) -> report.Point:
    """One wrk run; also how busy the rest of the machine was meanwhile (shared-machine noise)."""
    received_before = upstream.received()
    server_pid = endpoint.server.pid if endpoint.server else None
    cpu_before = tree_cpu(server_pid) if server_pid else {}
    nginx_before, own_before, busy_before = cpu_seconds(nginx_pid), own_cpu_seconds(), machine_busy_seconds()
    load = loadgen.run_wrk(endpoint.url, endpoint.script, concurrency, duration_s)
    cpu = cpu_delta(cpu_before, tree_cpu(server_pid)) if server_pid else None
    known = (cpu or 0.0) + cpu_seconds(nginx_pid) - nginx_before + own_cpu_seconds() - own_before
    other = max(0.0, machine_busy_seconds() - busy_before - known) / load.duration_s if load.duration_s else 0.0
    received = settle(upstream, received_before + load.ok) - received_before
    return report.Point(label or upstream.name, concurrency, endpoint.target, round_no, load, cpu, received, other)


def describe(p: report.Point) -> str:
    load = p.load
    cpu = f" cpu {p.cpu_s / load.requests * 1000:.3f}s/1k" if p.cpu_s is not None and load.requests else ""
    return (f"{p.upstream:7} c={p.concurrency:<3} {p.target:11} {load.rps:9.0f} req/s  p50 {load.p50_ms:8.2f} ms  "
            f"p99 {load.p99_ms:8.2f} ms  errors {load.errors}  upstream {p.received}{cpu}  "
            f"other load {p.other_cpu:.0%}")


def warm_up(ends: dict[tuple[str, str], Endpoint], running: list[servers.Server], plan: Plan) -> None:
    for s in running:
        loadgen.run_wrk(ends[(s.name, "instant")].url, ends[(s.name, "instant")].script, 16, plan.warmup_s)
    for (name, label), end in ends.items():
        if label in (servers.KEYS, servers.VKEY):
            loadgen.run_wrk(end.url, end.script, 16, plan.warmup_s)
        elif label == servers.CACHE:  # as many connections as measured, so that every worker stores the answer
            loadgen.run_wrk(end.url, end.script, CACHE_CONCURRENCY, plan.warmup_s)


Job = tuple[tuple[str, str], str, int, "str | None"]  # (endpoint key, upstream, concurrency, row label)


def round_jobs(plan: Plan, round_no: int, running: list[servers.Server], keyed: list[servers.Server],
               cached: list[servers.Server]) -> list[Job]:
    """One round's wrk runs. Per upstream and concurrency: direct, then every server (order
    reversed in odd rounds), so direct and proxied runs share the machine's noise; each scenario
    next to what it is compared with."""
    names = [s.name for s in running]
    order = names if round_no % 2 == 0 else names[::-1]
    gateways = [n for n in order if n.startswith("gateway")]
    jobs: list[Job] = []
    if "load" in plan.scenarios:
        jobs += [((target, upstream), upstream, c, None) for upstream in ("instant", "slow")
                 for c in plan.concurrency for target in [report.DIRECT, *order]]
    if "pair" in plan.scenarios:  # the router scenario, next to instant c=64
        jobs += [((g, servers.PAIR), "instant", ROUTER_CONCURRENCY, servers.PAIR) for g in gateways]
    for s in keyed:  # virtual key + spend log, next to the master key on the same gateway
        labels = (servers.KEYS, servers.VKEY) if round_no % 2 == 0 else (servers.VKEY, servers.KEYS)
        jobs += [((s.name, label), "instant", VKEY_CONCURRENCY, label) for label in labels]
    if cached:  # cache hits, next to the same request through the uncached gateway
        pairs = [item for g in sorted(gateways) for item in
                 [((g, servers.NOCACHE), servers.NOCACHE)]
                 + [((s.name, servers.CACHE), servers.CACHE) for s in cached if s.workers == int(g.rsplit("-w", 1)[1])]]
        pairs = pairs if round_no % 2 == 0 else pairs[::-1]
        jobs += [(key, servers.CACHE_UPSTREAM, CACHE_CONCURRENCY, label) for key, label in pairs]
    return jobs


def run_loads(plan: Plan, ups: dict[str, Upstream], nginx_pid: int, running: list[servers.Server],
              ends: dict[tuple[str, str], Endpoint], keyed: list[servers.Server] = (),
              cached: list[servers.Server] = ()) -> list[report.Point]:
    rounds = [round_jobs(plan, r, running, list(keyed), list(cached)) for r in range(plan.rounds)]
    total = sum(len(jobs) for jobs in rounds)
    points = []
    for round_no, jobs in enumerate(rounds):
        for key, upstream, c, label in jobs:
            if label in (servers.CACHE, servers.NOCACHE):
                quiesce(ups[upstream])  # what reaches the upstream during a cached run must be its own
            points.append(measure(ends[key], ups[upstream], nginx_pid, c, plan.duration_s, round_no, label=label))
            print(f"[{len(points)}/{total}] {describe(points[-1])}", flush=True)
    return points


def stream_targets(sse: Upstream, running: list[servers.Server]) -> dict[str, streams.StreamTarget]:
    result = {report.DIRECT: streams.StreamTarget(sse.port, CHAT_PATH, servers.UPSTREAM_KEY, "bench-sse")}
    for s in running:
        result[s.name] = streams.StreamTarget(s.port, s.path_for(sse), s.key(), s.model_for(sse))
    return result


def run_streaming(plan: Plan, spec: UpstreamSpec, sse: Upstream, running: list[servers.Server]
                  ) -> tuple[dict[str, dict], dict[str, dict]]:
    stargets = stream_targets(sse, running)
    timeout = 120.0
    ttft = asyncio.run(streams.measure_ttft(stargets, plan.ttft_samples, spec.sse_chunks, timeout))
    bursts = {}
    for name, target in stargets.items():
        before = sse.received()
        summary = asyncio.run(streams.measure_burst(target, plan.burst_streams, spec.sse_chunks, plan.stall_s, timeout))
        bursts[name] = {**dataclasses.asdict(summary), "upstream_received": settle(sse, before + summary.complete) - before}
        print(f"streams {name:11} {summary.complete}/{summary.streams} complete, {summary.stalled} stalled, "
              f"TTFT p50 {summary.ttft_p50_ms:.1f} ms, max gap {summary.max_gap_ms:.0f} ms", flush=True)
    return ttft, bursts


def print_report(rows, memory, ttft, bursts, checks, cache) -> None:
    print("\n== Load (wrk, POST /v1/chat/completions; medians over rounds) ==")
    print(report.load_table(rows))
    if cache:
        print(f"\n== Cache hits (one prompt, c={CACHE_CONCURRENCY}, the 50 ms upstream): cached gateway vs the "
              "same config uncached ==")
        print(report.cache_table(cache))
    print("\n== Memory: peak RSS (VmHWM) during the load runs, then during the streaming tests ==")
    print(report.memory_table(memory))
    if ttft:
        print("\n== Streaming (SSE upstream: 20 chunks 10 ms apart) ==")
        print(report.streaming_table(ttft, bursts))
    print("\n== Issue 5 targets ==")
    print(targets.checks_table(checks))
    noise = max((r.other_cpu for r in rows), default=0.0)
    if noise > NOISY:
        print(f"\nwarning: other processes kept up to {noise:.0%} of a core busy during some runs "
              "(column 'other load'); those figures are noisy, rerun on a quiet machine")


def benchmark(plan: Plan, spec: UpstreamSpec, workdir: Path) -> dict:
    litellm_bin = environment.ensure_litellm(plan.litellm_version)[0] if plan.compare_litellm else None
    with contextlib.ExitStack() as stack:
        upstreams = Upstreams(workdir / "nginx", spec)
        stack.callback(upstreams.stop)
        upstreams.start()
        ups = upstreams.by_name
        config = workdir / "config.yaml"
        config.write_text(servers.config_yaml(ups))
        running = start_servers(plan, config, workdir, litellm_bin, stack)
        for s in running:
            servers.wait_ready(s, ups["instant"], timeout=300 if s.kind == "litellm" else 60)
        keyed = start_keyed(plan, ups, workdir, stack) if not plan.soak and "vkey" in plan.scenarios else []
        cached = start_cached(plan, ups, workdir, stack) if not plan.soak and "cache" in plan.scenarios else []
        ends = {**endpoints(workdir, ups, running), **keyed_endpoints(workdir, keyed),
                **cache_endpoints(workdir, running, cached)}
        warm_up(ends, running, plan)
        if plan.soak:
            results = soak.run_soaks(running, ends, ups["instant"], plan.soak_duration_s, plan.soak_interval_s)
            print("\n" + soak.soak_table(results))
            checks = targets.soak_checks(results)
            print("\n" + targets.checks_table(checks))
            return {"soak": results, "targets": checks}
        points = run_loads(plan, ups, upstreams.process.pid, running, ends, [s for s, _ in keyed], cached)
        memory = [report.memory_report(s.name, "load", tree_usage(s.pid)) for s in running]
        ttft, bursts = {}, {}
        if "streams" in plan.scenarios:
            if all(reset_peaks(s.pid) for s in running):
                phase = "streams"
            else:
                phase = "load+streams"  # peaks could not be restarted: the second reading covers both
            ttft, bursts = run_streaming(plan, spec, ups["sse"], running)
            memory += [report.memory_report(s.name, phase, tree_usage(s.pid)) for s in running]
        rows = report.summarise(points)
        cache = report.cache_comparisons(rows)
        checks = targets.evaluate(rows, memory, ttft, bursts, {}, plan.workers, cache)
        print_report(rows, memory, ttft, bursts, checks, cache)
        return {"rows": rows, "points": points, "memory": memory, "ttft": ttft, "bursts": bursts,
                "cache": cache, "targets": checks}


def main(argv: list[str] | None = None) -> int:
    plan = plan_from(parse_args(argv))
    deps.ensure_tools()
    raise_open_files_limit()
    spec = UpstreamSpec()
    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    with tempfile.TemporaryDirectory(prefix="tornado-proxy-bench-") as tmp:
        results = benchmark(plan, spec, Path(tmp))
    document = {"started": stamp, "wall_s": round(time.time() - started, 1), "plan": plan, "upstreams": spec,
                "machine": environment.describe_machine(plan.compare_litellm), **results}
    out = RESULTS_DIR / f"{stamp}.json"
    report.write_json(out, document)
    print(f"\nresults: {out.relative_to(HERE.parent.parent)} ({document['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
