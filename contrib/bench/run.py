"""``make bench``: the gateway against no proxy, a bare Tornado + pycurl forwarder and
(``--compare litellm``) the LiteLLM proxy, on loopback upstreams that count what they receive.

    .venv/bin/python contrib/bench/run.py [--workers 1,2] [--rounds 2] [--duration 8]
        [--concurrency 1,16,64] [--compare litellm] [--quick] [--soak]

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
from pathlib import Path

import deps
import environment
import loadgen
import report
import servers
import soak
import streams
import targets
from proctree import cpu_delta, cpu_seconds, machine_busy_seconds, reset_peaks, tree_cpu, tree_usage
from upstreams import CHAT_PATH, Upstream, Upstreams, UpstreamSpec, settle

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
PROXYCTL = Path(sys.executable).parent / "proxyctl"
NOISY = 0.10  # other processes' CPU share (of one core) above which a run is flagged


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


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


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
                soak_interval_s=5.0 if quick else 15.0)


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
    if not plan.soak:
        keep(servers.start_bare(logdir))
    if litellm_bin is not None:
        for w in plan.workers:
            keep(servers.start_litellm(litellm_bin, config, w, logdir))
    return started


ROUTER_CONCURRENCY = 64  # the router scenario runs at c=64 and is compared with instant c=64
VKEY_CONCURRENCY = 64    # the virtual-key scenario: c=64, virtual key vs master key on one gateway


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


def run_loads(plan: Plan, ups: dict[str, Upstream], nginx_pid: int, running: list[servers.Server],
              ends: dict[tuple[str, str], Endpoint], keyed: list[servers.Server] = ()) -> list[report.Point]:
    """Per round, upstream and concurrency: direct, then every server (order reversed in odd
    rounds), so direct and proxied runs share the machine's noise."""
    names = [s.name for s in running]
    gateways = [s.name for s in running if s.kind == "gateway"]
    total = plan.rounds * (2 * len(plan.concurrency) * (1 + len(names)) + len(gateways) + 2 * len(keyed))
    points = []
    for round_no in range(plan.rounds):
        order = names if round_no % 2 == 0 else names[::-1]
        for upstream in ("instant", "slow"):
            for c in plan.concurrency:
                for target in [report.DIRECT, *order]:
                    points.append(measure(ends[(target, upstream)], ups[upstream], nginx_pid, c, plan.duration_s,
                                          round_no))
                    print(f"[{len(points)}/{total}] {describe(points[-1])}", flush=True)
        for target in (g for g in order if g in gateways):  # the router scenario, next to instant c=64
            points.append(measure(ends[(target, servers.PAIR)], ups["instant"], nginx_pid, ROUTER_CONCURRENCY,
                                  plan.duration_s, round_no, label=servers.PAIR))
            print(f"[{len(points)}/{total}] {describe(points[-1])}", flush=True)
        for s in keyed:  # virtual key + spend log, next to the master key on the same gateway
            labels = (servers.KEYS, servers.VKEY) if round_no % 2 == 0 else (servers.VKEY, servers.KEYS)
            for label in labels:
                points.append(measure(ends[(s.name, label)], ups["instant"], nginx_pid, VKEY_CONCURRENCY,
                                      plan.duration_s, round_no, label=label))
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


def print_report(rows, memory, ttft, bursts, checks) -> None:
    print("\n== Load (wrk, POST /v1/chat/completions; medians over rounds) ==")
    print(report.load_table(rows))
    print("\n== Memory: peak RSS (VmHWM) during the load runs, then during the streaming tests ==")
    print(report.memory_table(memory))
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
        keyed = [] if plan.soak else start_keyed(plan, ups, workdir, stack)
        ends = {**endpoints(workdir, ups, running), **keyed_endpoints(workdir, keyed)}
        warm_up(ends, running, plan)
        if plan.soak:
            results = soak.run_soaks(running, ends, ups["instant"], plan.soak_duration_s, plan.soak_interval_s)
            print("\n" + soak.soak_table(results))
            checks = targets.soak_checks(results)
            print("\n" + targets.checks_table(checks))
            return {"soak": results, "targets": checks}
        points = run_loads(plan, ups, upstreams.process.pid, running, ends, [s for s, _ in keyed])
        memory = [report.memory_report(s.name, "load", tree_usage(s.pid)) for s in running]
        if all(reset_peaks(s.pid) for s in running):
            phase = "streams"
        else:
            phase = "load+streams"  # peaks could not be restarted: the second reading covers both
        ttft, bursts = run_streaming(plan, spec, ups["sse"], running)
        memory += [report.memory_report(s.name, phase, tree_usage(s.pid)) for s in running]
        rows = report.summarise(points)
        checks = targets.evaluate(rows, memory, ttft, bursts, {}, plan.workers)
        print_report(rows, memory, ttft, bursts, checks)
        return {"rows": rows, "points": points, "memory": memory, "ttft": ttft, "bursts": bursts,
                "targets": checks}


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
