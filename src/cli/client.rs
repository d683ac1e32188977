//! The client commands: each connects with the SDK, does one thing, and prints it. Human
//! notes (subscribed, caught up, resumed) go to stderr so stdout stays one line per event.

use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::Notify;

use super::{cloudevent, format, json};
use super::{EventArgs, PublishArgs, QueryArgs, ReplyArgs, TopicsArgs, TopologyArgs};
use super::{ServerArg, SubscribeArgs, CLI_SOURCE};
use crate::pb;
use crate::sdk::{
    Client, EventBuilder, ManualAck, Reply, ServeOptions, Start, SubscribeOptions, SubscriptionItem,
};

/// A client for `server`'s URLs with its TLS and token settings, as `source`.
pub(super) async fn connect(server: &ServerArg, source: &str) -> anyhow::Result<Client> {
    let mut builder = Client::builder(&server.server).source(source);
    if let Some(ca) = &server.tls_ca {
        builder = builder.tls_ca_file(ca);
    }
    match (&server.tls_cert, &server.tls_key) {
        (Some(cert), Some(key)) => builder = builder.tls_client_cert_files(cert, key),
        (None, None) => {}
        (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key (the certificate's key)"),
        (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert (the key's certificate)"),
    }
    if let Some(token) = server.token.as_deref().filter(|token| !token.is_empty()) {
        builder = builder.token(token);
    }
    builder.connect().await.map_err(|error| {
        if refused(&error) {
            // The whole chain on one line, then the hint.
            let mut line = String::new();
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
            while let Some(error) = cause {
                let text = error.to_string();
                if !line.contains(&text) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&text);
                }
                cause = error.source();
            }
            anyhow::anyhow!("{line}; is `eventbus serve` running at {}?", server.server)
        } else {
            error.into()
        }
    })
}

/// Whether a connection was refused (nothing listens at the address), anywhere in `error`'s
/// chain of causes.
fn refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// The data argument, or stdin when it is `-` or absent.
fn read_data(data: Option<&str>) -> anyhow::Result<Bytes> {
    match data {
        Some(data) if data != "-" => Ok(Bytes::copy_from_slice(data.as_bytes())),
        _ => {
            let mut buffer = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buffer)
                .context("cannot read the data from stdin")?;
            Ok(buffer.into())
        }
    }
}

fn apply(mut builder: EventBuilder, args: &EventArgs, data: Bytes) -> EventBuilder {
    builder = builder.data(data);
    if let Some(event_type) = &args.event_type {
        builder = builder.event_type(event_type);
    }
    if let Some(content_type) = &args.content_type {
        builder = builder.content_type(content_type);
    }
    if let Some(correlation_id) = &args.correlation_id {
        builder = builder.correlation_id(correlation_id);
    }
    for (key, value) in &args.attrs {
        builder = builder.attr(key, value);
    }
    builder
}

/// The event `publish --cloudevent` reads from a file or stdin.
fn read_cloudevent(args: &PublishArgs, path: &str) -> anyhow::Result<pb::Event> {
    let text = if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the CloudEvent from stdin")?;
        text
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
    };
    let mut event = cloudevent::from_json(&text, args.cloudevent_topic.as_deref())
        .with_context(|| format!("{path}: not an event to publish"))?;
    if event.source.is_empty() {
        event.source = args.event.source.clone();
    }
    Ok(event)
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let event = match &args.cloudevent {
        Some(path) => Some(read_cloudevent(&args, path)?),
        None => None,
    };
    let data = match event {
        Some(_) => Bytes::new(),
        None => read_data(args.data.as_deref())?,
    };
    let client = connect(&args.server, &args.event.source).await?;
    let event = match event {
        Some(event) => event,
        None => {
            // clap requires the topic unless --cloudevent is given.
            let topic = args.topic.clone().unwrap_or_default();
            apply(client.event(topic), &args.event, data).build()
        }
    };
    if args.count == 1 {
        let sequences = client.publish_batch(vec![event]).await?;
        println!("{}", sequences[0]);
        return Ok(());
    }
    let publisher = client.publisher();
    let mut pending = Vec::with_capacity(args.count as usize);
    for _ in 0..args.count {
        pending.push(publisher.submit(event.clone()).await?);
    }
    let mut stdout = std::io::stdout().lock();
    for sequence in pending {
        writeln!(stdout, "{}", sequence.await?)?;
    }
    drop(stdout);
    publisher.close().await?;
    Ok(())
}

pub async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        return Ok(());
    }
    let client = connect(&args.server, &args.subscriber).await?;
    let start = match args.since {
        Some(since) => Start::FromTime(std::time::SystemTime::now() - since),
        None => args.from.clone(),
    };
    let mut options = SubscribeOptions::new()
        .start(start.clone())
        .subscriber(&args.subscriber);
    if let Some(group) = &args.group {
        options = options.group(group);
    }
    if args.ack {
        options = options.manual_ack(ManualAck::default());
    }
    let mut subscription = client.subscribe_with(&args.pattern, options).await?;
    let subscribed = subscription.subscribed();
    eprintln!(
        "subscribed to {} (subscription {}, head sequence {})",
        subscribed.topic, subscribed.subscription_id, subscribed.head_sequence
    );
    let mut seen = 0;
    let mut left_out = args.json.then(LeftOut::default);
    while let Some(item) = subscription.next().await {
        match item? {
            SubscriptionItem::Event(event) => {
                print_event(&event, left_out.as_mut())?;
                seen += 1;
                if args.count.is_some_and(|count| seen >= count) {
                    break;
                }
            }
            SubscriptionItem::Delivery(delivery) => {
                if delivery.attempt > 1 {
                    eprintln!("delivery attempt {}", delivery.attempt);
                }
                print_event(&delivery.event, left_out.as_mut())?;
                delivery.ack().await?;
                seen += 1;
                if args.count.is_some_and(|count| seen >= count) {
                    break;
                }
            }
            SubscriptionItem::CaughtUp { sequence } => match &start {
                // The start is ahead of the log: nothing up to it is delivered (the proto's rule).
                Start::AfterSequence(after) if *after > sequence => eprintln!(
                    "caught up at sequence {sequence}; waiting for events after sequence {after}"
                ),
                Start::FromTime(time) if *time > std::time::SystemTime::now() => eprintln!(
                    "caught up at sequence {sequence}; waiting for events published from {}",
                    crate::timefmt::format_time(*time).unwrap_or_default()
                ),
                _ => eprintln!("caught up at sequence {sequence}; live from here"),
            },
            SubscriptionItem::Resumed {
                after_sequence: Some(after),
                ..
            } => eprintln!("stream broke; resumed after sequence {after}"),
            SubscriptionItem::Resumed { .. } => match &start {
                Start::Latest => eprintln!("stream broke; resumed live"),
                // Nothing delivered yet: the SDK asked for the same start again.
                _ => eprintln!("stream broke; resumed from the start position"),
            },
            SubscriptionItem::Interrupted { why, node } => {
                eprintln!("lost the bus ({why}); waiting for it at {node}")
            }
            SubscriptionItem::BusReset { last_seen, head } => eprintln!(
                "warning: the bus restarted without its log (last seen {last_seen}, new head \
                 {head}); starting over on the new log"
            ),
            SubscriptionItem::Gap { from, to } => {
                eprintln!("warning: events {from} to {to} are gone from the bus and were missed")
            }
            // A kind of item a later SDK adds (the enum is non-exhaustive): nothing to print.
            _ => {}
        }
    }
    Ok(())
}

/// Attribute names `--json` could not write, each noted on stderr once.
#[derive(Default)]
struct LeftOut(std::collections::BTreeSet<String>);

impl LeftOut {
    fn note(&mut self, event: &pb::Event) {
        for name in cloudevent::left_out_attributes(event) {
            if self.0.insert(name.to_owned()) {
                eprintln!(
                    "note: attribute {name:?} is not a valid CloudEvents attribute name (or is \
                     taken) and is left out of the JSON"
                );
            }
        }
    }
}

fn print_event(event: &pb::Event, json: Option<&mut LeftOut>) -> anyhow::Result<()> {
    let line = match json {
        Some(left_out) => {
            left_out.note(event);
            cloudevent::to_json(event).to_string()
        }
        None => format::event_line(event),
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

pub async fn query(args: QueryArgs) -> anyhow::Result<()> {
    let data = read_data(Some(&args.data))?;
    let client = connect(&args.server, &args.event.source).await?;
    let reply = apply(client.event(&args.topic), &args.event, data)
        .query(args.timeout)
        .await?;
    if args.json {
        LeftOut::default().note(&reply);
        println!("{}", cloudevent::to_json(&reply));
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&reply.data)?;
    if !reply.data.ends_with(b"\n") {
        stdout.write_all(b"\n")?;
    }
    Ok(())
}

pub async fn reply(args: ReplyArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        return Ok(());
    }
    let client = connect(&args.server, &args.source).await?;
    let fixed = args.data.map(Bytes::from);
    let answered = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let count = args.count;
    let handler = {
        let answered = answered.clone();
        let done = done.clone();
        move |query: pb::Event| {
            let reply = match &fixed {
                Some(data) => Reply::new(data.clone()),
                None => Reply::new(query.data.clone()).content_type(&query.data_content_type),
            };
            // The log line is the query as `subscribe` prints it.
            let line = format::event_line(&query);
            let answered = answered.clone();
            let done = done.clone();
            async move {
                println!("{line}");
                let total = answered.fetch_add(1, Ordering::SeqCst) + 1;
                if count.is_some_and(|count| total >= count) {
                    done.notify_one();
                }
                Ok::<_, std::convert::Infallible>(reply)
            }
        }
    };
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = done.notified() => {}
        }
    };
    let options = ServeOptions::default().group(&args.group);
    let responder = client.responder(&args.topic, options).await?;
    // Printed once the subscription is confirmed: queries asked from now on are answered.
    eprintln!(
        "answering queries on {} (group {})",
        args.topic,
        if args.group.is_empty() {
            "none"
        } else {
            &args.group
        }
    );
    responder.run(handler, shutdown).await?;
    Ok(())
}

pub async fn topics(args: TopicsArgs) -> anyhow::Result<()> {
    let client = connect(&args.server, CLI_SOURCE).await?;
    let topics = client.list_topics(args.pattern.as_deref()).await?;
    if args.json {
        println!("{}", json::topics(&topics));
    } else {
        print!("{}", format::topics_table(&topics));
    }
    Ok(())
}

pub async fn topology(args: TopologyArgs) -> anyhow::Result<()> {
    let client = connect(&args.server, CLI_SOURCE).await?;
    let graph = client.topology_bounded(args.max_edges).await?;
    let format = if args.json {
        format::TopologyFormat::Json
    } else {
        args.format
    };
    print!("{}", format::topology(&graph, format));
    if graph.truncated {
        eprintln!(
            "note: the graph was cut at {} edges; ask for more with --max-edges",
            graph.edges.len()
        );
    }
    if graph.untracked_events > 0 {
        eprintln!(
            "note: {} events went along edges the bus no longer tracks (--max-names)",
            graph.untracked_events
        );
    }
    Ok(())
}
