//! Deciding what a call's result means: for the breaker (did the callee fail?) and for retry
//! (is another attempt worth it?).

/// How the circuit breaker counts one finished call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The callee did its job (this includes answers that are the caller's fault, such as an
    /// HTTP 4xx).
    Success,
    /// The callee failed: it counts towards the failure rate.
    Failure,
    /// The call says nothing about the callee's health (for example it was cancelled): not
    /// counted at all.
    Ignored,
}

/// Classifies a call's result for the circuit breaker.
///
/// Implemented for every `Fn(Result<&T, &E>) -> Outcome`, so a closure is a classifier
/// (annotate its argument's type: `|result: Result<&Response, &Error>| ..`).
pub trait Classify<T, E> {
    /// What this result means for the callee's health.
    fn classify(&self, result: Result<&T, &E>) -> Outcome;
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(Result<&T, &E>) -> Outcome,
{
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        self(result)
    }
}

/// The default classifier: `Ok` is a success, `Err` a failure.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsAreFailures;

impl<T, E> Classify<T, E> for ErrorsAreFailures {
    #[inline]
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// An HTTP classifier: transport errors and 5xx answers are failures; 4xx answers are the
/// client's problem and count as successes of the upstream.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerErrors;

impl<B, E> Classify<http::Response<B>, E> for ServerErrors {
    fn classify(&self, result: Result<&http::Response<B>, &E>) -> Outcome {
        match result {
            Ok(response) if response.status().is_server_error() => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// Decides whether a finished attempt should be tried again.
///
/// Implemented for every `Fn(Result<&T, &E>) -> bool`.
pub trait RetryIf<T, E> {
    /// `true` when another attempt may succeed where this one did not.
    fn should_retry(&self, result: Result<&T, &E>) -> bool;
}

impl<T, E, F> RetryIf<T, E> for F
where
    F: Fn(Result<&T, &E>) -> bool,
{
    fn should_retry(&self, result: Result<&T, &E>) -> bool {
        self(result)
    }
}

/// The default retry predicate: retry every `Err`, never an `Ok`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryErrors;

impl<T, E> RetryIf<T, E> for RetryErrors {
    #[inline]
    fn should_retry(&self, result: Result<&T, &E>) -> bool {
        result.is_err()
    }
}

/// An HTTP retry predicate: transport errors and the statuses that mean "try again"
/// (502, 503, 504, and 429) are retried; every other answer is final.
///
/// Whether the request itself may be repeated (an idempotent method) is the caller's decision:
/// wrap only such requests in a retry.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryTransient;

impl<B, E> RetryIf<http::Response<B>, E> for RetryTransient {
    fn should_retry(&self, result: Result<&http::Response<B>, &E>) -> bool {
        match result {
            Ok(response) => matches!(response.status().as_u16(), 429 | 502 | 503 | 504),
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_do_not_count_against_the_upstream() {
        let not_found: Result<http::Response<()>, ()> = Ok(http::Response::builder()
            .status(404)
            .body(())
            .expect("valid response"));
        let unavailable: Result<http::Response<()>, ()> = Ok(http::Response::builder()
            .status(503)
            .body(())
            .expect("valid response"));
        assert_eq!(ServerErrors.classify(not_found.as_ref()), Outcome::Success);
        assert_eq!(
            ServerErrors.classify(unavailable.as_ref()),
            Outcome::Failure
        );
        assert_eq!(
            ServerErrors.classify(Err::<&http::Response<()>, _>(&())),
            Outcome::Failure
        );
    }

    #[test]
    fn transient_statuses_are_retried_and_others_are_final() {
        for (status, retry) in [
            (200, false),
            (404, false),
            (500, false),
            (503, true),
            (429, true),
        ] {
            let result: Result<http::Response<()>, ()> = Ok(http::Response::builder()
                .status(status)
                .body(())
                .expect("valid response"));
            assert_eq!(
                RetryTransient.should_retry(result.as_ref()),
                retry,
                "status {status}"
            );
        }
    }
}
