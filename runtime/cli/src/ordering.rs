//! The admin side of ordered `stream` triggers (`patchbay fn deploy --ordered`): the source
//! that copies a function's input into PATCHBAY_ORDERED, partitioned by key, and the
//! partition consumers the runtime nodes pull from. The scheme itself (names, subjects,
//! transform) is [`patchbay_registry::ordering`]; the node's loops are in the host.
//!
//! PATCHBAY_ORDERED is declared in deploy/streams.toml; the bootstrap manages its limits
//! and subjects but leaves `sources` alone, so running `patchbay up` again keeps what
//! `fn deploy` added here. A source belongs to a function by its transform destination
//! (`patchbay.v1.ordered.<name>.…`). Two deploys changing sources at the same instant can
//! overwrite each other (a stream update is not compare-and-set); deploys are operator
//! actions, and re-running the deploy repairs it.

use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer, stream};
use futures::TryStreamExt as _;
use patchbay_bus::{Bus, Token};
use patchbay_registry::ordering::{
    self, ORDERED_STREAM, Ordered, function_filter, is_function_destination,
    parse_partition_consumer, partition_consumer, partition_filter,
};

/// Make `name`'s partitioned copy of `input` (events matching `filter`, without the
/// prefix) and its partition consumers match `ordered`. Idempotent: an unchanged trigger
/// keeps its source (and its position) as it is.
///
/// A new source starts with the events stored after this call, not the input's history.
/// Changing the filter or the partition count is refused while events still wait in the
/// old partitions, because they would be handled out of order with the re-partitioned ones.
pub async fn ensure(
    bus: &Bus,
    name: &Token,
    input: &str,
    filter: &str,
    ordered: Ordered,
    ack_wait: Duration,
    max_deliver: u32,
) -> anyhow::Result<()> {
    let js = bus.jetstream();
    let subjects = bus.subjects();
    let mut input_stream = js.get_stream(input).await.with_context(|| {
        format!("stream {input} does not exist (declare it in deploy/streams.toml)")
    })?;
    let copies = ordered_stream(&js).await?;
    let (src, dest) = ordering::source_transform(subjects, name, filter, ordered);
    let wanted = stream::Source {
        name: input.to_owned(),
        subject_transforms: vec![stream::SubjectTransform {
            source: src,
            destination: dest,
        }],
        ..Default::default()
    };
    let mut config = copies.cached_info().config.clone();
    let mut sources = config.sources.take().unwrap_or_default();
    let (mine, others): (Vec<_>, Vec<_>) = sources
        .drain(..)
        .partition(|s| is_function_source(bus, name, s));
    let unchanged = matches!(mine.as_slice(), [only]
        if only.name == wanted.name && only.subject_transforms == wanted.subject_transforms);
    if !unchanged {
        if !mine.is_empty() {
            let waiting = waiting(&copies, &function_filter(subjects, name)).await?;
            if waiting > 0 {
                bail!(
                    "function {name}: {waiting} event(s) still wait in the partitions of its \
                     ordered trigger; changing its filter or partition count now would handle \
                     them out of order. Let them drain (or `patchbay fn rm {name}`) first"
                );
            }
        }
        let next = input_stream
            .info()
            .await
            .with_context(|| format!("failed to read stream {input}"))?
            .state
            .last_sequence
            + 1;
        sources = others;
        sources.push(stream::Source {
            start_sequence: Some(next),
            ..wanted
        });
        config.sources = Some(sources);
        js.update_stream(config).await.with_context(|| {
            format!("failed to make {ORDERED_STREAM} source {input} for function {name}")
        })?;
    }
    for partition in 0..ordered.partitions {
        let durable = partition_consumer(name, partition);
        copies
            .create_consumer(consumer::pull::Config {
                durable_name: Some(durable.clone()),
                description: Some(format!(
                    "ordered trigger of function {name}, partition {partition}"
                )),
                filter_subject: partition_filter(subjects, name, partition),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_deliver: i64::from(max_deliver),
                // The whole point: the next event of a partition is delivered only once the
                // previous one is acked or terminated, whichever node holds it.
                max_ack_pending: 1,
                ..Default::default()
            })
            .await
            .with_context(|| format!("failed to create consumer {durable} on {ORDERED_STREAM}"))?;
    }
    delete_partition_consumers(&copies, name, |p| p >= ordered.partitions).await
}

/// Remove everything [`ensure`] made for `name`: its sources, its partition consumers and
/// the copies not handled yet. Nothing to do (and no error) when PATCHBAY_ORDERED does not
/// exist or holds nothing of `name`.
pub async fn remove(bus: &Bus, name: &Token) -> anyhow::Result<()> {
    let js = bus.jetstream();
    let Ok(copies) = js.get_stream(ORDERED_STREAM).await else {
        return Ok(());
    };
    let mut config = copies.cached_info().config.clone();
    if let Some(sources) = config.sources.as_mut() {
        let before = sources.len();
        sources.retain(|s| !is_function_source(bus, name, s));
        if sources.len() != before {
            if sources.is_empty() {
                config.sources = None;
            }
            js.update_stream(config).await.with_context(|| {
                format!("failed to remove function {name}'s source from {ORDERED_STREAM}")
            })?;
        }
    }
    delete_partition_consumers(&copies, name, |_| true).await?;
    let filter = function_filter(bus.subjects(), name);
    if waiting(&copies, &filter).await? > 0 {
        copies
            .purge()
            .filter(filter)
            .await
            .with_context(|| format!("failed to purge function {name}'s ordered copies"))?;
    }
    Ok(())
}

async fn ordered_stream(js: &jetstream::Context) -> anyhow::Result<stream::Stream> {
    js.get_stream(ORDERED_STREAM).await.with_context(|| {
        format!(
            "stream {ORDERED_STREAM} does not exist: run `patchbay up` (or `patchbay \
             bootstrap`) to create it from deploy/streams.toml"
        )
    })
}

fn is_function_source(bus: &Bus, name: &Token, source: &stream::Source) -> bool {
    source
        .subject_transforms
        .iter()
        .any(|t| is_function_destination(bus.subjects(), name, &t.destination))
}

/// How many copies under `filter` wait in PATCHBAY_ORDERED.
async fn waiting(copies: &stream::Stream, filter: &str) -> anyhow::Result<usize> {
    let counts: Vec<(String, usize)> = copies
        .info_with_subjects(filter)
        .await
        .context("failed to read the ordered stream")?
        .try_collect()
        .await
        .context("failed to read the ordered stream")?;
    Ok(counts.iter().map(|(_, n)| n).sum())
}

/// Delete `name`'s partition consumers whose partition `doomed` picks.
async fn delete_partition_consumers(
    copies: &stream::Stream,
    name: &Token,
    doomed: impl Fn(u32) -> bool,
) -> anyhow::Result<()> {
    let names: Vec<String> = copies
        .consumer_names()
        .try_collect()
        .await
        .context("failed to list the ordered stream's consumers")?;
    for consumer in names {
        if parse_partition_consumer(name, &consumer).is_some_and(&doomed) {
            copies
                .delete_consumer(&consumer)
                .await
                .with_context(|| format!("failed to delete consumer {consumer}"))?;
        }
    }
    Ok(())
}
