//! The PgBouncer in transaction mode that the pooler tests go through, and
//! a role of the test's own behind it.
//!
//! `PGBOUNCER_URL` names one (`.ci/run` starts one and sets it); otherwise
//! the first test that needs it starts one for the test process from
//! Debian's `pgbouncer` package, on a free port, forwarding to the Postgres
//! of `DATABASE_URL`; it stops when the test process exits. Either way it
//! must run `pool_mode = transaction` with `ignore_startup_parameters =
//! extra_float_digits` only (so that a session-scoped habit fails as it
//! would in production) and let in the roles the tests create: `auth_type =
//! trust` with `auth_user` and `auth_query`, as both write it.
//!
//! PgBouncer keeps a pool of server connections per database and role. A
//! test's role of its own gives it its own pool, and its own schema through
//! the role's `search_path` (the `options` startup parameter, which the
//! other tests use for it, is what a transaction-mode pooler refuses).

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;

use super::{connect, database_config, pool};

/// The variable naming a PgBouncer to go through instead of starting one.
pub const PGBOUNCER_URL: &str = "PGBOUNCER_URL";

/// How long a started PgBouncer may take to say it is up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the pooler tests reach PgBouncer.
pub struct PgBouncer {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    /// Kept open while the test process lives: the PgBouncer this process
    /// started stops when it closes.
    _started: Option<Started>,
}

struct Started {
    _child: Child,
    _lifeline: ChildStdin,
    _log: Arc<Mutex<String>>,
}

/// The PgBouncer of this test process; panics saying how to get one.
pub fn pgbouncer() -> &'static PgBouncer {
    static PGBOUNCER: OnceLock<Result<PgBouncer, String>> = OnceLock::new();
    match PGBOUNCER.get_or_init(find_or_start) {
        Ok(pgbouncer) => pgbouncer,
        Err(why) => panic!("{why}"),
    }
}

fn find_or_start() -> Result<PgBouncer, String> {
    match std::env::var(PGBOUNCER_URL) {
        Ok(url) if !url.is_empty() => {
            let config: tokio_postgres::Config = url
                .parse()
                .map_err(|error| format!("{PGBOUNCER_URL} is not a valid Postgres URL: {error}"))?;
            let host = match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
                _ => return Err(format!("{PGBOUNCER_URL} must name a TCP host: {url}")),
            };
            Ok(PgBouncer {
                host,
                port: config.get_ports().first().copied().unwrap_or(6432),
                dbname: config.get_dbname().unwrap_or("postgres").to_owned(),
                _started: None,
            })
        }
        _ => start(),
    }
}

/// What to do when there is no PgBouncer to go through.
fn how_to_get_one() -> String {
    format!(
        "install Debian's package `pgbouncer` (apt-get install pgbouncer) so that the tests start one, \
         or set {PGBOUNCER_URL} to a PgBouncer in transaction mode as .ci/run starts it \
         (postgres://postgres@127.0.0.1:6432/postgres)"
    )
}

fn pgbouncer_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

/// Starts PgBouncer in front of the Postgres of `DATABASE_URL`, on a free
/// port, under a shell that stops it once this process closes its stdin
/// (when the test process exits, however it exits).
fn start() -> Result<PgBouncer, String> {
    let binary = pgbouncer_binary().ok_or_else(|| {
        format!(
            "{PGBOUNCER_URL} is unset and pgbouncer is not installed: {}",
            how_to_get_one()
        )
    })?;
    let database = database_config();
    let (host, port) = match (database.get_hosts().first(), database.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(host)), port) => (host.clone(), port.copied().unwrap_or(5432)),
        _ => {
            return Err(format!(
                "DATABASE_URL must name a TCP host for PgBouncer to reach: {}",
                how_to_get_one()
            ))
        }
    };
    let user = database.get_user().unwrap_or("postgres").to_owned();
    let password = database
        .get_password()
        .map(|password| String::from_utf8_lossy(password).into_owned())
        .unwrap_or_default();
    let dbname = database.get_dbname().unwrap_or("postgres").to_owned();

    let dir = std::env::temp_dir().join(format!("tower-idempotency-pgbouncer-{}", std::process::id()));
    let listen_port = free_port()?;
    write_config(&dir, &host, port, &user, &password, listen_port)
        .map_err(|error| format!("cannot write PgBouncer's configuration in {}: {error}", dir.display()))?;

    // PgBouncer refuses to run as root: as root, it drops to `postgres`.
    let mut pgbouncer_args: Vec<String> = Vec::new();
    if running_as_root() {
        pgbouncer_args.extend(["-u".to_owned(), "postgres".to_owned()]);
    }
    pgbouncer_args.push(dir.join("pgbouncer.ini").display().to_string());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"dir="$1"; shift; "$@" & pgbouncer=$!; cat >/dev/null; kill "$pgbouncer"; wait "$pgbouncer"; rm -rf "$dir""#)
        .arg("sh")
        .arg(&dir)
        .arg(&binary)
        .args(&pgbouncer_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start {}: {error}", binary.display()))?;
    let lifeline = child.stdin.take().expect("stdin is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    // PgBouncer logs to stderr; "process up" says it accepts connections.
    let log = Arc::new(Mutex::new(String::new()));
    let (up_tx, up_rx) = mpsc::channel();
    std::thread::spawn({
        let log = log.clone();
        move || {
            let mut up = Some(up_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("process up") {
                    if let Some(up) = up.take() {
                        let _ = up.send(());
                    }
                }
                let mut log = log.lock().expect("the log");
                // The start and the latest lines are what a failure needs.
                if log.len() > 64 * 1024 {
                    log.clear();
                }
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    if up_rx.recv_timeout(STARTUP_TIMEOUT).is_err() {
        let _ = child.kill();
        let log = log.lock().map(|log| log.clone()).unwrap_or_default();
        return Err(format!(
            "{} did not start (on 127.0.0.1:{listen_port}); its log:\n{log}\n{}",
            binary.display(),
            how_to_get_one()
        ));
    }
    Ok(PgBouncer {
        host: "127.0.0.1".to_owned(),
        port: listen_port,
        dbname,
        _started: Some(Started {
            _child: child,
            _lifeline: lifeline,
            _log: log,
        }),
    })
}

fn free_port() -> Result<u16, String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|error| format!("cannot find a free port: {error}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| format!("cannot find a free port: {error}"))
}

/// The configuration: transaction mode, only `extra_float_digits` ignored
/// among startup parameters, and any role let in without a password
/// (`auth_query` finds it) so that each test can use a role of its own.
fn write_config(
    dir: &Path,
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    listen_port: u16,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    std::fs::create_dir_all(dir)?;
    // Read by PgBouncer once it runs as `postgres`.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let userlist = dir.join("userlist.txt");
    let quote = |text: &str| text.replace('"', "\"\"");
    std::fs::write(&userlist, format!("\"{}\" \"{}\"\n", quote(user), quote(password)))?;
    let mut ini = std::fs::File::create(dir.join("pgbouncer.ini"))?;
    write!(
        ini,
        "[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
pool_mode = transaction
ignore_startup_parameters = extra_float_digits
auth_type = trust
auth_file = {userlist}
auth_user = {user}
auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename = $1
max_client_conn = 1000
default_pool_size = 40
server_idle_timeout = 10
",
        userlist = userlist.display(),
    )?;
    for file in ["userlist.txt", "pgbouncer.ini"] {
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// A role and a schema of the test's own: the role owns the schema, which
/// is its `search_path`, and its sessions carry its name as
/// `application_name`. PgBouncer gives the role a server pool of its own.
/// Both are dropped with the guard (roles are the cluster's, not the
/// database's: a failed test must not leave its role behind).
pub struct PoolerRole {
    pub name: String,
    dropped: bool,
}

impl PoolerRole {
    /// Creates the role and its schema, named `name` (a fresh start if a
    /// killed run left them behind).
    pub async fn create(name: &str) -> Self {
        let admin = connect().await;
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; DROP ROLE IF EXISTS {name};
                 CREATE ROLE {name} LOGIN; CREATE SCHEMA {name} AUTHORIZATION {name};
                 ALTER ROLE {name} SET search_path = {name};"
            ))
            .await
            .unwrap_or_else(|error| panic!("cannot create the role and schema {name} (DATABASE_URL): {error}"));
        let mut role = Self {
            name: name.to_owned(),
            dropped: false,
        };
        // PgBouncer logs the role in without a password, and so do these
        // tests when they connect directly.
        let mut direct = database_config();
        direct.user(name).password("");
        if let Err(error) = direct.connect(tokio_postgres::NoTls).await {
            role.drop_all().await;
            panic!(
                "the role {name} cannot log in to DATABASE_URL's server without a password: {error}; the PgBouncer \
                 tests need that server to trust logins from 127.0.0.1 (pg_hba.conf: host all all 127.0.0.1/32 trust)"
            );
        }
        role
    }

    /// Runs `sql` as the role, so that what it creates is the role's.
    pub async fn execute_as(&self, sql: &str) {
        let admin = connect().await;
        let name = &self.name;
        admin
            .batch_execute(&format!("SET ROLE {name}; SET search_path = {name}; {sql}"))
            .await
            .unwrap_or_else(|error| panic!("{sql} as {name}: {error}"));
    }

    /// The role's connection settings through PgBouncer.
    pub fn pgbouncer_config(&self) -> tokio_postgres::Config {
        let pgbouncer = pgbouncer();
        let mut config = tokio_postgres::Config::new();
        config
            .host(&pgbouncer.host)
            .port(pgbouncer.port)
            .user(&self.name)
            .dbname(&pgbouncer.dbname)
            .application_name(&self.name)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// The role's URL through PgBouncer, for child processes.
    pub fn pgbouncer_url(&self) -> String {
        let pgbouncer = pgbouncer();
        format!(
            "postgres://{name}@{host}:{port}/{dbname}?application_name={name}",
            name = self.name,
            host = pgbouncer.host,
            port = pgbouncer.port,
            dbname = pgbouncer.dbname,
        )
    }

    /// A pool of `size` connections through PgBouncer, as the role.
    pub fn pgbouncer_pool(&self, size: usize) -> Pool {
        pool(self.pgbouncer_config(), size, Some(Duration::from_secs(10)))
    }

    /// A pool of direct connections to Postgres, as the role: for setup
    /// and inspection, which need no pooler.
    pub fn direct_pool(&self, size: usize) -> Pool {
        let mut config = database_config();
        config.user(&self.name).application_name(&self.name);
        pool(config, size, Some(Duration::from_secs(10)))
    }

    /// Drops the role and its schema, ending its sessions first.
    pub async fn drop_all(&mut self) {
        self.dropped = true;
        drop_role(&self.name).await;
    }
}

impl Drop for PoolerRole {
    fn drop(&mut self) {
        if !self.dropped {
            super::execute_detached(drop_role_sql(&self.name), Duration::from_secs(30));
        }
    }
}

/// Ends the role's sessions (PgBouncer's server connections to it among
/// them), then drops its schema and the role.
fn drop_role_sql(name: &str) -> String {
    format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}';
         SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {name} CASCADE; DROP OWNED BY {name}; DROP ROLE {name};"
    )
}

async fn drop_role(name: &str) {
    let _ = connect().await.batch_execute(&drop_role_sql(name)).await;
}
