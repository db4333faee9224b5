"""The deployment files checked offline: the nginx template (directives and `nginx -t`), the
systemd unit (`systemd-analyze verify`), the Kubernetes manifests (the Kubernetes schemas, via
kubernetes-validate, and their consistency with the gateway's config) and the Dockerfile (parsed:
nothing here builds an image). Each file's values are checked against the gateway's own defaults,
so changing one without the other fails here."""

from __future__ import annotations

import fnmatch
import json
import pathlib
import re
import shlex
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from contrib.deploy import two_instances as deploy
from tornado_proxy.app import log_startup_warnings, validate
from tornado_proxy.config import SETTINGS, load, load_default_routes

ROOT = pathlib.Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = ROOT / "contrib" / "nginx" / "tornado-proxy.conf"
UNIT = ROOT / "contrib" / "systemd" / "tornado-proxy.service"
K8S = ROOT / "contrib" / "kubernetes"
K8S_VERSION = "1.32"  # one kubernetes-validate ships schemas for; PDB policy/v1 and HPA v2 are GA there
DEFAULTS = {s.name: s.default for s in SETTINGS}


def default_route_paths() -> set[str]:
    return {p for spec in load_default_routes() for p in (spec.path, *spec.aliases)}


# --- nginx ----------------------------------------------------------------------------------------

def directives(conf: str) -> list[list[str]]:
    """Every statement as its words (`name args...`), ended by `;`, `{` or `}`; comments dropped,
    quoted strings kept whole (an empty one too)."""
    out: list[list[str]] = []
    words: list[str] = []
    word, quote, comment = None, None, False
    for ch in conf:
        if comment:
            comment = ch != "\n"
        elif quote:
            if ch == quote:
                quote = None
            else:
                word += ch
        elif ch in "'\"":
            quote, word = ch, word or ""
        elif ch == "#" and word is None:
            comment = True
        elif ch.isspace() or ch in ";{}":
            if word is not None:
                words.append(word)
                word = None
            if ch in ";{}" and words:
                out.append(words)
                words = []
        else:
            word = (word or "") + ch
    return out


def only(conf: str, name: str) -> list[str]:
    found = [d[1:] for d in directives(conf) if d[0] == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)?", text)
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]


def test_nginx_template_choices_match_the_gateway():
    conf = NGINX_TEMPLATE.read_text()
    assert only(conf, "proxy_next_upstream") == ["error", "timeout"]  # never http_5xx, never non_idempotent
    statements = " ".join(" ".join(d) for d in directives(conf))
    assert "non_idempotent" not in statements and "http_5" not in statements and "http_429" not in statements
    assert only(conf, "proxy_http_version") == ["1.1"]
    assert ["Connection", ""] in [d[1:] for d in directives(conf) if d[0] == "proxy_set_header"]
    assert ["X-Forwarded-For", "$proxy_add_x_forwarded_for"] in [d[1:] for d in directives(conf)
                                                                 if d[0] == "proxy_set_header"]
    assert only(conf, "proxy_buffering") == ["off"] and only(conf, "proxy_request_buffering") == ["off"]
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(only(conf, timeout)[0]) >= DEFAULTS["timeout"]  # router_settings.timeout
    # nginx closes idle upstream connections before the gateway would (keepalive_timeout)
    assert seconds(only(conf, "keepalive_timeout")[0]) < DEFAULTS["keepalive_timeout"]
    assert int(only(conf, "keepalive")[0]) > 0
    # the body limit: nginx's "16m" is the gateway's 16 MB (both 16 * 1024 * 1024 bytes)
    size = only(conf, "client_max_body_size")[0]
    assert size == f"{DEFAULTS['max_request_size_mb']:g}m"
    shipped = yaml.safe_load((ROOT / "routes.yaml").read_text())
    assert size == f"{shipped['general_settings']['max_request_size_mb']:g}m"
    servers = [d for d in directives(conf) if d[0] == "server" and len(d) > 1]
    assert [s[1] for s in servers] == ["127.0.0.1:4001", "127.0.0.1:4002"]
    assert all(any(p.startswith("max_fails=") for p in s) and any(p.startswith("fail_timeout=") for p in s)
               for s in servers)
    assert only(conf, "listen") == ["4000"]
    # nginx's own errors in the gateway's error shape
    for body in re.findall(r"return (\d+) '([^']*)'", conf):
        error = json.loads(body[1].replace("\\n", "\n"))["error"]  # nginx unescapes \n
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == body[0]


def test_rendering_changes_only_the_ports():
    template = NGINX_TEMPLATE.read_text()
    rendered = deploy.render_template(template, "127.0.0.1", 14000, [14001, 14002])
    changed = set(rendered.splitlines()) ^ set(template.splitlines())
    assert {line.strip() for line in changed} == {
        "listen 4000;", "listen 127.0.0.1:14000;",
        "server 127.0.0.1:4001 max_fails=3 fail_timeout=10s;", "server 127.0.0.1:4002 max_fails=3 fail_timeout=10s;",
        "server 127.0.0.1:14001 max_fails=3 fail_timeout=10s;", "server 127.0.0.1:14002 max_fails=3 fail_timeout=10s;"}
    with pytest.raises(deploy.DeployError):
        deploy.render_template(template.replace("listen 4000;", "listen 80;"), "127.0.0.1", 1, [2, 3])


@pytest.mark.parametrize("rendered", [False, True], ids=["as-shipped", "rendered"])
def test_nginx_accepts_the_configuration(tmp_path, rendered):
    try:
        nginx = deploy.find_nginx()
    except deploy.DeployError:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    snippet = NGINX_TEMPLATE.read_text()
    if rendered:
        snippet = deploy.render_template(snippet, "127.0.0.1", 14000, [14001, 14002])
    (tmp_path / "tornado-proxy.conf").write_text(snippet)
    (tmp_path / "temp").mkdir()
    (tmp_path / "nginx.conf").write_text(deploy.nginx_main_config(tmp_path))
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                           "-g", f"pid {tmp_path / 'nginx.pid'};"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "warn" not in done.stderr and "emerg" not in done.stderr


# --- systemd --------------------------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit_settings():
    unit = unit_settings(UNIT.read_text())
    assert unit["User"] == ["tornado-proxy"] and unit["Group"] == ["tornado-proxy"]
    assert unit["Restart"] == ["on-failure"] and unit["KillSignal"] == ["SIGTERM"]
    assert unit["EnvironmentFile"] == ["/etc/tornado-proxy/env"]
    start = shlex.split(unit["ExecStart"][0])
    assert start[0].endswith("/proxyctl") and start[1:4] == ["serve", "--config", "/etc/tornado-proxy/routes.yaml"]
    assert float(unit["TimeoutStopSec"][0]) > DEFAULTS["graceful_shutdown_timeout"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}.items():
        assert unit[key] == [value], key
    assert int(unit["LimitNOFILE"][0]) >= 65536
    # what the gateway writes (var/ under its working directory: pid, state, health, spend spill)
    # is writable; the pid file reload uses is the one serve writes
    workdir = unit["WorkingDirectory"][0]
    assert unit["ReadWritePaths"] == [workdir] and workdir == "/var/lib/" + unit["StateDirectory"][0]
    assert DEFAULTS["spend_spill_dir"].startswith("var/")
    pid_file = start[start.index("--pid-file") + 1]
    assert pid_file.startswith("var/") and shlex.split(unit["ExecReload"][0])[1:] == ["reload", "--pid-file", pid_file]


def test_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` works without systemd running as PID 1. It checks that ExecStart's
    binary exists, and /opt/tornado-proxy/bin/proxyctl is not installed here: the copy verified
    points ExecStart/ExecReload at the checkout's bin/proxyctl, nothing else changed."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text()
    assert text.count("/opt/tornado-proxy/bin/proxyctl ") == 2
    copy = tmp_path / "tornado-proxy.service"
    copy.write_text(text.replace("/opt/tornado-proxy/bin/proxyctl ", f"{ROOT / 'bin' / 'proxyctl'} "))
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""  # unknown keys and bad values are only warnings: none allowed
    # and the check is real: a misspelt key is reported
    copy.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHom=yes"))
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "ProtectHom" in done.stderr


# --- Kubernetes -----------------------------------------------------------------------------------

def manifests() -> dict[str, dict]:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    docs = {}
    for name in listed:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.mark.parametrize("kind", ["ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
                                  "HorizontalPodAutoscaler"])
def test_kubernetes_manifest_is_valid(kind):
    doc = manifests()[kind]
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_is_strict():
    doc = manifests()["Deployment"]
    doc["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def container(docs: dict) -> dict:
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def arg(c: dict, name: str) -> str:
    return c["args"][c["args"].index(name) + 1]


def test_kubernetes_config_is_a_valid_gateway_config(tmp_path):
    """The ConfigMap's routes.yaml loads and validates as `proxyctl check` would, with the Secret's
    variables as environment: nothing unset, nothing unsupported."""
    docs = manifests()
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(docs["ConfigMap"]["data"]["routes.yaml"])
    config = load(config_file, environ=dict(docs["Secret"]["stringData"]))
    validate(config)
    assert log_startup_warnings(config, validate(config)) == []


def test_kubernetes_manifests_agree(tmp_path):
    docs = manifests()
    deployment, pod = docs["Deployment"], docs["Deployment"]["spec"]["template"]["spec"]
    c = container(docs)
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(docs["ConfigMap"]["data"]["routes.yaml"])
    config = load(config_file, environ=dict(docs["Secret"]["stringData"]))
    paths = {p for spec in config.routes for p in (spec.path, *spec.aliases)}
    public = {p for spec in config.routes if spec.auth == "none" for p in (spec.path, *spec.aliases)}

    # probes: routes that exist and need no key, on the port the gateway listens on
    port = c["ports"][0]
    assert arg(c, "--port") == str(port["containerPort"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] in paths & public, probe
        assert c[probe]["httpGet"]["port"] == port["name"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/liveliness"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    service = docs["Service"]["spec"]
    assert service["ports"][0]["targetPort"] == port["name"] and service["ports"][0]["port"] == port["containerPort"]

    # the grace period covers the preStop pause and the drain
    pause = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", " ".join(c["lifecycle"]["preStop"]["exec"]["command"]))[1])
    assert pod["terminationGracePeriodSeconds"] > pause + config.settings.graceful_shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > pause + DEFAULTS["graceful_shutdown_timeout"]

    # names and labels line up
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], docs["PodDisruptionBudget"]["spec"]["selector"]
                     ["matchLabels"], service["selector"]):
        assert selector.items() <= labels.items()
    assert deployment["spec"]["replicas"] == 2 and docs["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert c["envFrom"][0]["secretRef"]["name"] == docs["Secret"]["metadata"]["name"]
    assert all(v.startswith("REPLACE-ME") for v in docs["Secret"]["stringData"].values())
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    config_dir, config_name = arg(c, "--config").rsplit("/", 1)
    assert volumes[mounts[config_dir]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert volumes[mounts[config_dir]]["configMap"]["items"] == [{"key": config_name, "path": config_name}]

    # non-root, read-only root: what the gateway writes is on emptyDirs (var/ under the image's
    # working directory, and /tmp), the uid is the image's
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    workdir = dockerfile_final_stage()["WORKDIR"][-1]
    for path in (f"{workdir}/var", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]], path
    user = pod["securityContext"]
    assert dockerfile_final_stage()["USER"][-1] == f"{user['runAsUser']}:{user['runAsGroup']}"
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys() and "memory" in c["resources"]["limits"]


# --- Dockerfile -----------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def dockerfile_final_stage() -> dict[str, list[str]]:
    stages = []
    for name, args in dockerfile_instructions():
        if name == "FROM":
            stages.append({})
        stages[-1].setdefault(name, []).append(args)
    return stages[-1]


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    # a pattern excludes a path when it matches the path, a parent folder, or (conservatively:
    # Docker anchors patterns without **/ at the top) any one component
    return any(fnmatch.fnmatch("/".join(parts[:i]), p.removeprefix("**/"))
               or fnmatch.fnmatch(parts[i - 1], p.removeprefix("**/"))
               for p in patterns for i in range(1, len(parts) + 1))


def test_dockerfile():
    instructions = dockerfile_instructions()
    final = dockerfile_final_stage()
    assert all("-slim" in args.split()[0] for name, args in instructions if name == "FROM")
    assert final["USER"][-1].split(":")[0] not in ("root", "0")
    assert json.loads(final["ENTRYPOINT"][-1]) == ["proxyctl", "serve"]
    cmd = json.loads(final["CMD"][-1])
    assert cmd == ["--config", "/app/routes.yaml", "--port", "4000"] and final["EXPOSE"] == ["4000"]
    health = final["HEALTHCHECK"][-1]
    assert "urllib" in health and f"127.0.0.1:{cmd[3]}/health/liveliness" in health
    assert "/health/liveliness" in default_route_paths()
    assert any("pip install" in args and args.rstrip().endswith(" .") for name, args in instructions if name == "RUN")
    # what is copied from the build context exists and is not excluded by .dockerignore
    copied = {}
    for name, args in instructions:
        if name == "COPY" and not args.startswith("--from"):
            *sources, dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not dockerignored(source), source
                copied[source] = dest
    # setup.py's inputs are all in the build stage; the config CMD names is in the image
    assert {"setup.py", "README.md", "tornado_proxy", "schemas", "sql"} <= set(copied)
    assert copied["routes.yaml"] == cmd[1]
    assert dockerignored("tests/test_x.py") and dockerignored(".venv/bin/python") and not dockerignored("sql")
