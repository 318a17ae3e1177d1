//! [`Choreography`]: the declared handlers, and running them on a delivery.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::Utc;
use trellis_bus::inbox::Handled;
use trellis_bus::{Envelope, HandlerError, Message};
use uuid::Uuid;

use super::timeline::{Fact, build_timeline, failure_error};
use super::{
    COMPENSATION_HEADER, ChoreographyDb, ChoreographyLogEntry, Effect, EffectFuture,
    PREPARED_HEADER, Sqlite,
};
use crate::command_step::STEP_HEADER;
use crate::inspector::SagaTimeline;

struct Handler<D: ChoreographyDb> {
    on: String,
    step: String,
    compensating: bool,
    effect: Effect<D>,
}

/// A choreographed saga on database `D` ([`Sqlite`] by default, or
/// [`Postgres`](super::Postgres)): named event handlers, forward and compensating.
pub struct Choreography<D: ChoreographyDb = Sqlite> {
    name: String,
    source: String,
    handlers: Vec<Handler<D>>,
    installed: AtomicBool,
}

impl<D: ChoreographyDb> fmt::Debug for Choreography<D> {
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

impl<D: ChoreographyDb> Choreography<D> {
    /// An empty choreography named `name`; events it emits have `source` as their source.
    /// Name the database when it is not SQLite: `Choreography::<Postgres>::new(..)`.
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            source: source.into(),
            handlers: Vec::new(),
            installed: AtomicBool::new(false),
        }
    }

    /// Declares step `step`: on events of type `on`, run `effect` in the inbox's transaction
    /// and emit the event it returns. Steps appear in the timeline in declaration order. The
    /// effect's writes on its connection commit with the inbox record, or roll back with it
    /// (in a function generic over `D`, take the connection as a [`Tx`](super::Tx) with
    /// [`ChoreographyDb::tx`]).
    #[must_use]
    pub fn step<F>(mut self, on: impl Into<String>, step: impl Into<String>, effect: F) -> Self
    where
        F: for<'t> Fn(&'t mut D::Connection, &'t Envelope) -> EffectFuture<'t>
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
        F: for<'t> Fn(&'t mut D::Connection, &'t Envelope) -> EffectFuture<'t>
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

    /// The event types its handlers run on, sorted, each once: what a participant needs
    /// delivered (every other event would be acknowledged unhandled).
    pub fn events(&self) -> Vec<&str> {
        let mut events: Vec<&str> = self.handlers.iter().map(|h| h.on.as_str()).collect();
        events.sort_unstable();
        events.dedup();
        events
    }

    /// The forward steps, in declaration order.
    fn steps(&self) -> Vec<String> {
        self.handlers
            .iter()
            .filter(|handler| !handler.compensating)
            .map(|handler| handler.step.clone())
            .collect()
    }

    /// [`Choreography::handle`] for a step whose side effect is remote, so it cannot run
    /// inside the inbox's transaction: a call to another service or an external API (or work
    /// through code that opens its own transactions). The caller makes that call first,
    /// idempotent by a business key (the order id) at the remote side, and passes its outcome
    /// as `prepared`; the effects read it with [`prepared`](super::prepared) and return the
    /// event to emit, which commits with the inbox record and the log entry as in
    /// [`Choreography::handle`]. Work on the service's own tables belongs in the effect
    /// instead, in the transaction (see the module's "Local and remote effects").
    ///
    /// What holds: the call is at least once (a process that stops between the call and the
    /// commit repeats it on redelivery), and the remote side's deduplication by the key keeps
    /// its effect to one, answering the first outcome again. The outcome and the next event
    /// are recorded exactly once (the inbox). Call and event are not atomic: without the key
    /// at the remote side, a redelivery acts twice.
    ///
    /// # Errors
    /// As [`Choreography::handle`].
    pub async fn handle_prepared(
        &self,
        inbox: &D::Inbox,
        message: &Message,
        prepared: &serde_json::Value,
    ) -> Result<usize, HandlerError> {
        let mut annotated = message.clone();
        annotated
            .envelope
            .headers
            .insert(PREPARED_HEADER.to_owned(), prepared.to_string());
        self.handle(inbox, &annotated).await
    }

    /// Runs every handler declared for `message`'s event type, each once per message id and
    /// consumer group: its effect, its next event (through the outbox) and its entry in
    /// `saga_choreography_log` commit with the inbox record. A redelivered message runs
    /// nothing. Returns how many handlers ran. The first run in a process also creates the
    /// log's tables if missing and records the declared steps (call
    /// [`ChoreographyLog::new`](super::ChoreographyLog::new) at start-up to create them before
    /// concurrent handlers race to).
    ///
    /// # Errors
    /// A handler's error (its writes roll back, the bus retries per its policy) or a database
    /// error (transient).
    pub async fn handle(&self, inbox: &D::Inbox, message: &Message) -> Result<usize, HandlerError> {
        // Owned, because the inbox's transaction may outlive this borrow of `self`.
        let handlers: Vec<(Effect<D>, String, bool)> = self
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
        let install = !self.installed.load(Ordering::Acquire);
        let definition = (
            self.name.clone(),
            serde_json::to_string(&self.steps()).unwrap_or_else(|_| "[]".to_owned()),
        );
        let source = self.source.clone();
        let trigger = message.envelope.clone();
        let handled = D::handle_once(
            inbox,
            message,
            Box::new(move |tx| {
                Box::pin(async move {
                    if install {
                        D::install(&mut *tx, Some((&definition.0, &definition.1))).await?;
                    }
                    for (effect, step, compensating) in handlers {
                        let next = effect(&mut *tx, &trigger).await?;
                        let mut entry = ChoreographyLogEntry {
                            choreography: definition.0.clone(),
                            correlation_id: trigger.correlation_id.unwrap_or(trigger.id),
                            event_id: trigger.id,
                            event_type: trigger.kind.clone(),
                            step: step.clone(),
                            compensating,
                            outcome: None,
                            error: None,
                            at: Utc::now(),
                        };
                        if let Some(next) = next {
                            let event = follow(
                                &trigger,
                                &source,
                                &step,
                                compensating,
                                next.kind,
                                next.data,
                            );
                            D::enqueue(&mut *tx, &next.topic, &event)
                                .await
                                .map_err(HandlerError::from)?;
                            entry.error = failure_error(&event);
                            entry.outcome = Some(event.kind);
                        }
                        D::record(&mut *tx, &entry).await?;
                    }
                    Ok(())
                })
            }),
        )
        .await?;
        Ok(match handled {
            Handled::Done(()) => {
                // Only a committed run created the tables (a duplicate ran nothing).
                if install {
                    self.installed.store(true, Ordering::Release);
                }
                count
            }
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
        let mut facts = Vec::new();
        for event in &events {
            for handler in self.handlers.iter().filter(|h| h.on == event.kind) {
                facts.push((
                    event.time,
                    Fact::Ran {
                        step: handler.step.clone(),
                        compensating: handler.compensating,
                    },
                ));
            }
            if let Some(step) = event.headers.get(STEP_HEADER) {
                facts.push((
                    event.time,
                    Fact::Done {
                        step: step.clone(),
                        compensating: event.headers.contains_key(COMPENSATION_HEADER),
                        error: failure_error(event),
                    },
                ));
            }
        }
        build_timeline(&self.name, correlation_id, &self.steps(), facts)
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
