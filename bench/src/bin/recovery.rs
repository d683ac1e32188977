//! Recovery time of the file store: writes a log of the given size (default 1 GiB) with the
//! store itself, then times how long `FileStore::open` takes to scan, check and index it, next to
//! a plain sequential read of the same files in the same run (the disk's floor).
//!
//! `cargo run --release -p eventbus-bench --bin recovery -- [--gib 1] [--event-bytes 1024]`

use std::io::Read as _;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use clap::Parser;
use eventbus::event::Event;
use eventbus::store::{FileStore, FileStoreConfig, FsyncPolicy, Store};
use eventbus::topic::Topic;

#[derive(Parser)]
struct Args {
    /// Size of the log to write and recover, in GiB.
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// Data bytes per event.
    #[arg(long, default_value_t = 1024)]
    event_bytes: usize,
    /// Where to write it (a temporary directory by default).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let temporary = tempfile::tempdir()?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_owned());
    let target = (args.gib * 1024.0 * 1024.0 * 1024.0) as u64;
    let config = || FileStoreConfig {
        fsync: FsyncPolicy::Never,
        ..FileStoreConfig::new(&dir)
    };

    let written = Instant::now();
    let events = {
        let store = FileStore::open(config())?;
        let topic = Topic::parse("bench.recovery")?;
        let source: Arc<str> = Arc::from("recovery-bench");
        let data = bytes::Bytes::from(vec![b'x'; args.event_bytes]);
        let per_batch = 256;
        let mut bytes = 0u64;
        let mut count = 0u64;
        while bytes < target {
            let batch = (0..per_batch)
                .map(|i| Event {
                    id: format!("e{count}-{i}"),
                    source: source.clone(),
                    event_type: "bench".into(),
                    topic: topic.clone(),
                    time: None,
                    data_content_type: String::new(),
                    data: data.clone(),
                    attributes: Default::default(),
                    correlation_id: String::new(),
                    causation_id: String::new(),
                    reply_to: None,
                })
                .collect();
            store.append(batch, SystemTime::now())?;
            count += per_batch;
            bytes += per_batch * (args.event_bytes as u64 + 80);
        }
        store.close();
        count
    };
    let on_disk: u64 = std::fs::read_dir(dir.join("log"))?
        .map(|entry| entry.map(|e| e.metadata().map(|m| m.len()).unwrap_or(0)))
        .sum::<Result<u64, _>>()?;
    eprintln!(
        "wrote {events} events, {:.2} GiB, in {:.1} s",
        on_disk as f64 / (1u64 << 30) as f64,
        written.elapsed().as_secs_f64()
    );

    // Floor: read every segment sequentially, as recovery must (page cache state is the same
    // for both: the files were just written).
    let floor = Instant::now();
    let mut buffer = vec![0u8; 1 << 20];
    let mut read = 0u64;
    for entry in std::fs::read_dir(dir.join("log"))? {
        let mut file = std::fs::File::open(entry?.path())?;
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            read += n as u64;
        }
    }
    let floor = floor.elapsed();

    let recovery = Instant::now();
    let store = FileStore::open(config())?;
    let recovery = recovery.elapsed();
    assert_eq!(store.bounds().head, events, "recovery found every event");

    let gib = on_disk as f64 / (1u64 << 30) as f64;
    println!("| log | events | recovery | recovery rate | plain read (floor) | ratio |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {gib:.2} GiB | {events} | {:.2} s | {:.0} MiB/s | {:.2} s ({:.0} MiB/s) | {:.1}x |",
        recovery.as_secs_f64(),
        on_disk as f64 / (1 << 20) as f64 / recovery.as_secs_f64(),
        floor.as_secs_f64(),
        read as f64 / (1 << 20) as f64 / floor.as_secs_f64(),
        recovery.as_secs_f64() / floor.as_secs_f64()
    );
    Ok(())
}
