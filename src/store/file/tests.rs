use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::topic::Topic;

fn event(topic: &str, data: &[u8]) -> Event {
    Event {
        id: "id".into(),
        source: Arc::from("test"),
        event_type: topic.into(),
        topic: Topic::parse(topic).unwrap(),
        time: None,
        data_content_type: String::new(),
        data: bytes::Bytes::copy_from_slice(data),
        attributes: HashMap::new(),
        correlation_id: String::new(),
        causation_id: String::new(),
        reply_to: None,
    }
}

fn config(dir: &Path) -> FileStoreConfig {
    FileStoreConfig {
        segment_bytes: 4096,
        ..FileStoreConfig::new(dir)
    }
}

fn fill(store: &FileStore, count: usize) {
    for i in 0..count {
        let data = format!("event-{i}");
        store
            .append(vec![event("a.b", data.as_bytes())], SystemTime::now())
            .unwrap();
    }
}

fn sequences(events: &[SharedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

fn all(store: &FileStore) -> Vec<SharedEvent> {
    store.read_after(0, usize::MAX).unwrap()
}

fn wait_durable(store: &FileStore, sequence: u64) {
    let receiver = store.durable_head().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while *receiver.borrow() < sequence {
        assert!(std::time::Instant::now() < deadline, "not durable in time");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn survives_a_reopen_across_segment_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let store = FileStore::open(config(dir.path())).unwrap();
        fill(&store, 300);
        wait_durable(&store, 300);
        all(&store)
    };
    assert!(segment_paths(&dir.path().join("log")).unwrap().len() > 3);
    let store = FileStore::open(config(dir.path())).unwrap();
    let reread = all(&store);
    assert_eq!(reread, written);
    assert_eq!(sequences(&reread), (1..=300).collect::<Vec<_>>());
    assert_eq!(
        store.bounds(),
        LogBounds {
            oldest: Some(1),
            head: 300,
            newest_dropped_time: None,
        }
    );
    assert_eq!(store.held_counts()["a.b"], 300);
    // New appends go on from the recovered head.
    let next = store
        .append(vec![event("c", b"")], SystemTime::now())
        .unwrap();
    assert_eq!(next[0].sequence, 301);
}

#[test]
fn reads_from_disk_and_cache_give_the_same_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(FileStoreConfig {
        cache_bytes: 2000,
        ..config(dir.path())
    })
    .unwrap();
    fill(&store, 200);
    let everything = all(&store);
    assert_eq!(sequences(&everything), (1..=200).collect::<Vec<_>>());
    for after in [0, 1, 57, 150, 198, 199, 200] {
        for max in [1, 7, 500] {
            let chunk = store.read_after(after, max).unwrap();
            let expected: Vec<u64> = (after + 1..=200).take(max).collect();
            assert_eq!(sequences(&chunk), expected, "after {after} max {max}");
        }
    }
}

#[test]
fn a_torn_tail_is_cut_at_every_offset_keeping_every_complete_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(FileStoreConfig {
            segment_bytes: u64::MAX,
            ..config(dir.path())
        })
        .unwrap();
        fill(&store, 20);
    }
    let path = dir.path().join("log").join(segment_name(1));
    let original = std::fs::read(&path).unwrap();
    // Record boundaries, to know how many records each cut keeps.
    let mut boundaries = vec![0usize];
    while *boundaries.last().unwrap() < original.len() {
        let (_, len) = codec::decode(&original[*boundaries.last().unwrap()..]).unwrap();
        boundaries.push(boundaries.last().unwrap() + len);
    }
    for cut in (0..original.len()).step_by(7) {
        std::fs::write(&path, &original[..cut]).unwrap();
        let store = FileStore::open(config(dir.path())).unwrap();
        let complete = boundaries.iter().filter(|b| **b <= cut).count() as u64 - 1;
        assert_eq!(store.bounds().head, complete, "cut at {cut}");
        assert_eq!(all(&store).len() as u64, complete);
        drop(store);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len() as usize,
            boundaries[complete as usize]
        );
    }
}

/// The sequences of the records in a file, read as a segment from its start.
fn records_in(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let (stored, len) = codec::decode(&bytes[at..]).unwrap();
        out.push(stored.sequence);
        at += len;
    }
    out
}

/// Record boundaries of a segment file: where each record starts, then its end.
fn boundaries(bytes: &[u8]) -> Vec<usize> {
    let mut starts = vec![0usize];
    while *starts.last().unwrap() < bytes.len() {
        let (_, len) = codec::decode(&bytes[*starts.last().unwrap()..]).unwrap();
        starts.push(starts.last().unwrap() + len);
    }
    starts
}

/// A log of `count` events in one segment; returns its path.
fn one_segment_log(dir: &Path, count: usize) -> PathBuf {
    let store = FileStore::open(FileStoreConfig {
        segment_bytes: u64::MAX,
        ..config(dir)
    })
    .unwrap();
    fill(&store, count);
    dir.join("log").join(segment_name(1))
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x20;
    std::fs::write(path, &bytes).unwrap();
}

fn log_id_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(LOG_ID_FILE)).unwrap()
}

/// Flips a byte inside record `damaged` (0-based) of a one-segment log of `count` events and
/// checks: start-up refuses naming the file and the record's offset; repair keeps the records
/// before it in the log, sets the damaged bytes and every intact record after them aside
/// byte for byte, and gives the log a new identity; start-up then works.
fn flip_refuse_and_repair(count: usize, damaged: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = one_segment_log(dir.path(), count);
    {
        // One group done with the whole log, one with none of it.
        let store = FileStore::open(config(dir.path())).unwrap();
        for (group, cursor) in [("late", count as u64), ("early", 0)] {
            let cursor = GroupCursor {
                pattern: ">".into(),
                cursor,
                not_before: None,
            };
            store.save_group_cursor(group, &cursor).unwrap();
        }
    }
    let original = std::fs::read(&path).unwrap();
    let starts = boundaries(&original);
    let at = starts[damaged] + (starts[damaged + 1] - starts[damaged]) / 2;
    flip(&path, at);
    let flipped = std::fs::read(&path).unwrap();
    let old_id = log_id_of(dir.path());

    match FileStore::open(config(dir.path())).unwrap_err() {
        StoreError::Corrupt {
            path: bad, offset, ..
        } => {
            assert_eq!(bad, path);
            assert_eq!(offset, starts[damaged] as u64);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        flipped,
        "a refused start cuts nothing"
    );

    let report = repair(dir.path()).unwrap();
    let kept = damaged as u64;
    assert_eq!(report.kept_through, (kept > 0).then_some(kept));
    if damaged + 1 < count {
        assert_eq!(report.intact_set_aside.len(), 1, "{report:?}");
        let (file, first, last) = &report.intact_set_aside[0];
        assert_eq!((*first, *last), (kept + 2, count as u64));
        assert_eq!(
            records_in(file),
            (kept + 2..=count as u64).collect::<Vec<_>>()
        );
    } else {
        assert!(report.intact_set_aside.is_empty());
    }
    // Never a byte deleted: the kept part and the pieces set aside are the file, in order.
    let mut rebuilt = std::fs::read(&path).unwrap();
    for moved in &report.moved {
        let name = moved.file_name().unwrap().to_str().unwrap();
        if name.ends_with(".log") || name.contains(".damaged-at-") {
            rebuilt.extend(std::fs::read(moved).unwrap());
        }
    }
    assert_eq!(rebuilt, flipped);
    let new_id = report.new_log_id.clone().expect("a new identity");
    assert_ne!(new_id, old_id);
    // The group past the kept log is moved back to its end, so it reads the new events that
    // will take the set-aside sequences.
    assert_eq!(report.groups_moved_back, vec!["late".to_owned()]);

    let store = FileStore::open(config(dir.path())).unwrap();
    assert_eq!(store.log_id(), new_id);
    assert_eq!(sequences(&all(&store)), (1..=kept).collect::<Vec<_>>());
    let cursors = store.load_group_cursors().unwrap();
    assert_eq!((cursors["late"].cursor, cursors["early"].cursor), (kept, 0));
    let next = store
        .append(vec![event("a.b", b"after repair")], SystemTime::now())
        .unwrap();
    assert_eq!(next[0].sequence, kept + 1);
}

#[test]
fn a_flipped_byte_mid_log_refuses_start_and_repair_keeps_every_intact_record() {
    flip_refuse_and_repair(1000, 500);
}

#[test]
fn a_flipped_byte_in_the_first_or_last_record_refuses_start_too() {
    flip_refuse_and_repair(20, 0);
    flip_refuse_and_repair(20, 19);
}

#[test]
fn a_torn_tail_is_cut_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let path = one_segment_log(dir.path(), 10);
    let original = std::fs::read(&path).unwrap();
    let starts = boundaries(&original);
    // The last record half written.
    std::fs::write(&path, &original[..starts[9] + 20]).unwrap();
    let (store, logs) = capture_logs(|| FileStore::open(config(dir.path())).unwrap());
    assert_eq!(store.bounds().head, 9);
    assert!(logs.contains("WARN") && logs.contains("torn"), "{logs}");
    drop(store);
    assert_eq!(std::fs::read(&path).unwrap(), original[..starts[9]]);
    // Zeros past the last record, as a machine crash can leave: no record there to lose.
    let mut zeros = original[..starts[9]].to_vec();
    zeros.extend_from_slice(&[0; 300]);
    std::fs::write(&path, &zeros).unwrap();
    let store = FileStore::open(config(dir.path())).unwrap();
    assert_eq!(store.bounds().head, 9);
}

#[test]
fn an_overlong_length_with_records_after_it_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = one_segment_log(dir.path(), 10);
    let original = std::fs::read(&path).unwrap();
    let starts = boundaries(&original);
    let mut bytes = original.clone();
    // Record 4's length now runs past the end of the file.
    bytes[starts[4] + 3] = 0x01;
    std::fs::write(&path, &bytes).unwrap();
    match FileStore::open(config(dir.path())).unwrap_err() {
        StoreError::Corrupt { offset, .. } => assert_eq!(offset, starts[4] as u64),
        other => panic!("expected corruption, got {other:?}"),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Any single flipped byte in any segment: recovery refuses, or keeps every record the flip
    /// did not touch. It never silently loses a complete, valid record.
    #[test]
    fn a_single_flipped_byte_is_refused_or_costs_no_valid_record(
        position in 0.0f64..1.0,
        mask in 1u8..=255,
    ) {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStore::open(FileStoreConfig {
                segment_bytes: 2048,
                ..config(dir.path())
            })
            .unwrap();
            fill(&store, 40);
        }
        let segments = segment_paths(&dir.path().join("log")).unwrap();
        let sizes: Vec<usize> = segments
            .iter()
            .map(|(_, p)| std::fs::metadata(p).unwrap().len() as usize)
            .collect();
        let total: usize = sizes.iter().sum();
        let mut at = ((total as f64) * position) as usize;
        let mut which = 0;
        while at >= sizes[which] {
            at -= sizes[which];
            which += 1;
        }
        let (base, path) = &segments[which];
        let mut bytes = std::fs::read(path).unwrap();
        let starts = boundaries(&bytes);
        let hit = starts.iter().rposition(|start| *start <= at).unwrap();
        let hit_sequence = base + hit as u64;
        bytes[at] ^= mask;
        std::fs::write(path, &bytes).unwrap();
        match FileStore::open(config(dir.path())) {
            Ok(store) => {
                let held = sequences(&all(&store));
                for sequence in (1..=40).filter(|s| *s != hit_sequence) {
                    proptest::prop_assert!(
                        held.contains(&sequence),
                        "flip at {} of segment {} lost record {}", at, base, sequence
                    );
                }
            }
            Err(StoreError::Corrupt { .. }) => {}
            Err(other) => proptest::prop_assert!(false, "unexpected error {:?}", other),
        }
    }
}

#[test]
fn corruption_in_an_older_segment_stops_start_up_and_repair_moves_it_aside() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(config(dir.path())).unwrap();
        fill(&store, 300);
    }
    let segments = segment_paths(&dir.path().join("log")).unwrap();
    assert!(segments.len() >= 3);
    let (second_base, second) = segments[1].clone();
    let mut bytes = std::fs::read(&second).unwrap();
    let (_, first_len) = codec::decode(&bytes).unwrap();
    bytes[first_len + 12] ^= 0x01; // inside the second record of the second segment
    std::fs::write(&second, &bytes).unwrap();

    let error = FileStore::open(config(dir.path())).unwrap_err();
    match &error {
        StoreError::Corrupt { path, offset, .. } => {
            assert_eq!(path, &second);
            assert_eq!(*offset, first_len as u64);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(error.to_string().contains("eventbus repair"));

    let report = repair(dir.path()).unwrap();
    assert_eq!(report.kept_through, Some(second_base));
    for moved in &report.moved {
        assert!(moved.exists(), "{moved:?} kept");
    }
    // The intact records after the damaged one, and every later segment, are set aside whole.
    let second_last = segments[2].0 - 1;
    assert_eq!(
        report.intact_set_aside[0].1..=report.intact_set_aside[0].2,
        second_base + 2..=second_last
    );
    for (later_base, later) in &segments[2..] {
        let moved = report
            .moved
            .iter()
            .find(|p| p.file_name() == later.file_name())
            .expect("a later segment set aside whole");
        assert_eq!(records_in(moved)[0], *later_base);
    }
    let store = FileStore::open(config(dir.path())).unwrap();
    assert_eq!(store.bounds().head, second_base);
    assert_eq!(
        sequences(&all(&store)),
        (1..=second_base).collect::<Vec<_>>()
    );
}

#[test]
fn retention_deletes_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(FileStoreConfig {
        retention_max_events: 100,
        ..config(dir.path())
    })
    .unwrap();
    fill(&store, 400);
    let bounds = store.bounds();
    let held = bounds.head + 1 - bounds.oldest.unwrap();
    assert!(held >= 100, "keeps at least the limit: {held}");
    assert!(held < 200, "deletes old segments: {held}");
    assert_eq!(
        sequences(&all(&store)),
        (bounds.oldest.unwrap()..=400).collect::<Vec<_>>()
    );
    assert_eq!(store.held_counts()["a.b"], held);

    let by_bytes = tempfile::tempdir().unwrap();
    let store = FileStore::open(FileStoreConfig {
        retention_max_bytes: 10_000,
        ..config(by_bytes.path())
    })
    .unwrap();
    fill(&store, 400);
    let on_disk: u64 = segment_paths(&by_bytes.path().join("log"))
        .unwrap()
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= 10_000 + 4096, "{on_disk}");
}

#[test]
fn retention_by_age_applies_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(config(dir.path())).unwrap();
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        for _ in 0..100 {
            store.append(vec![event("a", &[0; 64])], long_ago).unwrap();
        }
        fill(&store, 1);
    }
    let store = FileStore::open(FileStoreConfig {
        retention_max_age: Some(Duration::from_secs(60)),
        ..config(dir.path())
    })
    .unwrap();
    // Every segment holding only old events is gone; the one that also holds the new event
    // stays whole on disk, while reads see only the new event.
    let first_segment = segment_paths(&dir.path().join("log")).unwrap()[0].0;
    assert!(first_segment > 1 && first_segment <= 101, "{first_segment}");
    assert_eq!(store.bounds().oldest, Some(101));
    assert_eq!(sequences(&all(&store)), vec![101]);
}

#[test]
fn finds_sequences_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(config(dir.path())).unwrap();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    for i in 0..200u64 {
        store
            .append(vec![event("a", &[0; 32])], t0 + Duration::from_secs(i))
            .unwrap();
    }
    assert_eq!(store.first_sequence_at_or_after(t0).unwrap(), Some(1));
    assert_eq!(
        store
            .first_sequence_at_or_after(t0 + Duration::from_millis(150_500))
            .unwrap(),
        Some(152)
    );
    assert_eq!(
        store
            .first_sequence_at_or_after(t0 + Duration::from_secs(500))
            .unwrap(),
        None
    );
}

#[test]
fn every_fsync_policy_makes_appends_durable() {
    for policy in [
        FsyncPolicy::Always,
        FsyncPolicy::Interval(Duration::from_millis(5)),
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(FileStoreConfig {
            fsync: policy,
            ..config(dir.path())
        })
        .unwrap();
        fill(&store, 50);
        wait_durable(&store, 50);
        assert_eq!(store.durability_error(), None);
    }
}

#[test]
fn an_interval_policy_acknowledges_once_written_and_syncs_on_its_timer() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(FileStoreConfig {
        fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
        ..config(dir.path())
    })
    .unwrap();
    fill(&store, 5);
    // Durable (acknowledgeable) at once, not an hour later.
    assert_eq!(*store.durable_head().unwrap().borrow(), 5);
    let dirty = store.durability.state.lock().unwrap().dirty.len();
    assert_eq!(dirty, 1, "written, not yet synced");
}

#[test]
fn parses_fsync_policies() {
    assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
    assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
    assert_eq!(
        "interval:250".parse(),
        Ok(FsyncPolicy::Interval(Duration::from_millis(250)))
    );
    assert!("interval:0".parse::<FsyncPolicy>().is_err());
    assert!("sometimes".parse::<FsyncPolicy>().is_err());
}

#[test]
fn a_second_open_of_a_data_dir_is_refused_naming_the_holder_until_the_first_closes() {
    let dir = tempfile::tempdir().unwrap();
    let first = FileStore::open(config(dir.path())).unwrap();
    fill(&first, 3);
    let error = FileStore::open(config(dir.path())).unwrap_err();
    match &error {
        StoreError::Locked {
            dir: locked,
            holder,
        } => {
            assert_eq!(locked, dir.path());
            assert_eq!(*holder, Some(std::process::id()));
        }
        other => panic!("expected the directory to be locked, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&dir.path().display().to_string())
            && message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    // Repair writes the directory: it needs the same claim.
    assert!(matches!(repair(dir.path()), Err(StoreError::Locked { .. })));
    // The refused open touched nothing: the first store still appends.
    fill(&first, 1);
    assert_eq!(first.bounds().head, 4);
    drop(first);
    let reopened = FileStore::open(config(dir.path())).unwrap();
    assert_eq!(reopened.bounds().head, 4);
}

/// A tmpfs mounted for one test, so storage faults are real ones (no inodes, no space);
/// unmounted when dropped. `None`, after saying why, where this process cannot mount.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(options: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .output();
        match output {
            Ok(output) if output.status.success() => Some(Tmpfs { dir }),
            Ok(output) => {
                eprintln!(
                    "skipping: cannot mount a tmpfs ({options}): {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("skipping: cannot run mount: {error}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Log lines emitted on this thread while `run` runs.
fn capture_logs<T>(run: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Logs {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
        type Writer = Logs;
        fn make_writer(&'a self) -> Logs {
            self.clone()
        }
    }
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let value = tracing::subscriber::with_default(subscriber, run);
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    (value, text)
}

/// Appends one event at a time until an append fails; returns the error and the head before it.
fn append_until_refused(store: &FileStore) -> (StoreError, u64) {
    for i in 0..100_000 {
        let head = store.bounds().head;
        let data = format!("event-{i}-{}", "x".repeat(200));
        if let Err(error) = store.append(vec![event("a.b", data.as_bytes())], SystemTime::now()) {
            return (error, head);
        }
    }
    panic!("the fault never came");
}

/// What a reopened log holds: consecutive sequences from 1, each event once.
fn assert_reopens_whole(dir: &Path, head: u64) {
    let store = FileStore::open(config(dir)).unwrap();
    let events = all(&store);
    assert_eq!(sequences(&events), (1..=head).collect::<Vec<_>>());
    let mut payloads: Vec<_> = events.iter().map(|e| e.event.data.clone()).collect();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len() as u64, head, "no event stored twice");
}

#[test]
fn a_segment_that_cannot_be_created_refuses_the_batch_before_it_counts() {
    // Inodes: the mount's root, LOCK, log/, log-id and a few segments; then rolling fails.
    let Some(tmpfs) = Tmpfs::mount("size=16m,nr_inodes=10") else {
        return;
    };
    let dir = tmpfs.path().join("data");
    // An inode to give back later, as an operator freeing space would.
    let spare = tmpfs.path().join("spare");
    std::fs::write(&spare, b"").unwrap();
    let store = FileStore::open(config(&dir)).unwrap();
    let ((error, head), logs) = capture_logs(|| append_until_refused(&store));
    assert!(
        matches!(&error, StoreError::Io(e) if e.raw_os_error() == Some(28)),
        "ENOSPC, got {error:?}"
    );
    assert!(
        logs.contains("ERROR") && logs.contains("cannot roll"),
        "{logs}"
    );
    // Nothing of the refused batch counts: not in the head, not readable, not on disk.
    assert_eq!(store.bounds().head, head);
    assert_eq!(sequences(&all(&store)), (1..=head).collect::<Vec<_>>());
    let active = segment_paths(&dir.join("log")).unwrap().pop().unwrap().1;
    let size = std::fs::metadata(&active).unwrap().len();
    assert!(store
        .append(vec![event("a.b", b"again")], SystemTime::now())
        .is_err());
    assert_eq!(
        std::fs::metadata(&active).unwrap().len(),
        size,
        "the segment stops growing"
    );
    assert_eq!(
        store.durability_error(),
        None,
        "a passing cause does not fail the store"
    );
    let blocked = store
        .write_blocked()
        .expect("blocked while no inode is free");
    assert!(blocked.contains("cannot roll"), "{blocked}");
    // Once an inode is free the store says so before any write tries, then rolls and goes on.
    std::fs::remove_file(&spare).unwrap();
    assert_eq!(store.write_blocked(), None, "an inode is free again");
    let next = store
        .append(vec![event("a.b", b"after")], SystemTime::now())
        .unwrap();
    assert_eq!(next[0].sequence, head + 1);
    wait_durable(&store, head + 1);
    drop(store);
    assert_reopens_whole(&dir, head + 1);
}

#[test]
fn a_write_that_finds_no_space_leaves_nothing_of_its_batch() {
    let Some(tmpfs) = Tmpfs::mount("size=256k,nr_inodes=1000") else {
        return;
    };
    let dir = tmpfs.path().join("data");
    let spare = tmpfs.path().join("spare");
    std::fs::write(&spare, vec![0u8; 64 * 1024]).unwrap();
    let store = FileStore::open(FileStoreConfig {
        segment_bytes: u64::MAX,
        ..config(&dir)
    })
    .unwrap();
    let ((error, head), logs) = capture_logs(|| append_until_refused(&store));
    assert!(
        matches!(&error, StoreError::Io(e) if e.raw_os_error() == Some(28)),
        "ENOSPC, got {error:?}"
    );
    assert!(
        logs.contains("ERROR") && logs.contains("cannot write"),
        "{logs}"
    );
    assert_eq!(store.bounds().head, head);
    assert_eq!(sequences(&all(&store)), (1..=head).collect::<Vec<_>>());
    let blocked = store
        .write_blocked()
        .expect("blocked while the disk is full");
    assert!(blocked.contains("No space left"), "{blocked}");
    assert_eq!(store.durability_error(), None, "full is not failed");
    std::fs::remove_file(&spare).unwrap();
    assert_eq!(store.write_blocked(), None, "space is free again");
    store
        .append(vec![event("a.b", b"after")], SystemTime::now())
        .unwrap();
    wait_durable(&store, head + 1);
    drop(store);
    assert_reopens_whole(&dir, head + 1);
}

#[test]
fn a_log_whose_identity_file_is_gone_refuses_to_start_until_repair_gives_it_one() {
    for damage in ["delete", "empty"] {
        let dir = tempfile::tempdir().unwrap();
        let old_id = {
            let store = FileStore::open(config(dir.path())).unwrap();
            fill(&store, 5);
            store.log_id().to_owned()
        };
        let id_file = dir.path().join(LOG_ID_FILE);
        match damage {
            "delete" => std::fs::remove_file(&id_file).unwrap(),
            _ => std::fs::write(&id_file, b"").unwrap(),
        }
        let error = FileStore::open(config(dir.path())).unwrap_err();
        assert!(
            matches!(&error, StoreError::Metadata { path, .. } if *path == id_file),
            "{damage}: {error:?}"
        );
        assert!(error.to_string().contains("eventbus repair"), "{error}");
        assert!(!id_file.exists() || std::fs::read(&id_file).unwrap().is_empty());

        let report = repair(dir.path()).unwrap();
        let new_id = report
            .new_log_id
            .clone()
            .expect("a deliberate new identity");
        assert_ne!(new_id, old_id);
        assert_eq!(report.kept_through, Some(5), "the log itself is untouched");
        let store = FileStore::open(config(dir.path())).unwrap();
        assert_eq!(store.log_id(), new_id);
        assert_eq!(store.bounds().head, 5);
    }
    // A directory with no history yet (a crash before the first event) simply gets one.
    let fresh = tempfile::tempdir().unwrap();
    drop(FileStore::open(config(fresh.path())).unwrap());
    std::fs::remove_file(fresh.path().join(LOG_ID_FILE)).unwrap();
    FileStore::open(config(fresh.path())).unwrap();
}

#[test]
fn a_cut_short_groups_file_refuses_to_start_until_repair_keeps_what_it_can_read() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(config(dir.path())).unwrap();
        fill(&store, 10);
        for (name, cursor) in [("alpha", 3), ("beta", 7), ("gamma", 9)] {
            let cursor = GroupCursor {
                pattern: "a.>".into(),
                cursor,
                not_before: None,
            };
            store.save_group_cursor(name, &cursor).unwrap();
        }
    }
    let groups = dir.path().join(GROUPS_FILE);
    let whole = std::fs::read(&groups).unwrap();
    // Cut inside the last entry written (serde_json writes a map in its own order).
    let cut = &whole[..whole.len() - 20];
    std::fs::write(&groups, cut).unwrap();
    let error = FileStore::open(config(dir.path())).unwrap_err();
    assert!(
        matches!(&error, StoreError::Metadata { path, .. } if *path == groups),
        "{error:?}"
    );

    let report = repair(dir.path()).unwrap();
    assert!(report.groups_file_damaged);
    assert_eq!(report.groups_kept.len(), 2, "{report:?}");
    assert!(
        report.new_log_id.is_none(),
        "the log is intact: same identity"
    );
    let set_aside = report
        .moved
        .iter()
        .find(|p| p.file_name() == Some(GROUPS_FILE.as_ref()))
        .expect("the damaged file set aside");
    assert_eq!(std::fs::read(set_aside).unwrap(), cut);
    let store = FileStore::open(config(dir.path())).unwrap();
    let cursors = store.load_group_cursors().unwrap();
    let mut names: Vec<_> = cursors.keys().cloned().collect();
    names.sort();
    assert_eq!(names, report.groups_kept);
    let expected: HashMap<&str, u64> = [("alpha", 3), ("beta", 7), ("gamma", 9)].into();
    for (name, cursor) in &cursors {
        assert_eq!(cursor.cursor, expected[name.as_str()]);
    }
    // Nothing left to repair.
    drop(store);
    assert!(!repair(dir.path()).unwrap().changed_anything());
}

#[test]
fn age_is_judged_by_the_clock_when_read_and_expire_deletes_whole_segments() {
    for cache_bytes in [64 * 1024 * 1024, 2000] {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(FileStoreConfig {
            retention_max_age: Some(Duration::from_secs(30)),
            cache_bytes,
            ..config(dir.path())
        })
        .unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |millis: u64| t0 + Duration::from_millis(millis);
        for i in 0..100u64 {
            let topic = if i % 2 == 0 { "a.x" } else { "b.x" };
            store
                .append(vec![event(topic, &[0; 64])], at(i * 1000))
                .unwrap();
        }
        let segments_before = segment_paths(&dir.path().join("log")).unwrap().len();
        // Nothing appended since; at 90.5 s the events published before 60.5 s are past 30 s.
        let now = at(90_500);
        let check = |store: &FileStore| {
            assert_eq!(
                sequences(&store.read_after_at(0, usize::MAX, now).unwrap()),
                (62..=100).collect::<Vec<_>>()
            );
            // A reader past the boundary is unaffected; one before it sees the gap.
            assert_eq!(
                sequences(&store.read_after_at(70, 3, now).unwrap()),
                vec![71, 72, 73]
            );
            assert_eq!(store.read_after_at(10, 1, now).unwrap()[0].sequence, 62);
            assert_eq!(
                store.bounds_at(now),
                LogBounds {
                    oldest: Some(62),
                    head: 100,
                    newest_dropped_time: Some(at(60_000)),
                }
            );
            let counts = store.held_counts_at(now);
            assert_eq!((counts["a.x"], counts["b.x"]), (19, 20));
            assert_eq!(
                store.first_sequence_at_or_after_at(at(0), now).unwrap(),
                Some(62)
            );
            assert_eq!(
                store
                    .first_sequence_at_or_after_at(at(69_500), now)
                    .unwrap(),
                Some(71)
            );
        };
        check(&store);
        // Expire deletes the segments holding only expired events, and reads agree.
        store.expire(now).unwrap();
        let remaining = segment_paths(&dir.path().join("log")).unwrap();
        assert!(remaining.len() <= segments_before);
        assert!(
            remaining[0].0 <= 62 && remaining.get(1).is_none_or(|(base, _)| *base > 62),
            "the segment holding 62 is the oldest left: {remaining:?}"
        );
        check(&store);
        // Past every event's age: nothing is held, but the active segment stays.
        let later = at(200_000);
        assert!(store.read_after_at(0, 10, later).unwrap().is_empty());
        let bounds = store.bounds_at(later);
        assert_eq!(bounds.oldest, None);
        assert_eq!(bounds.newest_dropped_time, Some(at(99_000)));
        assert!(store.held_counts_at(later).is_empty());
        assert_eq!(
            store.first_sequence_at_or_after_at(at(0), later).unwrap(),
            None
        );
        store.expire(later).unwrap();
        assert_eq!(segment_paths(&dir.path().join("log")).unwrap().len(), 1);
        let next = store.append(vec![event("a.x", b"")], later).unwrap();
        assert_eq!(next[0].sequence, 101);
        assert_eq!(store.bounds_at(later).oldest, Some(101));
    }
}

#[test]
fn an_event_past_its_age_is_hidden_on_the_real_clock_with_no_append() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(FileStoreConfig {
        retention_max_age: Some(Duration::from_millis(300)),
        ..config(dir.path())
    })
    .unwrap();
    fill(&store, 3);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.bounds().oldest.is_some() {
        assert!(std::time::Instant::now() < deadline, "never expired");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(all(&store).is_empty());
    assert!(store.held_counts().is_empty());
    assert!(store.bounds().newest_dropped_time.is_some());
}

#[test]
fn a_failed_write_that_cannot_be_cut_back_fails_the_store_until_a_restart() {
    let Some(tmpfs) = Tmpfs::mount("size=256k,nr_inodes=1000") else {
        return;
    };
    let dir = tmpfs.path().join("data");
    let spare = tmpfs.path().join("spare");
    std::fs::write(&spare, vec![0u8; 64 * 1024]).unwrap();
    let store = FileStore::open(FileStoreConfig {
        segment_bytes: u64::MAX,
        ..config(&dir)
    })
    .unwrap();
    store
        .fail_cuts
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let ((error, head), logs) = capture_logs(|| append_until_refused(&store));
    assert!(matches!(error, StoreError::Io(_)), "{error:?}");
    assert!(
        logs.contains("ERROR") && logs.contains("refuses further writes"),
        "{logs}"
    );
    // What is on disk past the head is unknown: the store says so and takes no more writes.
    let reason = store.durability_error().expect("the store has failed");
    assert!(reason.contains("cannot cut"), "{reason}");
    std::fs::remove_file(&spare).unwrap();
    assert!(matches!(
        store.append(vec![event("a.b", b"refused")], SystemTime::now()),
        Err(StoreError::Failed(_))
    ));
    assert_eq!(store.bounds().head, head);
    drop(store);
    // A restart recovers: the half-written record is a torn tail, cut; nothing is lost or
    // stored twice, and writes go on.
    assert_reopens_whole(&dir, head);
    let store = FileStore::open(config(&dir)).unwrap();
    assert_eq!(store.durability_error(), None);
    let next = store
        .append(vec![event("a.b", b"after")], SystemTime::now())
        .unwrap();
    assert_eq!(next[0].sequence, head + 1);
}

/// A read bounded in bytes stops at the limit on disk and in the tail cache alike, and always
/// returns the first event.
#[test]
fn reads_within_a_byte_limit_from_disk_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    for cache_bytes in [0, 64 * 1024 * 1024] {
        let sub = dir.path().join(cache_bytes.to_string());
        let store = FileStore::open(FileStoreConfig {
            cache_bytes,
            ..config(&sub)
        })
        .unwrap();
        for _ in 0..10 {
            store
                .append(vec![event("a.b", &[1u8; 1000])], SystemTime::now())
                .unwrap();
        }
        wait_durable(&store, 10);
        let one = all(&store)[0].held_bytes();
        let read = store.read_after_within(2, 100, 3 * one + one / 2).unwrap();
        assert_eq!(sequences(&read), vec![3, 4, 5], "cache_bytes {cache_bytes}");
        let read = store.read_after_within(0, 100, 1).unwrap();
        assert_eq!(sequences(&read), vec![1], "cache_bytes {cache_bytes}");
        let read = store.read_after_within(7, 100, usize::MAX).unwrap();
        assert_eq!(
            sequences(&read),
            vec![8, 9, 10],
            "cache_bytes {cache_bytes}"
        );
    }
}
