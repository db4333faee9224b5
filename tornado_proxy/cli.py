"""``proxyctl``: the command line, and the only place that configures logging and starts things."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path

import click

from . import __version__, logscrub
from .app import log_startup_warnings, settle_auth, validate
from .config import DEFAULT_ROUTES_FILE, SECRET_KEY, Config, ConfigError, Secret, is_secret_name, load

log = logging.getLogger("tornado_proxy")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


def setup_logging(level: str) -> None:
    level = level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise click.BadParameter(f"unknown log level {level!r}", param_hint="--log-level / LITELLM_LOG")
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    access = logging.getLogger("tornado_proxy.access")  # one bare JSON object per line
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


def config_secrets(config: Config) -> list[str]:
    """Every secret value the config knows of, for the log filter: the master key, the database
    URL, secret-named model parameters and secret-named environment variables."""
    values = [s.reveal() for s in (config.settings.master_key, config.settings.database_url) if s]
    values += [str(v) for m in config.models for k, v in m.litellm_params.items() if is_secret_name(k) and v]
    values += [v for k, v in config.environ.items() if SECRET_KEY.search(k) and v]
    return values


def default_config_path() -> str:
    """``CONFIG_FILE_PATH``, else ./routes.yaml, else (an installed gateway run from a folder
    without one) the packaged default configuration."""
    if os.environ.get("CONFIG_FILE_PATH"):
        return os.environ["CONFIG_FILE_PATH"]
    return "routes.yaml" if Path("routes.yaml").exists() else str(DEFAULT_ROUTES_FILE)


def announce_packaged_default(config_path: str) -> None:
    if config_path == str(DEFAULT_ROUTES_FILE):
        click.echo(f"no routes.yaml in {os.getcwd()} and no --config: using the packaged default "
                   f"configuration {config_path}", err=True)


def load_or_exit(path: str):
    try:
        return load(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def validate_or_exit(config):
    """Routes, schemas and models, checked as a worker will build them; returns the registry."""
    try:
        return validate(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(__version__, prog_name="proxyctl")
def cli() -> None:
    """An OpenAI-compatible LLM gateway (a drop-in for the LiteLLM proxy's config.yaml)."""


CONFIG_HELP = "routes.yaml or a LiteLLM config.yaml (env CONFIG_FILE_PATH) [default: ./routes.yaml, else the packaged default]."


@cli.command()
@click.option("--config", "-c", "config_path", default=default_config_path, show_default="routes.yaml",
              help=CONFIG_HELP)
@click.option("--host", default="0.0.0.0", show_default=True, envvar="HOST", help="[env HOST]")
@click.option("--port", default=4000, show_default=True, type=int, envvar="PORT", help="[env PORT]")
@click.option("--num-workers", "--num_workers", "num_workers", type=int, default=None,
              help="Worker processes [env NUM_WORKERS, default 8].")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR [env LITELLM_LOG, default INFO].")
@click.option("--detailed_debug", "--detailed-debug", "detailed_debug", is_flag=True,
              help="Same as --log-level DEBUG (LiteLLM's spelling).")
@click.option("--pid-file", type=click.Path(path_type=Path), default=None,
              help="Where `proxyctl reload` finds this server [default: var/proxyctl-PORT.pid].")
@click.option("--require-db", is_flag=True, help="Exit at once if the database is unreachable.")
@click.option("--embedded-db", is_flag=True, help="Run a private PostgreSQL (same as database_url: embedded).")
@click.option("--no-auth", is_flag=True,
              help="No master key set: serve without auth instead of generating a key (loud warning).")
@click.option("--keepalive_timeout", "--keepalive-timeout", "keepalive_timeout", type=click.FloatRange(min=0.001),
              default=None, help="Seconds an idle client connection stays open [env KEEPALIVE_TIMEOUT, default 75].")
@click.option("--graceful-timeout", "--graceful_timeout", "graceful_timeout", type=click.FloatRange(min=0),
              default=None, help="Seconds in-flight requests and streams get after SIGTERM [env GRACEFUL_TIMEOUT, "
                                 "default 30].")
@click.option("--ssl-keyfile", "--ssl_keyfile_path", "ssl_keyfile", default=None,
              help="Serve HTTPS with this private key (PEM) [env SSL_KEYFILE_PATH].")
@click.option("--ssl-certfile", "--ssl_certfile_path", "ssl_certfile", default=None,
              help="Serve HTTPS with this certificate chain (PEM) [env SSL_CERTFILE_PATH].")
@click.option("--ciphers", default=None, help="OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's).")
def serve(config_path: str, host: str, port: int, num_workers: int | None, log_level: str | None,
          detailed_debug: bool, pid_file: Path | None, require_db: bool, embedded_db: bool, no_auth: bool,
          keepalive_timeout: float | None, graceful_timeout: float | None, ssl_keyfile: str | None,
          ssl_certfile: str | None, ciphers: str | None) -> None:
    """Start the gateway."""
    from .server import BindError, ServeOptions, serve as run_server  # tornado's server stack only when serving

    announce_packaged_default(config_path)
    config = load_or_exit(config_path)
    if embedded_db:
        config = use_embedded(config)
    validate_or_exit(config)  # before forking: a bad route or model stops start-up once, with the file named
    config = with_flags(config, keepalive_timeout=keepalive_timeout, graceful_shutdown_timeout=graceful_timeout,
                        ssl_keyfile_path=ssl_keyfile, ssl_certfile_path=ssl_certfile)
    ssl_context = https_context(config.settings, ciphers)  # before forking: a bad file is one line, once
    setup_logging("DEBUG" if detailed_debug else log_level or config.settings.log_level)
    workers = num_workers if num_workers is not None else config.settings.num_workers
    if workers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--num-workers / NUM_WORKERS")
    try:
        config, generated_key = settle_auth(config, no_auth)  # before forking: every worker shares the key
    except ConfigError as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None
    logscrub.install(config_secrets(config))  # the generated key too
    if generated_key:
        print_generated_key(generated_key)
    log.info("tornado-proxy %s: config %s, %d model deployment(s)", __version__, config_path, len(config.models))
    from .embedded import EmbeddedError

    try:
        status = run_server(config, ServeOptions(host=host, port=port, workers=workers, pid_file=pid_file,
                                                 require_db=require_db, ssl_context=ssl_context))
    except EmbeddedError as exc:
        raise click.ClickException(f"embedded PostgreSQL: {exc}") from None
    except BindError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    sys.exit(status)


def with_flags(config: Config, **flags) -> Config:
    """``config`` with the settings given on the command line (a flag wins over file and env)."""
    given = {name: value for name, value in flags.items() if value is not None}
    return dataclasses.replace(config, settings=dataclasses.replace(config.settings, **given)) if given else config


def https_context(settings, ciphers: str | None):
    """The server's ``ssl.SSLContext`` when both HTTPS files are given, else None (plain HTTP)."""
    from .tls import TlsError, server_context

    keyfile, certfile = settings.ssl_keyfile_path, settings.ssl_certfile_path
    if not keyfile and not certfile:
        if ciphers:
            raise click.UsageError("--ciphers needs --ssl-certfile and --ssl-keyfile")
        return None
    if not keyfile or not certfile:
        given, missing = ("--ssl-certfile", "--ssl-keyfile") if certfile else ("--ssl-keyfile", "--ssl-certfile")
        raise click.UsageError(f"{given} needs {missing} too (or SSL_CERTFILE_PATH / SSL_KEYFILE_PATH)")
    try:
        return server_context(certfile, keyfile, ciphers)
    except TlsError as exc:
        raise click.ClickException(f"HTTPS: {exc}") from None


def print_generated_key(key: str) -> None:
    """Once, on the terminal (stderr, so also in a service's log), as Jupyter prints its token."""
    click.echo("\n    No master key is set (general_settings.master_key / LITELLM_MASTER_KEY), so this run\n"
               "    uses a generated one, shared by every worker until the gateway stops:\n\n"
               f"        {key}\n\n"
               "    Send it as `Authorization: Bearer <key>`. Set LITELLM_MASTER_KEY to keep a key across\n"
               "    restarts, or start with --no-auth to serve without one.\n", err=True)


def use_embedded(config: Config) -> Config:
    """``--embedded-db``: exactly ``database_url: embedded`` (which turns store_model_in_db on)."""
    settings = dataclasses.replace(config.settings, database_url=Secret("embedded"), store_model_in_db=True)
    return dataclasses.replace(config, settings=settings)


@cli.command()
@click.option("--pid-file", type=click.Path(path_type=Path), default=None,
              help="The running server's pid file [default: var/proxyctl-PORT.pid].")
@click.option("--port", default=4000, show_default=True, type=int, help="Picks the default pid file.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the answer.")
def reload(pid_file: Path | None, port: int, timeout: float) -> None:
    """Make a running gateway (every worker) re-read its config file and the database."""
    from .server import StateFile, default_pid_file

    pid_file = pid_file or default_pid_file(port)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        raise click.ClickException(f"{pid_file}: no running gateway (is `proxyctl serve` running "
                                   "with this --pid-file / --port?)") from None
    if not is_gateway_process(pid):
        raise click.ClickException(f"{pid_file}: process {pid} is not a running proxyctl serve (stale pid file?)")
    state = StateFile(pid_file.with_suffix(".state"))
    before = state.read().get("seq", 0)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise click.ClickException(f"{pid_file}: process {pid} is not running") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = state.read()
        if now.get("seq", 0) > before:
            if now.get("status") != "ok":
                raise click.ClickException(f"reload refused: {now.get('message')}")
            click.echo(f"reloaded {now.get('config')}: config generation {now.get('generation')}")
            return
        time.sleep(0.05)
    raise click.ClickException(f"no answer from process {pid} within {timeout}s")


def is_gateway_process(pid: int) -> bool:
    """Never SIGHUP a stranger that inherited a stale pid (SIGHUP's default action kills)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"proxyctl" in part or b"tornado_proxy" in part for part in cmdline) and b"serve" in cmdline


@cli.command()
@click.option("--config", "-c", "config_path", default=default_config_path, show_default="routes.yaml")
@click.option("--dry-run", is_flag=True, help="Print the changes without applying them.")
def sync(config_path: str, dry_run: bool) -> None:
    """Sync the config file's models into the database: print the diff, then apply it."""
    config = load_or_exit(config_path)
    validate_or_exit(config)
    lines = run_with_database(config, lambda store: sync_models(store, config, dry_run))
    for line in lines:
        click.echo(line)
    verb = "would change" if dry_run else "changed"
    click.echo(f"{len(lines)} model(s) {verb}" if lines else "database already in sync")


async def sync_models(store, config: Config, dry_run: bool) -> list[str]:
    """The diff, applied unless ``dry_run`` (which changes nothing, migrations included)."""
    plan = await (store.plan(config.models) if dry_run else store.sync(config.models))
    return plan.describe()


@cli.group()
def db() -> None:
    """Database maintenance."""


@db.command("migrate")
@click.option("--config", "config_path", default=default_config_path, show_default="routes.yaml")
def db_migrate(config_path: str) -> None:
    """Apply the migrations in sql/ that the database has not seen."""
    config = load_or_exit(config_path)

    async def migrate(store):
        from .config import resource_dir

        async with store.db.startup_lock():
            return await store.db.migrate(resource_dir("sql")), await store.db.applied_migrations()

    applied, everything = run_with_database(config, migrate, need_cipher=False)
    for name in applied:
        click.echo(f"applied {name}")
    click.echo(f"schema up to date ({len(everything)} migrations)")


def run_with_database(config: Config, work, need_cipher: bool = True):
    """Run ``work(store)`` against the configured database (starting the embedded one if that
    is the setting); database errors become a clean non-zero exit."""
    from .catalog import make_database
    from .errors import DatabaseUnavailable
    from .embedded import EmbeddedError, EmbeddedPostgres
    from .modelstore import ModelStore, cipher_for

    if not config.settings.database_url:
        raise click.ClickException("no database: set general_settings.database_url or DATABASE_URL")
    embedded = None
    try:
        if config.settings.database_url.reveal() == "embedded":
            embedded = EmbeddedPostgres(config.settings.embedded_db_dir)
            settings = dataclasses.replace(config.settings, database_url=Secret(embedded.start()))
            config = dataclasses.replace(config, settings=settings)
        cipher = cipher_for(config.settings, config.environ)
        if need_cipher and cipher is None:
            raise click.ClickException("storing models needs LITELLM_SALT_KEY or a master key to encrypt "
                                       "their secrets")
        store = ModelStore(make_database(config), cipher, config.environ)

        async def main():
            try:
                return await work(store)
            finally:
                await store.db.close()

        return asyncio.run(main())
    except (DatabaseUnavailable, EmbeddedError) as exc:
        raise click.ClickException(f"database unavailable: {exc}") from None
    finally:
        if embedded is not None:
            embedded.stop()


@cli.group()
def keys() -> None:
    """Virtual keys in the database (the same rows as the /key/* API)."""


def run_with_tenants(config_path: str, work):
    """Run ``work(TenantStore)`` on the configured database, migrated first."""
    config = load_or_exit(config_path)

    async def with_store(store):
        from .config import resource_dir
        from .keystore import TenantStore

        async with store.db.startup_lock():
            await store.db.migrate(resource_dir("sql"))
        return await work(TenantStore(store.db))

    return run_with_database(config, with_store, need_cipher=False)


@keys.command("create")
@click.option("--config", "-c", "config_path", default=default_config_path, show_default="routes.yaml")
@click.option("--alias", "key_alias", default=None, help="key_alias (unique).")
@click.option("--team", "team_id", default=None, help="team_id the key belongs to.")
@click.option("--user", "user_id", default=None, help="user_id the key belongs to.")
@click.option("--model", "models", multiple=True, help="A model the key may use (repeat); none: every model.")
@click.option("--max-budget", type=float, default=None, help="max_budget in USD.")
@click.option("--duration", default=None, help="Lifetime: 30s, 1h, 30d, ...")
def keys_create(config_path, key_alias, team_id, user_id, models, max_budget, duration) -> None:
    """Create a key and print it (the only time it is shown)."""
    from .keystore import KEYS, USERS, hash_key, masked, new_key, now, parse_duration

    try:
        expires = now() + parse_duration(duration) if duration else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None
    text = new_key()

    async def create(store):
        if user_id:
            await store.insert(USERS, {"user_id": user_id})
        try:
            return await store.insert(KEYS, {"token": hash_key(text), "key_name": masked(text), "key_alias": key_alias,
                                             "team_id": team_id, "user_id": user_id, "models": list(models),
                                             "max_budget": max_budget, "expires": expires})
        except LookupError:
            raise click.ClickException(f"no team {team_id}") from None

    if run_with_tenants(config_path, create) is None:
        raise click.ClickException(f"a key with alias {key_alias} already exists")
    click.echo(text)


@keys.command("list")
@click.option("--config", "-c", "config_path", default=default_config_path, show_default="routes.yaml")
def keys_list(config_path) -> None:
    """One line per key: hash, masked key, alias, team, user, spend, blocked."""
    from .keystore import KEYS

    async def listing(store):
        return await store.all(KEYS)

    for k in run_with_tenants(config_path, listing):
        click.echo(f"{k.token}  {k.key_name}  alias={k.key_alias or '-'}  team={k.team_id or '-'}  "
                   f"user={k.user_id or '-'}  spend={k.spend:g}  {'BLOCKED' if k.blocked else 'active'}")


def change_key(config_path: str, key: str, work) -> None:
    from .keystore import token_of

    async def change(store):
        return await work(store, token_of(key))

    if not run_with_tenants(config_path, change):
        raise click.ClickException("no such key")


@keys.command("block")
@click.option("--config", "-c", "config_path", default=default_config_path, show_default="routes.yaml")
@click.option("--unblock", is_flag=True, help="Unblock instead.")
@click.argument("key")
def keys_block(config_path, unblock, key) -> None:
    """Block (or --unblock) a key, given as the key or its hash. Every gateway stops (or
    resumes) accepting it within about a second."""
    from .keystore import KEYS

    change_key(config_path, key, lambda store, token: store.update(KEYS, token, {"blocked": not unblock}))
    click.echo("unblocked" if unblock else "blocked")


@keys.command("delete")
@click.option("--config", "-c", "config_path", default=default_config_path, show_default="routes.yaml")
@click.argument("key")
def keys_delete(config_path, key) -> None:
    """Delete a key, given as the key or its hash."""
    from .keystore import KEYS

    change_key(config_path, key, lambda store, token: store.delete(KEYS, [token]))
    click.echo("deleted")


@cli.command()
@click.option("--config", "-c", "config_path", default=default_config_path, show_default="routes.yaml",
              help=CONFIG_HELP)
def check(config_path: str) -> None:
    """Validate a config file without starting: routes, schemas, models, settings."""
    setup_logging("ERROR")
    announce_packaged_default(config_path)
    config = load_or_exit(config_path)
    registry = validate_or_exit(config)
    for line in log_startup_warnings(config, registry):
        click.echo(f"warning: {line}")
    paths = sum(1 + len(r.aliases) for r in config.routes)
    click.echo(f"{config_path}: OK ({len(config.routes)} routes on {paths} paths, "
               f"{len(registry.deployments)} deployments in {len(registry.groups) + len(registry.wildcards)} "
               "model groups)")


@cli.group()
def cache() -> None:
    """The response cache (litellm_settings.cache)."""


@cache.command("flush")
@click.option("--config", "-c", "config_path", default=default_config_path, show_default="routes.yaml",
              help=CONFIG_HELP)
@click.option("--namespace", default=None, help="Only this namespace's entries (default: every cached answer).")
def cache_flush(config_path: str, namespace: str | None) -> None:
    """Delete cached answers from the configured Redis cache."""
    from .cache import CacheUnavailable, build_cache
    from .cachekey import CacheSettings

    setup_logging("ERROR")
    config = load_or_exit(config_path)
    try:
        settings, _ = CacheSettings.parse(config.litellm_settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if settings is None:
        raise click.ClickException(f"{config_path}: the response cache is off (litellm_settings.cache)")
    if settings.type != "redis":
        raise click.ClickException("a local cache lives in each worker's memory: restart the gateway, or POST "
                                   "/cache/flushall (it flushes the worker that answers)")
    store = build_cache(settings, config.settings)
    if store is None:
        raise click.ClickException(f"{config_path}: cache_params.type is redis but no Redis is configured")

    async def flush():
        try:
            return await store.flush(namespace)
        finally:
            await store.close()

    try:
        deleted = asyncio.run(flush())
    except CacheUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"deleted {deleted} cached answers" + (f" in namespace {namespace}" if namespace else ""))


def main() -> None:
    cli(prog_name="proxyctl")


from . import dbcommands  # noqa: E402,F401 - registers `db dump/restore/prune/rotate-key` on the `db` group
