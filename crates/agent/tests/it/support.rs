//! Tools and wiring shared by the loop tests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::{Barrier, Semaphore};
use trellis_agent::{
    Agent, Caller, Effect, Limits, Llm, OpenAiClient, OpenAiConfig, Tool, ToolContext, ToolError,
    ToolRegistry,
};
use trellis_resilience::{Backoff, RetryBudget, RetryPolicy};
use trellis_saga::{InMemorySagaStore, Lease};

use trellis_agent::testing::Script;

pub(crate) fn caller() -> Caller {
    Caller::new("user-1", "customer").with_bearer("token-of-user-1")
}

/// Reads a value; when given a barrier, waits for the other calls at it first (a test of
/// parallel calls deadlocks if calls run one after another).
pub(crate) struct Lookup {
    pub(crate) barrier: Option<Arc<Barrier>>,
    pub(crate) runs: Arc<AtomicU32>,
}

/// What to look up.
#[derive(Deserialize, JsonSchema)]
pub(crate) struct LookupInput {
    /// The key.
    key: String,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct LookupOutput {
    key: String,
    length: usize,
}

impl Tool for Lookup {
    type Input = LookupInput;
    type Output = LookupOutput;
    fn name(&self) -> &str {
        "lookup"
    }
    fn description(&self) -> &str {
        "Looks a key up."
    }
    async fn execute(
        &self,
        input: LookupInput,
        _ctx: &ToolContext,
    ) -> Result<LookupOutput, ToolError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if let Some(barrier) = &self.barrier {
            barrier.wait().await;
        }
        Ok(LookupOutput {
            length: input.key.len(),
            key: input.key,
        })
    }
}

/// Doubles a positive integer.
pub(crate) struct Double {
    pub(crate) runs: Arc<AtomicU32>,
}

/// The number.
#[derive(Deserialize, JsonSchema)]
pub(crate) struct DoubleInput {
    /// A positive integer.
    #[schemars(range(min = 1))]
    n: u32,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct DoubleOutput {
    doubled: u64,
}

impl Tool for Double {
    type Input = DoubleInput;
    type Output = DoubleOutput;
    fn name(&self) -> &str {
        "double"
    }
    fn description(&self) -> &str {
        "Doubles a positive integer."
    }
    async fn execute(
        &self,
        input: DoubleInput,
        _ctx: &ToolContext,
    ) -> Result<DoubleOutput, ToolError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(DoubleOutput {
            doubled: u64::from(input.n) * 2,
        })
    }
}

/// A shop that honours idempotency keys: the same key places the same order.
#[derive(Default)]
pub(crate) struct FakeShop {
    /// Orders by idempotency key: (order id, cancelled).
    pub(crate) orders: Mutex<BTreeMap<String, (u32, bool)>>,
    /// Times `place_order` ran (whatever the key).
    pub(crate) executions: AtomicU32,
    /// Times an undo ran.
    pub(crate) undos: AtomicU32,
    /// When set, each execution takes a permit first (a test holds the call in flight).
    pub(crate) gate: Option<Arc<Semaphore>>,
    /// When set, every undo is refused (the order shipped already).
    pub(crate) undo_refused: bool,
}

impl FakeShop {
    pub(crate) fn live_orders(&self) -> usize {
        self.orders
            .lock()
            .unwrap()
            .values()
            .filter(|(_, c)| !c)
            .count()
    }
    pub(crate) fn placed(&self) -> usize {
        self.orders.lock().unwrap().len()
    }
}

pub(crate) struct PlaceOrder {
    pub(crate) shop: Arc<FakeShop>,
    pub(crate) approval: bool,
}

/// The order.
#[derive(Deserialize, JsonSchema)]
pub(crate) struct PlaceInput {
    /// The product.
    product: String,
    /// How many.
    quantity: u32,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Placed {
    order_id: u32,
}

impl Tool for PlaceOrder {
    type Input = PlaceInput;
    type Output = Placed;
    fn name(&self) -> &str {
        "place_order"
    }
    fn description(&self) -> &str {
        "Places an order."
    }
    fn effect(&self) -> Effect {
        Effect::Changes {
            approval: self.approval,
        }
    }
    async fn execute(&self, input: PlaceInput, ctx: &ToolContext) -> Result<Placed, ToolError> {
        assert!(!input.product.is_empty() && input.quantity > 0);
        self.shop.executions.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.shop.gate {
            gate.acquire().await.unwrap().forget();
        }
        let mut orders = self.shop.orders.lock().unwrap();
        let next = u32::try_from(orders.len()).unwrap() + 1;
        let (id, _) = *orders
            .entry(ctx.idempotency_key().to_owned())
            .or_insert((next, false));
        Ok(Placed { order_id: id })
    }
    async fn undo(
        &self,
        _input: PlaceInput,
        output: Placed,
        _ctx: &ToolContext,
    ) -> Result<(), ToolError> {
        self.shop.undos.fetch_add(1, Ordering::SeqCst);
        if self.shop.undo_refused {
            return Err(ToolError::refused(
                "the order shipped and can no longer be cancelled",
            ));
        }
        for order in self.shop.orders.lock().unwrap().values_mut() {
            if order.0 == output.order_id {
                order.1 = true;
            }
        }
        Ok(())
    }
}

/// A client for the scripted server that retries at once (no backoff) and never runs out of
/// budget.
pub(crate) fn client(script: &Script) -> OpenAiClient {
    OpenAiClient::new(OpenAiConfig::new(script.base_url(), "scripted"))
        .unwrap()
        .with_retry(
            RetryPolicy::builder()
                .max_attempts(3)
                .backoff(Backoff {
                    initial: Duration::from_millis(1),
                    max: Duration::from_millis(1),
                    multiplier: 1.0,
                    full_jitter: false,
                })
                .budget(RetryBudget::new(1.0, 100, 100))
                .build()
                .unwrap(),
        )
}

pub(crate) fn registry(shop: &Arc<FakeShop>, approval: bool) -> ToolRegistry {
    ToolRegistry::builder()
        .tool(Lookup {
            barrier: None,
            runs: Arc::default(),
        })
        .unwrap()
        .tool(PlaceOrder {
            shop: shop.clone(),
            approval,
        })
        .unwrap()
        .build()
}

pub(crate) fn agent<S: trellis_saga::SagaStore>(
    store: Arc<S>,
    llm: Arc<dyn Llm>,
    tools: ToolRegistry,
) -> Agent<S> {
    Agent::new(store, llm, tools)
        .with_lease(Lease::new("test-agent", Duration::from_secs(30)))
        .with_limits(Limits {
            max_steps: 6,
            ..Limits::default()
        })
}

pub(crate) fn memory() -> Arc<InMemorySagaStore> {
    Arc::new(InMemorySagaStore::new())
}
