//! The simulated network between the orders process and the participants: a tower service
//! that tonic's generated clients use as their channel. Each call's fate is drawn from the
//! run's RNG: refused, delayed, delivered twice, its answer lost (reset or silence until the
//! client's timeout), or the participant crashing around it. Deliveries travel as tasks of
//! their own, so a request outlives the caller that gave up on it (and the orchestrator that
//! crashed) and may reach the participant after later requests: reordering.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::BodyExt as _;
use tokio::sync::oneshot;

use crate::host::{Answer, Crash, Host, Service, Wire};
use crate::rng::{self, SharedRng};
use crate::trace::{SimClock, Trace};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a production gRPC channel waits for one call (trellis-service's
/// `GrpcClientConfig::default().request_timeout`).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Fault rates of the network, per call (drawn once per seed).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NetFaults {
    /// Refused at once (connection refused): nothing delivered.
    pub(crate) refuse: f64,
    /// Delivered, answer lost.
    pub(crate) lose_answer: f64,
    /// Delivered twice.
    pub(crate) duplicate: f64,
    /// Longest ordinary one-way delay.
    pub(crate) delay_max: Duration,
    /// Share of requests held far longer (up to 30 s: past the client's timeout).
    pub(crate) stall: f64,
    /// The participant crashes before or after handling the request.
    pub(crate) crash: f64,
}

/// The network: the host the participants run on, and the faults.
#[derive(Debug)]
pub(crate) struct Net {
    pub(crate) host: Host,
    pub(crate) rng: SharedRng,
    pub(crate) trace: Trace,
    pub(crate) clock: SimClock,
    pub(crate) faults: Mutex<NetFaults>,
    calls: AtomicU64,
    in_flight: Arc<AtomicUsize>,
}

/// The fate of one call, drawn when it is sent.
#[derive(Debug, Clone, Copy)]
struct Fate {
    refuse: bool,
    delay: Duration,
    answer_delay: Duration,
    duplicate: Option<Duration>,
    lose: bool,
    hang: bool,
    crash: Crash,
}

impl Fate {
    fn draw(rng: &SharedRng, faults: &NetFaults) -> Self {
        rng::with(rng, |r| {
            let delay = |r: &mut crate::rng::Rng| {
                if r.chance(faults.stall) {
                    Duration::from_millis(r.range(5_000, 30_000))
                } else {
                    Duration::from_millis(r.range(0, faults.delay_max.as_millis() as u64))
                }
            };
            let refuse = r.chance(faults.refuse);
            let first = delay(r);
            let answer_delay =
                Duration::from_millis(r.range(0, faults.delay_max.as_millis() as u64));
            let duplicate = r.chance(faults.duplicate).then(|| delay(r));
            let lose = r.chance(faults.lose_answer);
            let hang = r.chance(0.5);
            let crash = if r.chance(faults.crash) {
                if r.chance(0.5) {
                    Crash::Before
                } else {
                    Crash::After
                }
            } else {
                Crash::No
            };
            Self {
                refuse,
                delay: first,
                answer_delay,
                duplicate,
                lose,
                hang,
                crash,
            }
        })
    }

    fn describe(&self) -> String {
        if self.refuse {
            return "refused".to_owned();
        }
        let mut out = format!("delay {} ms", self.delay.as_millis());
        if let Some(d) = self.duplicate {
            out.push_str(&format!(", duplicate after {} ms", d.as_millis()));
        }
        match self.crash {
            Crash::Before => out.push_str(", participant crashes before handling"),
            Crash::After => out.push_str(", participant crashes after handling"),
            Crash::No => {}
        }
        if self.lose {
            out.push_str(if self.hang {
                ", answer lost (silence)"
            } else {
                ", answer lost (reset)"
            });
        } else {
            out.push_str(&format!(
                ", answer after {} ms",
                self.answer_delay.as_millis()
            ));
        }
        out
    }
}

/// The order id of a request: field 1 (a string) of every participant request, after the
/// 5-byte gRPC frame header.
fn order_of(body: &Bytes) -> String {
    let message = body.get(5..).unwrap_or_default();
    if message.first() == Some(&0x0A)
        && let Some(&len) = message.get(1)
        && len < 0x80
        && let Some(id) = message.get(2..2 + len as usize)
    {
        return String::from_utf8_lossy(id).into_owned();
    }
    "?".to_owned()
}

/// Counts a delivery in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Net {
    pub(crate) fn new(
        host: Host,
        rng: SharedRng,
        trace: Trace,
        clock: SimClock,
        faults: NetFaults,
    ) -> Self {
        Self {
            host,
            rng,
            trace,
            clock,
            faults: Mutex::new(faults),
            calls: AtomicU64::new(0),
            in_flight: Arc::default(),
        }
    }

    /// Deliveries still travelling.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn set_faults(&self, faults: NetFaults) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults;
    }

    /// Calls `service` without faults (set-up).
    pub(crate) fn call_direct(&self, service: Service, wire: Wire) -> Option<Answer> {
        self.clock.sync();
        self.host.call(service, wire, Crash::No)
    }

    async fn send(
        self: Arc<Self>,
        service: Service,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<Reply>, BoxError> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await?.to_bytes();
        let wire = Wire {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body,
        };
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let method = wire.uri.path().rsplit('/').next().unwrap_or("?").to_owned();
        let label = format!(
            "#{call} {}.{method} {}",
            service.name(),
            order_of(&wire.body)
        );
        let faults = *self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let fate = Fate::draw(&self.rng, &faults);
        self.trace.now(format!("net {label}: {}", fate.describe()));
        if fate.refuse {
            return Err("connection refused (simulated)".into());
        }
        let (answer_tx, answer_rx) = oneshot::channel::<Answer>();
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        tokio::spawn(self.clone().deliver(
            label.clone(),
            service,
            wire.clone(),
            fate.delay,
            fate.crash,
            (!fate.lose).then_some((answer_tx, fate.answer_delay)),
        ));
        if let Some(delay) = fate.duplicate {
            tokio::spawn(self.clone().deliver(
                format!("{label} (duplicate)"),
                service,
                wire,
                delay,
                Crash::No,
                None,
            ));
        }
        let waited = tokio::time::timeout_at(deadline, async {
            match answer_rx.await {
                Ok(answer) => Ok(answer),
                Err(_) if fate.hang => std::future::pending().await,
                Err(_) => Err::<Answer, BoxError>("connection reset (simulated)".into()),
            }
        })
        .await;
        let answer = match waited {
            Ok(answer) => answer?,
            Err(_) => return Err("timed out (simulated)".into()),
        };
        Ok(answer.into_response())
    }

    async fn deliver(
        self: Arc<Self>,
        label: String,
        service: Service,
        wire: Wire,
        delay: Duration,
        crash: Crash,
        answer: Option<(oneshot::Sender<Answer>, Duration)>,
    ) {
        let _in_flight = InFlight::new(&self.in_flight);
        tokio::time::sleep(delay).await;
        self.clock.sync();
        let got = self.host.call(service, wire, crash);
        let outcome = match (&got, crash) {
            (_, Crash::Before) => "participant crashed before handling; restarted".to_owned(),
            (_, Crash::After) => {
                "handled, participant crashed before answering; restarted".to_owned()
            }
            (None, _) => "no answer (participant crashed)".to_owned(),
            (Some(a), _) => format!("handled, grpc-status {}", a.grpc_status()),
        };
        self.trace.log(format!("net {label} delivered: {outcome}"));
        if let (Some(got), Some((tx, after))) = (got, answer) {
            tokio::time::sleep(after).await;
            let _ = tx.send(got);
        }
    }
}

/// A channel to one participant over the simulated network (what tonic's clients wrap).
#[derive(Debug, Clone)]
pub(crate) struct Channel {
    net: Arc<Net>,
    service: Service,
    /// Without faults (an operator's set-up calls).
    clean: bool,
}

impl Channel {
    pub(crate) fn new(net: Arc<Net>, service: Service) -> Self {
        Self {
            net,
            service,
            clean: false,
        }
    }

    pub(crate) fn clean(net: Arc<Net>, service: Service) -> Self {
        Self {
            net,
            service,
            clean: true,
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<Reply>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (net, service) = (self.net.clone(), self.service);
        if self.clean {
            return Box::pin(async move {
                let (parts, body) = request.into_parts();
                let wire = Wire {
                    method: parts.method,
                    uri: parts.uri,
                    headers: parts.headers,
                    body: body.collect().await?.to_bytes(),
                };
                let answer = net
                    .call_direct(service, wire)
                    .ok_or("the participant did not answer")?;
                Ok(answer.into_response())
            });
        }
        Box::pin(net.send(service, request))
    }
}

impl Answer {
    fn into_response(self) -> http::Response<Reply> {
        let mut response = http::Response::new(Reply {
            data: Some(self.body),
            trailers: self.trailers,
        });
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

/// An answer's body as the client reads it: the data, then the trailers.
#[derive(Debug)]
pub(crate) struct Reply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take()
            && !data.is_empty()
        {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }
}
