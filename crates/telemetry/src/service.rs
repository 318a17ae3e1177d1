//! Which service a span belongs to, when one process hosts several.
//!
//! OpenTelemetry names the service on the *resource* of a tracer provider, not on each span,
//! so a process that exports under one name makes every span look as if one service made it.
//! `trellis up` runs the gateway and six services in one process, and its traces must still
//! show which service did what. The answer here (docs/decisions/0013-one-trace-per-order.md):
//!
//! - a [`ServiceName`] travels in the OpenTelemetry [`Context`], next to the span;
//! - the tracer [`init`](crate::init) installs looks it up in each new span's parent context
//!   and starts the span on a tracer provider whose resource carries that `service.name` (one
//!   provider per service, created on first use); a span without one goes to the process's
//!   own provider, named by [`TelemetryConfig`](crate::TelemetryConfig);
//! - since children take their parent's context, one [`ServiceName`] at the root of a
//!   service's work names every span below it.
//!
//! Roots come from two places. A server span takes the name of the service that serves it
//! ([`TraceContextServerLayer`](crate::http::TraceContextServerLayer)), whatever the caller
//! sent. Background work (a saga runner, a bus consumer, a projection) runs in a task started
//! with [`ServiceScopeExt::in_service`], or with [`ServiceScopeExt::in_current_service`] when
//! the task is started by code already in a service's scope; the propagation helpers extract
//! remote parents on top of the current context, so a consumer span keeps the scope's name.
//!
//! A process running one service needs none of this: its provider already has the right name.
//!
//! ```
//! use trellis_telemetry::service::{self, ServiceScopeExt as _};
//!
//! # async fn demo() {
//! let work = async {
//!     assert_eq!(service::current().as_ref().map(|s| s.as_str()), Some("orders"));
//! };
//! tokio::spawn(work.in_service("orders")).await.expect("the task runs");
//! # }
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::trace::{SpanBuilder, Tracer, TracerProvider as _};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::export::Exporting;

/// The instrumentation scope name spans are created under.
pub(crate) const INSTRUMENTATION_SCOPE: &str = "trellis-telemetry";

/// The most services one process gets a tracer provider of its own for; the spans of any
/// further name go to the process's provider. Each provider has its own export queue and
/// worker thread, so the number is bounded rather than grown by whatever names appear.
pub const SERVICES_MAX: usize = 32;

/// The `service.name` the spans below a context are exported under.
///
/// Stored in an OpenTelemetry [`Context`] with [`scope`] or by the server layer; read by the
/// tracer [`init`](crate::init) installs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceName(Cow<'static, str>);

impl ServiceName {
    /// A service name, such as `"orders"`.
    #[must_use]
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        Self(name.into())
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A context naming `service` and carrying no span: the root of one service's work.
#[must_use]
pub fn scope(service: impl Into<Cow<'static, str>>) -> Context {
    Context::new().with_value(ServiceName::new(service))
}

/// The service the current OpenTelemetry context names, if any.
#[must_use]
pub fn current() -> Option<ServiceName> {
    Context::map_current(|cx| cx.get::<ServiceName>().cloned())
}

/// The current service's scope without the current span: what a task started from here
/// should run in, so it keeps the service but does not become part of the caller's trace.
#[must_use]
pub fn current_scope() -> Context {
    match current() {
        Some(service) => Context::new().with_value(service),
        None => Context::new(),
    }
}

/// Runs futures in a service's scope (see the [module docs](self)).
pub trait ServiceScopeExt: Sized {
    /// Runs `self` with [`scope(service)`](scope) as the current context on every poll.
    fn in_service(self, service: impl Into<Cow<'static, str>>) -> WithContext<Self>;

    /// Runs `self` in the [`current_scope`] of the code that calls this: for a task spawned by
    /// a service, so its spans keep the service's name. Carries no span along.
    fn in_current_service(self) -> WithContext<Self>;
}

impl<F: Future> ServiceScopeExt for F {
    fn in_service(self, service: impl Into<Cow<'static, str>>) -> WithContext<Self> {
        self.with_context(scope(service))
    }

    fn in_current_service(self) -> WithContext<Self> {
        self.with_context(current_scope())
    }
}

/// The tracer behind the `tracing` layer: starts each span on the provider of the service its
/// parent context names.
#[derive(Clone)]
pub(crate) struct ServiceTracer {
    shared: Arc<Shared>,
}

struct Shared {
    /// The process's own provider, for spans outside any service scope.
    default_provider: SdkTracerProvider,
    default_tracer: SdkTracer,
    default_name: String,
    /// How to build a provider for a service; `None` when nothing is exported, so one
    /// provider serves every span (it only hands out ids).
    exporting: Option<Exporting>,
    /// One provider per service name seen, at most [`SERVICES_MAX`]; `None` marks a name whose
    /// provider could not be built (its spans go to the default provider).
    by_service: Mutex<HashMap<String, Option<(SdkTracerProvider, SdkTracer)>>>,
}

impl fmt::Debug for ServiceTracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceTracer")
            .field("default_name", &self.shared.default_name)
            .field("exporting", &self.shared.exporting.is_some())
            .finish_non_exhaustive()
    }
}

impl ServiceTracer {
    pub(crate) fn new(
        default_name: String,
        default_provider: SdkTracerProvider,
        exporting: Option<Exporting>,
    ) -> Self {
        let default_tracer = default_provider.tracer(INSTRUMENTATION_SCOPE);
        Self {
            shared: Arc::new(Shared {
                default_provider,
                default_tracer,
                default_name,
                exporting,
                by_service: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The process's own provider.
    pub(crate) fn default_provider(&self) -> &SdkTracerProvider {
        &self.shared.default_provider
    }

    /// The tracer for `service`: its own provider's, built on first use.
    fn tracer_for(&self, service: &ServiceName) -> SdkTracer {
        let shared = &self.shared;
        let Some(exporting) = &shared.exporting else {
            return shared.default_tracer.clone();
        };
        if service.as_str() == shared.default_name {
            return shared.default_tracer.clone();
        }
        let Ok(mut by_service) = shared.by_service.lock() else {
            return shared.default_tracer.clone();
        };
        if let Some(entry) = by_service.get(service.as_str()) {
            return entry.as_ref().map_or_else(
                || shared.default_tracer.clone(),
                |(_, tracer)| tracer.clone(),
            );
        }
        if by_service.len() >= SERVICES_MAX {
            return shared.default_tracer.clone();
        }
        // Built while the lock is held: it happens once per service name, and a second
        // builder racing for the same name would leave a provider (and a thread) behind.
        let entry = exporting.provider(service.as_str()).ok().map(|provider| {
            let tracer = provider.tracer(INSTRUMENTATION_SCOPE);
            (provider, tracer)
        });
        let tracer = entry.as_ref().map_or_else(
            || shared.default_tracer.clone(),
            |(_, tracer)| tracer.clone(),
        );
        by_service.insert(service.as_str().to_owned(), entry);
        tracer
    }

    /// Every provider: the default one and each service's.
    fn providers(&self) -> Vec<SdkTracerProvider> {
        let mut providers = vec![self.shared.default_provider.clone()];
        if let Ok(by_service) = self.shared.by_service.lock() {
            providers.extend(
                by_service
                    .values()
                    .flatten()
                    .map(|(provider, _)| provider.clone()),
            );
        }
        providers
    }

    /// Exports every finished span now, waiting for each provider's exporter.
    pub(crate) fn force_flush(&self) -> Result<(), String> {
        let errors: Vec<String> = self
            .providers()
            .iter()
            .filter_map(|provider| provider.force_flush().err().map(|e| e.to_string()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Shuts every provider down at once, each waiting at most `timeout`.
    pub(crate) fn shutdown(&self, timeout: Duration) -> Result<(), String> {
        let providers = self.providers();
        let errors: Vec<String> = std::thread::scope(|threads| {
            let handles: Vec<_> = providers
                .iter()
                .map(|provider| threads.spawn(move || provider.shutdown_with_timeout(timeout)))
                .collect();
            handles
                .into_iter()
                .filter_map(|handle| match handle.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(error)) => Some(error.to_string()),
                    Err(_) => Some("a provider's shutdown panicked".to_owned()),
                })
                .collect()
        });
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Tracer for ServiceTracer {
    type Span = opentelemetry_sdk::trace::Span;

    fn build_with_context(&self, builder: SpanBuilder, parent_cx: &Context) -> Self::Span {
        match parent_cx.get::<ServiceName>() {
            Some(service) => self
                .tracer_for(service)
                .build_with_context(builder, parent_cx),
            None => self
                .shared
                .default_tracer
                .build_with_context(builder, parent_cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::context::FutureExt as _;

    use super::*;

    #[tokio::test]
    async fn a_spawned_task_keeps_the_service_but_not_the_span_of_its_spawner() {
        // in_current_service carries the name into a task and leaves the caller's span behind.
        use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
        let span = SpanContext::new(
            opentelemetry::trace::TraceId::from(7_u128),
            opentelemetry::trace::SpanId::from(9_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let caller = scope("orders").with_remote_span_context(span);
        let seen = async {
            tokio::spawn(
                async { (current(), Context::current().has_active_span()) }.in_current_service(),
            )
            .await
            .expect("the task runs")
        }
        .with_context(caller)
        .await;
        assert_eq!(seen, (Some(ServiceName::new("orders")), false));
    }

    #[test]
    fn outside_any_scope_there_is_no_service() {
        // Code that never entered a scope is attributed to the process's own provider.
        assert_eq!(current(), None);
        assert_eq!(current_scope().get::<ServiceName>(), None);
    }
}
