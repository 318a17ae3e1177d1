//! The bus's message envelope, decoded from arbitrary bytes as every backend decodes what it
//! reads (`serde_json::from_slice::<Envelope>`).
//!
//! Properties: never panics; a decoded envelope serialises and decodes back to an equal one
//! (what a consumer sees is what the producer sent, after any number of hops: the relay, a
//! redrive); its accessors (`redrive_count`, `trace_map`, `decode`) never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_bus::Envelope;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = serde_json::from_slice::<Envelope>(data) else {
        return;
    };
    let bytes = serde_json::to_vec(&envelope).expect("a decoded envelope serialises");
    let again: Envelope = serde_json::from_slice(&bytes).expect("its own bytes decode");
    assert_eq!(again, envelope, "the envelope changed in one round trip");
    let _ = envelope.redrive_count();
    let _ = envelope.trace_map();
    let _ = envelope.decode::<serde_json::Value>();
});
