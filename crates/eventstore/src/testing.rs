//! Given/when/then tests for aggregates.

use std::fmt::Debug;

use crate::aggregate::Aggregate;

/// Starts an aggregate test from past events.
///
/// # Examples
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use trellis_eventstore::{Aggregate, DomainEvent, AggregateTest};
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// struct Counter { value: u32 }
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// enum CounterEvent { Incremented }
/// impl DomainEvent for CounterEvent {}
/// #[derive(Debug, thiserror::Error)]
/// #[error("the counter is full")]
/// struct Full;
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "counter";
///     type Command = ();
///     type Event = CounterEvent;
///     type Error = Full;
///     fn handle(&self, _: ()) -> Result<Vec<CounterEvent>, Full> {
///         if self.value >= 2 { Err(Full) } else { Ok(vec![CounterEvent::Incremented]) }
///     }
///     fn apply(&mut self, _: &CounterEvent) { self.value += 1 }
/// }
///
/// AggregateTest::<Counter>::given([CounterEvent::Incremented]).when(()).then_expect_events([CounterEvent::Incremented]);
/// AggregateTest::<Counter>::given([CounterEvent::Incremented, CounterEvent::Incremented]).when(()).then_expect_error();
/// ```
#[derive(Debug)]
pub struct AggregateTest<A> {
    state: A,
}

impl<A: Aggregate> AggregateTest<A> {
    /// The aggregate after `events`.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        for event in events {
            state.apply(&event);
        }
        Self { state }
    }

    /// A new aggregate with no history.
    pub fn given_no_events() -> Self {
        Self {
            state: A::default(),
        }
    }

    /// Runs `command`.
    pub fn when(self, command: A::Command) -> AggregateOutcome<A> {
        AggregateOutcome {
            result: self.state.handle(command),
        }
    }
}

/// What a command did, for assertions.
#[derive(Debug)]
pub struct AggregateOutcome<A: Aggregate> {
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> AggregateOutcome<A>
where
    A::Event: PartialEq + Debug,
{
    /// Asserts the command produced exactly these events.
    ///
    /// # Panics
    /// When it produced other events or an error.
    #[track_caller]
    pub fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>) {
        let expected: Vec<_> = expected.into_iter().collect();
        match self.result {
            Ok(events) => assert_eq!(events, expected, "the command produced other events"),
            Err(error) => panic!("expected events {expected:?}, the command failed: {error}"),
        }
    }

    /// Asserts the command failed, and returns the error for further checks.
    ///
    /// # Panics
    /// When the command succeeded.
    #[track_caller]
    pub fn then_expect_error(self) -> A::Error {
        match self.result {
            Ok(events) => panic!("expected an error, the command produced {events:?}"),
            Err(error) => error,
        }
    }
}
