-- Tenants: teams, users, team membership and virtual keys (LiteLLM's key model). A key is
-- stored only as the SHA-256 hex digest of its text ("token", as LiteLLM's
-- LiteLLM_VerificationToken.token) plus a masked form for display ("sk-...abcd").
--
-- spend / model_spend / spend_updated_at are written constantly (one increment per batch of
-- requests): the change triggers below ignore them, so spend never causes a cache reload.
CREATE TABLE proxy_teams (
    team_id               text PRIMARY KEY,
    team_alias            text,
    models                jsonb NOT NULL DEFAULT '[]'::jsonb,
    max_budget            double precision,
    soft_budget           double precision,
    budget_duration       text,
    budget_reset_at       timestamptz,
    tpm_limit             bigint,
    rpm_limit             bigint,
    max_parallel_requests integer,
    model_max_budget      jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
    blocked               boolean NOT NULL DEFAULT false,
    spend                 double precision NOT NULL DEFAULT 0,
    model_spend           jsonb NOT NULL DEFAULT '{}'::jsonb,
    spend_updated_at      timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE proxy_users (
    user_id               text PRIMARY KEY,
    user_email            text,
    user_alias            text,
    user_role             text NOT NULL DEFAULT 'internal_user',
    models                jsonb NOT NULL DEFAULT '[]'::jsonb,
    max_budget            double precision,
    soft_budget           double precision,
    budget_duration       text,
    budget_reset_at       timestamptz,
    tpm_limit             bigint,
    rpm_limit             bigint,
    max_parallel_requests integer,
    model_max_budget      jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
    spend                 double precision NOT NULL DEFAULT 0,
    model_spend           jsonb NOT NULL DEFAULT '{}'::jsonb,
    spend_updated_at      timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE proxy_team_members (
    team_id    text NOT NULL REFERENCES proxy_teams (team_id) ON DELETE CASCADE,
    user_id    text NOT NULL,
    role       text NOT NULL DEFAULT 'user' CHECK (role IN ('admin', 'user')),
    user_email text,
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX proxy_team_members_user ON proxy_team_members (user_id);

CREATE TABLE proxy_keys (
    token                 text PRIMARY KEY CHECK (token ~ '^[0-9a-f]{64}$'),
    key_name              text NOT NULL,
    key_alias             text UNIQUE,
    team_id               text REFERENCES proxy_teams (team_id) ON DELETE CASCADE,
    user_id               text,
    models                jsonb NOT NULL DEFAULT '[]'::jsonb,
    max_budget            double precision,
    soft_budget           double precision,
    budget_duration       text,
    budget_reset_at       timestamptz,
    tpm_limit             bigint,
    rpm_limit             bigint,
    max_parallel_requests integer,
    model_max_budget      jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
    blocked               boolean NOT NULL DEFAULT false,
    expires               timestamptz,
    spend                 double precision NOT NULL DEFAULT 0,
    model_spend           jsonb NOT NULL DEFAULT '{}'::jsonb,
    spend_updated_at      timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX proxy_keys_team ON proxy_keys (team_id);
CREATE INDEX proxy_keys_user ON proxy_keys (user_id);

-- One notification per changed row, naming it ("key:<token>", "team:<id>", "user:<id>"), on
-- one channel. UPDATE triggers list every column except the spend ones.
CREATE FUNCTION proxy_tenants_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    IF TG_TABLE_NAME = 'proxy_keys' THEN
        PERFORM pg_notify('proxy_tenants_changed', 'key:' || r.token);
        IF TG_OP = 'UPDATE' AND OLD.token <> NEW.token THEN  -- /key/regenerate: drop the old key too
            PERFORM pg_notify('proxy_tenants_changed', 'key:' || OLD.token);
        END IF;
    ELSIF TG_TABLE_NAME = 'proxy_teams' THEN
        PERFORM pg_notify('proxy_tenants_changed', 'team:' || r.team_id);
    ELSIF TG_TABLE_NAME = 'proxy_users' THEN
        PERFORM pg_notify('proxy_tenants_changed', 'user:' || r.user_id);
    ELSE
        PERFORM pg_notify('proxy_tenants_changed', 'team:' || r.team_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER proxy_keys_changed AFTER INSERT OR DELETE ON proxy_keys
    FOR EACH ROW EXECUTE FUNCTION proxy_tenants_notify();
CREATE TRIGGER proxy_keys_updated AFTER UPDATE OF
    token, key_name, key_alias, team_id, user_id, models, max_budget, soft_budget, budget_duration,
    budget_reset_at, tpm_limit, rpm_limit, max_parallel_requests, model_max_budget, metadata, blocked, expires
    ON proxy_keys FOR EACH ROW EXECUTE FUNCTION proxy_tenants_notify();

CREATE TRIGGER proxy_teams_changed AFTER INSERT OR DELETE ON proxy_teams
    FOR EACH ROW EXECUTE FUNCTION proxy_tenants_notify();
CREATE TRIGGER proxy_teams_updated AFTER UPDATE OF
    team_alias, models, max_budget, soft_budget, budget_duration, budget_reset_at, tpm_limit, rpm_limit,
    max_parallel_requests, model_max_budget, metadata, blocked
    ON proxy_teams FOR EACH ROW EXECUTE FUNCTION proxy_tenants_notify();

CREATE TRIGGER proxy_users_changed AFTER INSERT OR DELETE ON proxy_users
    FOR EACH ROW EXECUTE FUNCTION proxy_tenants_notify();
CREATE TRIGGER proxy_users_updated AFTER UPDATE OF
    user_email, user_alias, user_role, models, max_budget, soft_budget, budget_duration, budget_reset_at,
    tpm_limit, rpm_limit, max_parallel_requests, model_max_budget, metadata
    ON proxy_users FOR EACH ROW EXECUTE FUNCTION proxy_tenants_notify();

CREATE TRIGGER proxy_team_members_changed AFTER INSERT OR UPDATE OR DELETE ON proxy_team_members
    FOR EACH ROW EXECUTE FUNCTION proxy_tenants_notify();

-- One row per request (LiteLLM's LiteLLM_SpendLogs fields). request_id is the primary key, so
-- a batch replayed after an outage inserts each row at most once.
CREATE TABLE proxy_spend_logs (
    request_id        text PRIMARY KEY,
    call_type         text NOT NULL,
    api_key           text NOT NULL DEFAULT '',
    spend             double precision NOT NULL DEFAULT 0,
    total_tokens      integer NOT NULL DEFAULT 0,
    prompt_tokens     integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    start_time        timestamptz NOT NULL,
    end_time          timestamptz NOT NULL,
    model             text NOT NULL DEFAULT '',
    model_id          text,
    model_group       text,
    custom_llm_provider text,
    api_base          text,
    "user"            text,
    end_user          text,
    team_id           text,
    status            text NOT NULL,
    cache_hit         text NOT NULL DEFAULT 'False',
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX proxy_spend_logs_start ON proxy_spend_logs (start_time);
CREATE INDEX proxy_spend_logs_key ON proxy_spend_logs (api_key, start_time);
CREATE INDEX proxy_spend_logs_team ON proxy_spend_logs (team_id, start_time);
CREATE INDEX proxy_spend_logs_user ON proxy_spend_logs ("user", start_time);
