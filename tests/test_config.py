"""config.py: loading, os.environ/ resolution, the settings table, validation errors, redaction."""

import pathlib
import textwrap

import pytest
import yaml

from tornado_proxy import config as config_module
from tornado_proxy.config import ConfigError, Secret, Settings, load, load_default_routes, parse_routes
from tornado_proxy.registry import build_registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROVIDER_KEY = "sk-prov-config-test-5555"
MASTER_KEY = "sk-master-config-test-7777"


@pytest.fixture
def write(tmp_path):
    def do(text: str, name: str = "config.yaml") -> pathlib.Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return do


# --- os.environ/NAME -------------------------------------------------------------------------

def test_environ_references_resolve_at_any_depth(write):
    path = write("""
        model_list:
          - model_name: m
            litellm_params:
              model: openai/gpt-4o
              api_key: os.environ/PK
              extra_headers: {X-Team: os.environ/TEAM}
              stop: [os.environ/STOP1, literal]
            model_info:
              custom: {nested: [{deep: os.environ/DEEP}]}
        general_settings:
          master_key: os.environ/MK
        router_settings:
          model_group_alias: {alias: os.environ/GROUP}
    """)
    env = {"PK": PROVIDER_KEY, "TEAM": "blue", "STOP1": "###", "DEEP": "down", "MK": MASTER_KEY,
           "GROUP": "m"}
    config = load(path, environ=env)
    params = config.models[0].litellm_params
    assert params["api_key"] == PROVIDER_KEY
    assert params["extra_headers"] == {"X-Team": "blue"}
    assert params["stop"] == ["###", "literal"]
    assert config.models[0].model_info["custom"] == {"nested": [{"deep": "down"}]}
    assert config.settings.master_key.reveal() == MASTER_KEY
    assert config.router_settings["model_group_alias"] == {"alias": "m"}


def test_environment_variables_section_overlays_the_process_environment(write):
    path = write("""
        model_list:
          - model_name: m
            litellm_params: {model: openai/gpt-4o, api_key: os.environ/PK}
        environment_variables:
          PK: from-the-file
          LITELLM_MASTER_KEY: master-from-the-file
          NUM_WORKERS: 3
    """)
    config = load(path, environ={"PK": "from-the-process", "OTHER": "x"})
    assert config.models[0].litellm_params["api_key"] == "from-the-file"
    assert config.settings.master_key.reveal() == "master-from-the-file"
    assert config.settings.num_workers == 3
    assert config.environ["OTHER"] == "x" and config.environ["PK"] == "from-the-file"


def test_environ_reference_that_is_not_a_whole_value_is_left_alone(write):
    path = write("""
        model_list:
          - model_name: m
            litellm_params: {model: openai/gpt-4o, api_base: "http://host/os.environ/X"}
    """)
    config = load(path, environ={"X": "no"})
    assert config.models[0].litellm_params["api_base"] == "http://host/os.environ/X"


def test_missing_environ_variable_is_none_and_named_with_its_place(write):
    path = write("""
        model_list:
          - model_name: m
            litellm_params: {model: openai/gpt-4o, api_key: os.environ/NOT_SET_ANYWHERE}
        general_settings:
          alerting_webhook: os.environ/ALSO_MISSING
          database_url: os.environ/PRESENT_DB
    """)
    secret_value = "postgresql://user:pw-secret-111@db/x"
    config = load(path, environ={"PRESENT_DB": secret_value})
    assert config.models[0].litellm_params["api_key"] is None
    assert config.models[0].unset == {"api_key": "NOT_SET_ANYWHERE"}
    assert config.settings.database_url.reveal() == secret_value
    assert config.unset_env == (("model_list[0].litellm_params.api_key", "NOT_SET_ANYWHERE"),
                                ("general_settings.alerting_webhook", "ALSO_MISSING"))
    # reported (by `check` and at start-up) through log_startup_warnings, never the values
    from tornado_proxy.app import log_startup_warnings
    from tornado_proxy.registry import build_registry

    text = "\n".join(log_startup_warnings(config, build_registry(config.models, config.environ)))
    assert "os.environ/NOT_SET_ANYWHERE is not set" in text and "os.environ/ALSO_MISSING is not set" in text
    assert "PRESENT_DB" not in text and secret_value not in text


@pytest.mark.parametrize("line, expected", [
    ("master_key: os.environ/MY_MASTR_KEY_TYPO", "os.environ/MY_MASTR_KEY_TYPO is not set"),
    ("master_key: os.environ/EMPTY_KEY", "os.environ/EMPTY_KEY is set but empty"),
    ('master_key: ""', "general_settings.master_key: is empty"),
])
def test_master_key_configured_but_empty_stops_loading(write, line, expected):
    """Auth must not fail open on a typo (even when LITELLM_MASTER_KEY happens to be set)."""
    path = write(f"general_settings:\n  {line}\n")
    for environ in ({"EMPTY_KEY": ""}, {"EMPTY_KEY": "", "LITELLM_MASTER_KEY": "sk-env"}):
        with pytest.raises(ConfigError) as exc:
            load(path, environ=environ)
        assert str(path) in str(exc.value) and "general_settings.master_key" in str(exc.value)
        assert expected in str(exc.value)


@pytest.mark.parametrize("line, where", [
    ("general_settings: {max_request_size_mb: -5}", "general_settings.max_request_size_mb: must be greater than 0"),
    ("general_settings: {max_request_size_mb: 0}", "general_settings.max_request_size_mb: must be greater than 0"),
    ("router_settings: {timeout: 0}", "router_settings.timeout: must be greater than 0"),
    ("router_settings: {stream_timeout: -1}", "router_settings.stream_timeout: must be greater than 0"),
    ("general_settings: {upstream_connect_timeout: 0}", "general_settings.upstream_connect_timeout"),
    ("general_settings: {database_connection_pool_limit: 0}", "database_connection_pool_limit: must be at least 1"),
    ("general_settings: {graceful_shutdown_timeout: -1}", "graceful_shutdown_timeout: must be at least 0"),
    ("general_settings: {upstream_max_connections: 0}", "upstream_max_connections: must be at least 1"),
])
def test_out_of_range_settings_are_config_errors(write, line, where):
    path = write(line + "\n")
    with pytest.raises(ConfigError) as exc:
        load(path, environ={})
    assert str(path) in str(exc.value) and where in str(exc.value)


def test_out_of_range_environment_setting_names_the_variable(write):
    with pytest.raises(ConfigError) as exc:
        load(write("model_list: []\n"), environ={"NUM_WORKERS": "0"})
    assert "environment NUM_WORKERS: must be at least 1" in str(exc.value)


def test_every_range_checked_setting_accepts_its_default():
    from tornado_proxy.config import SETTINGS

    for s in SETTINGS:
        s.check_range(s.default, s.name)


def test_database_url_embedded_turns_model_storage_on(write):
    """`database_url: embedded` means what `serve --embedded-db` means."""
    from tornado_proxy.cli import use_embedded

    from_file = load(write("general_settings: {database_url: embedded}\n"), environ={})
    from_flag = use_embedded(load(write("model_list: []\n", ), environ={}))
    for config in (from_file, from_flag):
        assert config.settings.database_url.reveal() == "embedded" and config.settings.store_model_in_db


# --- settings: env fallbacks, config wins ------------------------------------------------------

ENV_FALLBACKS = {
    "LITELLM_MASTER_KEY": "sk-env-master",
    "DATABASE_URL": "postgresql://env/db",
    "STORE_MODEL_IN_DB": "True",
    "NUM_WORKERS": "3",
    "LITELLM_LOG": "DEBUG",
}


def test_settings_defaults_with_an_empty_file(write):
    config = load(write(""), environ={})
    assert config.settings == Settings()
    s = config.settings
    assert (s.master_key, s.database_url, s.store_model_in_db, s.num_workers, s.log_level) == (
        None, None, False, 8, "INFO")
    assert s.max_request_size_mb == 16.0
    assert config.models == ()


def test_settings_fall_back_to_the_environment(write):
    config = load(write("model_list: []\n"), environ=ENV_FALLBACKS)
    s = config.settings
    assert s.master_key.reveal() == "sk-env-master"
    assert s.database_url.reveal() == "postgresql://env/db"
    assert s.store_model_in_db is True
    assert s.num_workers == 3
    assert s.log_level == "DEBUG"


def test_config_values_win_over_the_environment(write):
    path = write("""
        general_settings:
          master_key: sk-file-master
          database_url: postgresql://file/db
          store_model_in_db: false
    """)
    s = load(path, environ=ENV_FALLBACKS).settings
    assert s.master_key.reveal() == "sk-file-master"
    assert s.database_url.reveal() == "postgresql://file/db"
    assert s.store_model_in_db is False


def test_empty_environment_value_does_not_count(write):
    s = load(write(""), environ={"LITELLM_MASTER_KEY": "", "NUM_WORKERS": ""}).settings
    assert s.master_key is None and s.num_workers == 8


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("false", False), ("0", False)])
def test_store_model_in_db_strings(write, value, expected):
    assert load(write(""), environ={"STORE_MODEL_IN_DB": value}).settings.store_model_in_db is expected


def test_bad_setting_value_names_where_it_came_from(write):
    with pytest.raises(ConfigError, match="NUM_WORKERS"):
        load(write(""), environ={"NUM_WORKERS": "many"})
    path = write("general_settings: {max_request_size_mb: huge}\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(path) in str(info.value) and "general_settings.max_request_size_mb" in str(info.value)


def test_router_settings_feed_settings(write):
    s = load(write("router_settings: {timeout: 30, stream_timeout: '5'}\n"), environ={}).settings
    assert s.timeout == 30.0 and s.stream_timeout == 5.0


def test_settings_table_matches_the_settings_dataclass():
    names = [s.name for s in config_module.SETTINGS]
    assert len(names) == len(set(names))
    defaults = Settings()
    for s in config_module.SETTINGS:
        assert s.help, s.name
        assert getattr(defaults, s.name) == s.default, s.name


# --- bad files ------------------------------------------------------------------------------

def error_of(path, environ=None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, environ=environ or {})
    return str(info.value)


def test_missing_model_names_the_yaml_path(write):
    path = write("""
        model_list:
          - model_name: a
            litellm_params: {model: mock/a}
          - model_name: b
            litellm_params: {model: mock/b}
          - model_name: c
            litellm_params: {api_base: "http://x"}
    """)
    message = error_of(path)
    assert str(path) in message
    assert "model_list[2].litellm_params.model" in message
    assert "required" in message


def test_bad_auth_enum_names_the_route(write):
    path = write("""
        routes:
          - path: /x
            methods: [GET]
            handler: models
            auth: public
    """)
    message = error_of(path)
    assert str(path) in message and "routes[0].auth" in message and "public" in message


def test_unknown_route_key_is_an_error(write):
    path = write("""
        routes:
          - {path: /x, methods: [GET], handler: models, auth: key, tempalte: y}
    """)
    message = error_of(path)
    assert "routes[0]" in message and "tempalte" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_file_that_is_not_a_mapping(write, text):
    path = write(text)
    message = error_of(path)
    assert str(path) in message and "object" in message


def test_invalid_yaml(write):
    path = write("model_list: [\n")
    message = error_of(path)
    assert str(path) in message and "not valid YAML" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = error_of(path)
    assert str(path) in message and "no such file" in message


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"model_list: []\n# caf\xe9\n")
    assert str(path) in error_of(path)


def test_wrong_type_in_model_list_names_the_path(write):
    path = write("""
        model_list:
          - model_name: a
            litellm_params: {model: mock/a, rpm: [1]}
    """)
    assert "model_list[0].litellm_params.rpm" in error_of(path)


def test_config_error_never_echoes_a_secret_value(write):
    # A key of the wrong type must be reported by its path, not by its value.
    path = write("""
        model_list:
          - model_name: a
            litellm_params: {model: mock/a, api_key: 98765432109876543210}
    """)
    message = error_of(path)
    assert "model_list[0].litellm_params.api_key" in message
    assert "98765432109876543210" not in message


# --- unknown keys ---------------------------------------------------------------------------

def test_unknown_keys_are_kept_and_listed_never_fatal(write):
    path = write("""
        model_list:
          - model_name: m
            litellm_params: {model: openai/gpt-4o, api_key: k, custom_thing: 7}
            model_info: {id: m1, input_cost_per_token: 0.001, team: blue}
            extra_entry_key: true
        general_settings: {master_key: sk-1, alerting: [slack], proxy_batch_write_at: 10}
        router_settings: {routing_strategy: simple-shuffle, redis_host: localhost, num_retries: 2}
        litellm_settings: {drop_params: true, success_callback: [langfuse]}
        some_future_section: {x: 1}
    """)
    config = load(path, environ={})
    assert set(config.ignored) == {
        "some_future_section",
        "general_settings.alerting", "general_settings.proxy_batch_write_at",
        "litellm_settings.success_callback",
    }
    assert config.general_settings["alerting"] == ["slack"]
    assert config.litellm_settings["drop_params"] is True
    assert config.models[0].litellm_params["custom_thing"] == 7
    assert config.models[0].model_info["team"] == "blue"


# --- LiteLLM config.yaml and the default routes ----------------------------------------------

LITELLM_CONFIG = """
model_list:
  - model_name: gpt-3.5-turbo
    litellm_params:
      model: azure/chatgpt-v-2
      api_base: os.environ/AZURE_API_BASE
      api_key: os.environ/AZURE_API_KEY
      api_version: "2023-07-01-preview"
  - model_name: gpt-4
    litellm_params:
      model: openai/gpt-4
      api_key: os.environ/OPENAI_API_KEY
      rpm: 480
      timeout: 300
      stream_timeout: 60
    model_info:
      id: my-gpt4
      mode: chat
      input_cost_per_token: 0.00003
  - model_name: "openai/*"
    litellm_params:
      model: "openai/*"
      api_key: os.environ/OPENAI_API_KEY
litellm_settings:
  drop_params: True
  num_retries: 3
  request_timeout: 600
  set_verbose: False
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 2
  timeout: 30
  redis_host: os.environ/REDIS_HOST
general_settings:
  master_key: sk-1234
  alerting: ["slack"]
  database_url: "postgresql://llmproxy:dbpassword9090@localhost:5432/litellm"
environment_variables:
  REDIS_HOST: localhost
"""


def test_plain_litellm_config_loads_with_the_default_routes(write):
    config = load(write(LITELLM_CONFIG), environ={"AZURE_API_BASE": "https://x.openai.azure.com",
                                                  "AZURE_API_KEY": "az", "OPENAI_API_KEY": "oa"})
    assert config.routes == load_default_routes()
    assert [m.model_name for m in config.models] == ["gpt-3.5-turbo", "gpt-4", "openai/*"]
    assert config.settings.master_key.reveal() == "sk-1234"
    assert config.settings.timeout == 30.0
    assert config.router_settings["redis_host"] == "localhost"
    registry = build_registry(config.models, config.environ)
    azure = registry.groups["gpt-3.5-turbo"][0]
    assert (azure.provider, azure.model, azure.api_base, azure.api_version) == (
        "azure", "chatgpt-v-2", "https://x.openai.azure.com", "2023-07-01-preview")
    assert azure.api_key.reveal() == "az" and registry.problems() == []
    assert registry.by_id["my-gpt4"].rpm == 480


def test_shipped_routes_yaml_is_the_packaged_default_configuration():
    shipped = yaml.safe_load((ROOT / "routes.yaml").read_text())
    default = yaml.safe_load((ROOT / "tornado_proxy" / "default_routes.yaml").read_text())
    assert shipped == default  # the whole file: it is what `serve` uses outside a checkout
    assert parse_routes(shipped["routes"]) == load_default_routes()


def test_shipped_routes_yaml_loads():
    config = load(ROOT / "routes.yaml", environ={"LITELLM_MASTER_KEY": MASTER_KEY})
    names = [m.model_name for m in config.models]
    assert "demo" in names
    assert any(m.litellm_params["model"] == "openrouter/openai/gpt-3.5-turbo" for m in config.models)
    assert any(m.model_name == "openrouter/*" and m.litellm_params["model"] == "openrouter/*" for m in config.models)
    assert config.ignored == ()


def test_shipped_routes_yaml_needs_nothing_set():
    """A fresh clone with no variables set: loads (serve then generates a master key)."""
    config = load(ROOT / "routes.yaml", environ={})
    assert config.settings.master_key is None
    assert {name for _, name in config.unset_env} == {"OPENROUTER_API_KEY"}


def test_default_routes_parse():
    routes = load_default_routes()
    by_handler = {r.handler: r for r in routes}
    chat = by_handler["chat_completions"]
    assert chat.path == "/chat/completions" and "/v1/chat/completions" in chat.aliases
    assert chat.methods == frozenset({"POST"}) and chat.schema == "chat_completions" and chat.auth == "key"
    assert by_handler["liveliness"].auth == "none"
    assert by_handler["models"].methods == frozenset({"GET"})


def test_route_methods_are_upper_cased_and_auth_defaults_to_key(write):
    path = write("routes:\n  - {path: /m, methods: [get, POST], handler: models}\n")
    (route,) = load(path, environ={}).routes
    assert route.methods == frozenset({"GET", "POST"}) and route.auth == "key" and route.aliases == ()


# --- Secret never prints ----------------------------------------------------------------------

def test_secret_never_prints_its_value():
    s = Secret(PROVIDER_KEY)
    for text in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % s, "{}".format(s), repr([s]), repr({"k": s})):
        assert PROVIDER_KEY not in text
        assert "***" in text
    assert s.reveal() == PROVIDER_KEY
    assert s == Secret(PROVIDER_KEY) and s != Secret("other") and s != PROVIDER_KEY
    assert bool(s) and not bool(Secret(""))


def test_settings_and_deployment_reprs_hide_keys(write):
    path = write(f"""
        model_list:
          - model_name: m
            litellm_params: {{model: openai/gpt-4o, api_key: os.environ/PK}}
        general_settings:
          master_key: {MASTER_KEY}
          database_url: postgresql://u:dbpass-secret-42@h/db
    """)
    config = load(path, environ={"PK": PROVIDER_KEY})
    registry = build_registry(config.models, config.environ)
    (d,) = registry.deployments
    assert d.api_key.reveal() == PROVIDER_KEY
    secrets = (PROVIDER_KEY, MASTER_KEY, "dbpass-secret-42")
    for obj in (config.settings, d, registry, config.models[0], config):
        for text in (repr(obj), str(obj), f"{obj}"):
            for secret in secrets:
                assert secret not in text, (type(obj).__name__, secret)
    assert "api_key" not in d.public_params
