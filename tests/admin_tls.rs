//! `idempotency-admin` connects with TLS as `DATABASE_URL`'s `sslmode`
//! asks, against the local server's own TLS.
//!
//! The server must have `ssl = on` with a self-signed certificate (Debian's
//! default, the "snakeoil" certificate; `.ci/run` makes sure of it): the
//! certificate file the server names (`SHOW ssl_cert_file`) serves as
//! `sslrootcert`, and the host names it is issued to are read from it, so
//! that `verify-full` is tried with a name the certificate holds
//! (`hostaddr` still points the connection at DATABASE_URL's server).
#![cfg(feature = "admin")]

mod support;

use std::process::{Output, Stdio};
use std::time::Duration;

use support::{connect, TestDb};
use tokio::time::Instant;
use x509_cert::der::DecodePem;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

/// How long the admin command may take to show up waiting on the lock.
const OBSERVE: Duration = Duration::from_secs(20);

/// DATABASE_URL's server, database and credentials.
struct Server {
    config: tokio_postgres::Config,
    /// The address to connect to, whatever host name the URL gives.
    address: std::net::IpAddr,
    port: u16,
}

impl Server {
    async fn new() -> Self {
        let config = support::database_config();
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => panic!("these tests need DATABASE_URL to name a TCP host"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let address = tokio::net::lookup_host((host.as_str(), port))
            .await
            .ok()
            .and_then(|mut addresses| addresses.next())
            .unwrap_or_else(|| panic!("cannot resolve DATABASE_URL's host {host}"))
            .ip();
        Self { config, address, port }
    }

    /// A URL to `host` (reached at the server's address) with the test's
    /// schema on the search_path, `application_name` and `parameters`.
    fn url(&self, host: &str, db: &TestDb, application_name: &str, parameters: &str) -> String {
        let user = self.config.get_user().unwrap_or("postgres");
        let password = self
            .config
            .get_password()
            .map(|password| format!(":{}", String::from_utf8_lossy(password)))
            .unwrap_or_default();
        let database = self.config.get_dbname().unwrap_or("postgres");
        format!(
            "postgres://{user}{password}@{host}:{port}/{database}?hostaddr={address}&options=-csearch_path%3D{schema}\
             &application_name={application_name}&{parameters}",
            port = self.port,
            address = self.address,
            schema = db.schema,
        )
    }
}

/// The server's certificate file, and the DNS names it is issued to.
async fn server_certificate() -> (String, Vec<String>) {
    let client = connect().await;
    let ssl: String = client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(ssl, "on", "the server has ssl = off: turn it on (`.ci/run` does)");
    let path: String = client.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
    let pem =
        std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read the server's certificate {path}: {error}"));
    let certificate = x509_cert::Certificate::from_pem(&pem).expect("a PEM certificate");
    let names = certificate
        .tbs_certificate
        .get::<SubjectAltName>()
        .expect("a readable subjectAltName")
        .map(|(_, names)| names.0)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|name| match name {
            GeneralName::DnsName(name) => Some(name.to_string()),
            _ => None,
        })
        .collect();
    (path, names)
}

fn admin(url: &str, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_idempotency-admin"));
    command.args(args).env("DATABASE_URL", url);
    command
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `stats` with `parameters` and answers whether its session was
/// encrypted, read from `pg_stat_ssl` while the command waits on a lock the
/// test holds on the records table.
async fn stats_session_uses_tls(label: &str, parameters: &str) -> bool {
    let db = TestDb::new(label).await;
    db.store().await;
    let server = Server::new().await;
    let application_name = format!("{}_admin", db.schema);
    let url = server.url(&server.address.to_string(), &db, &application_name, parameters);
    let mut locker = connect().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute(&format!(
        "LOCK TABLE {}.idempotency_records IN ACCESS EXCLUSIVE MODE",
        db.schema
    ))
    .await
    .unwrap();

    let command = tokio::process::Command::from(admin(&url, &["stats", "--json"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run idempotency-admin");
    let observer = connect().await;
    let deadline = Instant::now() + OBSERVE;
    let encrypted = loop {
        let row = observer
            .query_opt(
                "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.application_name = $1 AND a.wait_event_type = 'Lock'",
                &[&application_name],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get::<_, bool>(0);
        }
        assert!(
            Instant::now() < deadline,
            "idempotency-admin never waited on the lock within {OBSERVE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    lock.rollback().await.unwrap();
    let output = command.wait_with_output().await.unwrap();

    assert!(output.status.success(), "{}", stderr(&output));
    db.drop_schema().await;
    encrypted
}

#[tokio::test]
async fn sslmode_require_connects_over_tls() {
    assert!(stats_session_uses_tls("admin_tls_require", "sslmode=require").await);
}

#[tokio::test]
async fn sslmode_disable_connects_in_plain_text() {
    assert!(!stats_session_uses_tls("admin_tls_disable", "sslmode=disable").await);
}

#[tokio::test]
async fn verify_full_without_the_servers_ca_fails_naming_the_untrusted_certificate() {
    let db = TestDb::new("admin_tls_unknown_ca").await;
    let server = Server::new().await;
    let (_, names) = server_certificate().await;
    let host = names.first().expect("the server's certificate names a host");
    let url = server.url(host, &db, "admin_tls", "sslmode=verify-full");

    let output = admin(&url, &["stats"]).output().unwrap();

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(
            "the server's certificate is not signed by a trusted certificate authority: name the CA's certificate \
             with sslrootcert=<file>"
        ),
        "{}",
        stderr(&output)
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn verify_full_with_the_servers_ca_accepts_the_host_the_certificate_names() {
    let db = TestDb::new("admin_tls_verify_full").await;
    db.store().await;
    let server = Server::new().await;
    let (certificate, names) = server_certificate().await;
    let host = names.first().expect("the server's certificate names a host");
    let url = server.url(
        host,
        &db,
        "admin_tls",
        &format!("sslmode=verify-full&sslrootcert={certificate}"),
    );

    let output = admin(&url, &["stats"]).output().unwrap();

    assert!(output.status.success(), "{}", stderr(&output));
    db.drop_schema().await;
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_issued_to_another_host() {
    let db = TestDb::new("admin_tls_wrong_host").await;
    let server = Server::new().await;
    let (certificate, names) = server_certificate().await;
    let address = server.address.to_string();
    assert!(!names.contains(&address), "the certificate names {address} itself");
    let url = server.url(
        &address,
        &db,
        "admin_tls",
        &format!("sslmode=verify-full&sslrootcert={certificate}"),
    );

    let output = admin(&url, &["stats"]).output().unwrap();

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!(
            "the server's certificate is not valid for the host {address} (it names {})",
            names.join(", ")
        )),
        "{}",
        stderr(&output)
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn verify_ca_with_the_servers_ca_accepts_any_host_name() {
    let db = TestDb::new("admin_tls_verify_ca").await;
    db.store().await;
    let server = Server::new().await;
    let (certificate, _) = server_certificate().await;
    let url = server.url(
        &server.address.to_string(),
        &db,
        "admin_tls",
        &format!("sslmode=verify-ca&sslrootcert={certificate}"),
    );

    let output = admin(&url, &["stats"]).output().unwrap();

    assert!(output.status.success(), "{}", stderr(&output));
    db.drop_schema().await;
}
