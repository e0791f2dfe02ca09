-- tower-idempotency's index of open lease-mode claims, for the store gauges' oldest-claim read
-- (PostgresStore::spawn_metrics_task). PostgresStore::migrate() creates it when its role owns the table.
CREATE INDEX IF NOT EXISTS "idempotency_records_open_claims" ON "idempotency_records" (created_at) WHERE state = 1;
