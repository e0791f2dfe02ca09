-- tower-idempotency's records table and its expiry index, from PostgresStore::migration_sql("idempotency_records").
-- Once it is applied, PostgresStore::migrate() only checks it.
CREATE TABLE IF NOT EXISTS "idempotency_records" (
    source           text        NOT NULL,
    event_type       text        NOT NULL DEFAULT '',
    key              text        NOT NULL,
    fingerprint      bytea       NOT NULL,
    state            smallint    NOT NULL,
    claim_token      uuid,
    locked_until     timestamptz,
    response_status  smallint,
    response_headers bytea,
    response_body    bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz,
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (source, event_type, key)
);
CREATE INDEX IF NOT EXISTS "idempotency_records_expires_at" ON "idempotency_records" (expires_at);
