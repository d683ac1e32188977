//! Encoding and decoding one event: the file store's record codec, protobuf on the wire, and the
//! conversion between the wire type and the domain type at the service boundary.

use std::hint::black_box;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eventbus::event::{Event, StoredEvent};
use eventbus::pb;
use eventbus::service::convert;
use eventbus::store::codec;
use eventbus::topic::Topic;
use prost::Message as _;

/// A typical event: a 128-byte payload, a correlation id and one attribute.
fn stored() -> StoredEvent {
    StoredEvent::new(
        123_456,
        SystemTime::now(),
        Event {
            id: "0192c4a8-7b3e-7cc1-9c55-3f2b1e4d5a6b".into(),
            source: Arc::from("order-service"),
            event_type: "order.created".into(),
            topic: Topic::parse("order.created").expect("a valid topic"),
            time: Some(SystemTime::now()),
            data_content_type: "application/json".into(),
            data: Bytes::from(vec![b'x'; 128]),
            attributes: [(
                "traceparent".to_string(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string(),
            )]
            .into_iter()
            .collect(),
            correlation_id: "c-42".into(),
            causation_id: String::new(),
            reply_to: None,
        },
    )
}

fn bench(c: &mut Criterion) {
    let event = stored();
    let mut record = Vec::new();
    codec::encode(&event, &mut record);
    let wire = convert::event_to_pb(&event);
    let wire_bytes = wire.encode_to_vec();

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("store record encode", |b| {
        let mut out = Vec::with_capacity(record.len());
        b.iter(|| {
            out.clear();
            codec::encode(black_box(&event), &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("store record decode", |b| {
        b.iter(|| black_box(codec::decode(black_box(&record)).expect("a valid record")))
    });
    group.bench_function("pb encode", |b| {
        let mut out = Vec::with_capacity(wire_bytes.len());
        b.iter(|| {
            out.clear();
            black_box(&wire).encode(&mut out).expect("room");
            black_box(out.len())
        })
    });
    group.bench_function("pb decode", |b| {
        b.iter(|| black_box(pb::Event::decode(black_box(&wire_bytes[..])).expect("valid")))
    });
    group.bench_function("convert pb to domain (publish)", |b| {
        b.iter(|| {
            black_box(
                convert::event_from_pb(
                    black_box(wire.clone()),
                    convert::EventPath::Named("event"),
                    16 * 1024 * 1024,
                )
                .expect("valid"),
            )
        })
    });
    group.bench_function("convert domain to pb (deliver)", |b| {
        b.iter(|| black_box(convert::event_to_pb(black_box(&event))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
