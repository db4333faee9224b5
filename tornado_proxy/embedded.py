"""A private PostgreSQL owned by the gateway (``database_url: embedded``) and by the test suite
where no server runs: ``initdb`` on first use, the server on a Unix socket inside the data
folder (no TCP port), stopped on shutdown, data kept across restarts.

PostgreSQL refuses to run as root, so as root the binaries run as the ``postgres`` user (or
``TORNADO_PROXY_PG_USER``), and the data folder is handed to that user.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "var/pgdata"


class EmbeddedError(Exception):
    pass


def find_binary(name: str) -> str:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0, reverse=True)
    for path in candidates + [shutil.which(name)]:
        if path and os.access(path, os.X_OK):
            return path
    raise EmbeddedError(f"{name} not found: install the PostgreSQL server package (e.g. postgresql)")


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read it: {exc.strerror})"


class EmbeddedPostgres:
    def __init__(self, data_dir: str | Path = DEFAULT_DATA_DIR, run_as: str | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.run_as = run_as or (os.environ.get("TORNADO_PROXY_PG_USER", "postgres") if os.geteuid() == 0 else None)
        self.started_here = False

    @property
    def dsn(self) -> str:
        return f"host={self.data_dir} port=5432 user=postgres dbname=postgres"

    def _user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.run_as)
        except KeyError:
            raise EmbeddedError(f"PostgreSQL refuses to run as root and there is no user {self.run_as!r} to run "
                                "it as: create one, or set TORNADO_PROXY_PG_USER") from None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.run_as:
            user = self._user()
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        result = subprocess.run(args, capture_output=True, text=True, cwd="/", **kwargs)
        if check and result.returncode != 0:
            raise EmbeddedError(f"{Path(args[0]).name} failed: {(result.stderr or result.stdout).strip()[-800:]}")
        return result

    def _prepare_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedError(f"cannot create the data folder {self.data_dir}: {exc.strerror}") from None
        if self.run_as:
            user = self._user()
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
            parent = self.data_dir.parent  # the user must be able to reach the folder
            while parent != parent.parent:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
                parent = parent.parent
        os.chmod(self.data_dir, 0o700)

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists() and self._run(
            find_binary("pg_ctl"), "-D", str(self.data_dir), "status", check=False).returncode == 0

    def start(self) -> str:
        """initdb if needed, start if not running; returns the DSN."""
        if not self.initialized():
            self._prepare_dir()
            log.info("creating a PostgreSQL cluster in %s", self.data_dir)
            self._run(find_binary("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-locale", "--no-sync")
        if not self.running():
            options = f"-k {self.data_dir} -c listen_addresses='' -c fsync=on"
            server_log = self.data_dir / "server.log"
            try:
                self._run(find_binary("pg_ctl"), "-D", str(self.data_dir), "-o", options,
                          "-l", str(server_log), "-w", "-t", "60", "start")
            except EmbeddedError as exc:  # pg_ctl only says "Examine the log output": show it
                raise EmbeddedError(f"{exc}\n{server_log} ends with:\n{log_tail(server_log)}") from None
            self.started_here = True
        return self.dsn

    def stop(self) -> None:
        if self.started_here and self.initialized():
            self._run(find_binary("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
            self.started_here = False
