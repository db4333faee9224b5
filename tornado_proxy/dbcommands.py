"""``proxyctl db dump / restore / prune / rotate-key``: backups, spend log retention and the
rotation of the key that encrypts stored secrets. The work is in ``backup.py``,
``spendstore.py`` and ``modelstore.py``; here are the flags and the output."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click

from .cli import CONFIG_HELP, db, default_config_path, load_or_exit, run_with_database
from .config import Config, Secret

DATABASE_URL_HELP = ("PostgreSQL DSN; wins over general_settings.database_url and DATABASE_URL (which keep a "
                     "password out of shell history).")


def database_options(command):
    command = click.option("--database-url", default=None, help=DATABASE_URL_HELP)(command)
    return click.option("--config", "-c", "config_path", default=default_config_path, show_default="routes.yaml",
                        help=CONFIG_HELP)(command)


def database_config(config_path: str, database_url: str | None) -> Config:
    config = load_or_exit(config_path)
    if database_url:
        config = dataclasses.replace(config, settings=dataclasses.replace(config.settings,
                                                                          database_url=Secret(database_url)))
    return config


def run_backup(config: Config, work, need_cipher: bool = False):
    """``run_with_database`` with a dump's, restore's or rotation's refusals as clean exits."""
    from .dumpfile import DumpError

    try:
        return run_with_database(config, work, need_cipher=need_cipher)
    except DumpError as exc:
        raise click.ClickException(str(exc)) from None


def as_utc(value):
    import datetime as dt

    return value.replace(tzinfo=dt.timezone.utc) if value is not None else None


@db.command("dump")
@database_options
@click.option("--include-spend-logs", is_flag=True, help="Also dump the spend log (one row per request).")
@click.option("--since", type=click.DateTime(), default=None,
              help="With --include-spend-logs: only spend log rows that started at or after this UTC date/time.")
@click.option("--until", type=click.DateTime(), default=None,
              help="With --include-spend-logs: only spend log rows that started before this UTC date/time.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def db_dump(config_path, database_url, include_spend_logs, since, until, file: Path) -> None:
    """Write everything the gateway stores to FILE (gzip'd JSON lines; model secrets stay encrypted)."""
    from . import backup
    from .config import resource_dir

    if (since or until) and not include_spend_logs:
        raise click.UsageError("--since / --until select spend log rows: add --include-spend-logs")
    options = backup.DumpOptions(include_spend_logs, as_utc(since), as_utc(until))
    config = database_config(config_path, database_url)
    summary = run_backup(config, lambda store: backup.dump(store.db, file, options, resource_dir("sql")))
    for table, rows in summary.rows.items():
        click.echo(f"{table}: {rows} rows")
    left_out = f"; not included: {', '.join(summary.header.excluded)} (--include-spend-logs)" \
        if summary.header.excluded else ""
    click.echo(f"wrote {file} (schema {summary.header.schema_version}, {sum(summary.rows.values())} rows{left_out})")


@db.command("restore")
@database_options
@click.option("--force", is_flag=True,
              help="The database already holds gateway data: delete it first (in the restore's transaction).")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def db_restore(config_path, database_url, force: bool, file: Path) -> None:
    """Load a `db dump` FILE into an empty database (migrating it first), in one transaction."""
    from . import backup
    from .config import resource_dir
    from .modelstore import undecryptable

    async def restore(store):
        summary = await backup.restore(store.db, file, resource_dir("sql"), force)
        bad = undecryptable(await store.db.fetch_models(), store.cipher) if store.cipher else None
        return summary, bad

    summary, bad = run_backup(database_config(config_path, database_url), restore)
    for table, rows in summary.rows.items():
        click.echo(f"{table}: {rows} rows")
    header = summary.header
    click.echo(f"restored {file} (written {header.created_at} by tornado-proxy {header.gateway_version}, schema "
               f"{header.schema_version}): {sum(summary.rows.values())} rows")
    if bad:
        click.echo(f"warning: the secrets of {len(bad)} restored model(s) do not decrypt with this configuration's "
                   f"LITELLM_SALT_KEY / master key: {', '.join(bad)}. Run the gateway with the key of the dumped "
                   "one.", err=True)


@db.command("prune")
@database_options
@click.option("--older-than", default=None,
              help="Delete spend log rows that started longer ago than this (30d, 12h, 7d; s, m, h, d, w, mo) "
                   "[default: general_settings.maximum_spend_logs_retention_period].")
@click.option("--dry-run", is_flag=True, help="Only count the rows that would go.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Rows per DELETE statement.")
def db_prune(config_path, database_url, older_than, dry_run: bool, batch_size: int) -> None:
    """Delete old spend log rows now, in batches, as the retention job does."""
    from .keystore import parse_duration
    from .retention import utc_now
    from .spendstore import SpendStore

    config = database_config(config_path, database_url)
    older_than = older_than or config.settings.maximum_spend_logs_retention_period
    if not older_than:
        raise click.UsageError("give --older-than (or set general_settings.maximum_spend_logs_retention_period)")
    try:
        cutoff = utc_now() - parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None

    async def prune(store):
        spend = SpendStore(store.db)
        return await (spend.count_older(cutoff) if dry_run else spend.prune(cutoff, batch_size))

    result = run_backup(config, prune)
    if dry_run:
        click.echo(f"would delete {result} spend log row(s) older than {older_than} (started before "
                   f"{cutoff.isoformat()})")
    elif result is None:
        raise click.ClickException("another prune is running now (a gateway's retention job, or another "
                                   "`proxyctl db prune`): try again later")
    else:
        click.echo(f"deleted {result.deleted} spend log row(s) older than {older_than} (started before "
                   f"{cutoff.isoformat()}) in {result.statements} statement(s)")


@db.command("rotate-key")
@database_options
@click.option("--new-key-env", metavar="NAME", default=None,
              help="Read the new key from environment variable NAME (e.g. NEW_LITELLM_SALT_KEY).")
@click.option("--new-key", default=None,
              help="The new key itself (it lands in shell history and the process list: prefer --new-key-env, "
                   "or neither option to be prompted).")
def db_rotate_key(config_path, database_url, new_key_env, new_key) -> None:
    """Re-encrypt every stored model secret from the current key (LITELLM_SALT_KEY, else the
    master key) to a new one, in one transaction; then restart the gateways with the new key."""
    from .crypt import Cipher
    from .modelstore import RotationError

    config = database_config(config_path, database_url)
    new_key = read_new_key(new_key_env, new_key)
    current = "LITELLM_SALT_KEY" if config.environ.get("LITELLM_SALT_KEY") else "the master key"
    if new_key == (config.environ.get("LITELLM_SALT_KEY") or
                   (config.settings.master_key.reveal() if config.settings.master_key else None)):
        raise click.UsageError("the new key is the current key")

    async def rotate(store):
        return await store.rotate_key(Cipher(new_key))

    try:
        models, secrets = run_backup(config, rotate, need_cipher=True)
    except RotationError as exc:
        raise click.ClickException(f"{len(exc.model_ids)} model(s) have secrets that do not "
                                   f"decrypt with the current key ({current}): {', '.join(exc.model_ids)}. Nothing "
                                   "was changed. Fix them first (config-file models: `proxyctl sync` with the "
                                   "current key; API models: /model/update with the secret), or remove them.") from None
    click.echo(f"re-encrypted {secrets} secret(s) of {models} model(s). Now restart every gateway instance with "
               "LITELLM_SALT_KEY set to the new key; until then, running instances keep serving the models they "
               "have loaded.")


def read_new_key(env_name: str | None, value: str | None) -> str:
    """--new-key-env NAME, --new-key, or a hidden prompt asked twice."""
    if env_name and value:
        raise click.UsageError("give --new-key-env or --new-key, not both")
    if env_name:
        value = os.environ.get(env_name)
        if not value:
            raise click.UsageError(f"environment variable {env_name} is not set (or empty)")
    elif value is None:
        value = click.prompt("New key", hide_input=True, confirmation_prompt=True)
    if not value:
        raise click.UsageError("the new key is empty")
    return value
