-- Responses API: the responses kept for previous_response_id and GET / DELETE /v1/responses/{id}
-- (store: true, the default). A translated model's row holds the response object and the
-- conversation's input items (earlier turns included), from which a follow-up turn is built; a
-- pass-through row (openai/, azure/: the provider keeps the response) holds only the deployment
-- that answered, so that reads and deletes go back to it. api_key is the creating key's SHA-256
-- hex ('' for the master key): a virtual key sees only its own rows.
CREATE TABLE proxy_responses (
    id            text PRIMARY KEY,
    api_key       text NOT NULL DEFAULT '',
    model         text NOT NULL,
    deployment_id text,
    response      jsonb,
    input_items   jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX proxy_responses_created ON proxy_responses (created_at);
