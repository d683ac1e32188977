//! Appending to the file store's active segment, without fsync (`FsyncPolicy::Never`), so the
//! numbers show the store's own work (encoding, CRC, the write, the cache) and not the disk's.

use std::hint::black_box;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use eventbus::event::Event;
use eventbus::store::{FileStore, FileStoreConfig, FsyncPolicy, Store};
use eventbus::topic::Topic;

fn event() -> Event {
    Event {
        id: "0192c4a8-7b3e-7cc1-9c55-3f2b1e4d5a6b".into(),
        source: Arc::from("order-service"),
        event_type: "order.created".into(),
        topic: Topic::parse("order.created").expect("a valid topic"),
        time: None,
        data_content_type: String::new(),
        data: Bytes::from(vec![b'x'; 128]),
        attributes: Default::default(),
        correlation_id: String::new(),
        causation_id: String::new(),
        reply_to: None,
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = FileStore::open(FileStoreConfig {
        fsync: FsyncPolicy::Never,
        // Small retention so a long run does not fill the disk: whole segments are dropped.
        segment_bytes: 16 * 1024 * 1024,
        retention_max_bytes: 64 * 1024 * 1024,
        ..FileStoreConfig::new(dir.path())
    })
    .expect("the store opens");
    let mut group = c.benchmark_group("segment append (fsync never)");
    for batch in [1usize, 256] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("{batch} events of 128 B"), |b| {
            b.iter_batched(
                || vec![event(); batch],
                |events| black_box(store.append(events, SystemTime::now()).expect("append")),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
    store.close();
}

criterion_group!(benches, bench);
criterion_main!(benches);
