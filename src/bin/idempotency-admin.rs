//! `idempotency-admin`: see, purge and fix idempotency records without SQL.
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! whose `sslmode` and `sslrootcert` it honours as libpq does (see `tls`).
//! Exit codes: 0 done, 1 database error, 2 usage error, 3 no such record,
//! 4 refused (an in-progress claim, without `--force`).

// Beside this file rather than in src/bin/, where Cargo would take it for
// a binary of its own.
#[path = "idempotency-admin/tls.rs"]
mod tls;

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tower_idempotency::{Deletion, PoolMode, PostgresStore, RecordView, StoreError, StoreStats, DEFAULT_TABLE};

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DEFAULT_BATCH: u32 = 10_000;

const USAGE: &str = "idempotency-admin: see, purge and fix idempotency records

Usage: idempotency-admin [--table NAME] COMMAND [ARGS]

Commands:
  migrate                             create the records table and index if absent
  stats [--json]                      records by state, oldest open claim, expired
                                      records awaiting purge, leases past expiry
  purge [--batch N] [--dry-run]       delete expired records in batches of N
                                      (default 10000); --dry-run only counts them
  show SOURCE EVENT_TYPE KEY [--json] one record, with its stored response
  delete SOURCE EVENT_TYPE KEY [--force] [--by NAME]
                                      delete a record so the next delivery runs
                                      again; an open claim needs --force
                                      (`release` is its former name)
  help [COMMAND]                      this text, or a command's

Options:
  --table NAME   the records table, `table` or `schema.table`
                 [default: idempotency_records]

Environment:
  DATABASE_URL   the Postgres to use [default: postgres://postgres@127.0.0.1:5432/postgres];
                 sslmode (disable, allow, prefer, require, verify-ca, verify-full)
                 and sslrootcert=<file> as for psql
  DATABASE_POOL_MODE  `transaction` when DATABASE_URL reaches a
                 transaction-mode pooler (PgBouncer, Supavisor, RDS Proxy):
                 no named prepared statements [default: session]

Exit codes: 0 done, 1 database error, 2 usage error, 3 no such record,
4 refused (an in-progress claim, without --force).
";

fn command_usage(command: &str) -> Option<&'static str> {
    Some(match command {
        "migrate" => "Usage: idempotency-admin [--table NAME] migrate\n\nCreates the records table, its indexes (expiry, open claims) and, for\n`schema.table`, the schema, when absent. Safe to run at any time, from many hosts at once.\n",
        "stats" => "Usage: idempotency-admin [--table NAME] stats [--json]\n\nPrints records by state, the oldest open claim, expired records awaiting\npurge and open claims whose lease ran out. Reads the whole table.\n",
        "purge" => "Usage: idempotency-admin [--table NAME] purge [--batch N] [--dry-run]\n\nDeletes expired records, oldest first, N at a time (default 10000), each\nbatch a short transaction; safe beside running instances and other purges.\n--dry-run prints how many would be deleted.\n",
        "show" => "Usage: idempotency-admin [--table NAME] show SOURCE EVENT_TYPE KEY [--json]\n\nPrints one record and its stored response. Use '' for an empty event type.\n",
        "delete" | "release" => "Usage: idempotency-admin [--table NAME] delete SOURCE EVENT_TYPE KEY [--force] [--by NAME]\n\nDeletes one record so that the next delivery of the event runs the handler\nagain. An open claim with a live lease is refused unless --force (its\nhandler may still be running). The deletion is logged to stderr with who\n(--by, else $USER) and when. Instances with a record cache may replay the\nkey until their cache time-to-live passes. `release` is its former name.\n",
        _ => return None,
    })
}

/// A parsed command line.
struct Invocation {
    table: String,
    command: String,
    positional: Vec<String>,
    flags: Vec<String>,
    batch: u32,
    by: Option<String>,
}

fn parse(args: Vec<String>) -> Result<Invocation, String> {
    let mut table = DEFAULT_TABLE.to_owned();
    let mut command = None;
    let mut positional = Vec::new();
    let mut flags = Vec::new();
    let mut batch = DEFAULT_BATCH;
    let mut by = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--table" => table = value("--table")?,
            "--batch" => {
                batch = value("--batch")?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--batch needs a whole number greater than 0")?;
            }
            "--by" => by = Some(value("--by")?),
            "--json" | "--dry-run" | "--force" | "--help" | "-h" => flags.push(arg),
            flag if flag.starts_with("--") => return Err(format!("unknown option `{flag}`")),
            _ if command.is_none() => command = Some(arg),
            _ => positional.push(arg),
        }
    }
    let command = command.unwrap_or_else(|| "help".to_owned());
    Ok(Invocation {
        table,
        command,
        positional,
        flags,
        batch,
        by,
    })
}

impl Invocation {
    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|flag| flag == name)
    }

    /// SOURCE EVENT_TYPE KEY.
    fn record_key(&self) -> Result<(&str, &str, &str), String> {
        match self.positional.as_slice() {
            [source, event_type, key] => Ok((source, event_type, key)),
            _ => Err(format!("`{}` needs SOURCE EVENT_TYPE KEY", self.command)),
        }
    }
}

fn main() -> ExitCode {
    let invocation = match parse(std::env::args().skip(1).collect()) {
        Ok(invocation) => invocation,
        Err(error) => return usage_error(&error),
    };
    if invocation.command == "help" || invocation.flag("--help") || invocation.flag("-h") {
        let topic = if invocation.command == "help" {
            invocation.positional.first()
        } else {
            Some(&invocation.command)
        };
        match topic.map(|topic| command_usage(topic)) {
            None => print!("{USAGE}"),
            Some(Some(text)) => print!("{text}"),
            Some(None) => return usage_error(&format!("unknown command `{}`", topic.map_or("", |t| t))),
        }
        return ExitCode::SUCCESS;
    }
    if command_usage(&invocation.command).is_none() {
        return usage_error(&format!("unknown command `{}`", invocation.command));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("idempotency-admin: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(invocation))
}

fn usage_error(error: &str) -> ExitCode {
    eprintln!("idempotency-admin: {error}\nrun `idempotency-admin help` for usage");
    ExitCode::from(2)
}

fn database_error(error: &StoreError) -> ExitCode {
    let mut text = error.to_string();
    // Why a connection failed (a refused certificate, say) is only in the
    // chain; the store's other errors already say it.
    if let StoreError::Connect(_) = error {
        let mut cause = std::error::Error::source(error);
        while let Some(current) = cause {
            let cause_text = current.to_string();
            if !text.contains(&cause_text) {
                text = format!("{text}: {cause_text}");
            }
            cause = current.source();
        }
    }
    eprintln!("idempotency-admin: {text}");
    if let Some(advice) = tls::certificate_advice(error) {
        eprintln!("idempotency-admin: {advice}");
    }
    ExitCode::FAILURE
}

async fn run(invocation: Invocation) -> ExitCode {
    let store = match connect(&invocation.table) {
        Ok(store) => store,
        Err(error) => return usage_error(&error),
    };
    let outcome = match invocation.command.as_str() {
        "migrate" => store.migrate().await.map(|()| {
            println!("migrated {}", invocation.table);
            ExitCode::SUCCESS
        }),
        "stats" => store.stats().await.map(|stats| {
            print_stats(&stats, invocation.flag("--json"));
            ExitCode::SUCCESS
        }),
        "purge" if invocation.flag("--dry-run") => store.count_expired().await.map(|count| {
            println!("{count} expired records would be purged");
            ExitCode::SUCCESS
        }),
        "purge" => store.purge_expired(invocation.batch).await.map(|deleted| {
            println!("purged {deleted} expired records");
            ExitCode::SUCCESS
        }),
        "show" => {
            let (source, event_type, key) = match invocation.record_key() {
                Ok(parts) => parts,
                Err(error) => return usage_error(&error),
            };
            store.record(source, event_type, key).await.map(|record| match record {
                Some(record) => {
                    print_record(&record, invocation.flag("--json"));
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("idempotency-admin: no record for ({source:?}, {event_type:?}, {key:?})");
                    ExitCode::from(3)
                }
            })
        }
        // `release` was this command's name; a claim's release is the
        // layer's, an operator deletes a record.
        "delete" | "release" => {
            let (source, event_type, key) = match invocation.record_key() {
                Ok(parts) => parts,
                Err(error) => return usage_error(&error),
            };
            let force = invocation.flag("--force");
            store
                .delete_record(source, event_type, key, force)
                .await
                .map(|deletion| deletion_outcome(deletion, (source, event_type, key), force, invocation.by.as_deref()))
        }
        _ => return usage_error(&format!("unknown command `{}`", invocation.command)),
    };
    outcome.unwrap_or_else(|error| database_error(&error))
}

fn connect(table: &str) -> Result<PostgresStore, String> {
    let url = std::env::var("DATABASE_URL").ok().filter(|url| !url.is_empty());
    let url = url.as_deref().unwrap_or(DEFAULT_DATABASE_URL);
    let (database, tls) = tls::connection_settings(url)?;
    let manager = deadpool_postgres::Manager::new(database, tls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(2)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|error| format!("cannot build a connection pool: {error}"))?;
    PostgresStore::new(pool)
        .with_pool_mode(pool_mode()?)
        .with_table(table)
        .map_err(|error| error.to_string())
}

/// `DATABASE_POOL_MODE`: `session` (the default) or `transaction`.
fn pool_mode() -> Result<PoolMode, String> {
    match std::env::var("DATABASE_POOL_MODE")
        .ok()
        .filter(|mode| !mode.is_empty())
        .as_deref()
    {
        None | Some("session") => Ok(PoolMode::Session),
        Some("transaction") => Ok(PoolMode::Transaction),
        Some(other) => Err(format!(
            "invalid DATABASE_POOL_MODE={other:?}: expected `session` or `transaction`"
        )),
    }
}

fn deletion_outcome(deletion: Deletion, key: (&str, &str, &str), force: bool, by: Option<&str>) -> ExitCode {
    let (source, event_type, key) = key;
    match deletion {
        Deletion::Deleted => {
            let who = by
                .map(str::to_owned)
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "unknown".into());
            eprintln!(
                "idempotency-admin: deleted ({source:?}, {event_type:?}, {key:?}) by {who} at {}{}",
                timestamp(SystemTime::now()),
                if force { " (forced)" } else { "" }
            );
            println!("deleted");
            ExitCode::SUCCESS
        }
        Deletion::NotFound => {
            eprintln!("idempotency-admin: no record for ({source:?}, {event_type:?}, {key:?})");
            ExitCode::from(3)
        }
        Deletion::InFlight => {
            eprintln!(
                "idempotency-admin: ({source:?}, {event_type:?}, {key:?}) is an open claim whose handler may still \
                 be running; rerun with --force to delete it anyway"
            );
            ExitCode::from(4)
        }
    }
}

fn print_stats(stats: &StoreStats, as_json: bool) {
    let oldest = stats.oldest_in_flight.map(timestamp);
    if as_json {
        let document = json!({
            "in_flight": stats.in_flight,
            "completed": stats.completed,
            "expired_awaiting_purge": stats.expired_awaiting_purge,
            "leases_past_expiry": stats.leases_past_expiry,
            "oldest_in_flight": oldest,
        });
        println!("{document}");
        return;
    }
    println!("in flight               {}", stats.in_flight);
    println!("completed               {}", stats.completed);
    println!("expired awaiting purge  {}", stats.expired_awaiting_purge);
    println!("leases past expiry      {}", stats.leases_past_expiry);
    println!("oldest open claim       {}", oldest.as_deref().unwrap_or("-"));
}

fn print_record(record: &RecordView, as_json: bool) {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let pairs = |list: &[(String, Vec<u8>)]| {
        list.iter()
            .map(|(name, value)| json!([name, text(value)]))
            .collect::<Vec<_>>()
    };
    if as_json {
        let document = json!({
            "state": record.state,
            "fingerprint": record.fingerprint,
            "created_at": timestamp(record.created_at),
            "completed_at": record.completed_at.map(timestamp),
            "expires_at": timestamp(record.expires_at),
            "locked_until": record.locked_until.map(timestamp),
            "response": {
                "status": record.response_status,
                "headers": pairs(&record.response_headers),
                "trailers": record.response_trailers.as_deref().map(pairs),
                "body": record.response_body.as_deref().map(text),
            },
        });
        println!("{document}");
        return;
    }
    println!("state         {}", record.state);
    println!("fingerprint   {}", record.fingerprint);
    println!("created at    {}", timestamp(record.created_at));
    println!("completed at  {}", record.completed_at.map_or("-".into(), timestamp));
    println!("expires at    {}", timestamp(record.expires_at));
    println!("locked until  {}", record.locked_until.map_or("-".into(), timestamp));
    if let Some(status) = record.response_status {
        println!("response      {status}");
        for (name, value) in &record.response_headers {
            println!("  {name}: {}", text(value));
        }
        match &record.response_body {
            Some(body) => println!("\n{}", text(body)),
            None => println!("\n(body not retained: over the storage limit)"),
        }
    }
}

/// RFC 3339 in UTC, whole seconds.
fn timestamp(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs());
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}
