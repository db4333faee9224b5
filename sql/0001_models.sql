-- The model registry. litellm_params values whose names mark them secret (api_key, ...)
-- are stored encrypted ("enc:v1:<fernet token>"); see tornado_proxy/crypt.py.
CREATE TABLE proxy_models (
    id             text PRIMARY KEY,
    model_name     text NOT NULL,
    litellm_params jsonb NOT NULL,
    model_info     jsonb NOT NULL DEFAULT '{}'::jsonb,
    source         text NOT NULL CHECK (source IN ('yaml', 'api')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX proxy_models_model_name ON proxy_models (model_name);

-- Every change is announced on one channel; gateways LISTEN and reload the table.
CREATE FUNCTION proxy_models_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('proxy_models_changed', TG_OP);
    RETURN NULL;
END;
$$;
CREATE TRIGGER proxy_models_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON proxy_models
    FOR EACH STATEMENT EXECUTE FUNCTION proxy_models_notify();
