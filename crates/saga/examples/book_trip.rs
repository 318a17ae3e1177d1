//! Books a trip whose car rental fails: the hotel and the flight are compensated in reverse
//! order, and the saga log (a SQLite file in a temporary directory) shows every transition.
//!
//! Run with `cargo run -p trellis-saga --example book_trip`.

use serde::{Deserialize, Serialize};
use trellis_saga::{SagaDefinition, SagaEngine, SqliteSagaStore, Step, StepContext, StepError};

#[derive(Debug, Serialize, Deserialize)]
struct Trip {
    traveller: String,
    bookings: Vec<String>,
}

/// A step that books `what`, printing the idempotency key a real participant would receive.
fn booking(what: &'static str) -> Step<Trip> {
    Step::new(what, move |trip: &mut Trip, step: StepContext| {
        Box::pin(async move {
            println!(
                "book {what} for {} (key {})",
                trip.traveller,
                step.idempotency_key()
            );
            trip.bookings.push(what.to_owned());
            Ok(())
        })
    })
    .compensate(move |trip: &mut Trip, step: StepContext| {
        Box::pin(async move {
            println!("cancel {what} (key {})", step.idempotency_key());
            trip.bookings.retain(|booking| booking != what);
            Ok(())
        })
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("sagas.db").display());
    let store = SqliteSagaStore::open(&url).await?;

    let definition = SagaDefinition::builder("book-trip", 1)
        .step(booking("flight"))
        .step(booking("hotel"))
        .step(Step::new("car", |_trip: &mut Trip, _step: StepContext| {
            Box::pin(async move { Err(StepError::permanent("no cars left")) })
        }))
        .build()?;
    let engine = SagaEngine::new(store).register(definition);
    let report = engine.recover().await?;
    println!("recovered {} sagas", report.resumed.len());

    let trip = Trip {
        traveller: "ada".to_owned(),
        bookings: Vec::new(),
    };
    let id = engine.start("book-trip", &trip).await?;
    let instance = engine.load(id).await?;
    println!("saga {id} ended {:?}", instance.status);
    for record in &instance.records {
        println!("  {:>2} {:?}", record.seq, record.transition);
    }
    Ok(())
}
