"""proxyctl: `check` through click's CliRunner, and bin/proxyctl run from a checkout."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from tornado_proxy.cli import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROXYCTL = ROOT / "bin" / "proxyctl"

GOOD = """
model_list:
  - model_name: demo
    litellm_params: {model: mock/demo}
  - model_name: gpt
    litellm_params: {model: openai/gpt-4o, api_key: os.environ/OPENAI_API_KEY}
  - model_name: gpt
    litellm_params: {model: openai/gpt-4o-mini, api_key: os.environ/OPENAI_API_KEY}
  - model_name: claude
    litellm_params: {model: bedrock/anthropic.claude-3-5-sonnet, api_key: sk-ant-xxx}
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
litellm_settings:
  drop_params: true
  success_callback: [langfuse]
"""


pytestmark = pytest.mark.usefixtures("restore_logging")  # proxyctl configures logging


@pytest.fixture
def runner(monkeypatch):
    for name in ("LITELLM_MASTER_KEY", "CONFIG_FILE_PATH", "NUM_WORKERS", "LITELLM_LOG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-cli")
    return CliRunner()


@pytest.fixture
def config_file(tmp_path):
    def write(text: str, name: str = "config.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


def test_check_ok_with_summary(runner, config_file):
    path = config_file(GOOD)
    result = runner.invoke(cli, ["check", "--config", path], env={"LITELLM_MASTER_KEY": "sk-m"})
    assert result.exit_code == 0, result.output
    assert f"{path}: OK" in result.output
    from tornado_proxy.config import load_default_routes

    assert f"{len(load_default_routes())} routes" in result.output and "4 deployments in 3 model groups" in result.output
    assert "NO MASTER KEY" not in result.output
    # the unsupported provider is reported, not fatal
    assert "bedrock" in result.output and "claude" in result.output
    assert "litellm_settings.success_callback" in result.output  # kept, listed as ignored
    assert "litellm_settings.drop_params" not in result.output  # used


def test_check_warns_without_a_master_key(runner, config_file):
    result = runner.invoke(cli, ["check", "--config", config_file(GOOD.replace(
        "  master_key: os.environ/LITELLM_MASTER_KEY\n", ""))])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert any("no master key is set: `proxyctl serve` generates one" in w for w in warnings)
    assert any("Unsupported provider 'bedrock'" in w for w in warnings)


def test_check_reads_config_file_path(runner, config_file):
    path = config_file("model_list: []\n", "from_env.yaml")
    result = runner.invoke(cli, ["check"], env={"CONFIG_FILE_PATH": path})
    assert result.exit_code == 0 and f"{path}: OK" in result.output


def test_check_shipped_routes_yaml(runner, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = runner.invoke(cli, ["check"], env={"LITELLM_MASTER_KEY": "sk-m"})
    assert result.exit_code == 0, result.output
    assert "routes.yaml: OK" in result.output and "3 deployments" in result.output


@pytest.mark.parametrize("text, expected", [
    ("model_list:\n  - model_name: a\n    litellm_params: {api_base: x}\n", "model_list[0].litellm_params.model"),
    ("routes:\n  - {path: /x, methods: [GET], handler: models, auth: everyone}\n", "routes[0].auth"),
    ("routes:\n  - {path: /x, methods: [GET], handler: no_such_handler}\n", "no_such_handler"),
    ("routes:\n  - {path: /x, methods: [GET], handler: models}\n  - {path: /x, methods: [GET], handler: model_info}\n",
     "already served"),
    ("model_list:\n  - model_name: a\n    litellm_params: {model: openai/x, rpm: lots}\n",
     "model_list[0].litellm_params.rpm"),
    ("model_list: [\n", "not valid YAML"),
    ("- just\n- a list\n", "(top level)"),
])
def test_check_broken_file_fails_naming_the_problem(runner, config_file, text, expected):
    path = config_file(text)
    result = runner.invoke(cli, ["check", "--config", path])
    assert result.exit_code != 0
    assert path in result.output and expected in result.output
    assert "Traceback" not in result.output


def test_check_missing_file(runner, tmp_path):
    path = str(tmp_path / "absent.yaml")
    result = runner.invoke(cli, ["check", "--config", path])
    assert result.exit_code != 0 and path in result.output and "no such file" in result.output


def test_serve_with_broken_config_does_not_start(runner, config_file):
    path = config_file("routes:\n  - {path: /x, methods: [GET], handler: models, auth: nobody}\n")
    result = runner.invoke(cli, ["serve", "--config", path, "--port", "0"])
    assert result.exit_code != 0 and "routes[0].auth" in result.output


@pytest.mark.parametrize("text, expected", [
    ("routes:\n  - {path: /x, methods: [GET], handler: no_such_handler}\n", "no_such_handler"),
    ("model_list:\n  - model_name: a\n    litellm_params: {model: openai/x, tpm: many}\n", "tpm"),
])
def test_serve_validates_routes_and_models_before_forking(runner, config_file, text, expected):
    path = config_file(text)
    result = runner.invoke(cli, ["serve", "--config", path, "--port", "0", "--num-workers", "2"])
    assert result.exit_code == 1
    assert path in result.output and expected in result.output


def test_serve_rejects_zero_workers(runner, config_file):
    result = runner.invoke(cli, ["serve", "--config", config_file("model_list: []\n"), "--num-workers", "0"])
    assert result.exit_code == 2 and "--num-workers" in result.output


def test_serve_rejects_unknown_log_level(runner, config_file):
    result = runner.invoke(cli, ["serve", "--config", config_file("model_list: []\n"), "--log-level", "LOUD"])
    assert result.exit_code == 2 and "LOUD" in result.output


# --- bin/proxyctl from a checkout ---------------------------------------------------------------

def run_proxyctl(args, cwd, direct=False, env=None):
    environ = {k: v for k, v in os.environ.items() if k not in ("LITELLM_MASTER_KEY", "CONFIG_FILE_PATH")}
    # `#!/usr/bin/env python3` must find this virtualenv's python first
    environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environ.get("PATH", "")
    environ.pop("PYTHONPATH", None)
    environ.update(env or {})
    command = [str(PROXYCTL), *args] if direct else [sys.executable, str(PROXYCTL), *args]
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=30)


def test_bin_proxyctl_help_runs_directly():
    done = run_proxyctl(["--help"], cwd=ROOT, direct=True)
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout and "check" in done.stdout


def test_python_bin_proxyctl_check_from_the_checkout():
    done = run_proxyctl(["check"], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "routes.yaml: OK" in done.stdout
    assert "no master key is set" in done.stdout  # nothing set on a fresh clone: not an error


def test_python_bin_proxyctl_from_another_directory(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_list:\n  - model_name: a\n    litellm_params: {api_base: x}\n")
    done = run_proxyctl(["check", "--config", str(config)], cwd=tmp_path, env={"LITELLM_MASTER_KEY": "sk-m"})
    assert done.returncode == 1
    assert str(config) in done.stderr and "model_list[0].litellm_params.model" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_proxyctl(["--version"], cwd=tmp_path)
    assert done.returncode == 0 and "proxyctl" in done.stdout
