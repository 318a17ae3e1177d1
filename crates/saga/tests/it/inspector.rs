//! The inspector: list, timeline, operator actions (retry, skip, cancel, purge) and its HTTP
//! endpoints, with an engine picking up what the operator wrote.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;
use trellis_saga::{
    AttemptOutcome, InMemorySagaStore, Inspector, LEASE_DEFAULT, Lease, SagaDefinition, SagaEngine,
    SagaError, SagaFilter, SagaId, SagaInstance, SagaRecord, SagaStatus, SagaStore, SagaSummary,
    SagaTimeline, Step, StepContext, StepError, StepState, Transition,
};

use crate::support::{
    Behaviour, Crash, CrashingStore, Ledger, NODE, Trip, quick_retry, step, trip,
};

fn ada() -> Trip {
    Trip {
        customer: "ada".to_owned(),
        done: Vec::new(),
    }
}

/// flight (compensable), pay (pivot), then `ship`, which fails until `fixed` is set.
fn shipping(ledger: &Ledger, fixed: Arc<AtomicBool>) -> SagaDefinition<Trip> {
    let ship = Step::new("ship", move |trip: &mut Trip, _step: StepContext| {
        let fixed = fixed.clone();
        Box::pin(async move {
            if !fixed.load(Ordering::SeqCst) {
                return Err(StepError::retryable("carrier down"));
            }
            trip.done.push("ship".to_owned());
            Ok(())
        })
    })
    .retry(quick_retry(3));
    SagaDefinition::builder("book-trip", 1)
        .step(step(ledger, "flight", Behaviour::Succeeds, true, false))
        .pivot_step(step(ledger, "pay", Behaviour::Succeeds, false, false))
        .step(ship)
        .build()
        .expect("valid")
}

#[tokio::test(start_paused = true)]
async fn a_stuck_step_retried_by_an_operator_completes_and_the_timeline_shows_every_attempt() {
    // Goal: list finds the stuck saga, show explains it (three failed attempts of ship), the
    // retry is recorded and the engine's recovery finishes the saga with a fourth attempt.
    let store = InMemorySagaStore::new();
    let ledger = Ledger::default();
    let fixed = Arc::new(AtomicBool::new(false));
    let engine = SagaEngine::new(store.clone()).register(shipping(&ledger, fixed.clone()));
    let inspector = Inspector::new(store.clone()).with_operator("grace");
    let id = engine.start("book-trip", &ada()).await.expect("start");

    let stuck = inspector
        .list(&SagaFilter::new().with_status(SagaStatus::Stuck))
        .await
        .expect("list");
    assert_eq!(
        stuck.iter().map(|saga| saga.id).collect::<Vec<_>>(),
        vec![id]
    );
    let timeline = inspector.show(id).await.expect("show");
    assert_eq!(timeline.pivot.as_deref(), Some("pay"));
    let ship = &timeline.steps[2];
    assert_eq!(ship.state, StepState::Stuck);
    assert_eq!(ship.attempts.len(), 3);
    assert!(
        ship.attempts
            .iter()
            .all(|attempt| attempt.outcome == AttemptOutcome::Failed
                && attempt.error.as_deref() == Some("carrier down"))
    );
    assert_eq!(
        timeline.outcome.as_deref(),
        Some("stuck on ship: carrier down")
    );
    // Cancelling past the pivot is refused: the saga only goes forward.
    let refused = inspector.cancel(id, "customer asked").await;
    assert!(
        matches!(refused, Err(SagaError::Rejected { .. })),
        "{refused:?}"
    );

    fixed.store(true, Ordering::SeqCst);
    let written = inspector.retry(id).await.expect("retry");
    assert!(
        matches!(written, Transition::Retried { ref operator, compensating: false, .. } if operator == "grace")
    );
    let report = engine.recover().await.expect("recover");
    assert_eq!(report.resumed, vec![(id, SagaStatus::Completed)]);
    let ship = inspector.show(id).await.expect("show").steps[2].clone();
    assert_eq!(ship.state, StepState::Succeeded);
    assert_eq!(ship.attempts.len(), 4);
    assert_eq!(ship.attempts[3].outcome, AttemptOutcome::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn a_stuck_compensation_skipped_by_an_operator_lets_the_rest_compensate() {
    // Goal: skip names the stuck compensation, is recorded, and the steps below it still
    // compensate; skipping another step is refused.
    let store = InMemorySagaStore::new();
    let ledger = Ledger::default();
    let definition = SagaDefinition::builder("book-trip", 1)
        .step(step(&ledger, "flight", Behaviour::Succeeds, true, false))
        .step(step(&ledger, "hotel", Behaviour::Succeeds, true, true))
        .step(step(
            &ledger,
            "car",
            Behaviour::FailsPermanently,
            true,
            false,
        ))
        .build()
        .expect("valid");
    let engine = SagaEngine::new(store.clone()).register(definition);
    let inspector = Inspector::new(store.clone());
    let id = engine.start("book-trip", &ada()).await.expect("start");
    assert_eq!(engine.status(id).await.expect("status"), SagaStatus::Stuck);

    let wrong = inspector.skip(id, "flight").await;
    assert!(
        matches!(wrong, Err(SagaError::Rejected { .. })),
        "{wrong:?}"
    );
    inspector.skip(id, "hotel").await.expect("skip");
    engine.recover().await.expect("recover");
    let timeline = inspector.show(id).await.expect("show");
    assert_eq!(timeline.status, SagaStatus::Failed);
    let hotel = &timeline.steps[1];
    assert!(hotel.compensation_skipped);
    assert_eq!(
        hotel.compensation.len(),
        3,
        "three failed undos before the skip"
    );
    assert_eq!(timeline.steps[0].state, StepState::Compensated);
    ledger.with(|state| assert_eq!(state.compensation_order, ["flight"]));
}

#[tokio::test(start_paused = true)]
async fn cancelling_waits_for_a_live_lease_then_compensates_the_step_in_flight() {
    // Goal: a saga whose engine died mid-step is leased until expiry (cancel answers Leased);
    // afterwards cancel compensates the in-flight step and those before it, and it fails.
    let store = InMemorySagaStore::new();
    let ledger = Ledger::default();
    // Writes: create, flight executing, flight succeeded, hotel executing (crash after it).
    let crashing = CrashingStore::new(store.clone(), 4, Crash::AfterWrite);
    let dead = SagaEngine::new(crashing.clone())
        .with_owner(NODE)
        .register(trip(&ledger, Behaviour::Succeeds));
    dead.start("book-trip", &ada()).await.expect_err("crashes");
    let id = crashing.created().expect("created");
    let inspector = Inspector::new(store.clone());

    let leased = inspector.cancel(id, "customer asked").await;
    assert!(
        matches!(&leased, Err(SagaError::Leased { owner, .. }) if owner == NODE),
        "{leased:?}"
    );
    tokio::time::advance(LEASE_DEFAULT + Duration::from_secs(1)).await;
    let written = inspector
        .cancel(id, "customer asked")
        .await
        .expect("cancel");
    assert_eq!(
        written,
        Transition::Cancelled {
            step: Some("hotel".to_owned()),
            reason: "customer asked (by operator)".to_owned()
        }
    );
    let other = SagaEngine::new(store.clone()).register(trip(&ledger, Behaviour::Succeeds));
    other.recover().await.expect("recover");
    let timeline = inspector.show(id).await.expect("show");
    assert_eq!(timeline.status, SagaStatus::Failed);
    assert_eq!(
        timeline.outcome.as_deref(),
        Some("failed at hotel: cancelled: customer asked (by operator)")
    );
    ledger.with(|state| assert_eq!(state.compensation_order, ["hotel", "flight"]));
}

#[tokio::test(start_paused = true)]
async fn purge_deletes_old_terminal_sagas_but_keeps_stuck_ones() {
    // Goal: purge with a zero age removes completed and failed sagas, never stuck ones.
    let store = InMemorySagaStore::new();
    let ledger = Ledger::default();
    let inspector = Inspector::new(store.clone());
    let completed = SagaEngine::new(store.clone()).register(trip(&ledger, Behaviour::Succeeds));
    completed.start("book-trip", &ada()).await.expect("start");
    let failed =
        SagaEngine::new(store.clone()).register(trip(&ledger, Behaviour::FailsPermanently));
    failed.start("book-trip", &ada()).await.expect("start");
    let stuck = SagaEngine::new(store.clone())
        .register(shipping(&ledger, Arc::new(AtomicBool::new(false))));
    let stuck_id = stuck.start("book-trip", &ada()).await.expect("start");
    assert_eq!(
        inspector
            .purge(Duration::from_secs(3600))
            .await
            .expect("purge"),
        0
    );
    assert_eq!(inspector.purge(Duration::ZERO).await.expect("purge"), 2);
    let left = inspector.list(&SagaFilter::new()).await.expect("list");
    assert_eq!(
        left.iter().map(|saga| saga.id).collect::<Vec<_>>(),
        vec![stuck_id]
    );
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let request = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_owned()))
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[tokio::test(start_paused = true)]
async fn the_http_endpoints_list_show_act_and_explain_bad_input_as_json() {
    // Goal: the Router answers each endpoint with JSON, and every client error is a 4xx with
    // {"error": {"code", "message"}}.
    let store = InMemorySagaStore::new();
    let ledger = Ledger::default();
    let engine = SagaEngine::new(store.clone())
        .register(shipping(&ledger, Arc::new(AtomicBool::new(false))));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    let router = trellis_saga::http::router(Inspector::new(store.clone()));

    let (status, body) = call(
        &router,
        "GET",
        "/sagas?status=stuck&definition=book-trip",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sagas"][0]["id"], id.to_string());
    assert_eq!(body["sagas"][0]["status"], "stuck");
    let (status, body) = call(&router, "GET", &format!("/sagas/{id}"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["steps"][2]["state"], "stuck");
    assert_eq!(
        body["steps"][2]["attempts"].as_array().map(Vec::len),
        Some(3)
    );

    for (method, uri, payload, expected, code) in [
        (
            "GET",
            "/sagas?status=bogus".to_owned(),
            "",
            400,
            "bad_request",
        ),
        (
            "GET",
            "/sagas?colour=red".to_owned(),
            "",
            400,
            "bad_request",
        ),
        (
            "GET",
            "/sagas/not-a-uuid".to_owned(),
            "",
            400,
            "bad_request",
        ),
        (
            "GET",
            format!("/sagas/{}", uuid::Uuid::now_v7()),
            "",
            404,
            "saga_not_found",
        ),
        (
            "POST",
            format!("/sagas/{id}/skip"),
            "{}",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("/sagas/{id}/skip"),
            "{\"step\": 1",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("/sagas/{id}/skip"),
            "{\"step\": \"pay\"}",
            409,
            "action_rejected",
        ),
        (
            "POST",
            format!("/sagas/{id}/cancel"),
            "",
            409,
            "action_rejected",
        ),
        ("POST", "/sagas/purge".to_owned(), "{}", 400, "bad_request"),
        ("POST", "/sagas/purge".to_owned(), "[0]", 400, "bad_request"),
        (
            "POST",
            format!("/sagas/{id}/skip"),
            "[\"ship\"]",
            400,
            "bad_request",
        ),
    ] {
        let (status, body) = call(&router, method, &uri, payload).await;
        assert_eq!(status, expected, "{method} {uri}: {body}");
        assert_eq!(body["error"]["code"], code, "{method} {uri}: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }

    let (status, body) = call(
        &router,
        "POST",
        &format!("/sagas/{id}/skip"),
        "{\"step\": \"ship\"}",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["written"]["type"], "skipped");
    engine.recover().await.expect("recover");
    assert_eq!(
        engine.status(id).await.expect("status"),
        SagaStatus::Completed
    );
    let (status, body) = call(&router, "POST", "/sagas/purge", "{\"older_than_days\": 1}").await;
    assert_eq!((status, body["purged"].as_u64()), (200, Some(0)), "{body}");
}

/// A store whose `load` returns every saga with an empty log (as a broken or third-party store
/// might), over an in-memory store for everything else.
#[derive(Debug, Clone, Default)]
struct HollowStore(InMemorySagaStore);

impl SagaStore for HollowStore {
    async fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        self.0.create(id, definition, version, first, lease).await
    }

    async fn append(
        &self,
        id: SagaId,
        record: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        self.0.append(id, record, lease).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        Ok(self.0.load(id).await?.map(|mut instance| {
            instance.records.clear();
            instance
        }))
    }

    async fn list_active(&self, limit: usize) -> Result<Vec<SagaId>, SagaError> {
        self.0.list_active(limit).await
    }

    async fn claim_next(
        &self,
        lease: &Lease,
        after: Option<SagaId>,
    ) -> Result<Option<SagaId>, SagaError> {
        self.0.claim_next(lease, after).await
    }

    async fn claim(&self, id: SagaId, lease: &Lease) -> Result<(), SagaError> {
        self.0.claim(id, lease).await
    }

    async fn renew(&self, id: SagaId, lease: &Lease) -> Result<bool, SagaError> {
        self.0.renew(id, lease).await
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        self.0.release(id, owner).await
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaSummary>, SagaError> {
        self.0.list(filter).await
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, SagaError> {
        self.0.purge(before).await
    }
}

#[tokio::test]
async fn the_inspector_answers_an_empty_saga_log_without_panicking() {
    // Goal: a saga whose log comes back empty is answered with an error (show, cancel, the
    // HTTP endpoint) or an empty timeline (from_instance), never a panic; method: a store
    // that drops every record on load.
    let store = HollowStore::default();
    let id = SagaId::new();
    let first = SagaRecord {
        seq: 1,
        transition: Transition::Started {
            steps: vec!["flight".to_owned()],
            pivot: None,
        },
        context: serde_json::json!(null),
        at: Utc::now(),
    };
    store
        .create(id, "book-trip", 1, &first, &Lease::new(NODE, LEASE_DEFAULT))
        .await
        .expect("create");
    store.release(id, NODE).await.expect("release");
    let empty = store.load(id).await.expect("load").expect("exists");
    assert!(empty.records.is_empty());

    let timeline = SagaTimeline::from_instance(&empty);
    assert!(timeline.steps.is_empty() && timeline.log.is_empty());

    let inspector = Inspector::new(store.clone());
    assert!(matches!(
        inspector.show(id).await,
        Err(SagaError::CorruptLog { .. })
    ));
    assert!(matches!(
        inspector.cancel(id, "why").await,
        Err(SagaError::CorruptLog { .. })
    ));
    let response = trellis_saga::http::router(Inspector::new(store))
        .oneshot(
            axum::http::Request::get(format!("/sagas/{id}"))
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("answered");
    assert!(response.status().is_server_error(), "{}", response.status());
}

#[tokio::test(start_paused = true)]
async fn an_action_over_http_records_the_operator_the_actor_header_names() {
    // Goal: the operator of a retry written over HTTP is who `x-actor` names (what an admin
    // layer sets from the verified caller), and the inspector's own name without the header.
    let store = InMemorySagaStore::new();
    let ledger = Ledger::default();
    let engine = SagaEngine::new(store.clone())
        .register(shipping(&ledger, Arc::new(AtomicBool::new(false))));
    let first = engine.start("book-trip", &ada()).await.expect("start");
    let second = engine.start("book-trip", &ada()).await.expect("start");
    let router =
        trellis_saga::http::router(Inspector::new(store.clone()).with_operator("fallback"));

    let request = axum::http::Request::builder()
        .method("POST")
        .uri(format!("/sagas/{first}/retry"))
        .header(trellis_saga::http::ACTOR_HEADER, "admin-7")
        .body(axum::body::Body::empty())
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), 200);
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(body["written"]["operator"], "admin-7", "{body}");

    let (status, body) = call(&router, "POST", &format!("/sagas/{second}/retry"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["written"]["operator"], "fallback", "{body}");
}
