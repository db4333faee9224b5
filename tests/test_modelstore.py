"""modelstore.py: the YAML -> database diff (pure), masking, the public view, the model API's
row checks, and the store against a real PostgreSQL (sync applied, rows -> deployments)."""

import pytest

from tornado_proxy.config import ModelSpec, Secret
from tornado_proxy.crypt import PREFIX, Cipher
from tornado_proxy.db import Database, ModelRow
from tornado_proxy.errors import InvalidRequestError, NotFoundError
from tornado_proxy.modelstore import (MASK, ModelStore, SyncPlan, cipher_for, mask, plan_sync, public_view,
                                      spec_of, yaml_row)

KEY = "sk-provider-plaintext-4242"
CIPHER = Cipher("salt-for-tests")


def spec(name: str = "gpt", model: str = "openai/gpt-4o", info: dict | None = None, **params) -> ModelSpec:
    return ModelSpec(model_name=name, litellm_params={"model": model, **params}, model_info=dict(info or {}),
                     where="model_list[0]")


def api_row(model_id: str, name: str = "api-model", **params) -> ModelRow:
    return ModelRow(model_id, name, CIPHER.seal({"model": "mock/x", **params}, lambda k: k == "api_key"), {}, "api")


# --- yaml_row ---------------------------------------------------------------------------------------

def test_yaml_row_seals_secrets_and_gets_a_stable_id():
    row = yaml_row(spec(api_key=KEY, api_base="http://b/v1"), CIPHER)
    assert row.source == "yaml" and row.model_name == "gpt"
    assert row.litellm_params["api_key"].startswith(PREFIX) and KEY not in str(row)
    assert row.litellm_params["api_base"] == "http://b/v1"
    assert row.model_info["id"] == row.id
    again = yaml_row(spec(api_key=KEY, api_base="http://b/v1"), CIPHER)
    assert again.id == row.id  # derived from the entry: same entry, same id
    assert again.litellm_params["api_key"] != row.litellm_params["api_key"]  # but not the same ciphertext
    # the id leaves secrets out (a published id must not confirm a guessed key) ...
    assert yaml_row(spec(api_key="other-key", api_base="http://b/v1"), CIPHER).id == row.id
    # ... and config.load numbers entries that differ only in their keys
    from tornado_proxy.config import assign_ids
    ids = [s.model_info["id"] for s in assign_ids((spec(api_key="k1"), spec(api_key="k2")))]
    assert ids[1] == ids[0] + "-2"


def test_yaml_row_keeps_an_explicit_id():
    row = yaml_row(spec(info={"id": "my-id", "mode": "chat"}), CIPHER)
    assert row.id == "my-id" and row.model_info == {"id": "my-id", "mode": "chat"}


# --- plan_sync ----------------------------------------------------------------------------------------

def test_plan_against_an_empty_table_adds_everything():
    wanted = [yaml_row(spec("a"), CIPHER), yaml_row(spec("b", api_key=KEY), CIPHER)]
    plan = plan_sync(wanted, [], CIPHER)
    assert plan.added == wanted and plan.changed == [] and plan.removed == []
    assert not plan.empty


def test_plan_is_empty_when_nothing_changed_although_ciphertexts_differ():
    stored = [yaml_row(spec("a", api_key=KEY), CIPHER), yaml_row(spec("b"), CIPHER)]
    wanted = [yaml_row(spec("a", api_key=KEY), CIPHER), yaml_row(spec("b"), CIPHER)]
    assert stored[0].litellm_params["api_key"] != wanted[0].litellm_params["api_key"]
    plan = plan_sync(wanted, stored, CIPHER)
    assert plan.empty and plan.describe() == []


def test_plan_sees_a_changed_secret_through_the_encryption():
    stored = [yaml_row(spec("a", info={"id": "a1"}, api_key=KEY), CIPHER)]
    wanted = [yaml_row(spec("a", info={"id": "a1"}, api_key="sk-rotated"), CIPHER)]
    plan = plan_sync(wanted, stored, CIPHER)
    assert [r.id for r in plan.changed] == ["a1"] and not plan.added and not plan.removed


@pytest.mark.parametrize("before, after", [
    (spec("a", info={"id": "a1"}), spec("renamed", info={"id": "a1"})),
    (spec("a", info={"id": "a1"}), spec("a", info={"id": "a1", "mode": "embedding"})),
    (spec("a", info={"id": "a1"}, rpm=5), spec("a", info={"id": "a1"}, rpm=6)),
    (spec("a", info={"id": "a1"}, rpm=5), spec("a", info={"id": "a1"})),
])
def test_plan_sees_other_changes(before, after):
    plan = plan_sync([yaml_row(after, CIPHER)], [yaml_row(before, CIPHER)], CIPHER)
    assert [r.id for r in plan.changed] == ["a1"] and not plan.added and not plan.removed
    assert plan.changed[0].model_name == after.model_name


def test_plan_removes_only_yaml_rows_gone_from_the_file():
    kept, gone = yaml_row(spec("kept"), CIPHER), yaml_row(spec("gone"), CIPHER)
    api = api_row("api-1", api_key=KEY)
    plan = plan_sync([yaml_row(spec("kept"), CIPHER)], [kept, gone, api], CIPHER)
    assert plan.removed == [gone]
    assert not plan.added and not plan.changed


def test_plan_with_an_empty_file_never_removes_api_rows():
    plan = plan_sync([], [api_row("api-1"), api_row("api-2")], CIPHER)
    assert plan.empty


def test_a_stored_row_written_with_another_key_counts_as_changed():
    stored = [yaml_row(spec("a", info={"id": "a1"}, api_key=KEY), Cipher("the-old-salt"))]
    plan = plan_sync([yaml_row(spec("a", info={"id": "a1"}, api_key=KEY), CIPHER)], stored, CIPHER)
    assert [r.id for r in plan.changed] == ["a1"]  # rewritten with the current key, not a crash


def test_describe_masks_secrets():
    stored = [yaml_row(spec("old", info={"id": "o1"}), CIPHER),
              yaml_row(spec("chg", info={"id": "c1"}, api_key="sk-old-value"), CIPHER)]
    wanted = [yaml_row(spec("new", info={"id": "n1"}, api_key=KEY), CIPHER),
              yaml_row(spec("chg", info={"id": "c1"}, api_key="sk-new-value"), CIPHER)]
    lines = plan_sync(wanted, stored, CIPHER).describe()
    assert [line[:2] for line in lines] == ["+ ", "~ ", "- "]
    assert "new (n1)" in lines[0] and "chg (c1)" in lines[1] and "old (o1)" in lines[2]
    text = "\n".join(lines)
    assert MASK in lines[0] and MASK in lines[1]
    for secret in (KEY, "sk-old-value", "sk-new-value", PREFIX):
        assert secret not in text


def test_empty_plan():
    assert SyncPlan().empty and SyncPlan().describe() == []


# --- mask, public_view, spec_of, cipher_for -------------------------------------------------------------

def test_mask():
    params = {"model": "openai/x", "api_key": KEY, "aws_secret_access_key": "s", "max_tokens": 7,
              "api_base": "http://b", "azure_ad_token": ""}
    assert mask(params) == {"model": "openai/x", "api_key": MASK, "aws_secret_access_key": MASK,
                            "max_tokens": 7, "api_base": "http://b", "azure_ad_token": ""}
    assert params["api_key"] == KEY


def test_public_view_is_litellms_shape_with_secrets_masked():
    row = ModelRow("id-1", "gpt", CIPHER.seal({"model": "openai/x", "api_key": KEY}, lambda k: k == "api_key"),
                   {"mode": "chat", "id": "id-1"}, "api")
    view = public_view(row)
    assert view == {"model_id": "id-1", "model_name": "gpt",
                    "litellm_params": {"model": "openai/x", "api_key": MASK},
                    "model_info": {"mode": "chat", "id": "id-1", "db_model": True}}
    assert public_view(ModelRow("y", "gpt", {"model": "m/x"}, {}, "yaml"))["model_info"]["db_model"] is False


def test_spec_of_decrypts_and_resolves_the_environment():
    row = ModelRow("r1", "gpt", CIPHER.seal({"model": "openai/x", "api_key": KEY,
                                              "api_base": "os.environ/BASE"}, lambda k: k == "api_key"),
                   {"id": "r1"}, "api")
    got, problem = spec_of(row, CIPHER, {"BASE": "http://from-env/v1"})
    assert problem is None
    assert got.litellm_params == {"model": "openai/x", "api_key": KEY, "api_base": "http://from-env/v1"}
    assert "r1" in got.where


def test_spec_of_with_a_wrong_key_reports_a_problem():
    row = ModelRow("r1", "gpt", CIPHER.seal({"model": "openai/x", "api_key": KEY}, lambda k: k == "api_key"),
                   {}, "api")
    got, problem = spec_of(row, Cipher("another-salt"), {})
    assert problem and "LITELLM_SALT_KEY" in problem
    assert KEY not in str(got.litellm_params)


class FakeSettings:
    def __init__(self, master_key):
        self.master_key = master_key


def test_cipher_prefers_the_salt_key_then_the_master_key():
    sealed = Cipher("the-salt").encrypt(KEY)
    assert cipher_for(FakeSettings(Secret("mk")), {"LITELLM_SALT_KEY": "the-salt"}).decrypt(sealed) == KEY
    by_master = cipher_for(FakeSettings(Secret("mk")), {})
    assert by_master.decrypt(Cipher("mk").encrypt(KEY)) == KEY
    assert cipher_for(FakeSettings(None), {}) is None


# --- checked_row (the model API's validation) -----------------------------------------------------------

def store(environ=None, cipher=CIPHER) -> ModelStore:
    return ModelStore(Database("dbname=unused"), cipher, environ or {})  # checked_row does no I/O


def test_checked_row_seals_and_keeps_env_references():
    row = store({"K": KEY}).checked_row(
        {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o", "api_key": "os.environ/K"},
         "model_info": {"mode": "chat"}}, "id-9")
    assert row.id == "id-9" and row.source == "api" and row.model_info == {"mode": "chat", "id": "id-9"}
    assert row.litellm_params["api_key"].startswith(PREFIX)
    assert CIPHER.open(row.litellm_params)["api_key"] == "os.environ/K"  # resolved when served


def test_checked_row_literal_key_is_encrypted():
    row = store().checked_row({"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o", "api_key": KEY}},
                              "id-1")
    assert KEY not in str(row.litellm_params) and CIPHER.open(row.litellm_params)["api_key"] == KEY


def test_checked_row_rejects_an_unknown_provider():
    with pytest.raises(InvalidRequestError) as info:
        store().checked_row({"model_name": "x", "litellm_params": {"model": "nope/x"}}, "id-1")
    assert info.value.param == "litellm_params.model" and "nope" in str(info.value)


def test_checked_row_rejects_a_bad_number_naming_the_field():
    with pytest.raises(InvalidRequestError) as info:
        store().checked_row({"model_name": "x", "litellm_params": {"model": "mock/x", "rpm": "lots"}}, "id-1")
    message = str(info.value)
    assert info.value.param == "litellm_params"
    assert "litellm_params.rpm" in message and "database model" not in message


def test_checked_row_needs_a_cipher():
    with pytest.raises(InvalidRequestError, match="LITELLM_SALT_KEY"):
        store(cipher=None).checked_row({"model_name": "x", "litellm_params": {"model": "mock/x"}}, "id-1")


def test_merged_params_decrypts_and_lets_the_request_win():
    row = api_row("r1", api_key=KEY, rpm=3)
    merged = store().merged_params(row, {"rpm": 9, "temperature": 0.5})
    assert merged == {"model": "mock/x", "api_key": KEY, "rpm": 9, "temperature": 0.5}


def test_merged_params_with_an_unreadable_secret():
    row = ModelRow("r1", "m", Cipher("old-salt").seal({"model": "mock/x", "api_key": KEY}, lambda k: k == "api_key"),
                   {}, "api")
    with pytest.raises(InvalidRequestError) as info:
        store().merged_params(row, {"rpm": 1})
    assert info.value.param == "litellm_params.api_key" and KEY not in str(info.value)
    # a new value for the unreadable secret replaces it
    assert store().merged_params(row, {"api_key": "sk-new"}) == {"model": "mock/x", "api_key": "sk-new"}


# --- the store on a real PostgreSQL ---------------------------------------------------------------------

async def test_store_plan_apply_and_deployments(pg_dsn):
    db = Database(pg_dsn)
    ms = ModelStore(db, CIPHER, {"K": KEY})
    try:
        await db.insert_model(ms.checked_row({"model_name": "api-one", "litellm_params": {
            "model": "openai/gpt-4o", "api_key": "os.environ/K"}}, "api-1"))
        specs = [spec("a", info={"id": "a1"}, api_key=KEY), spec("b", model="mock/b", info={"id": "b1"})]
        plan = await ms.plan(specs)
        assert sorted(r.id for r in plan.added) == ["a1", "b1"] and not plan.changed and not plan.removed
        await ms.apply(plan)
        assert (await ms.plan(specs)).empty  # idempotent

        stored = {r.id: r for r in await db.fetch_models()}
        assert set(stored) == {"api-1", "a1", "b1"}
        assert stored["a1"].litellm_params["api_key"].startswith(PREFIX)
        assert stored["api-1"].source == "api" and stored["a1"].source == "yaml"

        deployments = {d.id: d for d in await ms.deployments(exclude_ids={"b1"})}
        assert set(deployments) == {"api-1", "a1"}
        assert deployments["api-1"].api_key.reveal() == KEY  # decrypted, then os.environ/K resolved
        assert deployments["a1"].api_key.reveal() == KEY
        assert deployments["api-1"].source == "db" and deployments["a1"].source == "yaml"
        assert all(d.problem is None for d in deployments.values())

        # "b" leaves the file: its row goes, the API row stays
        plan = await ms.plan(specs[:1])
        assert [r.id for r in plan.removed] == ["b1"] and not plan.added and not plan.changed
        await ms.apply(plan)
        assert {r.id for r in await db.fetch_models()} == {"api-1", "a1"}
        assert (await ms.plan([])).removed and all(r.source == "yaml" for r in (await ms.plan([])).removed)
    finally:
        await db.close()


async def test_rows_written_with_another_key_load_with_a_problem(pg_dsn):
    db = Database(pg_dsn)
    try:
        writer = ModelStore(db, Cipher("first-salt"), {})
        await db.insert_model(writer.checked_row({"model_name": "m", "litellm_params": {
            "model": "openai/gpt-4o", "api_key": KEY}}, "m1"))
        reader = ModelStore(db, Cipher("second-salt"), {})
        [d] = await reader.deployments(exclude_ids=set())
        assert d.id == "m1" and d.problem and "LITELLM_SALT_KEY" in d.problem
    finally:
        await db.close()


async def test_existing_api_row_rules(pg_dsn):
    db = Database(pg_dsn)
    ms = ModelStore(db, CIPHER, {})
    try:
        await db.insert_model(api_row("api-1"))
        await ms.apply(SyncPlan(added=[yaml_row(spec("y", model="mock/y", info={"id": "y1"}), CIPHER)]))
        assert (await ms.existing_api_row("api-1")).id == "api-1"
        with pytest.raises(NotFoundError):
            await ms.existing_api_row("nope")
        with pytest.raises(InvalidRequestError, match="config file"):
            await ms.existing_api_row("y1")
    finally:
        await db.close()


async def test_sync_under_the_startup_lock_with_a_pool_of_one(pg_dsn):
    db = Database(pg_dsn, pool_size=1)
    ms = ModelStore(db, CIPHER, {})
    try:
        async with db.startup_lock():  # its own connection: the pool's one stays free for the work
            await ms.apply(await ms.plan([spec("a", model="mock/a", info={"id": "a1"})]))
        assert [r.id for r in await db.fetch_models()] == ["a1"]
    finally:
        await db.close()


async def test_waiting_for_a_held_startup_lock_is_bounded(pg_dsn):
    import psycopg2

    from tornado_proxy.db import LOCK_ID, DatabaseUnavailable

    holder = psycopg2.connect(pg_dsn)
    db = Database(pg_dsn, statement_timeout_ms=200)  # the server cancels the wait, not the client
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        with pytest.raises(DatabaseUnavailable, match="timed out"):
            async with db.startup_lock():
                pytest.fail("got a lock another session holds")
    finally:
        holder.close()
        await db.close()
    async with db.startup_lock():  # released with the holder's session
        pass
    await db.close()


async def test_a_row_that_cannot_be_built_here_is_skipped_not_fatal(pg_dsn, caplog):
    db = Database(pg_dsn)
    try:
        writer = ModelStore(db, CIPHER, {"RPM": "5"})
        await db.insert_model(writer.checked_row({"model_name": "bad-here", "litellm_params": {
            "model": "mock/x", "rpm": "os.environ/RPM", "api_key": KEY}}, "bad-1"))
        await db.insert_model(writer.checked_row({"model_name": "fine", "litellm_params": {"model": "mock/y"}},
                                                 "ok-1"))
        reader = ModelStore(db, CIPHER, {"RPM": "five"})
        assert [d.id for d in await reader.deployments(exclude_ids=set())] == ["ok-1"]
        assert "bad-1" in caplog.text and KEY not in caplog.text
        assert [d.id for d in await writer.deployments(exclude_ids=set())] == ["bad-1", "ok-1"]
    finally:
        await db.close()
