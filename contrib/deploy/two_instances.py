"""Two gateway instances behind nginx on one machine: by hand, or from tests/test_e2e_deploy.py.

    DATABASE_URL=postgresql://... python contrib/deploy/two_instances.py start --workdir /tmp/tp
    python contrib/deploy/two_instances.py status --workdir /tmp/tp
    python contrib/deploy/two_instances.py restart a --workdir /tmp/tp
    python contrib/deploy/two_instances.py stop --workdir /tmp/tp

``start`` runs ``proxyctl serve`` twice (instances "a" and "b", on ``--instance-ports``, default
4001,4002) with one shared PostgreSQL (``DATABASE_URL``, ``STORE_MODEL_IN_DB=True``), one master
key and, when ``REDIS_URL`` (or ``--redis-url``) is given, one Redis; then nginx on ``--port``
(default 4000) with contrib/nginx/tornado-proxy.conf rendered for those ports. It waits until
every piece answers and prints the URL. It starts only the pieces that are not running, so after
an instance died, ``start`` again brings just that one back with the settings of the first start.
``restart a`` restarts one instance without failing a request: nginx marks it ``down`` and
reloads, its old workers finish, the instance drains (SIGTERM), starts again and is taken back.
(SIGTERM alone is not enough behind nginx: nginx keeps reusing its kept-alive connections to the
instance until they close, and a POST sent on one just as it closes gets a 502, never a retry.)
``stop`` stops nginx and both instances gracefully (SIGQUIT / SIGTERM), then kills what is left.

Everything lives in ``--workdir``: ``deploy.json`` (settings and pids), ``env`` (the secrets, mode
0600, in systemd EnvironmentFile form), ``a/`` and ``b/`` (each instance's working directory with
its ``var/`` and ``stderr.log``), ``nginx/`` (the rendered configuration, ``access.log``,
``error.log``). The master key is ``LITELLM_MASTER_KEY`` when set, else one generated into ``env``.
Only the Python standard library is used, so any Python 3.10+ runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PROXYCTL = ROOT / "bin" / "proxyctl"
TEMPLATE = ROOT / "contrib" / "nginx" / "tornado-proxy.conf"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
INSTANCES = ("a", "b")
SECRET_ENV = ("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_URL")
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0  # above the gateway's default 30 s drain (graceful_shutdown_timeout)


class DeployError(Exception):
    """A problem to print as one line (exit status 1)."""


@dataclass
class Deployment:
    """What ``deploy.json`` holds: the settings of the first ``start`` and the running pids."""
    config: str
    host: str = "127.0.0.1"
    port: int = 4000
    instance_ports: list[int] = field(default_factory=lambda: [4001, 4002])
    workers: int = 2
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def instance_port(self, name: str) -> int:
        return self.instance_ports[INSTANCES.index(name)]


# --- processes ------------------------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of ``pid``, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[2])


def running(pid: int | None) -> bool:
    """A live process (a zombie waiting for its parent to reap it is not)."""
    stat = proc_stat(pid) if pid else None
    return stat is not None and stat[0] != "Z"


def group_members(pgid: int) -> set[int]:
    """Live processes of process group ``pgid`` (an instance: its supervisor and its workers)."""
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[0] != "Z" and stat[1] == pgid:
                members.add(int(entry))
    return members


def command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def is_ours(pid: int | None, marker: str) -> bool:
    """``pid`` is running and is the process we started (its command line names ``marker``), not a
    stranger that got the number after ours died."""
    return running(pid) and marker in " ".join(command_line(pid))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DeployError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def spawn(argv: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> int:
    """Start ``argv`` in its own session (so its process group can be signalled as one, and it
    outlives this script), output appended to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    return proc.pid


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the working directory --------------------------------------------------------------------------

def state_path(workdir: Path) -> Path:
    return workdir / "deploy.json"


def load_state(workdir: Path) -> Deployment | None:
    try:
        return Deployment(**json.loads(state_path(workdir).read_text()))
    except FileNotFoundError:
        return None


def save_state(workdir: Path, deployment: Deployment) -> None:
    tmp = state_path(workdir).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(deployment), indent=2) + "\n")
    os.replace(tmp, state_path(workdir))


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines (systemd EnvironmentFile form, no quoting)."""
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {name.strip(): value for name, value in pairs}


def write_env_file(path: Path, env: dict[str, str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# secrets of the instances started by contrib/deploy/two_instances.py\n")
        f.writelines(f"{name}={value}\n" for name, value in env.items())


def settle_env(workdir: Path, database_url: str | None, redis_url: str | None) -> dict[str, str]:
    """The environment every instance shares, kept in ``workdir/env`` for later ``start``s:
    the option, else the environment, else what an earlier start recorded."""
    recorded = read_env_file(workdir / "env")
    given = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    env = {}
    for name in SECRET_ENV:
        value = given.get(name) or os.environ.get(name) or recorded.get(name)
        if value:
            env[name] = value
    if "DATABASE_URL" not in env:
        raise DeployError("no database: set DATABASE_URL (or --database-url); the instances share one PostgreSQL")
    generated = "LITELLM_MASTER_KEY" not in env
    if generated:
        env["LITELLM_MASTER_KEY"] = "sk-" + secrets.token_urlsafe(24)
    env["STORE_MODEL_IN_DB"] = "True"
    write_env_file(workdir / "env", env)
    if generated:
        print(f"generated a master key: LITELLM_MASTER_KEY in {workdir / 'env'}", file=sys.stderr)
    return env


# --- nginx ----------------------------------------------------------------------------------------

UPSTREAM_SERVER = re.compile(r"^(\s*)server\s+\S+:\d+(\s[^;]*)?;\s*$", re.M)
LISTEN = re.compile(r"^(\s*)listen\s+4000;\s*$", re.M)


def render_template(template: str, host: str, port: int, instance_ports: list[int],
                    down: frozenset[int] = frozenset()) -> str:
    """contrib/nginx/tornado-proxy.conf with its ``listen`` and upstream ``server`` lines for
    these ports (those in ``down`` marked ``down``: no new requests); every other line
    (timeouts, retries, buffering, health checks) as shipped."""
    servers = list(UPSTREAM_SERVER.finditer(template))
    if not servers or len(LISTEN.findall(template)) != 1:
        raise DeployError(f"{TEMPLATE}: expected one `listen 4000;` and upstream `server host:port ...;` lines")
    indent, params = servers[0].group(1), servers[0].group(2) or ""
    lines = "".join(f"{indent}server 127.0.0.1:{p}{params}{' down' if p in down else ''};\n" for p in instance_ports)
    start, end = servers[0].start(), servers[-1].end()
    rendered = template[:start] + lines.rstrip("\n") + template[end:]
    return LISTEN.sub(lambda m: f"{m.group(1)}listen {host}:{port};", rendered)


def nginx_main_config(folder: Path) -> str:
    """The top-level file that wraps the rendered snippet: logs and temp files inside ``folder``.
    As root, nginx would switch its workers to ``nobody``, which may not reach a private
    working directory, so they keep root's identity (they only proxy on loopback)."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {folder}/temp/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# generated by contrib/deploy/two_instances.py
{user}worker_processes 1;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    log_format deploy escape=json '{{"time": "$time_iso8601", "request": "$request", "status": $status, '
                                  '"x_request_id": "$http_x_request_id", "upstream_addr": "$upstream_addr", '
                                  '"upstream_status": "$upstream_status", "request_time": $request_time, '
                                  '"call_id": "$upstream_http_x_litellm_call_id"}}';
    access_log {folder}/access.log deploy;
{temp}
    include {folder}/tornado-proxy.conf;
}}
"""


def find_nginx() -> str:
    found = shutil.which("nginx") or next((p for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None)
    if found is None:
        raise DeployError("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


def write_nginx_config(workdir: Path, deployment: Deployment, down: frozenset[int] = frozenset()) -> None:
    folder = workdir / "nginx"
    (folder / "temp").mkdir(parents=True, exist_ok=True)
    (folder / "tornado-proxy.conf").write_text(
        render_template(TEMPLATE.read_text(), deployment.host, deployment.port, deployment.instance_ports, down))
    (folder / "nginx.conf").write_text(nginx_main_config(folder))


def reload_nginx(workdir: Path, deployment: Deployment, down: frozenset[int] = frozenset()) -> None:
    """New configuration, then wait until nginx's old workers have finished their requests and
    exited (SIGHUP: new workers take new requests at once, old ones only finish theirs and close
    their kept-alive connections). A stream can hold an old worker for long: after STOP_TIMEOUT
    this goes on anyway (the instance then drains that stream itself)."""
    master = deployment.pids["nginx"]
    if not is_ours(master, str(workdir / "nginx")):
        raise DeployError("nginx is not running: `start` first")
    old = group_members(master) - {master}
    write_nginx_config(workdir, deployment, down)
    os.kill(master, signal.SIGHUP)
    try:
        wait_until(lambda: not old & group_members(master), STOP_TIMEOUT, "nginx's old workers to finish")
    except DeployError as exc:
        print(f"two_instances: {exc}; going on", file=sys.stderr)


def start_nginx(workdir: Path, deployment: Deployment) -> int:
    folder = workdir / "nginx"
    write_nginx_config(workdir, deployment)
    argv = [find_nginx(), "-p", str(folder), "-c", str(folder / "nginx.conf"),
            "-g", f"daemon off; pid {folder / 'nginx.pid'};"]
    pid = spawn(argv, folder, folder / "nginx.out")
    try:
        wait_until(lambda: not running(pid) or accepts(deployment.host, deployment.port), 10, "nginx")
    except DeployError:
        pass
    if not running(pid):
        raise DeployError(f"nginx did not start:\n{tail(folder / 'nginx.out')}\n{tail(folder / 'error.log')}")
    return pid


# --- the instances --------------------------------------------------------------------------------

def markers(workdir: Path, deployment: Deployment) -> list[tuple[str, str]]:
    """(piece, what its command line holds) for nginx and each instance."""
    return [("nginx", str(workdir / "nginx"))] + [(n, instance_marker(deployment, n)) for n in INSTANCES]


def instance_marker(deployment: Deployment, name: str) -> str:
    """What only this instance's command line holds (nginx rewrites its own: see ``start_nginx``)."""
    return f"--port {deployment.instance_port(name)} --num-workers"


def start_instance(workdir: Path, deployment: Deployment, name: str, env: dict[str, str]) -> int:
    folder = workdir / name
    folder.mkdir(exist_ok=True)
    argv = [sys.executable, str(PROXYCTL), "serve", "--config", deployment.config, "--host", "127.0.0.1",
            "--port", str(deployment.instance_port(name)), "--num-workers", str(deployment.workers)]
    child_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    return spawn(argv, folder, folder / "stderr.log", child_env)


def wait_instance(workdir: Path, deployment: Deployment, name: str) -> None:
    pid = deployment.pids[name]
    url = f"http://127.0.0.1:{deployment.instance_port(name)}/health/liveliness"
    try:
        wait_until(lambda: not running(pid) or answers(url), STARTUP_TIMEOUT, f"instance {name}")
    except DeployError:
        pass
    if not (running(pid) and answers(url)):
        raise DeployError(f"instance {name} did not come up:\n{tail(workdir / name / 'stderr.log')}")


# --- commands -------------------------------------------------------------------------------------

def settle_deployment(workdir: Path, args: argparse.Namespace) -> Deployment:
    """The settings: the first start's, unless options change them while nothing runs."""
    recorded = load_state(workdir)
    given = {"config": args.config and str(Path(args.config).resolve()), "host": args.host, "port": args.port,
             "instance_ports": args.instance_ports, "workers": args.workers}
    given = {k: v for k, v in given.items() if v is not None}
    if recorded is None:
        return Deployment(**{"config": str((ROOT / "routes.yaml").resolve()), **given})
    changed = {k for k, v in given.items() if getattr(recorded, k) != v}
    alive = [name for name, pid in recorded.pids.items() if running(pid)]
    if changed and alive:
        raise DeployError(f"{', '.join(alive)} running with other {', '.join(sorted(changed))}: stop first")
    for key in changed:
        setattr(recorded, key, given[key])
    return recorded


def start(workdir: Path, args: argparse.Namespace) -> Deployment:
    workdir.mkdir(parents=True, exist_ok=True)
    deployment = settle_deployment(workdir, args)
    env = settle_env(workdir, args.database_url, args.redis_url)
    started = []
    for name in INSTANCES:
        if not is_ours(deployment.pids.get(name), instance_marker(deployment, name)):
            deployment.pids[name] = start_instance(workdir, deployment, name, env)
            started.append(name)
    save_state(workdir, deployment)
    for name in started:
        wait_instance(workdir, deployment, name)
    if not is_ours(deployment.pids.get("nginx"), dict(markers(workdir, deployment))["nginx"]):
        deployment.pids["nginx"] = start_nginx(workdir, deployment)
        save_state(workdir, deployment)
    return deployment


def stop_group(pid: int, sig: int) -> None:
    """``sig`` to the group leader, then wait for the whole group; SIGKILL what is left after
    STOP_TIMEOUT."""
    if running(pid):
        os.kill(pid, sig)
    try:
        wait_until(lambda: not group_members(pid), STOP_TIMEOUT, "a graceful stop")
    except DeployError:
        kill_group(pid)


def kill_group(pgid: int) -> None:
    for member in group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def restart(workdir: Path, name: str) -> Deployment:
    """Restart one instance without failing a request: nginx stops sending it requests (``down``
    and a reload, waiting for the old workers), the instance drains and stops (SIGTERM) and
    starts again, and nginx takes it back."""
    deployment = load_state(workdir)
    if deployment is None:
        raise DeployError(f"nothing started in {workdir}")
    env = read_env_file(workdir / "env")
    reload_nginx(workdir, deployment, down=frozenset({deployment.instance_port(name)}))
    if is_ours(deployment.pids.get(name), instance_marker(deployment, name)):
        stop_group(deployment.pids[name], signal.SIGTERM)
    deployment.pids[name] = start_instance(workdir, deployment, name, env)
    save_state(workdir, deployment)
    wait_instance(workdir, deployment, name)
    reload_nginx(workdir, deployment)
    return deployment


def stop(workdir: Path) -> None:
    """nginx finishes its requests (SIGQUIT) while each instance drains (SIGTERM to its
    supervisor, which stops its workers); whatever is left after STOP_TIMEOUT is killed. Only
    processes that are still the ones started here are signalled."""
    deployment = load_state(workdir)
    if deployment is None:
        return
    signals = {"nginx": signal.SIGQUIT, **{name: signal.SIGTERM for name in INSTANCES}}
    groups = [deployment.pids[name] for name, marker in markers(workdir, deployment)
              if is_ours(deployment.pids.get(name), marker)]
    for name, pid in deployment.pids.items():
        if pid in groups:
            os.kill(pid, signals[name])
    try:
        wait_until(lambda: not any(group_members(pid) for pid in groups), STOP_TIMEOUT, "a graceful stop")
    except DeployError:
        for pid in groups:
            kill_group(pid)
    deployment.pids = {}
    save_state(workdir, deployment)


def status(workdir: Path) -> bool:
    deployment = load_state(workdir)
    if deployment is None:
        print(f"nothing started in {workdir}")
        return False
    urls = {"nginx": deployment.url, **{n: f"http://127.0.0.1:{deployment.instance_port(n)}" for n in INSTANCES}}
    up = True
    for name, marker in markers(workdir, deployment):
        url = urls[name]
        alive = is_ours(deployment.pids.get(name), marker)
        up &= alive
        print(f"{name:6} {url:28} {'running, pid %d' % deployment.pids[name] if alive else 'stopped'}")
    return up


def port_list(text: str) -> list[int]:
    ports = [int(p) for p in text.split(",")]
    if len(ports) != len(INSTANCES):
        raise argparse.ArgumentTypeError(f"give {len(INSTANCES)} ports, comma-separated")
    return ports


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("start", "stop", "status", "restart"))
    p.add_argument("instance", nargs="?", choices=INSTANCES, help="restart: the instance to restart")
    p.add_argument("--workdir", required=True, type=Path, help="where everything is kept")
    p.add_argument("--config", help="the instances' config file [first start: the repository's routes.yaml]")
    p.add_argument("--host", help="nginx's address [127.0.0.1]")
    p.add_argument("--port", type=int, help="nginx's port [4000]")
    p.add_argument("--instance-ports", type=port_list, help="the instances' ports [4001,4002]")
    p.add_argument("--workers", type=int, help="worker processes per instance [2]")
    p.add_argument("--database-url", help="PostgreSQL DSN [env DATABASE_URL] (prefer the env: argv is public)")
    p.add_argument("--redis-url", help="Redis shared by the instances [env REDIS_URL]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    try:
        if args.command == "start":
            deployment = start(workdir, args)
            print(deployment.url)
            ports = ", ".join(f"{n}: http://127.0.0.1:{deployment.instance_port(n)}" for n in INSTANCES)
            print(f"nginx -> {ports}; logs in {workdir}/{{a,b}}/stderr.log, {workdir}/nginx/", file=sys.stderr)
            return 0
        if args.command == "stop":
            stop(workdir)
            return 0
        if args.command == "restart":
            if args.instance is None:
                raise DeployError("restart which instance? a or b")
            restart(workdir, args.instance)
            return 0
        return 0 if status(workdir) else 3
    except DeployError as exc:
        print(f"two_instances: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
