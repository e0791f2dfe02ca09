//! The ordering guard on a real Postgres: forward moves apply, repeats and
//! backward moves change nothing, terminal states stay, an override is
//! explicit, and concurrent out-of-order deliveries of a payment's events
//! always end in its terminal state.

mod support;

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use futures_util::future::join_all;
use serde_json::{json, Value};
use support::{send, TestDb};
use tokio::sync::Barrier;
use tower_idempotency::{IdempotencyLayer, OrderingError, OrderingGuard, Preset, Transition, Tx};

fn payment_states() -> OrderingGuard {
    OrderingGuard::new("payment_states", "payment_id")
        .expect("valid names")
        .then(["created"])
        .then(["processing"])
        .terminal(["succeeded", "payment_failed", "canceled"])
}

async fn setup(name: &str) -> (TestDb, OrderingGuard) {
    let db = TestDb::new(name).await;
    let guard = payment_states();
    let mut client = db.client().await;
    guard.create_table(&mut client).await.expect("create payment_states");
    (db, guard)
}

async fn state(db: &TestDb, payment: &str) -> Option<String> {
    db.client()
        .await
        .query_opt("SELECT status FROM payment_states WHERE payment_id = $1", &[&payment])
        .await
        .expect("read the state")
        .map(|row| row.get(0))
}

fn ignored(current: &str) -> Transition {
    Transition::Ignored {
        current: current.to_owned(),
    }
}

#[tokio::test]
async fn states_move_forward_only_and_terminal_states_stay() {
    let (db, guard) = setup("ordering_forward").await;
    let client = db.client().await;
    let mut steps = Vec::new();
    for status in [
        "processing",     // first seen: recorded, whatever its stage
        "created",        // backwards: ignored
        "processing",     // a repeat: no-op
        "succeeded",      // forward into a terminal state
        "processing",     // backwards out of a terminal state: ignored
        "canceled",       // sideways between terminal states: ignored
        "succeeded",      // a repeat of the terminal state: no-op
        "payment_failed", // ignored
    ] {
        steps.push(guard.advance(&client, "pi_1", status).await.expect(status));
    }
    assert_eq!(
        steps,
        vec![
            Transition::Inserted,
            ignored("processing"),
            Transition::Unchanged,
            Transition::Advanced,
            ignored("succeeded"),
            ignored("succeeded"),
            Transition::Unchanged,
            ignored("succeeded"),
        ]
    );
    assert_eq!(state(&db, "pi_1").await.as_deref(), Some("succeeded"));

    // Skipping a stage is still forward.
    assert_eq!(
        guard.advance(&client, "pi_2", "created").await.unwrap(),
        Transition::Inserted
    );
    assert_eq!(
        guard.advance(&client, "pi_2", "canceled").await.unwrap(),
        Transition::Advanced
    );
    assert_eq!(state(&db, "pi_2").await.as_deref(), Some("canceled"));
    drop(client);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_terminal_state_stays_even_below_a_later_stage() {
    let db = TestDb::new("ordering_terminal_rank").await;
    // Invoices: `void` ends an invoice; paid ones are archived later.
    let guard = OrderingGuard::new("invoice_states", "invoice_id")
        .unwrap()
        .then(["open"])
        .then(["paid"])
        .terminal(["void"])
        .then(["archived"]);
    let mut client = db.client().await;
    guard.create_table(&mut client).await.unwrap();
    guard.advance(&client, "in_paid", "paid").await.unwrap();
    assert_eq!(
        guard.advance(&client, "in_paid", "archived").await.unwrap(),
        Transition::Advanced
    );
    guard.advance(&client, "in_void", "void").await.unwrap();
    assert_eq!(
        guard.advance(&client, "in_void", "archived").await.unwrap(),
        ignored("void")
    );
    drop(client);
    db.drop_schema().await;
}

#[tokio::test]
async fn undeclared_states_are_refused_and_never_overwritten() {
    let (db, guard) = setup("ordering_undeclared").await;
    let client = db.client().await;
    let refused = guard.advance(&client, "pi_1", "refunded").await;
    assert!(
        matches!(refused, Err(OrderingError::UnknownState(ref s)) if s == "refunded"),
        "{refused:?}"
    );
    assert_eq!(state(&db, "pi_1").await, None);

    // A state written by something else, unknown to the guard, stays.
    client
        .execute(
            "INSERT INTO payment_states (payment_id, status) VALUES ('pi_2', 'disputed')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        guard.advance(&client, "pi_2", "succeeded").await.unwrap(),
        ignored("disputed")
    );
    assert_eq!(state(&db, "pi_2").await.as_deref(), Some("disputed"));
    drop(client);
    db.drop_schema().await;
}

#[tokio::test]
async fn an_explicit_override_sets_any_declared_state() {
    let (db, guard) = setup("ordering_override").await;
    let client = db.client().await;
    guard.advance(&client, "pi_1", "succeeded").await.unwrap();
    let overridden = guard
        .force(&client, "pi_1", "processing", "support reopened a charge sent in error")
        .await
        .unwrap();
    assert_eq!(
        overridden,
        Transition::Overridden {
            previous: Some("succeeded".to_owned())
        }
    );
    assert_eq!(state(&db, "pi_1").await.as_deref(), Some("processing"));
    assert_eq!(
        guard.force(&client, "pi_new", "created", "backfill").await.unwrap(),
        Transition::Overridden { previous: None }
    );
    assert!(matches!(
        guard.force(&client, "pi_1", "refunded", "typo").await,
        Err(OrderingError::UnknownState(_))
    ));
    // Back under the order after the override.
    assert_eq!(
        guard.advance(&client, "pi_1", "created").await.unwrap(),
        ignored("processing")
    );
    drop(client);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_the_state_alone() {
    let (db, guard) = setup("ordering_rollback").await;
    let client = db.client().await;
    guard.advance(&client, "pi_1", "created").await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        guard.advance(&client, "pi_1", "succeeded").await.unwrap(),
        Transition::Advanced
    );
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(state(&db, "pi_1").await.as_deref(), Some("created"));
    drop(client);
    db.drop_schema().await;
}

#[tokio::test]
async fn concurrent_transactions_in_any_order_end_in_the_terminal_state() {
    const ROUNDS: u64 = 25;
    let (db, guard) = setup("ordering_concurrent_tx").await;
    let events = ["created", "processing", "processing", "succeeded", "created"];
    for round in 0..ROUNDS {
        let payment = format!("pi_{round}");
        let mut order = events.to_vec();
        fastrand::Rng::with_seed(round).shuffle(&mut order);
        let barrier = Barrier::new(order.len());
        let (db, guard, barrier, payment) = (&db, &guard, &barrier, &payment);
        let transitions = join_all(order.iter().map(|status| async move {
            let client = db.pool.get().await.expect("a connection");
            client.batch_execute("BEGIN").await.expect("begin");
            // Every transaction is open before any applies its change.
            barrier.wait().await;
            let transition = guard.advance(&client, payment, status).await.expect("advance");
            client.batch_execute("COMMIT").await.expect("commit");
            (*status, transition)
        }))
        .await;

        assert_eq!(
            state(db, payment).await.as_deref(),
            Some("succeeded"),
            "round {round}, order {order:?}: {transitions:?}"
        );
        let inserted = transitions.iter().filter(|(_, t)| *t == Transition::Inserted).count();
        assert_eq!(
            inserted, 1,
            "round {round}: one delivery creates the row: {transitions:?}"
        );
        assert!(
            transitions
                .iter()
                .any(|(status, t)| *status == "succeeded" && t.changed()),
            "round {round}: the terminal event always applies: {transitions:?}"
        );
    }
    db.drop_schema().await;
}

/// What the Stripe-shaped handler shares.
#[derive(Clone)]
struct App {
    guard: Arc<OrderingGuard>,
}

/// Writes its ledger row and moves the payment's state through the guard,
/// both in the request's transaction; a backward event still answers 200.
async fn payment_event(State(app): State<App>, tx: Tx, Json(event): Json<Value>) -> (StatusCode, String) {
    let payment = event["data"]["object"]["id"].as_str().unwrap_or_default();
    let status = event["type"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("payment_intent.");
    let body = event.to_string();
    if let Err(error) = tx
        .execute("INSERT INTO ledger (body) VALUES ($1)", &[&body.as_bytes()])
        .await
    {
        return (StatusCode::SERVICE_UNAVAILABLE, error.to_string());
    }
    match app.guard.advance(&tx, payment, status).await {
        Ok(transition) => (StatusCode::OK, format!("{transition:?}")),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    }
}

#[tokio::test]
async fn shuffled_concurrent_deliveries_through_the_layer_end_in_the_terminal_state() {
    const PAYMENTS: u64 = 8;
    let (db, guard) = setup("ordering_through_layer").await;
    let store = db.store().await;
    let app = Router::new()
        .route("/webhooks/stripe", post(payment_event))
        .route_layer(IdempotencyLayer::new(store).preset(Preset::stripe()))
        .with_state(App { guard: Arc::new(guard) });

    // Each payment's events, each delivered twice (a provider retry), all
    // payments' deliveries shuffled together and sent at once.
    let mut deliveries = Vec::new();
    for payment in 0..PAYMENTS {
        let terminal = ["succeeded", "payment_failed", "canceled"][(payment % 3) as usize];
        for (n, status) in ["created", "processing", terminal].iter().enumerate() {
            let event = json!({
                "id": format!("evt_{payment}_{n}"),
                "type": format!("payment_intent.{status}"),
                "data": {"object": {"id": format!("pi_{payment}")}}
            })
            .to_string();
            deliveries.push(event.clone());
            deliveries.push(event);
        }
    }
    fastrand::Rng::with_seed(7).shuffle(&mut deliveries);
    let barrier = Barrier::new(deliveries.len());
    let (app, barrier) = (&app, &barrier);
    let replies = join_all(deliveries.iter().map(|event| async move {
        barrier.wait().await;
        let request = http::Request::post("/webhooks/stripe")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(event.clone()))
            .expect("request");
        send(app, request).await
    }))
    .await;

    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    for payment in 0..PAYMENTS {
        let terminal = ["succeeded", "payment_failed", "canceled"][(payment % 3) as usize];
        assert_eq!(
            state(&db, &format!("pi_{payment}")).await.as_deref(),
            Some(terminal),
            "payment {payment}"
        );
    }
    // Every event ran once, backward ones included: one ledger row each.
    assert_eq!(db.ledger_rows().await, i64::try_from(PAYMENTS * 3).unwrap());
    assert_eq!(db.records().await, i64::try_from(PAYMENTS * 3).unwrap());
    db.drop_schema().await;
}
