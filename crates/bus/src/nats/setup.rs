//! Connecting: the bus, DLQ and park streams and their limits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, stream};

use super::{Inner, NatsBus, NatsBusConfig, PARTITIONS_MAX, REQUEST_TIMEOUT, bounded};
use crate::error::BusError;

/// Creates the bus stream with `wanted`'s limits, or brings an existing one (made by an older
/// version or another configuration) to them: a stream left with an old age limit would keep
/// dropping unconsumed messages.
async fn ensure_limits(
    context: &jetstream::Context,
    wanted: stream::Config,
) -> Result<stream::Stream, BusError> {
    let mut stream = bounded(context.get_or_create_stream(wanted.clone())).await?;
    let existing = stream.cached_info().config.clone();
    let differs = existing.max_age != wanted.max_age
        || existing.max_bytes != wanted.max_bytes
        || existing.discard != wanted.discard
        || existing.max_message_size != wanted.max_message_size;
    if differs {
        tracing::warn!(
            stream = %wanted.name,
            old_max_age = ?existing.max_age,
            new_max_age = ?wanted.max_age,
            old_max_bytes = existing.max_bytes,
            new_max_bytes = wanted.max_bytes,
            "updating the bus stream's limits"
        );
        let updated = stream::Config {
            max_age: wanted.max_age,
            max_bytes: wanted.max_bytes,
            discard: wanted.discard,
            max_message_size: wanted.max_message_size,
            ..existing
        };
        bounded(context.update_stream(&updated))
            .await
            .map_err(|error| {
                BusError::InvalidConfig(format!(
                    "the stream {} exists with other limits and could not be updated \
                     (update or recreate it by hand): {error}",
                    wanted.name
                ))
            })?;
        bounded(stream.info()).await?;
    }
    Ok(stream)
}

impl NatsBus {
    /// Connects and creates (or reuses) the bus and DLQ streams.
    ///
    /// An existing bus stream whose age limit, size limit or discard policy differ from
    /// `config` is updated to them (logged as a warning); when the server refuses, this is
    /// [`BusError::InvalidConfig`] naming the stream.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] for a bad prefix or partition count; the server is
    /// unreachable or refuses the streams.
    pub async fn connect(config: NatsBusConfig) -> Result<Self, BusError> {
        crate::gauges::describe();
        let prefix_ok = !config.prefix.is_empty()
            && config.prefix.len() <= 64
            && config
                .prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !prefix_ok {
            return Err(BusError::InvalidConfig(format!(
                "nats prefix must be 1 to 64 of [a-z0-9_], got {:?}",
                config.prefix
            )));
        }
        if !(1..=PARTITIONS_MAX).contains(&config.partitions) {
            return Err(BusError::InvalidConfig(format!(
                "partitions must be 1..={PARTITIONS_MAX}"
            )));
        }
        let client = bounded(
            async_nats::ConnectOptions::new()
                .connection_timeout(REQUEST_TIMEOUT)
                .connect(config.url.as_str()),
        )
        .await?;
        let context = jetstream::new(client.clone());
        let upper = config.prefix.to_ascii_uppercase();
        let max_message_size =
            i32::try_from(config.message_bytes_max.saturating_add(4096)).unwrap_or(i32::MAX);
        let bus_config = stream::Config {
            name: format!("{upper}_BUS"),
            subjects: vec![format!("{}.bus.>", config.prefix)],
            storage: stream::StorageType::File,
            max_message_size,
            max_age: config.max_age,
            max_bytes: config
                .max_bytes
                .map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX)),
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let bus_stream = ensure_limits(&context, bus_config).await?;
        if config.max_age.is_zero() {
            tracing::debug!(stream = %format!("{upper}_BUS"), "bus stream without an age limit");
        } else {
            tracing::warn!(
                stream = %format!("{upper}_BUS"),
                max_age = ?config.max_age,
                "the bus stream drops messages at this age even if a group has not consumed them"
            );
        }
        metrics::gauge!("trellis_bus_stream_max_age_seconds").set(config.max_age.as_secs_f64());
        let dlq_stream = bounded(context.get_or_create_stream(stream::Config {
            name: format!("{upper}_DLQ"),
            subjects: vec![format!("{}.dlq.>", config.prefix)],
            storage: stream::StorageType::File,
            max_message_size: max_message_size.saturating_add(16 * 1024),
            ..Default::default()
        }))
        .await?;
        // Work-queue retention: a parked message is removed once its group acked it, so "the
        // lane has a message" means "the subject is parked".
        let park_stream = bounded(context.get_or_create_stream(stream::Config {
            name: format!("{upper}_PARK"),
            subjects: vec![format!("{}.park.>", config.prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_message_size: max_message_size.saturating_add(1024),
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        }))
        .await?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                context,
                prefix: config.prefix,
                bus_stream,
                dlq_stream,
                park_stream,
                partitions: config.partitions,
                message_bytes_max: config.message_bytes_max,
                group_views: Mutex::new(HashMap::new()),
                lane_first_failures: Mutex::new(HashMap::new()),
            }),
        })
    }
}
