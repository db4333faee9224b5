"""What the benchmark ran on: the machine and versions for the results file, and
``litellm[proxy]`` in its own virtualenv (contrib/bench/.venvs/litellm, git-ignored),
installed once and reused; ``--litellm-version`` pins a release."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

VENV_DIR = Path(__file__).resolve().parent / ".venvs" / "litellm"


def requirement(version: str | None) -> str:
    return f"litellm[proxy]=={version}" if version else "litellm[proxy]"


def installed_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_litellm(version: str | None, venv: Path = VENV_DIR) -> tuple[Path, str]:
    """The ``litellm`` executable and its version, installing it first if needed."""
    have = installed_version(venv)
    if have is None or (version and have != version):
        print(f"installing {requirement(version)} into {venv} (takes a few minutes) ...", flush=True)
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        subprocess.run(pip + [requirement(version)], check=True)
        have = installed_version(venv)
        if have is None:
            raise RuntimeError(f"litellm did not install into {venv}")
    return venv / "bin" / "litellm", have


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except FileNotFoundError:
        return ""


def command_output(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (done.stdout or done.stderr).strip().splitlines()  # wrk --version exits 1
    return lines[0] if lines else ""


def git_revision() -> str:
    repo = str(Path(__file__).resolve().parents[2])
    head = command_output(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"])
    return head + ("+dirty" if dirty else "")


def describe_machine(with_litellm: bool) -> dict:
    proxyctl = Path(sys.executable).parent / "proxyctl"
    return {
        "cpus": os.cpu_count(), "cpu_model": cpu_model(), "kernel": platform.release(),
        "python": platform.python_version(), "git": git_revision(),
        "gateway": command_output([str(proxyctl), "--version"]),
        "wrk": command_output(["wrk", "--version"]), "nginx": command_output(["nginx", "-v"]),
        "litellm": installed_version(VENV_DIR) if with_litellm else None,
    }
