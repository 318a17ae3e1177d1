//! Choreography helpers: sagas without an orchestrator, as event handlers on `trellis-bus`.
//!
//! A [`Choreography`] declares handlers: `on` an event type, run a side effect and emit the
//! next event ([`Choreography::step`]); compensating handlers run on a failure event (by
//! convention `*.failed`) and undo a step ([`Choreography::compensation`]). A service calls
//! [`Choreography::handle`] for each delivery (from [`trellis_bus::Subscription::run`]):
//! the effect and the next event commit together, exactly once per message, through the bus
//! inbox ([`SqliteInbox::handle_once`]) and outbox ([`SqliteOutbox::enqueue`]), so a
//! redelivered message has no second effect and the next event is never lost or doubled.
//!
//! Every event a handler emits carries the correlation id of its trigger, its trigger as
//! causation, and the handler's step name in [`STEP_HEADER`] ([`COMPENSATION_HEADER`] for an
//! undo). [`Choreography::timeline`] rebuilds one flow's progress from its events (all events
//! with one correlation id) as the same [`SagaTimeline`] the orchestrator's inspector shows.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::Utc;
use sqlx::SqliteConnection;
use trellis_bus::inbox::{Handled, SqliteInbox};
use trellis_bus::outbox::SqliteOutbox;
use trellis_bus::{Envelope, HandlerError, Message};
use uuid::Uuid;

use crate::bus::STEP_HEADER;
use crate::inspector::SagaTimeline;
use crate::store::{SagaId, SagaInstance, SagaRecord, SagaStatus, Transition};

/// The header marking an event emitted by a compensating handler.
pub const COMPENSATION_HEADER: &str = "trellis-saga-compensation";

/// The event a handler emits: its type and data, published on `topic`.
#[derive(Debug, Clone, PartialEq)]
pub struct NextEvent {
    /// The topic to publish on.
    pub topic: String,
    /// The event type (`stock.reserved`, or `payment.failed` to start compensation).
    pub kind: String,
    /// The body.
    pub data: serde_json::Value,
}

impl NextEvent {
    /// The event `kind` with `data` on `topic`.
    pub fn new(topic: impl Into<String>, kind: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            topic: topic.into(),
            kind: kind.into(),
            data,
        }
    }
}

/// What a handler's effect returns: the next event, if any.
pub type EffectFuture<'t> =
    Pin<Box<dyn Future<Output = Result<Option<NextEvent>, HandlerError>> + Send + 't>>;

type Effect =
    Arc<dyn for<'t> Fn(&'t mut SqliteConnection, &'t Envelope) -> EffectFuture<'t> + Send + Sync>;

struct Handler {
    on: String,
    step: String,
    compensating: bool,
    effect: Effect,
}

/// A choreographed saga: named event handlers, forward and compensating.
pub struct Choreography {
    name: String,
    source: String,
    handlers: Vec<Handler>,
}

impl fmt::Debug for Choreography {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let handlers: Vec<_> = self
            .handlers
            .iter()
            .map(|handler| (&handler.on, &handler.step, handler.compensating))
            .collect();
        f.debug_struct("Choreography")
            .field("name", &self.name)
            .field("handlers", &handlers)
            .finish()
    }
}

impl Choreography {
    /// An empty choreography named `name`; events it emits have `source` as their source.
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            source: source.into(),
            handlers: Vec::new(),
        }
    }

    /// Declares step `step`: on events of type `on`, run `effect` in the inbox's transaction
    /// and emit the event it returns. Steps appear in the timeline in declaration order.
    #[must_use]
    pub fn step<F>(mut self, on: impl Into<String>, step: impl Into<String>, effect: F) -> Self
    where
        F: for<'t> Fn(&'t mut SqliteConnection, &'t Envelope) -> EffectFuture<'t>
            + Send
            + Sync
            + 'static,
    {
        self.handlers.push(Handler {
            on: on.into(),
            step: step.into(),
            compensating: false,
            effect: Arc::new(effect),
        });
        self
    }

    /// Declares the compensation of `step`: on failure events of type `on`, run `effect`
    /// (the undo) and emit the event it returns.
    #[must_use]
    pub fn compensation<F>(
        mut self,
        on: impl Into<String>,
        step: impl Into<String>,
        effect: F,
    ) -> Self
    where
        F: for<'t> Fn(&'t mut SqliteConnection, &'t Envelope) -> EffectFuture<'t>
            + Send
            + Sync
            + 'static,
    {
        self.handlers.push(Handler {
            on: on.into(),
            step: step.into(),
            compensating: true,
            effect: Arc::new(effect),
        });
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs every handler declared for `message`'s event type, each once per message id and
    /// consumer group: its effect and its next event (through the outbox) commit with the
    /// inbox record. A redelivered message runs nothing. Returns how many handlers ran.
    ///
    /// # Errors
    /// A handler's error (its writes roll back, the bus retries per its policy) or a database
    /// error (transient).
    pub async fn handle(
        &self,
        inbox: &SqliteInbox,
        message: &Message,
    ) -> Result<usize, HandlerError> {
        // Owned, because the inbox's transaction may outlive this borrow of `self`.
        let handlers: Vec<(Effect, String, bool)> = self
            .handlers
            .iter()
            .filter(|handler| handler.on == message.envelope.kind)
            .map(|handler| {
                (
                    handler.effect.clone(),
                    handler.step.clone(),
                    handler.compensating,
                )
            })
            .collect();
        let count = handlers.len();
        if handlers.is_empty() {
            return Ok(0);
        }
        let source = self.source.clone();
        let trigger = message.envelope.clone();
        let handled = inbox
            .handle_once(message, move |tx| {
                Box::pin(async move {
                    for (effect, step, compensating) in handlers {
                        let next = effect(&mut *tx, &trigger).await?;
                        if let Some(next) = next {
                            let event = follow(
                                &trigger,
                                &source,
                                &step,
                                compensating,
                                next.kind,
                                next.data,
                            );
                            SqliteOutbox::enqueue(&mut *tx, &next.topic, &event)
                                .await
                                .map_err(HandlerError::from)?;
                        }
                    }
                    Ok(())
                })
            })
            .await?;
        Ok(match handled {
            Handled::Done(()) => count,
            Handled::Duplicate => 0,
        })
    }

    /// Rebuilds the progress of the flow whose events are `events` (all carrying one
    /// correlation id, in any order) as a timeline: each declared step with its trigger
    /// (executing), its emitted event (succeeded, or failed for a `*.failed` type) and its
    /// compensation. `Completed` once the last step succeeded; `Failed` once every
    /// compensation that started has finished.
    pub fn timeline(&self, correlation_id: Uuid, events: &[Envelope]) -> SagaTimeline {
        let mut events: Vec<&Envelope> = events
            .iter()
            .filter(|event| event.correlation_id == Some(correlation_id))
            .collect();
        events.sort_by_key(|event| (event.time, event.id));
        let steps: Vec<String> = self
            .handlers
            .iter()
            .filter(|handler| !handler.compensating)
            .map(|handler| handler.step.clone())
            .collect();
        let started_at = events.first().map_or_else(Utc::now, |event| event.time);
        let mut transitions = vec![(
            started_at,
            Transition::Started {
                steps: steps.clone(),
                pivot: None,
            },
        )];
        let mut failure: Option<(String, String)> = None;
        let mut compensations_open = 0_i64;
        for event in &events {
            for handler in self.handlers.iter().filter(|h| h.on == event.kind) {
                let transition = if handler.compensating {
                    compensations_open += 1;
                    Transition::StepCompensating {
                        step: handler.step.clone(),
                        attempt: 1,
                    }
                } else {
                    Transition::StepExecuting {
                        step: handler.step.clone(),
                        attempt: 1,
                    }
                };
                transitions.push((event.time, transition));
            }
            let Some(step) = event.headers.get(STEP_HEADER) else {
                continue;
            };
            if event.headers.contains_key(COMPENSATION_HEADER) {
                compensations_open -= 1;
                transitions.push((
                    event.time,
                    Transition::StepCompensated { step: step.clone() },
                ));
            } else if event.kind.ends_with(".failed") {
                let error = event.data["error"]
                    .as_str()
                    .map_or_else(|| event.kind.clone(), str::to_owned);
                transitions.push((
                    event.time,
                    Transition::StepFailed {
                        step: step.clone(),
                        attempt: 1,
                        retryable: false,
                        error: error.clone(),
                    },
                ));
                transitions.push((
                    event.time,
                    Transition::Compensating {
                        failed_step: step.clone(),
                        error: error.clone(),
                    },
                ));
                failure = Some((step.clone(), error));
            } else {
                transitions.push((event.time, Transition::StepSucceeded { step: step.clone() }));
                if failure.is_none() && steps.last() == Some(step) {
                    transitions.push((event.time, Transition::Completed));
                }
            }
        }
        let last_at = transitions.last().map_or(started_at, |(at, _)| *at);
        if let Some((step, error)) = failure
            && compensations_open <= 0
        {
            transitions.push((last_at, Transition::Failed { step, error }));
        }
        let status = transitions
            .last()
            .map_or(SagaStatus::Running, |(_, transition)| {
                transition.status_after()
            });
        let instance = SagaInstance {
            id: SagaId::from_uuid(correlation_id),
            definition: self.name.clone(),
            version: 0,
            status,
            records: transitions
                .into_iter()
                .enumerate()
                .map(|(index, (at, transition))| SagaRecord {
                    seq: index as u64 + 1,
                    transition,
                    context: serde_json::Value::Null,
                    at,
                })
                .collect(),
        };
        SagaTimeline::from_instance(&instance)
    }
}

/// The event a handler emits after `trigger`: same subject and correlation, caused by it,
/// naming the handler's step.
fn follow(
    trigger: &Envelope,
    source: &str,
    step: &str,
    compensating: bool,
    kind: String,
    data: serde_json::Value,
) -> Envelope {
    let mut event = Envelope::new(kind, source, trigger.subject.clone(), data);
    event.correlation_id = trigger.correlation_id.or(Some(trigger.id));
    event.causation_id = Some(trigger.id);
    event
        .headers
        .insert(STEP_HEADER.to_owned(), step.to_owned());
    if compensating {
        event
            .headers
            .insert(COMPENSATION_HEADER.to_owned(), "true".to_owned());
    }
    event
}
