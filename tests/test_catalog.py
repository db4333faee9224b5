"""catalog.py without a database: the registry comes from the config file alone, readiness says
"Not connected", and ``storage_problem`` explains why storage is off when it was asked for.
(Database-backed behaviour is in test_e2e_db_faults.py and test_db.py.)"""

from __future__ import annotations

import asyncio
import textwrap
import types

import pytest

from tornado_proxy import config as config_module
from tornado_proxy.catalog import NOT_CONFIGURED, Catalog, storage_problem
from tornado_proxy.db import Listener

MASTER_KEY = "sk-catalog-master-1234"


def load(tmp_path, text: str, environ: dict | None = None, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return config_module.load(path, environ=environ or {})


TWO_MODELS = """
model_list:
  - model_name: demo
    litellm_params: {model: mock/demo}
  - model_name: gpt
    litellm_params: {model: openai/gpt-4o, api_key: sk-a}
router_settings:
  model_group_alias: {fast: gpt}
"""


async def test_storage_off_serves_the_config_models(tmp_path):
    catalog = Catalog(load(tmp_path, TWO_MODELS))
    assert catalog.store is None
    assert catalog.db_state == NOT_CONFIGURED == "Not connected"
    assert catalog.registry.generation == 1
    assert catalog.registry.model_names() == ["demo", "gpt", "fast"]
    assert [d.model for d in catalog.registry.resolve("fast")] == ["gpt-4o"]  # the alias is applied
    assert {d.source for d in catalog.registry.deployments} == {"yaml"}
    await catalog.start(require_db=True)  # nothing to connect to, so nothing to require
    await catalog.stop()
    assert catalog.db_state == NOT_CONFIGURED


async def test_reload_without_storage_swaps_the_registry_with_its_generation(tmp_path):
    catalog = Catalog(load(tmp_path, TWO_MODELS))
    before = catalog.registry
    new = load(tmp_path, """
    model_list:
      - model_name: demo
        litellm_params: {model: mock/demo}
      - model_name: added
        litellm_params: {model: mock/added}
    """, name="v2.yaml")
    await catalog.reload(new, 7)
    assert catalog.generation == 7 and catalog.registry.generation == 7
    assert catalog.registry.model_names() == ["demo", "added"]
    assert catalog.db_state == NOT_CONFIGURED
    # the old registry object is untouched: a request that started with it keeps its deployments
    assert before.generation == 1 and before.model_names() == ["demo", "gpt", "fast"]


def test_generation_passed_in_is_the_registry_generation(tmp_path):
    assert Catalog(load(tmp_path, TWO_MODELS), generation=4).registry.generation == 4


@pytest.mark.parametrize("general, environ, expected", [
    ("{}", {}, None),  # storage not asked for: no problem to report
    ("{store_model_in_db: false, database_url: 'host=/nowhere'}", {}, None),
    ("{store_model_in_db: true}", {"LITELLM_MASTER_KEY": MASTER_KEY},
     "store_model_in_db is on but no database_url / DATABASE_URL is set"),
    ("{store_model_in_db: true, database_url: 'host=/nowhere dbname=x'}", {},
     "store_model_in_db needs LITELLM_SALT_KEY or a master key to encrypt stored secrets"),
    ("{store_model_in_db: true, database_url: 'host=/nowhere dbname=x'}", {"LITELLM_MASTER_KEY": MASTER_KEY},
     None),
    ("{store_model_in_db: true, database_url: 'host=/nowhere dbname=x'}", {"LITELLM_SALT_KEY": "salt-123"},
     None),
    ("{}", {"STORE_MODEL_IN_DB": "True", "DATABASE_URL": "host=/nowhere dbname=x"},
     "store_model_in_db needs LITELLM_SALT_KEY or a master key to encrypt stored secrets"),
    ("{}", {"STORE_MODEL_IN_DB": "True", "LITELLM_MASTER_KEY": MASTER_KEY},
     "store_model_in_db is on but no database_url / DATABASE_URL is set"),
])
def test_storage_problem(tmp_path, general, environ, expected):
    config = load(tmp_path, f"model_list: []\ngeneral_settings: {general}\n", environ)
    assert storage_problem(config) == expected


@pytest.mark.parametrize("general, environ", [
    ("{store_model_in_db: true}", {"LITELLM_MASTER_KEY": MASTER_KEY}),
    ("{store_model_in_db: true, database_url: 'host=/nowhere dbname=x'}", {}),
])
async def test_storage_asked_for_but_unusable_serves_the_config_and_warns(tmp_path, caplog, general, environ):
    config = load(tmp_path, TWO_MODELS + f"general_settings: {general}\n", environ)
    catalog = Catalog(config)
    assert catalog.store is None and catalog.db_state == NOT_CONFIGURED
    assert catalog.registry.model_names() == ["demo", "gpt", "fast"]
    assert any("database storage is off: " + storage_problem(config) in r.getMessage() for r in caplog.records)
    await catalog.start()
    await catalog.stop()


async def test_storage_on_starts_disconnected_until_connected(tmp_path):
    config = load(tmp_path, TWO_MODELS + "general_settings: {store_model_in_db: true, database_url: 'host=/x'}\n",
                  {"LITELLM_MASTER_KEY": MASTER_KEY})
    catalog = Catalog(config)
    assert catalog.store is not None
    assert catalog.db_state == "disconnected"  # nothing tried yet: not "connected"
    assert catalog.registry.model_names() == ["demo", "gpt", "fast"]  # the config models serve at once
    await catalog.stop()


class ListenConnection:
    """Stands in for the aiopg connection whose ``Listener`` ``Catalog._listen`` waits on: a
    notification queue."""

    closed = False

    def __init__(self):
        self.notifies = asyncio.Queue()


async def test_stop_ends_the_watcher_when_a_change_arrives_with_the_cancel(tmp_path):
    # On Python < 3.12, asyncio.wait_for returns a result that is ready in the same loop turn as
    # a cancellation and drops the cancellation: a single cancel() can leave the watcher running
    # for ever, and a worker that shuts down right then never exits.
    config = load(tmp_path, TWO_MODELS + "general_settings: {store_model_in_db: true, database_url: 'host=/x'}\n",
                  {"LITELLM_MASTER_KEY": MASTER_KEY})
    catalog = Catalog(config)
    refreshes = []

    async def refresh() -> None:  # no database here: count the refreshes instead
        refreshes.append(1)

    catalog.refresh = refresh
    conn = ListenConnection()
    catalog._watcher = asyncio.create_task(catalog._listen(Listener(conn)))
    await asyncio.sleep(0.05)  # the watcher is waiting for a notification
    conn.notifies.put_nowait(types.SimpleNamespace(payload="INSERT"))  # a change arrives ...
    stop = asyncio.create_task(catalog.stop())  # ... in the same instant as the stop
    try:
        await asyncio.wait({stop}, timeout=10)  # (not wait_for: its own cancel would end the watcher)
        assert stop.done(), "Catalog.stop() did not end the watcher"
        assert catalog._watcher.cancelled()
    finally:
        catalog._watcher.cancel()
        stop.cancel()
        await asyncio.gather(catalog._watcher, stop, return_exceptions=True)
