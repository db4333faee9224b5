"""Load routes.yaml / a LiteLLM ``config.yaml`` into frozen dataclasses.

The file is validated against ``schemas/config.json`` first; every string of the form
``os.environ/NAME`` is then read from the environment (``environment_variables`` from the file
overlaid on the process environment). Settings come from one table, :data:`SETTINGS`, which is
also what the README's configuration reference is written from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import orjson
import yaml

log = logging.getLogger(__name__)

ENV_PREFIX = "os.environ/"
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_ROUTES_FILE = PACKAGE_DIR / "default_routes.yaml"
SECRET_KEY = re.compile(r"key|secret|token|password|credential|database_url", re.IGNORECASE)
# litellm_params names whose values are secrets: api_key, aws_secret_access_key, azure_ad_token,
# vertex_credentials, an Authorization header, ... (but not max_tokens or input_cost_per_token).
SECRET_PARAM = re.compile(r"(key|(?<!_per)_token|secret|password|credentials?)$|secret|password|credential|"
                          r"^authorization$", re.IGNORECASE)


# Environment variables that hold the gateway's own secrets. A model created through the admin
# API may not read them by reference (``"api_key": "os.environ/DATABASE_URL"`` would send the
# value to any host the caller names); nor any variable the config's settings sections read.
OWN_SECRET_ENVS = frozenset({"LITELLM_MASTER_KEY", "LITELLM_SALT_KEY", "DATABASE_URL", "DIRECT_URL",
                             "UI_USERNAME", "UI_PASSWORD", "LITELLM_LICENSE", "KEEPALIVE_TIMEOUT"})
OWN_SECRET_PREFIXES = ("LITELLM_", "REDIS_", "PG", "SSL_", "DATABASE_")


def is_own_secret_env(name: str, config_refs: frozenset[str] = frozenset()) -> bool:
    return name in OWN_SECRET_ENVS or name.startswith(OWN_SECRET_PREFIXES) or name in config_refs


def env_refs(value: Any) -> set[str]:
    """The NAMEs of every ``os.environ/NAME`` string in ``value``, at any depth."""
    if isinstance(value, str):
        return {value[len(ENV_PREFIX):]} if value.startswith(ENV_PREFIX) else set()
    if isinstance(value, dict):
        return set().union(*map(env_refs, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(env_refs, value)) if value else set()
    return set()


def is_secret_name(name: str) -> bool:
    return bool(SECRET_PARAM.search(name))


def public_url(url: str | None) -> str:
    """A URL fit to show (headers, /model/info): no user:password@, no query string."""
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class ConfigError(Exception):
    """A configuration problem, with the file and the path inside it."""


class Secret:
    """A value that never prints: ``repr``/``str`` give ``***``; use ``reveal()``."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


class VerifyOption:
    """The kind of ``ssl_verify``: true, false, or the path of a CA bundle (see ``ssl_verify_value``)."""


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def ssl_verify_value(value: Any, where: str) -> bool | str:
    """``ssl_verify`` as LiteLLM reads it: a boolean (``False``, ``"False"``), or the path of a CA
    bundle to verify with. A path must name a readable file: a typo stops start-up instead of
    quietly verifying against the wrong roots."""
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    return readable_file(text, where, "CA bundle")


def readable_file(path: str, where: str, what: str) -> str:
    try:
        with open(path, "rb"):
            return path
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the {what} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class Setting:
    name: str            # attribute on Settings, and the key in its section
    section: str | None  # "general_settings", "router_settings" or None (environment/CLI only)
    env: str | None
    default: Any
    kind: type
    help: str
    secret: bool = False
    minimum: float | None = None  # smallest allowed value (see ``above``)
    above: bool = False           # True: the value must be strictly greater than ``minimum``

    def check_range(self, value: Any, where: str) -> None:
        if self.minimum is None or value is None or isinstance(value, (bool, Secret)):
            return
        if value < self.minimum or (self.above and value == self.minimum):
            bound = f"greater than {self.minimum:g}" if self.above else f"at least {self.minimum:g}"
            raise ConfigError(f"{where}: must be {bound}, got {value!r}")


SETTINGS: tuple[Setting, ...] = (
    Setting("master_key", "general_settings", "LITELLM_MASTER_KEY", None, str,
            "Admin key clients send as `Authorization: Bearer ...`. Unset: `serve` generates one and "
            "prints it; configured but empty (an unset `os.environ/` variable) stops start-up.", True),
    Setting("allow_unauthenticated", "general_settings", None, False, bool,
            "Serve without any key when no master key is set (`serve --no-auth`); a loud warning."),
    Setting("database_url", "general_settings", "DATABASE_URL", None, str,
            "PostgreSQL DSN for the model registry (used with store_model_in_db); `embedded` runs a "
            "private PostgreSQL (`serve --embedded-db`) and turns store_model_in_db on.", True),
    Setting("store_model_in_db", "general_settings", "STORE_MODEL_IN_DB", False, bool,
            "Sync YAML models into PostgreSQL and serve models added through the API."),
    Setting("database_connection_pool_limit", "general_settings", None, 10, int,
            "PostgreSQL connections per worker.", minimum=1),
    Setting("database_connection_timeout", "general_settings", None, 5.0, float,
            "Seconds to connect to PostgreSQL, and the statement timeout.", minimum=0, above=True),
    Setting("model_refresh_interval", "general_settings", None, 30.0, float,
            "Seconds between full re-reads of the database models (LISTEN/NOTIFY does the fast path).",
            minimum=0, above=True),
    Setting("embedded_db_dir", "general_settings", None, "var/pgdata", str,
            "Data folder of the private PostgreSQL used with `database_url: embedded`."),
    Setting("max_request_size_mb", "general_settings", None, 16.0, float,
            "Largest request body accepted; bigger ones get 413.", minimum=0, above=True),
    Setting("upstream_max_connections", "general_settings", None, 1000, int,
            "Concurrent upstream transfers per worker (the pycurl handle pool).", minimum=1),
    Setting("upstream_connect_timeout", "general_settings", None, 10.0, float,
            "Seconds to establish an upstream connection.", minimum=0, above=True),
    Setting("graceful_shutdown_timeout", "general_settings", "GRACEFUL_TIMEOUT", 30.0, float,
            "Seconds in-flight requests and streams get to finish after SIGTERM (`serve --graceful-timeout`); "
            "what is still open then is cut.", minimum=0),
    Setting("require_auth_for_metrics_endpoint", "general_settings", None, False, bool,
            "`/metrics` needs a key (any key the gateway accepts); off, it is open as in LiteLLM."),
    Setting("trusted_proxies", "general_settings", None, (), tuple,
            "Addresses or CIDR ranges of the load balancers in front of the gateway. Only from these is "
            "X-Forwarded-For / X-Real-Ip believed (for the access log's remote_ip); from anyone else it is ignored."),
    Setting("keepalive_timeout", "general_settings", "KEEPALIVE_TIMEOUT", 75.0, float,
            "Seconds an idle client connection is kept open (`--keepalive_timeout`). Keep it above your load "
            "balancer's idle timeout (AWS ALB: 60 s) so that the balancer, not the gateway, closes idle connections.",
            minimum=0.001),
    Setting("background_health_checks", "general_settings", None, False, bool,
            "Probe every deployment every `health_check_interval` seconds (one loop per instance, in worker "
            "0); `GET /health` then answers from the latest results instead of probing."),
    Setting("health_check_interval", "general_settings", None, 300.0, float,
            "Seconds between background health checks (LiteLLM's default, 300).", minimum=0, above=True),
    Setting("health_check_timeout", "general_settings", "HEALTH_CHECK_TIMEOUT_SECONDS", 5.0, float,
            "Seconds one health-check probe may take (a deployment's `model_info.health_check_timeout` "
            "wins); slower counts as unhealthy.", minimum=0, above=True),
    Setting("allow_requests_on_db_unavailable", "general_settings", None, True, bool,
            "While PostgreSQL is unreachable, virtual keys this worker already knows keep working from its "
            "memory (off: every virtual key gets a 503 until the database answers; the master key always works). "
            "A key it has never seen gets a 503 saying the key store is unavailable."),
    Setting("user_api_key_cache_ttl", "general_settings", None, 60.0, float,
            "Seconds between full re-reads of keys, teams and users (LISTEN/NOTIFY brings each change at once).",
            minimum=0, above=True),
    Setting("invalid_key_cache_ttl", "general_settings", None, 5.0, float,
            "Seconds an unknown key is remembered as unknown, so a flood of bad keys costs one database "
            "lookup per key and this period.", minimum=0),
    Setting("enable_health_check_routing", "general_settings", None, True, bool,
            "With background_health_checks: the router skips the deployments the latest check found "
            "unhealthy while a healthy one is left in the group (all unhealthy: they are tried anyway). "
            "LiteLLM's key; on by default here, `false` routes as if there were no checks."),
    Setting("spend_spill_dir", "general_settings", "SPEND_SPILL_DIR", "var/spend", str,
            "Folder where spend-log events wait (JSON lines) when PostgreSQL is away and the in-memory queue "
            "is full; they are written to the database, and the files removed, once it is back."),
    Setting("spend_queue_size", "general_settings", None, 10000, int,
            "Spend-log events a worker keeps in memory while PostgreSQL is away before spilling them to "
            "`spend_spill_dir`.", minimum=1),
    Setting("budget_exceeded_status_code", "general_settings", None, 422, int,
            "HTTP status of the `budget_exceeded` error (LiteLLM 1.108 answers 422; older versions 429).",
            minimum=400),
    Setting("proxy_budget_rescheduler_min_time", "general_settings", None, 10.0, float,
            "Seconds between checks for budgets due for their `budget_duration` reset (one worker of one "
            "instance does each reset, under a PostgreSQL advisory lock).", minimum=0, above=True),
    Setting("maximum_spend_logs_retention_period", "general_settings", None, None, str,
            "How long spend log rows are kept (`30d`, `12h`, `7d`; s, m, h, d, w or mo = 30 days); older ones are "
            "deleted in batches of 1000 by one instance at a time (a PostgreSQL advisory lock). Unset: kept for ever."),
    Setting("maximum_spend_logs_retention_interval", "general_settings", None, "1d", str,
            "How often the spend log clean-up runs (same format; the first round runs within a minute of start-up)."),
    Setting("ssl_verify", "litellm_settings", "SSL_VERIFY", True, VerifyOption,
            "Verify providers' TLS certificates: `true`, `false`, or the path of a CA bundle (PEM) to verify "
            "them with. A deployment's `litellm_params.ssl_verify` wins."),
    Setting("ssl_cert_file", None, "SSL_CERT_FILE", None, str,
            "CA bundle (PEM) used to verify providers when `ssl_verify` is true (default: the system's)."),
    Setting("ssl_keyfile_path", None, "SSL_KEYFILE_PATH", None, str,
            "Private key (PEM) for serving HTTPS (`serve --ssl-keyfile` / `--ssl_keyfile_path`)."),
    Setting("ssl_certfile_path", None, "SSL_CERTFILE_PATH", None, str,
            "Certificate chain (PEM) for serving HTTPS (`serve --ssl-certfile` / `--ssl_certfile_path`)."),
    Setting("drop_params", "litellm_settings", None, False, bool,
            "Drop OpenAI parameters a provider has no equivalent for, instead of answering 400."),
    Setting("num_workers", None, "NUM_WORKERS", 8, int,
            "Worker processes sharing the port (`--num-workers` / `--num_workers`).", minimum=1),
    Setting("log_level", None, "LITELLM_LOG", "INFO", str,
            "DEBUG, INFO, WARNING or ERROR (`--log-level`; `--detailed_debug` is DEBUG)."),
    Setting("timeout", "router_settings", None, 600.0, float,
            "Seconds a whole call may take, retries and fallbacks included; also each attempt's timeout when "
            "its deployment sets none. Default: litellm_settings.request_timeout, else 600.", minimum=0, above=True),
    Setting("stream_timeout", "router_settings", None, None, float,
            "Default seconds to the first streamed byte when a deployment sets none.", minimum=0,
            above=True),
    Setting("redis_host", "router_settings", "REDIS_HOST", None, str,
            "Redis shared by every instance: rate limits (rpm, tpm, parallel requests) count across "
            "instances, and the router's cooldowns, failure counts and rpm/tpm usage are shared. Unset: "
            "each instance counts rate limits on its own (exactly, across its workers) and each worker routes "
            "on its own counters."),
    Setting("redis_port", "router_settings", "REDIS_PORT", 6379, int, "Port of `redis_host`.", minimum=1),
    Setting("redis_password", "router_settings", "REDIS_PASSWORD", None, str, "Password of `redis_host`.", True),
    Setting("redis_url", "router_settings", "REDIS_URL", None, str,
            "`redis://[:password@]host:port/db` (`rediss://` for TLS); wins over redis_host/port/password.", True),
)
SETTINGS_SECTIONS = ("general_settings", "router_settings", "litellm_settings")
KNOWN_SECTIONS = ("routes", "model_list", "general_settings", "router_settings",
                  "litellm_settings", "environment_variables")


@dataclass(frozen=True)
class Settings:
    master_key: Secret | None = None
    allow_unauthenticated: bool = False
    database_url: Secret | None = None
    store_model_in_db: bool = False
    database_connection_pool_limit: int = 10
    database_connection_timeout: float = 5.0
    model_refresh_interval: float = 30.0
    allow_requests_on_db_unavailable: bool = True
    user_api_key_cache_ttl: float = 60.0
    invalid_key_cache_ttl: float = 5.0
    embedded_db_dir: str = "var/pgdata"
    max_request_size_mb: float = 16.0
    upstream_max_connections: int = 1000
    upstream_connect_timeout: float = 10.0
    graceful_shutdown_timeout: float = 30.0
    require_auth_for_metrics_endpoint: bool = False
    trusted_proxies: tuple = ()  # ipaddress networks
    keepalive_timeout: float = 75.0
    background_health_checks: bool = False
    health_check_interval: float = 300.0
    health_check_timeout: float = 5.0
    enable_health_check_routing: bool = True
    spend_spill_dir: str = "var/spend"
    spend_queue_size: int = 10000
    budget_exceeded_status_code: int = 422
    proxy_budget_rescheduler_min_time: float = 10.0
    maximum_spend_logs_retention_period: str | None = None
    maximum_spend_logs_retention_interval: str = "1d"
    ssl_verify: bool | str = True
    ssl_cert_file: str | None = None
    ssl_keyfile_path: str | None = None
    ssl_certfile_path: str | None = None
    drop_params: bool = False
    num_workers: int = 8
    log_level: str = "INFO"
    timeout: float = 600.0
    stream_timeout: float | None = None
    redis_host: str | None = None
    redis_port: int = 6379
    redis_password: Secret | None = None
    redis_url: Secret | None = None


@dataclass(frozen=True)
class RouteSpec:
    path: str
    aliases: tuple[str, ...]
    methods: frozenset[str]
    handler: str
    schema: str | None
    auth: str  # "none" | "key" | "master"


@dataclass(frozen=True)
class ModelSpec:
    """One ``model_list`` entry, environment references resolved."""

    model_name: str
    litellm_params: Mapping[str, Any] = field(repr=False)  # holds resolved keys: never printed
    model_info: Mapping[str, Any]
    where: str  # "model_list[3]", for messages
    # litellm_params names whose ``os.environ/NAME`` was not set -> NAME (api_base must not
    # silently become the provider's public default)
    unset: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    path: str
    routes: tuple[RouteSpec, ...]
    models: tuple[ModelSpec, ...]
    settings: Settings
    # The resolved sections and the environment hold plain keys: keep them out of reprs.
    environ: Mapping[str, str] = field(repr=False)
    general_settings: Mapping[str, Any] = field(default_factory=dict, repr=False)
    router_settings: Mapping[str, Any] = field(default_factory=dict, repr=False)
    litellm_settings: Mapping[str, Any] = field(default_factory=dict, repr=False)
    ignored: tuple[str, ...] = ()
    own_env: frozenset[str] = frozenset()  # variables the settings sections read (see is_own_secret_env)
    unset_env: tuple[tuple[str, str], ...] = ()  # (YAML path, NAME) of every unset os.environ/NAME


def resource_dir(name: str) -> Path:
    """``schemas`` or ``sql``: beside the package in a checkout, or under ``share/`` installed."""
    for candidate in (PACKAGE_DIR.parent / name, Path(sys.prefix) / "share" / "tornado-proxy" / name):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"cannot find the {name}/ folder next to {PACKAGE_DIR}")


def read_yaml(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def format_path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validate_document(doc: Any, path: str) -> None:
    """Check the raw document against ``schemas/config.json``; raise naming the bad key."""
    import jsonschema  # local: only start-up and `proxyctl check` validate files

    schema = yaml.safe_load((resource_dir("schemas") / "config.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    first = errors[0]
    parts = list(first.absolute_path)
    if first.validator == "required" and isinstance(first.instance, dict):
        missing = [k for k in first.validator_value if k not in first.instance]
        parts += missing[:1]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise ConfigError(f"{path}: {format_path(parts)}: {describe_error(first, parts)}{more}")


def describe_error(error, parts) -> str:
    """jsonschema's message, unless the value sits under a secret-looking key: then not its value."""
    if not any(isinstance(p, str) and SECRET_KEY.search(p) for p in parts):
        return error.message
    if error.validator == "type":
        expected = error.validator_value
        return "expected " + (" or ".join(expected) if isinstance(expected, list) else str(expected))
    return f"invalid value ({error.validator})"


def resolve_env(value: Any, environ: Mapping[str, str], missing: list[str]) -> Any:
    """Replace every ``os.environ/NAME`` string (at any depth) with the variable's value."""
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):]
        if name not in environ:
            missing.append(name)
        return environ.get(name)
    if isinstance(value, dict):
        return {k: resolve_env(v, environ, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, environ, missing) for v in value]
    return value


def unset_references(value: Any, environ: Mapping[str, str], where: str = "") -> list[tuple[str, str]]:
    """``(YAML path, NAME)`` for every ``os.environ/NAME`` (at any depth) that is not set."""
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):]
        return [] if name in environ else [(where, name)]
    if isinstance(value, dict):
        return [u for k, v in value.items() for u in unset_references(v, environ, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [u for i, v in enumerate(value) for u in unset_references(v, environ, f"{where}[{i}]")]
    return []


def coerce(setting: Setting, value: Any, where: str) -> Any:
    if value is None:
        return None
    if setting.kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if setting.kind is VerifyOption:
        return ssl_verify_value(value, where)
    if setting.kind is tuple:  # a list of networks (the only list setting so far)
        return networks(value, where)
    try:
        converted = setting.kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {setting.kind.__name__}, got {value!r}") from None
    return Secret(converted) if setting.secret else converted


def networks(value: Any, where: str) -> tuple:
    """A YAML list (or a comma-separated string) of addresses and CIDR ranges."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of addresses or CIDR ranges")
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{where}: {item!r} is not an IP address or CIDR range") from None
    return tuple(out)


def build_settings(sections: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str],
                   path: str) -> Settings:
    values = {}
    for s in SETTINGS:
        section = sections.get(s.section) or {} if s.section else {}
        raw = section.get(s.name) if s.section else None
        where = f"{path}: {s.section}.{s.name}" if s.section else f"environment {s.env}"
        if raw is None and s.env and environ.get(s.env) not in (None, ""):
            raw, where = environ[s.env], f"environment {s.env}"
        if raw is not None:
            values[s.name] = coerce(s, raw, where)
            s.check_range(values[s.name], where)
    request_timeout = (sections.get("litellm_settings") or {}).get("request_timeout")
    if "timeout" not in values and request_timeout is not None:  # LiteLLM's router default
        timeout = next(s for s in SETTINGS if s.name == "timeout")
        values["timeout"] = coerce(timeout, request_timeout, f"{path}: litellm_settings.request_timeout")
        timeout.check_range(values["timeout"], f"{path}: litellm_settings.request_timeout")
    if values.get("ssl_cert_file"):
        readable_file(values["ssl_cert_file"], "environment SSL_CERT_FILE", "CA bundle")
    if values.get("database_url") and values["database_url"].reveal() == "embedded":
        values["store_model_in_db"] = True  # the private database exists only to store models
    return Settings(**values)


def check_master_key(doc: Mapping[str, Any], resolved: Mapping[str, Any], path: str) -> None:
    """A master key that is configured but comes out empty would leave every route open: stop."""
    general = doc.get("general_settings") or {}
    if "master_key" not in general:
        return
    raw, value = general["master_key"], (resolved.get("general_settings") or {}).get("master_key")
    if value not in (None, ""):
        return
    if isinstance(raw, str) and raw.startswith(ENV_PREFIX):
        problem = f"{raw} is not set" if value is None else f"{raw} is set but empty"
    else:
        problem = "is empty"
    raise ConfigError(f"{path}: general_settings.master_key: {problem}. Set it, or remove the line: "
                      "`serve` then generates a key and prints it (or opt into no auth with "
                      "general_settings.allow_unauthenticated: true / `serve --no-auth`).")


def parse_routes(raw_routes: list[dict]) -> tuple[RouteSpec, ...]:
    return tuple(
        RouteSpec(path=r["path"], aliases=tuple(r.get("aliases") or ()),
                  methods=frozenset(m.upper() for m in r.get("methods") or ("POST",)),
                  handler=r["handler"], schema=r.get("schema"), auth=r.get("auth", "key"))
        for r in raw_routes)


def derive_id(spec: ModelSpec) -> str:
    """A stable id for a deployment the config gives none: same entry, same id, every worker.

    Secret values are left out of the hash, so a published id cannot confirm a guessed key;
    ``config.load`` numbers entries that differ only in their secrets (``<id>-2``, ...)."""
    params = {k: ("<secret>" if is_secret_name(k) else v) for k, v in spec.litellm_params.items()}
    canonical = orjson.dumps({"model_name": spec.model_name, "litellm_params": params},
                             option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(canonical).hexdigest()


def assign_ids(specs: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
    """Give every entry without ``model_info.id`` its derived id, unique within the list."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        if spec.model_info.get("id"):
            out.append(spec)
            continue
        base = derive_id(spec)
        seen[base] = seen.get(base, 0) + 1
        model_id = base if seen[base] == 1 else f"{base}-{seen[base]}"
        out.append(dataclasses.replace(spec, model_info={**spec.model_info, "id": model_id}))
    return tuple(out)


def load_default_routes() -> tuple[RouteSpec, ...]:
    doc = read_yaml(DEFAULT_ROUTES_FILE)
    validate_document(doc, str(DEFAULT_ROUTES_FILE))
    return parse_routes(doc["routes"])


# What a LiteLLM setting this gateway does not implement costs the user (item by item, so
# `proxyctl check` and start-up can say it). Keys not in this table get a generic line.
UNSUPPORTED: Mapping[str, str] = {
    "litellm_settings.success_callback": "successful calls are not sent to these callbacks (only the JSON "
                                         "request log, /metrics and \"otel\" tracing)",
    "litellm_settings.failure_callback": "failed calls are not sent to these callbacks (only \"otel\" is implemented)",
    "litellm_settings.callbacks": "no callbacks but \"otel\" (OpenTelemetry tracing) are run",
    "litellm_settings.set_verbose": "not read; use --log-level DEBUG or --detailed_debug",
    "litellm_settings.json_logs": "not read; the request log is always JSON",
    "litellm_settings.max_budget": "no budget is enforced",
    "litellm_settings.default_team_settings": "teams are not implemented",
    "general_settings.alerting": "no alerts are sent (Slack, email, ...)",
    "general_settings.alerting_threshold": "no alerts are sent",
    "general_settings.disable_spend_logs": "spend is not logged anyway",
    "general_settings.proxy_batch_write_at": "spend is not written to the database",
    "general_settings.ui_username": "there is no admin UI",
    "general_settings.ui_password": "there is no admin UI",
    "general_settings.enforce_user_param": "the `user` field is not required",
    "general_settings.allowed_routes": "every route in the routes table is served",
    "general_settings.public_routes": "only routes with `auth: none` are public",
    "general_settings.custom_auth": "custom auth is not run: only the master key is accepted",
    "general_settings.max_parallel_requests": "no limit on parallel requests",
    "general_settings.global_max_parallel_requests": "no limit on parallel requests",
    "router_settings.cache_responses": "responses are not cached",
    "router_settings.enable_pre_call_checks": "no context-window pre-call checks",
}
ROUTING_STRATEGIES = ("simple-shuffle", "least-busy", "latency-based-routing", "usage-based-routing-v2",
                      "cost-based-routing")  # router.py
# router_settings / litellm_settings keys router.RouterSettings reads (beyond the SETTINGS table).
ROUTER_KEYS = ("routing_strategy", "routing_strategy_args", "num_retries", "allowed_fails", "cooldown_time",
               "retry_after", "max_fallbacks", "fallbacks", "context_window_fallbacks", "content_policy_fallbacks",
               "default_fallbacks", "model_group_alias", "retry_policy", "model_group_retry_policy")
LITELLM_ROUTER_KEYS = ("num_retries", "request_timeout", "fallbacks", "context_window_fallbacks",
                       "content_policy_fallbacks", "default_fallbacks")
LITELLM_CACHE_KEYS = ("cache", "cache_params")  # cachekey.CacheSettings reads them
LITELLM_TRACING_KEYS = ("otel_log_content", "turn_off_message_logging")  # tracing.TraceSettings reads them
CALLBACK_KEYS = ("callbacks", "success_callback", "failure_callback")  # "otel" is implemented (tracing.py)


def implemented_callbacks(value: Any) -> bool:
    """A callbacks list this gateway runs in full: it names "otel" and nothing else."""
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    return bool(names) and all(name == "otel" for name in names)


def ignored_keys(doc: Mapping[str, Any]) -> tuple[str, ...]:
    known = {s.name for s in SETTINGS if s.section == "general_settings"}
    used_router = {s.name for s in SETTINGS if s.section == "router_settings"} | set(ROUTER_KEYS)
    out = [k for k in doc if k not in KNOWN_SECTIONS]
    out += [f"general_settings.{k}" for k in (doc.get("general_settings") or {}) if k not in known]
    router = doc.get("router_settings") or {}
    out += [f"router_settings.{k}" for k in router if k not in used_router]
    used_litellm = ({s.name for s in SETTINGS if s.section == "litellm_settings"} | set(LITELLM_ROUTER_KEYS)
                    | set(LITELLM_CACHE_KEYS) | set(LITELLM_TRACING_KEYS))
    litellm = doc.get("litellm_settings") or {}
    out += [f"litellm_settings.{k}" for k in litellm if k not in used_litellm
            and not (k in CALLBACK_KEYS and implemented_callbacks(litellm[k]))]
    return tuple(out)


def describe_ignored(key: str, doc_router: Mapping[str, Any] | None = None) -> str:
    """One warning line for a setting this gateway does not implement: what the user loses."""
    if key in UNSUPPORTED:
        return f"{key}: not implemented: {UNSUPPORTED[key]}"
    if "." not in key:
        return f"{key}: unknown section, kept and not used"
    return f"{key}: not used by this gateway (kept); whatever it does in LiteLLM does not happen here"


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve a config file. Pure apart from reading the file."""
    path = str(path)
    doc = read_yaml(path)
    if doc is None:
        doc = {}
    validate_document(doc, path)
    base_env = dict(os.environ if environ is None else environ)
    overlay = {k: str(v) for k, v in (doc.get("environment_variables") or {}).items() if v is not None}
    env = {**base_env, **overlay}
    missing: list[str] = []
    body = {k: v for k, v in doc.items() if k not in ("routes", "environment_variables")}
    resolved = resolve_env(body, env, missing)
    check_master_key(doc, resolved, path)
    routes = parse_routes(doc["routes"]) if doc.get("routes") else load_default_routes()
    raw_models = doc.get("model_list") or ()
    models = assign_ids(tuple(
        ModelSpec(model_name=m["model_name"], litellm_params=dict(m.get("litellm_params") or {}),
                  model_info=dict(m.get("model_info") or {}), where=f"model_list[{i}]",
                  unset=unset_params(raw_models[i].get("litellm_params") or {}, env))
        for i, m in enumerate(resolved.get("model_list") or ())))
    return Config(
        path=path, routes=routes, models=models,
        settings=build_settings(resolved, env, path), environ=env,
        general_settings=resolved.get("general_settings") or {},
        router_settings=resolved.get("router_settings") or {},
        litellm_settings=resolved.get("litellm_settings") or {},
        ignored=ignored_keys(doc), unset_env=tuple(unset_references(body, env)),
        own_env=frozenset(env_refs({k: doc.get(k) for k in SETTINGS_SECTIONS if isinstance(doc.get(k), dict)})))


def unset_params(raw_params: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """litellm_params name -> NAME, for top-level values ``os.environ/NAME`` that are not set."""
    return {k: v[len(ENV_PREFIX):] for k, v in raw_params.items()
            if isinstance(v, str) and v.startswith(ENV_PREFIX) and v[len(ENV_PREFIX):] not in environ}
