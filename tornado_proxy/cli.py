"""``proxyctl``: the command line, and the only place that configures logging and starts things."""

from __future__ import annotations

import logging
import os
import sys

import click

from . import __version__
from .app import HANDLERS, log_startup_warnings
from .config import ConfigError, load, resource_dir
from .registry import build_registry
from .routes import check as check_routes
from .schemas import Schemas

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


def default_config_path() -> str:
    return os.environ.get("CONFIG_FILE_PATH") or "routes.yaml"


def load_or_exit(path: str):
    try:
        return load(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def validate_or_exit(config):
    """Routes, schemas and models, checked as a worker will build them; returns the registry."""
    try:
        check_routes(config.routes, HANDLERS, Schemas(resource_dir("schemas")))
        return build_registry(config.models, config.environ,
                              aliases=config.router_settings.get("model_group_alias"))
    except ConfigError as exc:
        raise click.ClickException(f"{config.path}: {exc}") from None


@click.group()
@click.version_option(__version__, prog_name="proxyctl")
def cli() -> None:
    """An OpenAI-compatible LLM gateway (a drop-in for the LiteLLM proxy's config.yaml)."""


@cli.command()
@click.option("--config", "config_path", default=default_config_path, show_default="routes.yaml",
              help="routes.yaml or a LiteLLM config.yaml (env CONFIG_FILE_PATH).")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=4000, show_default=True, type=int)
@click.option("--num-workers", type=int, default=None, help="Worker processes [env NUM_WORKERS, default 8].")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR [env LITELLM_LOG, default INFO].")
def serve(config_path: str, host: str, port: int, num_workers: int | None, log_level: str | None) -> None:
    """Start the gateway."""
    from .server import serve as run_server  # imports tornado's server stack only when serving

    config = load_or_exit(config_path)
    validate_or_exit(config)  # before forking: a bad route or model stops start-up once, with the file named
    setup_logging(log_level or config.settings.log_level)
    workers = num_workers if num_workers is not None else config.settings.num_workers
    if workers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--num-workers / NUM_WORKERS")
    log.info("tornado-proxy %s: config %s, %d model deployment(s)", __version__, config_path, len(config.models))
    sys.exit(run_server(config, host, port, workers))


@cli.command()
@click.option("--config", "config_path", default=default_config_path, show_default="routes.yaml")
def check(config_path: str) -> None:
    """Validate a config file without starting: routes, schemas, models, settings."""
    setup_logging("ERROR")
    config = load_or_exit(config_path)
    registry = validate_or_exit(config)
    for line in log_startup_warnings(config, registry):
        click.echo(f"warning: {line}")
    paths = sum(1 + len(r.aliases) for r in config.routes)
    click.echo(f"{config_path}: OK ({len(config.routes)} routes on {paths} paths, "
               f"{len(registry.deployments)} deployments in {len(registry.groups) + len(registry.wildcards)} "
               "model groups)")


def main() -> None:
    cli(prog_name="proxyctl")
