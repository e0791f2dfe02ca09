//! The operators' pack in `monitoring/`: the Prometheus rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), the
//! Grafana dashboard has the structure an import needs and queries only
//! metrics the crate exports, and a real Prometheus scraping the example
//! receiver sees its counters move and takes IdempotencyStoreUnavailable
//! from pending to firing while the receiver's database is cut off, and
//! back to inactive once it returns.
//!
//! Prometheus and promtool come from Debian's `prometheus` package
//! (`apt-get install prometheus`; `.ci/run` installs it). Without them these
//! tests fail, saying so.

mod process;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use process::{assert_setting_refused, stripe_event, Http, Receiver, Schema};
use serde_json::Value;
use support::wire::{proxied_url, FaultyProxy};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const RULES: &str = "monitoring/prometheus/idempotency.rules.yml";
const RULE_TESTS: &str = "monitoring/prometheus/idempotency.rules.test.yml";
const DASHBOARD: &str = "monitoring/grafana/idempotency-dashboard.json";
/// The alert the end-to-end test takes through its states.
const STORE_UNAVAILABLE: &str = "IdempotencyStoreUnavailable";
/// Its `for:` in the rules file.
const STORE_UNAVAILABLE_FOR: Duration = Duration::from_secs(30);

fn repository_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repository_file(path)).unwrap_or_else(|error| panic!("cannot read {path}: {error}"))
}

/// A binary of Debian's `prometheus` package; fails, naming the package,
/// when it is not installed.
fn prometheus_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|directory| directory.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: install Debian's `prometheus` package (apt-get install -y prometheus), \
                 which provides /usr/bin/prometheus and /usr/bin/promtool"
            )
        })
}

/// Runs promtool with `args` in `monitoring/prometheus/`; fails with its
/// output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let output = std::process::Command::new(prometheus_binary("promtool"))
        .args(args)
        .current_dir(repository_file("monitoring/prometheus"))
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {}:\n{text}", args.join(" "));
    text
}

#[test]
fn the_rules_pass_promtool_check_rules() {
    let text = promtool(&["check", "rules", "idempotency.rules.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_rules_pass_their_promtool_unit_tests() {
    let text = promtool(&["test", "rules", "idempotency.rules.test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
}

/// Every alert of the rules file, by name.
fn alert_names() -> Vec<String> {
    read(RULES)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_alert_has_a_threshold_comment_a_runbook_and_a_unit_test() {
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    let alerts = alert_names();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in &alerts {
        let at = rules.find(&format!("- alert: {alert}\n")).expect("the alert");
        let rule_end = rules[at + 1..]
            .find("- alert: ")
            .map_or(rules.len(), |end| at + 1 + end);
        let rule = &rules[at..rule_end];
        for annotation in ["summary:", "description:", "runbook: |"] {
            assert!(rule.contains(annotation), "{alert} has no {annotation}");
        }
        assert!(rule.contains("severity: "), "{alert} has no severity");
        let line_start = rules[..at].rfind('\n').map_or(0, |newline| newline + 1);
        let comment: Vec<&str> = rules[..line_start]
            .lines()
            .rev()
            .take_while(|line| line.trim_start().starts_with('#'))
            .collect();
        assert!(
            comment.iter().any(|line| line.contains("Threshold:")),
            "{alert}: no `# Threshold:` comment above it"
        );
        assert!(
            tests.contains(&format!("alertname=\"{alert}\"")) || tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test in {RULE_TESTS}"
        );
    }
}

/// The metrics the README's "Metrics and tracing" table documents.
fn documented_metrics() -> BTreeSet<String> {
    let readme = read("README.md");
    let start = readme
        .find("### Metrics and tracing")
        .expect("the README's metrics section");
    let section = &readme[start..];
    let section = &section[..section[4..].find("\n## ").map_or(section.len(), |end| end + 4)];
    let metrics: BTreeSet<String> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("idempotency_"))
        .map(str::to_owned)
        .collect();
    assert!(metrics.len() >= 10, "the README documents {metrics:?}");
    metrics
}

/// The metric names in `text`: identifiers starting `idempotency_` that are
/// not part of a recording rule's name (`level:metric:operation`), with a
/// histogram's series suffix taken off. The default table's name, which
/// runbooks mention, is not a metric.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("idempotency_") {
        let before = rest[..at].chars().next_back();
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let after = rest[at + name.len()..].chars().next();
        rest = &rest[at + name.len()..];
        let in_identifier = before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if in_identifier || after == Some(':') || name == tower_idempotency::DEFAULT_TABLE {
            continue;
        }
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| base.ends_with("_seconds"))
            .map_or(name.clone(), str::to_owned);
        names.insert(name);
    }
    names
}

#[test]
fn the_rules_name_only_documented_metrics() {
    let documented = documented_metrics();
    let named = metric_names_in(&read(RULES));
    assert!(named.len() >= 8, "{named:?}");
    let undocumented: Vec<_> = named.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "the rules use undocumented metrics {undocumented:?}"
    );
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            all.extend(nested);
        }
    }
    all
}

#[test]
fn the_dashboard_has_a_datasource_variable_and_every_query_names_a_documented_metric() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|version| version >= 30));

    let variables = dashboard["templating"]["list"].as_array().expect("templating.list");
    let datasource = variables
        .iter()
        .find(|variable| variable["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let datasource_uid = format!("${{{}}}", datasource["name"].as_str().expect("its name"));
    let variable_names: BTreeSet<&str> = variables.iter().filter_map(|v| v["name"].as_str()).collect();
    for variable in variables.iter().filter(|variable| variable["type"] == "query") {
        assert_eq!(variable["datasource"]["uid"], datasource_uid.as_str(), "{variable}");
    }

    let documented = documented_metrics();
    let mut ids = BTreeSet::new();
    let mut queried = BTreeSet::new();
    let mut cells = BTreeMap::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("a numeric id")),
            "duplicate id: {title}"
        );
        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| grid[k].as_u64().expect("gridPos"));
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: {grid}");
        for row in y..y + h {
            for column in x..x + w {
                if let Some(other) = cells.insert((row, column), title) {
                    panic!("{title} overlaps {other}");
                }
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(panel["datasource"]["uid"], datasource_uid.as_str(), "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} queries nothing");
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            assert!(ref_ids.insert(target["refId"].as_str().expect("a refId")), "{title}");
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let names = metric_names_in(expr);
            assert!(!names.is_empty(), "{title}: {expr} names no metric");
            for name in &names {
                assert!(documented.contains(name), "{title}: {name} is not a documented metric");
            }
            for variable in expr.split('$').skip(1) {
                let variable: String = variable
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    variable.starts_with("__") || variable_names.contains(variable.as_str()),
                    "{title}: ${variable} is not a dashboard variable"
                );
            }
            queried.extend(names);
        }
    }
    // The panels the operators' questions need.
    for metric in [
        "idempotency_requests_total",
        "idempotency_store_duration_seconds",
        "idempotency_in_flight",
        "idempotency_waiting",
        "idempotency_store_up",
        "idempotency_purged_records_total",
        "idempotency_expired_awaiting_purge",
    ] {
        assert!(queried.contains(metric), "no panel shows {metric}");
    }
}

#[tokio::test]
async fn the_receiver_refuses_monitoring_intervals_that_are_not_positive_milliseconds() {
    for (setting, value) in [
        ("PURGE_INTERVAL_MS", "0"),
        ("PURGE_INTERVAL_MS", "soon"),
        ("STORE_METRICS_INTERVAL_MS", "-5"),
    ] {
        let stderr = assert_setting_refused("webhook_receiver", setting, value).await;
        assert!(!stderr.contains("panicked at"), "{stderr}");
    }
}

// ---------------------------------------------------------------------------
// A real Prometheus scraping the example receiver

/// A Prometheus of the test's own: its own port, its own storage in a
/// scratch directory, scraping one target every second and evaluating the
/// rules file every second. Killed, and its directory removed, on drop.
struct Prometheus {
    http: Http,
    child: Child,
    directory: PathBuf,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Self {
        let binary = prometheus_binary("prometheus");
        let directory = std::env::temp_dir().join(format!("idempotency-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).expect("create Prometheus' directory");
        let config = directory.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: webhook_receiver\n    static_configs:\n      - targets: ['{target}']\n",
                rules = repository_file(RULES).display(),
            ),
        )
        .expect("write prometheus.yml");
        let address = free_address();
        let mut child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", directory.join("data").display()))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let http = Http::new(address);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(reply) = http.send(Method::GET, "/-/ready", &[], Bytes::new()).await {
                if reply.status == StatusCode::OK {
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let output = child.wait_with_output().await.expect("its output");
                panic!(
                    "prometheus exited ({status}) before it was ready:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            assert!(Instant::now() < deadline, "prometheus was not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { http, child, directory }
    }

    /// GET an API path; the `data` of its answer.
    async fn api(&self, path_and_query: &str) -> Value {
        let reply = self
            .http
            .send(Method::GET, path_and_query, &[], Bytes::new())
            .await
            .unwrap_or_else(|error| panic!("prometheus {path_and_query}: {error}"));
        assert_eq!(reply.status, StatusCode::OK, "{path_and_query}: {reply:?}");
        let answer = reply.json();
        assert_eq!(answer["status"], "success", "{path_and_query}: {answer}");
        answer["data"].clone()
    }

    /// An instant query's samples: each one's labels and value.
    async fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let data = self.api(&format!("/api/v1/query?{query}")).await;
        data["result"]
            .as_array()
            .expect("a vector")
            .iter()
            .map(|sample| {
                let value = sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (sample["metric"].clone(), value)
            })
            .collect()
    }

    /// The single value `promql` gives, if it gives one.
    async fn value(&self, promql: &str) -> Option<f64> {
        match self.query(promql).await.as_slice() {
            [(_, value)] => Some(*value),
            _ => None,
        }
    }

    /// The active (pending or firing) alert named `name`, if there is one.
    async fn alert(&self, name: &str) -> Option<Value> {
        let data = self.api("/api/v1/alerts").await;
        data["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .find(|alert| alert["labels"]["alertname"] == name)
            .cloned()
    }

    /// Polls `probe` until it returns `Some`, at most `bound`: Prometheus
    /// scrapes and evaluates on its own clock.
    async fn poll<T, F, Fut>(&self, what: &str, bound: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(found) = probe().await {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {bound:?} waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the scraped sum of `promql` reaches at least `at_least`.
    async fn sees(&self, promql: &str, at_least: f64) {
        let what = format!("Prometheus sees {promql} >= {at_least}");
        self.poll(&what, Duration::from_secs(30), || async {
            self.value(&format!("sum({promql})"))
                .await
                .filter(|value| *value >= at_least)
        })
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// A local address no one listens on now.
fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address")
}

#[tokio::test]
async fn prometheus_scraping_the_receiver_sees_its_counters_and_pages_while_the_store_is_down() {
    let started = Instant::now();
    let schema = Schema::new("monitoring").await;
    let proxy = FaultyProxy::stalling().await;
    let database_url = proxied_url(proxy.port, &schema.name);
    let receiver = Receiver::start(
        &schema,
        &[
            ("DATABASE_URL", database_url.as_str()),
            ("PURGE_INTERVAL_MS", "1000"),
            ("STORE_METRICS_INTERVAL_MS", "1000"),
            ("GITHUB_WEBHOOK_SECRET", "monitoring-secret"),
            // Long enough that a duplicate sent while the first writes its
            // ledger row waits for it.
            ("DEMO_HANDLER_DELAY_MS", "300"),
        ],
    )
    .await;
    let prometheus = Prometheus::start(receiver.address).await;

    // Deliveries of every kind the dashboard and the rules count.
    for event in ["evt_m1", "evt_m2", "evt_m3"] {
        assert_eq!(receiver.deliver(event).await.status, StatusCode::OK);
        assert!(receiver.deliver(event).await.replayed());
    }
    let reused = receiver
        .post("/webhooks/stripe", &[], stripe_event("evt_m1", "charge.succeeded", 999))
        .await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY, "{reused:?}");
    let unsigned = receiver
        .post(
            "/webhooks/github",
            &[("x-github-delivery", "d-1"), ("x-github-event", "push")],
            "{}",
        )
        .await;
    assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED, "{unsigned:?}");
    let first = tokio::spawn({
        let http = receiver.http();
        async move { http.deliver("evt_waited").await }
    });
    schema.wait_for_the_ledger_write(Duration::from_secs(10)).await;
    let duplicate = receiver.deliver("evt_waited").await;
    assert!(duplicate.replayed(), "{duplicate:?}");
    assert_eq!(
        first.await.expect("the first").expect("answered").status,
        StatusCode::OK
    );
    // Expired records for the purge task to delete.
    schema
        .db
        .execute(
            &format!(
                "UPDATE {}.idempotency_records SET expires_at = now() - interval '1 hour' WHERE key IN ('evt_m2', 'evt_m3')",
                schema.name
            ),
            &[],
        )
        .await
        .expect("expire two records");

    let requests =
        |outcome: &str| format!("idempotency_requests_total{{job=\"webhook_receiver\", outcome=\"{outcome}\"}}");
    prometheus.sees(&requests("first"), 4.0).await;
    prometheus.sees(&requests("replayed"), 3.0).await;
    prometheus.sees(&requests("waited"), 1.0).await;
    prometheus.sees(&requests("mismatch"), 1.0).await;
    prometheus.sees(&requests("signature_rejected"), 1.0).await;
    prometheus.sees("idempotency_purged_records_total", 2.0).await;
    prometheus
        .sees("idempotency_purge_runs_total{result=\"ok\"}", 1.0)
        .await;
    prometheus
        .sees("idempotency_store_duration_seconds_count{operation=\"claim\"}", 4.0)
        .await;
    prometheus.sees("idempotency_wait_duration_seconds_count", 1.0).await;
    prometheus.sees("idempotency_store_up", 1.0).await;
    prometheus.sees("idempotency_table_bytes", 8192.0).await;
    assert_eq!(prometheus.value("max(idempotency_in_flight)").await, Some(0.0));
    assert_eq!(prometheus.value("max(idempotency_waiting)").await, Some(0.0));
    assert!(prometheus.alert(STORE_UNAVAILABLE).await.is_none());

    // Every metric the rules and the dashboard name is one the receiver
    // exports, as Prometheus scraped it.
    let scraped: BTreeSet<String> = prometheus
        .api("/api/v1/label/__name__/values")
        .await
        .as_array()
        .expect("names")
        .iter()
        .filter_map(|name| name.as_str())
        .filter_map(|name| metric_names_in(name).into_iter().next())
        .collect();
    let mut named = metric_names_in(&read(RULES));
    named.extend(metric_names_in(&read(DASHBOARD)));
    let missing: Vec<_> = named.difference(&scraped).collect();
    assert!(
        missing.is_empty(),
        "named but never scraped: {missing:?} (scraped {scraped:?})"
    );
    // Every rule evaluates without error on real data.
    let groups = prometheus.api("/api/v1/rules").await;
    let rules: Vec<&Value> = groups["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("rules"))
        .collect();
    let in_file = read(RULES)
        .lines()
        .filter(|line| line.trim_start().starts_with("- record:") || line.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(rules.len(), in_file, "every rule is loaded");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    let store_unavailable = rules
        .iter()
        .find(|rule| rule["name"] == STORE_UNAVAILABLE)
        .expect("the store-unavailable alert");
    assert_eq!(
        store_unavailable["duration"].as_f64(),
        Some(STORE_UNAVAILABLE_FOR.as_secs_f64()),
        "{store_unavailable}"
    );

    // The database goes away: pending at once, firing after the rule's `for`.
    proxy.go_down();
    let refused = receiver.deliver("evt_during_outage").await;
    refused.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    prometheus.sees(&requests("store_error"), 1.0).await;
    let pending = prometheus
        .poll(
            "the store-unavailable alert is pending",
            Duration::from_secs(20),
            || async {
                prometheus
                    .alert(STORE_UNAVAILABLE)
                    .await
                    .filter(|alert| alert["state"] == "pending")
            },
        )
        .await;
    assert_eq!(pending["labels"]["severity"], "critical", "{pending}");
    assert_eq!(pending["labels"]["table"], "idempotency_records", "{pending}");
    let firing = prometheus
        .poll(
            "the store-unavailable alert fires",
            STORE_UNAVAILABLE_FOR + Duration::from_secs(20),
            || async {
                prometheus
                    .alert(STORE_UNAVAILABLE)
                    .await
                    .filter(|alert| alert["state"] == "firing")
            },
        )
        .await;
    assert_eq!(firing["activeAt"], pending["activeAt"], "one episode: {firing}");
    let summary = firing["annotations"]["summary"].as_str().expect("a summary");
    assert!(
        summary.contains(&receiver.address.to_string()) && summary.contains("idempotency_records"),
        "{summary}"
    );
    for annotation in ["description", "runbook"] {
        let text = firing["annotations"][annotation].as_str().expect("the annotation");
        assert!(!text.is_empty() && !text.contains("error expanding template"), "{text}");
    }
    assert!(
        firing["annotations"]["runbook"]
            .as_str()
            .is_some_and(|runbook| runbook.contains("pg_isready")),
        "{firing}"
    );

    // It comes back: the alert resolves, and deliveries run again.
    proxy.restore();
    prometheus
        .poll(
            "the store-unavailable alert is inactive",
            Duration::from_secs(30),
            || async { prometheus.alert(STORE_UNAVAILABLE).await.is_none().then_some(()) },
        )
        .await;
    assert_eq!(prometheus.value("min(idempotency_store_up)").await, Some(1.0));
    let after = receiver.deliver("evt_during_outage").await;
    assert_eq!(after.status, StatusCode::OK, "{after:?}");
    assert!(!after.replayed());
    eprintln!("the pack's end-to-end run took {:?}", started.elapsed());
}
