"""Issue 10: what a new user or a LiteLLM user meets first. The README's example request, the
master key (generated, typo, open mode), LiteLLM's command line, start-up errors, database
settings, upstream errors that name the deployment, unsupported settings, and running outside
the checkout. Real HTTP on loopback, real PostgreSQL, `proxyctl` through CliRunner or a subprocess;
no timing assertions."""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shlex
import socket
import subprocess
import sys

import orjson
import pytest
from click.testing import CliRunner

from tornado_proxy.cli import cli
from tornado_proxy.config import DEFAULT_ROUTES_FILE

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of, provider_yaml
from .test_e2e_reload import pin_workers
from .test_e2e_serve import PROXYCTL, Served, child_env, free_port, request

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


pytestmark = pytest.mark.usefixtures("restore_logging")  # proxyctl configures logging


@pytest.fixture
def runner(monkeypatch):
    for name in ("LITELLM_MASTER_KEY", "CONFIG_FILE_PATH", "NUM_WORKERS", "LITELLM_LOG", "PORT", "HOST",
                 "DATABASE_URL", "STORE_MODEL_IN_DB"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def write(tmp_path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- 1. the README's example request ---------------------------------------------------------------

def readme_example() -> tuple[str, bytes]:
    """The curl command under the README's `example-request` marker -> (path, body bytes)."""
    text = README.read_text()
    block = text[text.index("<!-- example-request"):]
    block = block[block.index("```sh\n") + 6:]
    command = block[:block.index("```")].replace("\\\n", " ")
    args = shlex.split(command)
    url = next(a for a in args if a.startswith("http://"))
    body = args[args.index("-d") + 1]
    return re.sub(r"^http://[^/]+", "", url), body.encode()


async def test_readme_example_request_works_against_openrouter(gateway, http, fake_openai):
    path, body = readme_example()
    assert b'"model": "openrouter/openai/gpt-3.5-turbo"' in body
    gw = await gateway((ROOT / "routes.yaml").read_text(),
                       env={"OPENROUTER_API_KEY": PROVIDER_KEY, "OPENROUTER_API_BASE": fake_openai.base})
    from tornado.httpclient import HTTPRequest

    r = await http.fetch(HTTPRequest(gw.url + path, method="POST", body=body, headers={
        "Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}), raise_error=False)
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "echo: Say hi"
    sent = fake_openai.received[-1]
    assert sent.body["model"] == "openai/gpt-3.5-turbo"  # the openrouter/ prefix stripped
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    # the named deployment served it, not the wildcard
    assert r.headers["x-litellm-model-id"] == gw.config.models[1].model_info["id"]


async def test_any_openrouter_model_through_the_shipped_wildcard(gateway, fetch, fake_openai):
    gw = await gateway((ROOT / "routes.yaml").read_text(),
                       env={"OPENROUTER_API_KEY": PROVIDER_KEY, "OPENROUTER_API_BASE": fake_openai.base})
    r = await fetch(gw, "/v1/chat/completions", {"model": "openrouter/anthropic/claude-3.5-sonnet",
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.code == 200, r.body
    assert fake_openai.received[-1].body["model"] == "anthropic/claude-3.5-sonnet"


async def test_a_deployment_is_also_found_by_its_model_id(gateway, fetch, fake_openai):
    gw = await gateway(provider_yaml(fake_openai))
    model_id = gw.config.models[0].model_info["id"]
    r = await fetch(gw, "/v1/chat/completions", {"model": model_id, "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 200, r.body
    assert r.headers["x-litellm-model-id"] == model_id


# --- 2. the master key -----------------------------------------------------------------------------

def test_serve_without_a_master_key_generates_one_shared_by_all_workers(tmp_path):
    """Nothing set: serve starts, prints a key once, and every worker accepts it (and only it).
    The port comes from PORT, as for LiteLLM."""
    port = free_port()
    config = write(tmp_path, "model_list:\n  - model_name: demo\n    litellm_params: {model: mock/demo}\n")
    err = open(tmp_path / "stderr.log", "wb")
    proc = subprocess.Popen([sys.executable, str(PROXYCTL), "serve", "-c", config, "--host", "127.0.0.1",
                             "--num_workers", "2"], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path,
                            env=child_env(PORT=str(port)), start_new_session=True)
    served = Served.__new__(Served)
    served.proc, served.port, served._stderr, served.stderr_path = proc, port, err, tmp_path / "stderr.log"
    try:
        served.wait_alive()
        keys = re.findall(r"^\s+(sk-\S+)$", served.stderr(), re.M)
        assert len(keys) == 1, served.stderr()
        key = keys[0]
        for worker in pin_workers(port, 2):
            for sent, expected in ((None, 401), (MASTER_KEY, 401), (key, 200)):
                headers = {"Authorization": f"Bearer {sent}"} if sent else {}
                worker.conn.request("GET", "/v1/models", headers=headers)
                resp = worker.conn.getresponse()
                resp.read()
                assert resp.status == expected, (worker.pid, sent)
            worker.close()
    finally:
        served.close()


def test_serve_from_the_checkout_with_nothing_set_starts(tmp_path):
    """`make serve` on a fresh clone: the shipped routes.yaml, no variables."""
    port = free_port()
    err = open(tmp_path / "stderr.log", "wb")
    proc = subprocess.Popen([sys.executable, str(PROXYCTL), "serve", "--config", "routes.yaml", "--port", str(port),
                             "--host", "127.0.0.1", "--num-workers", "1", "--pid-file", str(tmp_path / "p.pid")],
                            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=child_env(),
                            start_new_session=True)
    served = Served.__new__(Served)
    served.proc, served.port, served._stderr, served.stderr_path = proc, port, err, tmp_path / "stderr.log"
    try:
        served.wait_alive()
        text = served.stderr()
        assert "os.environ/OPENROUTER_API_KEY is not set" in text
        key = re.findall(r"^\s+(sk-\S+)$", text, re.M)[0]
        status, _, body = request(port, "POST", "/v1/chat/completions",
                                  {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}, key=key)
        assert status == 200, body
    finally:
        served.close()


@pytest.mark.parametrize("command", ["serve", "check"])
def test_a_master_key_variable_typo_stops_serve_and_check_naming_it(runner, tmp_path, command):
    config = write(tmp_path, "general_settings:\n  master_key: os.environ/MY_MASTR_KEY_TYPO\n")
    result = runner.invoke(cli, [command, "--config", config, "--port", "0"][:3 if command == "check" else 5])
    assert result.exit_code == 1, result.output
    assert "general_settings.master_key: os.environ/MY_MASTR_KEY_TYPO is not set" in result.output
    assert "Traceback" not in result.output


def test_no_auth_serves_openly_with_a_loud_warning(tmp_path):
    served = Served(tmp_path, "model_list:\n  - model_name: demo\n    litellm_params: {model: mock/demo}\n", 1,
                    "--no-auth", LITELLM_MASTER_KEY="")
    try:
        served.wait_alive()
        status, _, body = request(served.port, "GET", "/v1/models", key=None)
        assert status == 200, body
        assert "NO MASTER KEY, AUTHENTICATION IS OFF" in served.stderr()
        assert not re.findall(r"^\s+(sk-\S+)$", served.stderr(), re.M)  # nothing generated
    finally:
        served.close()


# --- 3. LiteLLM's command line and environment -----------------------------------------------------

def test_litellm_spellings_and_environment(runner, tmp_path, monkeypatch):
    seen = {}

    def fake_serve(config, options):
        seen["config"], seen["options"] = config, options
        return 0

    monkeypatch.setattr("tornado_proxy.server.serve", fake_serve)
    monkeypatch.setattr("tornado_proxy.cli.setup_logging", lambda level: seen.update(level=level.upper()))
    config = write(tmp_path, "model_list: []\ngeneral_settings: {master_key: sk-x}\n")
    result = runner.invoke(cli, ["serve", "-c", config, "--num_workers", "3", "--detailed_debug"],
                           env={"PORT": "8080", "HOST": "127.0.0.1"})
    assert result.exit_code == 0, result.output
    assert (seen["options"].port, seen["options"].host, seen["options"].workers) == (8080, "127.0.0.1", 3)
    assert seen["level"] == "DEBUG" and seen["config"].path == config
    # our spellings still work, and a flag wins over the environment
    result = runner.invoke(cli, ["serve", "--config", config, "--num-workers", "2", "--port", "9000",
                                 "--host", "::1", "--log-level", "warning"], env={"PORT": "8080"})
    assert result.exit_code == 0, result.output
    assert (seen["options"].port, seen["options"].host, seen["options"].workers) == (9000, "::1", 2)
    assert seen["level"] == "WARNING"


# --- 4. clear start-up errors -----------------------------------------------------------------------

def test_port_in_use_is_one_line_and_non_zero(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write(tmp_path, "model_list: []\n")
        done = subprocess.run([sys.executable, str(PROXYCTL), "serve", "-c", config, "--host", "127.0.0.1",
                               "--port", str(port), "--num-workers", "1", "--pid-file", str(tmp_path / "p.pid")],
                              capture_output=True, text=True, timeout=30, cwd=tmp_path,
                              env=child_env(LITELLM_MASTER_KEY=MASTER_KEY))
    assert done.returncode == 1
    assert f"port {port} is in use (another gateway?)" in done.stderr.splitlines()
    assert "Traceback" not in done.stderr


def test_check_reports_every_unset_variable_by_name(runner, tmp_path):
    config = write(tmp_path, """\
model_list:
  - model_name: a
    litellm_params: {model: openai/gpt-4o, api_key: os.environ/UNSET_KEY_ONE}
  - model_name: b
    litellm_params: {model: openai/gpt-4o, api_key: os.environ/UNSET_KEY_TWO}
general_settings:
  master_key: sk-x
  database_url: os.environ/UNSET_DB_URL
""")
    result = runner.invoke(cli, ["check", "--config", config])
    assert result.exit_code == 0, result.output
    for where, name in (("model_list[0].litellm_params.api_key", "UNSET_KEY_ONE"),
                        ("model_list[1].litellm_params.api_key", "UNSET_KEY_TWO"),
                        ("general_settings.database_url", "UNSET_DB_URL")):
        assert f"warning: {where}: os.environ/{name} is not set" in result.output


@pytest.mark.parametrize("line, expected", [
    ("general_settings: {max_request_size_mb: -5}", "general_settings.max_request_size_mb: must be greater than 0"),
    ("router_settings: {timeout: 0}", "router_settings.timeout: must be greater than 0"),
    ("general_settings: {upstream_connect_timeout: -1}", "upstream_connect_timeout: must be greater than 0"),
])
def test_check_and_serve_reject_out_of_range_values(runner, tmp_path, line, expected):
    config = write(tmp_path, line + "\n")
    for args in (["check", "-c", config], ["serve", "-c", config, "--port", "0"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1 and expected in result.output, result.output


def test_zero_workers_from_the_environment_is_rejected(runner, tmp_path):
    result = runner.invoke(cli, ["check", "-c", write(tmp_path, "model_list: []\n")], env={"NUM_WORKERS": "0"})
    assert result.exit_code == 1 and "NUM_WORKERS: must be at least 1" in result.output


# --- 5. database settings ---------------------------------------------------------------------------

def test_database_url_without_model_storage_is_a_warning(runner, tmp_path, pg_dsn):
    config = write(tmp_path, f"general_settings:\n  master_key: sk-x\n  database_url: \"{pg_dsn}\"\n")
    result = runner.invoke(cli, ["check", "-c", config])
    assert result.exit_code == 0, result.output
    assert "database_url is set but store_model_in_db is off: the database is not used" in result.output
    assert pg_dsn not in result.output


async def test_database_url_without_model_storage_is_announced_at_startup(gateway, pg_dsn, caplog):
    with caplog.at_level("WARNING"):
        await gateway(f"general_settings:\n  database_url: \"{pg_dsn}\"\n")
    assert any("store_model_in_db is off" in r.getMessage() for r in caplog.records)


async def test_undecryptable_stored_secrets_are_reported_at_startup(gateway, fetch, fake_openai, pg_dsn, caplog):
    config = f"model_list: []\ngeneral_settings:\n  store_model_in_db: true\n  database_url: \"{pg_dsn}\"\n"
    first = await gateway(config, env={"LITELLM_SALT_KEY": "salt-one"})
    ids = []
    for name in ("stored-a", "stored-b"):
        r = await fetch(first, "/model/new", {"model_name": name, "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": fake_openai.base, "api_key": PROVIDER_KEY}})
        assert r.code == 200, r.body
        ids.append(orjson.loads(r.body)["model_id"])
    await first.stop()
    caplog.clear()
    with caplog.at_level("WARNING", logger="tornado_proxy.catalog"):
        await gateway(config, env={"LITELLM_SALT_KEY": "salt-two"})  # returns once started
        await wait_for_record(caplog, "cannot be decrypted")
    line = next(r.getMessage() for r in caplog.records if "cannot be decrypted" in r.getMessage())
    assert line.startswith("2 stored model(s) cannot be decrypted")
    assert all(model_id in line for model_id in ids) and PROVIDER_KEY not in line


async def wait_for_record(caplog, text: str) -> None:
    from .conftest import wait_for as async_wait_for

    await async_wait_for(lambda: any(text in r.getMessage() for r in caplog.records), timeout=15)


# --- 6. upstream errors a user can act on ----------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_connection_failure_names_the_deployment_and_host(gateway, fetch, stream, caplog):
    port = closed_port()
    gw = await gateway(f"""
        model_list:
          - model_name: gpt-fake
            litellm_params:
              model: openai/gpt-4o-mini
              api_base: http://user:pw-secret@127.0.0.1:{port}/v1?token=qs-secret
              api_key: {PROVIDER_KEY}
            model_info: {{id: my-deployment-7}}
        """)
    with caplog.at_level("WARNING", logger="tornado_proxy.llm"):
        r = await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "stream": stream,
                                                    "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 503, r.body
    message = error_of(r)["message"]
    assert "model_id=my-deployment-7" in message and f"http://127.0.0.1:{port}/v1" in message
    assert r.headers["x-litellm-model-id"] == "my-deployment-7"
    assert r.headers["x-litellm-model-group"] == "gpt-fake"
    assert r.headers["x-litellm-call-id"]
    logged = [rec.getMessage() for rec in caplog.records if "my-deployment-7" in rec.getMessage()]
    assert logged and rec_level(caplog, logged[0]) >= logging.WARNING
    for text in [r.body.decode(), *logged]:
        assert "pw-secret" not in text and "qs-secret" not in text and PROVIDER_KEY not in text


def rec_level(caplog, message: str) -> int:
    return next(r.levelno for r in caplog.records if r.getMessage() == message)


async def test_error_responses_carry_the_model_headers(gateway, fetch, fake_openai):
    gw = await gateway(provider_yaml(fake_openai, extra="router_settings: {num_retries: 0}"))
    fake_openai.fail_times, fake_openai.fail_status = 1, 429
    r = await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 429
    assert r.headers["x-litellm-model-id"] == gw.config.models[0].model_info["id"]


async def test_unset_api_base_variable_never_falls_back_to_the_public_address(gateway, fetch, caplog):
    with caplog.at_level("WARNING"):
        gw = await gateway("""
            model_list:
              - model_name: private
                litellm_params: {model: openai/gpt-4o, api_base: os.environ/UNSET_PRIVATE_BASE, api_key: k}
            """, env={"OPENAI_API_BASE": "http://127.0.0.1:9/never"})
    assert any("api_base is os.environ/UNSET_PRIVATE_BASE, which is not set" in r.getMessage()
               for r in caplog.records)
    r = await fetch(gw, "/v1/chat/completions", {"model": "private", "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 400, r.body
    assert "UNSET_PRIVATE_BASE" in error_of(r)["message"]


# --- 7. unsupported settings ------------------------------------------------------------------------

def test_each_unsupported_setting_gets_its_own_line(runner, tmp_path):
    config = write(tmp_path, """\
general_settings: {master_key: sk-x, alerting: [slack], some_new_thing: 1}
router_settings: {routing_strategy: latency-based-routing, num_retries: 2, cache_responses: true}
litellm_settings: {cache: true, cache_params: {type: s3}, success_callback: [langfuse], drop_params: true}
""")
    result = runner.invoke(cli, ["check", "-c", config])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    expected = {
        "litellm_settings.cache_params.type": "responses are NOT cached",
        "litellm_settings.success_callback": "callbacks",
        "general_settings.alerting": "no alerts are sent",
        "router_settings.cache_responses": "responses are not cached",
        "general_settings.some_new_thing": "not used by this gateway",
    }
    for key, loss in expected.items():
        mine = [line for line in lines if line.startswith(f"warning: {key}:")]
        assert len(mine) == 1 and loss in mine[0], (key, lines)
    assert not any("drop_params" in line or "routing_strategy" in line or "num_retries" in line for line in lines)


async def test_unsupported_settings_are_announced_at_startup(gateway, caplog):
    with caplog.at_level("WARNING"):
        await gateway("litellm_settings: {cache: true, cache_params: {type: s3}}\n")
    assert any(r.getMessage() == "litellm_settings.cache_params.type: 's3' is not implemented by this gateway "
               "(only local and redis): responses are NOT cached" for r in caplog.records)


# --- 8. outside the checkout ------------------------------------------------------------------------

def test_packaged_default_configuration_from_an_empty_folder(tmp_path):
    """No routes.yaml here and no --config: the packaged copy is used, and serve says so."""
    served = Served.__new__(Served)
    port = free_port()
    err = open(tmp_path / "stderr.log", "wb")
    served.proc = subprocess.Popen([sys.executable, str(PROXYCTL), "serve", "--host", "127.0.0.1", "--port",
                                    str(port), "--num-workers", "1"], stdout=subprocess.DEVNULL, stderr=err,
                                   cwd=tmp_path, env=child_env(LITELLM_MASTER_KEY=MASTER_KEY), start_new_session=True)
    served.port, served._stderr, served.stderr_path = port, err, tmp_path / "stderr.log"
    try:
        served.wait_alive()
        assert f"using the packaged default configuration {DEFAULT_ROUTES_FILE}" in served.stderr()
        status, _, body = request(port, "GET", "/v1/models", key=MASTER_KEY)
        assert status == 200 and "demo" in {m["id"] for m in json.loads(body)["data"]}
    finally:
        served.close()


def test_check_in_an_empty_folder_uses_the_packaged_default(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["check"])
    assert result.exit_code == 0, result.output
    assert f"{DEFAULT_ROUTES_FILE}: OK" in result.output


def test_the_packaged_default_is_package_data():
    setup = (ROOT / "setup.py").read_text()
    assert '"tornado_proxy": ["default_routes.yaml", "prices.json"]' in setup


def test_readme_points_to_nothing_outside_the_repository():
    text = README.read_text()
    assert "../" not in text
    for target in re.findall(r"\]\((?!https?://|#)([^)]+)\)", text):
        assert (ROOT / target).exists(), target
