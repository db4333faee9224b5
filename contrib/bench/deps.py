"""The system tools the benchmark needs (wrk, nginx with the echo module), installed with
apt-get when missing and when we may (root on Debian/Ubuntu)."""

from __future__ import annotations

import os
import shutil
import subprocess

from upstreams import ECHO_MODULE_CANDIDATES, NGINX_CANDIDATES, find_file

APT_PACKAGES = {"wrk": "wrk", "nginx": "nginx-light"}  # Debian's nginx-light ships the echo module


def missing_tools() -> list[str]:
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk")
    if find_file(NGINX_CANDIDATES) is None or find_file(ECHO_MODULE_CANDIDATES) is None:
        missing.append("nginx")
    return missing


def apt_install(packages: list[str]) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env).returncode == 0:
        return True
    subprocess.run(["apt-get", "update"], env=env)  # a fresh machine may have no package lists yet
    return subprocess.run(install, env=env).returncode == 0


def ensure_tools() -> None:
    missing = missing_tools()
    if not missing:
        return
    packages = [APT_PACKAGES[name] for name in missing]
    can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    print(f"benchmark tools missing: {', '.join(missing)}; installing {' '.join(packages)}", flush=True)
    if not (can_install and apt_install(packages)) or missing_tools():
        raise SystemExit(f"install them first: apt-get install -y {' '.join(packages)}")
