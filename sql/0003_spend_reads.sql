-- Spend re-reads: after each batch of spend increments the writer announces one notification
-- ("spend:<worker>:<the transaction's now() in UTC>" on proxy_tenants_changed) and every worker
-- re-reads the spend columns of the rows whose spend_updated_at is at least that time. These
-- indexes keep that read small however many keys, teams and users there are.
CREATE INDEX proxy_keys_spend_updated ON proxy_keys (spend_updated_at);
CREATE INDEX proxy_teams_spend_updated ON proxy_teams (spend_updated_at);
CREATE INDEX proxy_users_spend_updated ON proxy_users (spend_updated_at);
