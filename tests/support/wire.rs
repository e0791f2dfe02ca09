//! The Postgres wire protocol as a proxy between the store's pool and the
//! server sees it: a parser of the client's messages, a pool that connects
//! through a proxy, and a proxy that loses or holds back one statement's
//! answer after the server has run it, or stalls altogether.
//!
//! After the startup packet every message, either way, is one type byte and
//! a 4-byte length that counts itself, so messages can be told apart exactly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// One frontend message: its type byte and its body (after the length).
pub struct Frame {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Frame {
    /// The first NUL-terminated string of the body from `offset`, and where
    /// the next field starts.
    fn c_str(&self, offset: usize) -> Option<(&str, usize)> {
        let rest = self.body.get(offset..)?;
        let end = rest.iter().position(|&byte| byte == 0)?;
        let text = std::str::from_utf8(&rest[..end]).ok()?;
        Some((text, offset + end + 1))
    }

    /// A Parse message's statement name and SQL.
    pub fn parsed_statement(&self) -> Option<(&str, &str)> {
        if self.kind != b'P' {
            return None;
        }
        let (name, next) = self.c_str(0)?;
        let (sql, _) = self.c_str(next)?;
        Some((name, sql))
    }

    /// The statement a Bind message binds.
    pub fn bound_statement(&self) -> Option<&str> {
        if self.kind != b'B' {
            return None;
        }
        let (_portal, next) = self.c_str(0)?;
        Some(self.c_str(next)?.0)
    }

    /// How many statements a simple Query message carries.
    pub fn query_statements(&self) -> u32 {
        if self.kind != b'Q' {
            return 0;
        }
        // The layer's SQL has no `;` inside literals.
        String::from_utf8_lossy(&self.body)
            .trim_end_matches('\0')
            .split(';')
            .filter(|statement| !statement.trim().is_empty())
            .count() as u32
    }
}

/// Splits the client's byte stream into frontend messages.
#[derive(Default)]
pub struct FrontendParser {
    started: bool,
    pending: Vec<u8>,
}

impl FrontendParser {
    /// The type bytes of the messages completed by `bytes` (the startup
    /// packet counts as `0`), each with the number of statements it carries
    /// if it is a simple Query.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<(u8, u32)> {
        self.frames(bytes)
            .iter()
            .map(|frame| (frame.kind, frame.query_statements()))
            .collect()
    }

    /// The messages completed by `bytes`.
    pub fn frames(&mut self, bytes: &[u8]) -> Vec<Frame> {
        self.pending.extend_from_slice(bytes);
        let mut frames = Vec::new();
        loop {
            if !self.started {
                // Startup phase: length-prefixed packets without a type byte
                // (an SSL or GSS request first, then the startup message).
                let Some(length) = self.pending.get(..4) else { break };
                let length = u32::from_be_bytes(length.try_into().unwrap()) as usize;
                if self.pending.len() < length {
                    break;
                }
                let code = u32::from_be_bytes(self.pending[4..8].try_into().unwrap());
                self.pending.drain(..length);
                if code != 80_877_103 && code != 80_877_104 {
                    self.started = true;
                }
                frames.push(Frame {
                    kind: b'0',
                    body: Vec::new(),
                });
                continue;
            }
            let Some(header) = self.pending.get(..5) else { break };
            let kind = header[0];
            let length = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
            if self.pending.len() < 1 + length {
                break;
            }
            let message: Vec<u8> = self.pending.drain(..1 + length).collect();
            frames.push(Frame {
                kind,
                body: message[5..].to_vec(),
            });
        }
        frames
    }
}

/// Whether `bytes`, backend messages from a message boundary on, hold a
/// complete ReadyForQuery: the server has finished (and, outside a
/// transaction block, committed) everything it was sent before.
fn holds_ready_for_query(bytes: &[u8]) -> bool {
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 5) {
        let length = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
        if bytes.len() < at + 1 + length {
            return false;
        }
        if header[0] == b'Z' {
            return true;
        }
        at += 1 + length;
    }
    false
}

/// The server DATABASE_URL names, as a TCP address.
pub fn upstream() -> (String, u16) {
    let config = super::database_config();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => panic!("the wire proxy needs a TCP DATABASE_URL"),
    };
    (host, config.get_ports().first().copied().unwrap_or(5432))
}

/// DATABASE_URL's database and credentials, reached through a proxy on
/// `port`.
pub fn proxied_config(port: u16) -> tokio_postgres::Config {
    let url = super::database_config();
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port);
    if let Some(user) = url.get_user() {
        config.user(user);
    }
    if let Some(password) = url.get_password() {
        config.password(password);
    }
    if let Some(dbname) = url.get_dbname() {
        config.dbname(dbname);
    }
    config
}

/// DATABASE_URL's database and credentials, reached through a proxy on
/// `port`, as a URL for a child process whose sessions work in `schema` and
/// carry its name as `application_name` (as `support::schema_url`).
pub fn proxied_url(port: u16, schema: &str) -> String {
    let url = super::database_config();
    let user = url.get_user().unwrap_or("postgres");
    let password = url
        .get_password()
        .map(|password| format!(":{}", form_urlencoded::byte_serialize(password).collect::<String>()))
        .unwrap_or_default();
    let dbname = url.get_dbname().unwrap_or("postgres");
    format!(
        "postgres://{user}{password}@127.0.0.1:{port}/{dbname}?options=-csearch_path%3D{schema}&application_name={schema}"
    )
}

/// A pool of `size` connections through a proxy on `port`, on the test's
/// schema.
pub fn pool_through(port: u16, schema: &str, size: usize) -> Pool {
    super::pool(super::on_schema(proxied_config(port), schema, schema), size, None)
}

/// An sqlx pool of `size` connections through a proxy on `port`, on the
/// test's schema.
#[cfg(feature = "sqlx")]
pub fn sqlx_pool_through(port: u16, schema: &str, size: u32) -> sqlx::PgPool {
    let url = super::database_config();
    let mut options = sqlx::postgres::PgConnectOptions::new_without_pgpass()
        .host("127.0.0.1")
        .port(port)
        .username(url.get_user().unwrap_or("postgres"))
        .database(url.get_dbname().unwrap_or("postgres"));
    if let Some(password) = url.get_password() {
        options = options.password(&String::from_utf8_lossy(password));
    }
    super::sqlx_pool_with(options, schema, size)
}

/// What happens to the answer of the statement a [`FaultyProxy`] watches,
/// once the server has sent all of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The connection is cut before the client reads the answer, as when the
    /// network or the server's host fails right after the commit.
    CutBeforeAnswer,
    /// The answer is held back until [`FaultyProxy::resume`], as on a link
    /// so slow that the client gives up first.
    HoldAnswer,
}

struct Control {
    /// The marker of the watched statement's SQL and what its answer meets;
    /// `None` watches no statement.
    watched: Option<(String, Fault)>,
    armed: AtomicBool,
    answered: Notify,
    resume: Notify,
    /// While set, what clients send is swallowed.
    stalled: AtomicBool,
    /// The cut switch of every relayed connection, and whether the proxy
    /// is down (refusing connections); one lock, so that no connection
    /// slips in while an outage begins.
    outage: Mutex<Outage>,
}

#[derive(Default)]
struct Outage {
    down: bool,
    connections: Vec<Weak<Notify>>,
}

/// A proxy that relays every connection faithfully, except
/// - for the next execution, once armed, of a prepared statement whose SQL
///   contains the watched marker: the server runs it, and then its answer
///   meets the [`Fault`];
/// - while stalled: what clients send is swallowed and no answer comes, as
///   from a stalled server or over a broken network. A client that closes
///   its end still closes the server's;
/// - while down: every connection is cut and new ones are closed at once,
///   as when the database's host goes down, until restored.
#[derive(Clone)]
pub struct FaultyProxy {
    pub port: u16,
    control: Arc<Control>,
}

impl FaultyProxy {
    /// A proxy watching the statement whose SQL contains `marker`.
    pub async fn start(marker: &str, fault: Fault) -> Self {
        Self::spawn(Some((marker.to_owned(), fault))).await
    }

    /// A proxy watching no statement, faithful until [`FaultyProxy::stall`].
    pub async fn stalling() -> Self {
        Self::spawn(None).await
    }

    async fn spawn(watched: Option<(String, Fault)>) -> Self {
        let control = Arc::new(Control {
            watched,
            armed: AtomicBool::new(false),
            answered: Notify::new(),
            resume: Notify::new(),
            stalled: AtomicBool::new(false),
            outage: Mutex::new(Outage::default()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let upstream = upstream();
        tokio::spawn({
            let control = control.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let cut = Arc::new(Notify::new());
                    {
                        let mut outage = control.outage.lock().expect("the outage lock");
                        if outage.down {
                            // Closed at once: the client's connect fails.
                            continue;
                        }
                        outage.connections.retain(|connection| connection.strong_count() > 0);
                        outage.connections.push(Arc::downgrade(&cut));
                    }
                    let server = TcpStream::connect((upstream.0.as_str(), upstream.1))
                        .await
                        .expect("reach Postgres from the proxy");
                    tokio::spawn(relay(client, server, control.clone(), cut));
                }
            }
        });
        Self { port, control }
    }

    /// Applies the fault to the next execution of the watched statement.
    pub fn arm(&self) {
        self.control.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until the server has answered the watched statement in full
    /// (so, outside a transaction block, committed it).
    pub async fn answered(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.control.answered.notified())
            .await
            .expect("the watched statement to be answered by the server");
    }

    /// Swallows what clients send from now on, until [`FaultyProxy::resume`].
    pub fn stall(&self) {
        self.control.stalled.store(true, Ordering::SeqCst);
    }

    /// Cuts every connection and closes new ones at once, until
    /// [`FaultyProxy::restore`]: to the client, the database is down.
    pub fn go_down(&self) {
        let mut outage = self.control.outage.lock().expect("the outage lock");
        outage.down = true;
        for connection in outage.connections.drain(..) {
            if let Some(cut) = connection.upgrade() {
                cut.notify_one();
            }
        }
    }

    /// Ends an outage: connections are relayed again.
    pub fn restore(&self) {
        self.control.outage.lock().expect("the outage lock").down = false;
    }

    /// Ends a stall, and lets a held answer, and everything after it,
    /// through.
    pub fn resume(&self) {
        self.control.stalled.store(false, Ordering::SeqCst);
        self.control.resume.notify_one();
    }
}

async fn relay(client: TcpStream, server: TcpStream, control: Arc<Control>, cut: Arc<Notify>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set when this connection has sent the watched statement; the server's
    // bytes from then on are its answer (the client waits for one answer
    // before sending the next statement of a store step).
    let faulted = Arc::new(AtomicBool::new(false));
    let upstream = {
        let (control, faulted, cut) = (control.clone(), faulted.clone(), cut.clone());
        async move {
            let mut parser = FrontendParser::default();
            let mut watched = HashSet::new();
            let mut buffer = vec![0_u8; 64 * 1024];
            loop {
                let read = tokio::select! {
                    read = client_read.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(read) => read,
                    },
                    () = cut.notified() => break,
                };
                if control.stalled.load(Ordering::SeqCst) {
                    continue;
                }
                for frame in parser.frames(&buffer[..read]) {
                    if let (Some((name, sql)), Some((marker, _))) = (frame.parsed_statement(), &control.watched) {
                        if sql.contains(marker.as_str()) {
                            watched.insert(name.to_owned());
                        }
                    }
                    if frame.bound_statement().is_some_and(|name| watched.contains(name))
                        && control.armed.swap(false, Ordering::SeqCst)
                    {
                        faulted.store(true, Ordering::SeqCst);
                    }
                }
                if server_write.write_all(&buffer[..read]).await.is_err() {
                    break;
                }
            }
            let _ = server_write.shutdown().await;
        }
    };
    let downstream = async move {
        let mut buffer = vec![0_u8; 64 * 1024];
        let mut answer = Vec::new();
        loop {
            let read = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            if !faulted.load(Ordering::SeqCst) {
                if client_write.write_all(&buffer[..read]).await.is_err() {
                    break;
                }
                continue;
            }
            answer.extend_from_slice(&buffer[..read]);
            if !holds_ready_for_query(&answer) {
                continue;
            }
            faulted.store(false, Ordering::SeqCst);
            control.answered.notify_one();
            // Only a watched statement sets `faulted`, so `watched` is `Some` here.
            match control.watched.as_ref().map(|(_, fault)| *fault) {
                Some(Fault::CutBeforeAnswer) | None => {
                    cut.notify_one();
                    break;
                }
                Some(Fault::HoldAnswer) => {
                    control.resume.notified().await;
                    if client_write.write_all(&std::mem::take(&mut answer)).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}
