//! The file store: the bus log as append-only segment files, so every acknowledged event survives
//! a crash of the bus (kill -9) or of the machine (with `--fsync always`).
//!
//! # On disk
//! `<data-dir>/log/<base sequence, 20 digits>.log` files, each a run of records with consecutive
//! sequences in the [`codec`](super::codec) framing (length, CRC32C, payload). A segment that has
//! reached `segment_bytes` is rolled by the next append, before that append writes anything, so
//! a segment that cannot be created refuses the batch with nothing of it stored (rather than
//! failing after the batch counted); retention deletes whole segments, oldest first, never the
//! active one. Age retention is also judged when read: reads skip events past the max age by the
//! clock (the boundary inside a segment is found by reading forward from where it last stood,
//! so each expired event is read once), and [`Store::expire`] deletes the segments that hold
//! only such events.
//!
//! # Failures
//! Every storage error is logged at ERROR. An append whose write fails is cut back off the file
//! and refused whole; the store stays writable. Only when the store cannot know what is on disk
//! (a failed fsync, a failed write it cannot cut back) does it enter a failed state that refuses
//! every later write ([`StoreError::Failed`], reported by [`Store::durability_error`]) until a
//! restart, whose recovery keeps exactly the complete records.
//!
//! # Durability: group commit
//! [`FileStore::append`] writes the batch to the active segment (a `write` into the page cache,
//! under the broker's routing lock) and returns. A syncer thread makes written data durable:
//! with [`FsyncPolicy::Always`] it runs `fdatasync` as soon as there is unsynced data, so all
//! the appends that arrived during one sync share the next one (group commit); with `Interval`
//! it syncs on a timer; with `Never` it leaves it to the OS. The durable head is published on a
//! watch channel ([`Store::durable_head`]); the broker acknowledges a publish, and routes its
//! events to subscribers, only once the durable head has reached them, so no subscriber ever sees
//! an event that a crash could take back. Under `Always` the head moves after the sync; under
//! `Interval` and `Never` it moves once written (a bus crash cannot take a written event back;
//! a machine crash can take what the last sync did not cover), as JetStream acknowledges by
//! default.
//!
//! # Reads
//! Recent events are kept in a bounded in-memory tail cache (live replays and catch-ups hit it).
//! Older ones are read from disk, seeking with a sparse in-memory index per segment (a sequence,
//! file offset and publish time every [`INDEX_INTERVAL_BYTES`]) that recovery rebuilds.
//!
//! # One writer per directory
//! [`FileStore::open`] and [`repair`] first lock `<data-dir>/LOCK` (see [`DirLock`]): two buses
//! on one directory would interleave appends and corrupt the log.
//!
//! # Recovery
//! On open, every segment is scanned and checked. Only a torn write at the end of the last
//! segment is cut off (and logged): the file ends inside a record (its declared length runs past
//! the end) or in zeros, with no valid record after it. Such a record was never complete, so it
//! was never acknowledged. Anything else (a complete record with a bad checksum or format, a
//! length that runs into later records, a sequence out of order), in any segment, stops start-up
//! with [`StoreError::Corrupt`] naming the file and offset: cutting there could eat acknowledged
//! events. [`repair`] then sets the damaged part aside (never deletes it) so the bus can start;
//! its docs say what it keeps. The log's identity (`log-id`) and the group cursors
//! (`groups.json`) are checked too: [`StoreError::Metadata`] names a file that is unreadable, or
//! a missing `log-id` of a log that holds events (a new identity must be given deliberately, by
//! [`repair`], never silently).

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::codec::{self, DecodeError};
use super::{
    count_family, AgeCutoff, GroupCursor, HeldCounts, LogBounds, Store, StoreError, WithinBytes,
};
use crate::event::{Event, SharedEvent, StoredEvent};
use crate::metrics::FsyncTimer;

mod lock;

pub(crate) use lock::describe_holder;
pub use lock::{DirLock, LOCK_FILE};

/// A sparse index entry is kept every this many bytes of a segment.
pub const INDEX_INTERVAL_BYTES: u64 = 64 * 1024;

/// When written data is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before a publish is acknowledged (group commit). The default.
    Always,
    /// Acknowledged once written, synced every interval: a crash of the machine (not of the
    /// bus alone) may lose up to that much.
    Interval(Duration),
    /// Never explicitly: the OS writes back when it likes. A bus crash loses nothing written; a
    /// machine crash may lose recent events.
    Never,
}

/// The form [`FsyncPolicy`]'s `FromStr` reads: `always`, `never`, `interval:<duration>` (`interval:500ms`; a bare number is milliseconds).
impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(every) => write!(f, "interval:{}ms", every.as_millis()),
        }
    }
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => match text.strip_prefix("interval:") {
                // A bare number is milliseconds (the original form); otherwise a duration.
                Some(every) => every
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .or_else(|_| crate::timefmt::parse_duration(every))
                    .ok()
                    .filter(|every| !every.is_zero())
                    .map(FsyncPolicy::Interval)
                    .ok_or_else(|| {
                        format!(
                            "interval: needs a positive duration (interval:500ms, interval:1s, \
                             or milliseconds: interval:500), got {every:?}"
                        )
                    }),
                None => Err(format!(
                    "expected always, never or interval:<duration>, got {text:?}"
                )),
            },
        }
    }
}

/// How the file store is laid out and bounded.
#[derive(Debug, Clone)]
pub struct FileStoreConfig {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// A segment is rolled once it is this large.
    pub segment_bytes: u64,
    /// Retention: events, bytes on disk and age, whichever is reached first. Whole segments are
    /// deleted, so the log may hold a little more than the limits.
    pub retention_max_events: u64,
    pub retention_max_bytes: u64,
    pub retention_max_age: Option<Duration>,
    /// Bytes of recent events kept in memory for fast reads.
    pub cache_bytes: u64,
    /// Where the syncer reports how long each fsync round took, if anywhere.
    pub fsync_timer: Option<crate::metrics::FsyncTimer>,
}

impl FileStoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> FileStoreConfig {
        FileStoreConfig {
            dir: dir.into(),
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 * 1024 * 1024,
            retention_max_events: u64::MAX,
            retention_max_bytes: u64::MAX,
            retention_max_age: None,
            cache_bytes: 64 * 1024 * 1024,
            fsync_timer: None,
        }
    }
}

/// One segment file's metadata.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: Arc<File>,
    /// The first sequence this segment holds (or will hold, while empty).
    base: u64,
    /// The last sequence it holds; `base - 1` while empty.
    last: u64,
    bytes: u64,
    last_publish_time: Option<SystemTime>,
    /// (sequence, offset, publish time), ascending, the first record always included.
    index: Vec<(u64, u64, SystemTime)>,
    held_by_family: HeldCounts,
}

impl Segment {
    fn count(&self) -> u64 {
        self.last + 1 - self.base
    }
}

#[derive(Debug)]
struct Inner {
    /// Oldest first; the last one is the active segment that appends go to.
    segments: Vec<Segment>,
    head: u64,
    last_publish_time: Option<SystemTime>,
    /// When the newest event retention deleted was published. After a restart the deleted
    /// segments are gone, so a log that does not start at sequence 1 assumes it was just before
    /// its oldest held event: a `from_time` before that is then reported as possibly truncated.
    newest_dropped_time: Option<SystemTime>,
    /// The newest events, consecutive, ending at `head`.
    cache: VecDeque<SharedEvent>,
    cache_bytes: u64,
    /// Reused encoding buffer.
    buffer: Vec<u8>,
}

/// The boundary of age retention inside the held log: events before `first_live` are expired.
/// It only moves forward, a little at a time as the clock passes events, so finding it reads
/// each expired event once.
#[derive(Debug, Default)]
struct Expiry {
    /// The first sequence not expired (or not yet judged: see `first_live_time`).
    first_live: u64,
    /// The publish time of the event at `first_live`, once found: until the cutoff passes it,
    /// the boundary stands.
    first_live_time: Option<SystemTime>,
    /// When the newest expired event was published.
    newest_expired_time: Option<SystemTime>,
    /// The segment (by base) holding both expired and live events, and its expired events per
    /// family.
    partial: Option<(u64, HeldCounts)>,
}

/// Shared with the syncer thread.
#[derive(Debug)]
struct Durability {
    state: Mutex<SyncState>,
    wake: Condvar,
    durable: watch::Sender<u64>,
}

#[derive(Debug)]
struct SyncState {
    /// The last sequence written to a file.
    written: u64,
    /// Files with written but unsynced data, the active segment last.
    dirty: Vec<Arc<File>>,
    failed: Option<String>,
    closing: bool,
}

/// The bus log on disk. See the module docs.
#[derive(Debug)]
pub struct FileStore {
    config: FileStoreConfig,
    log_dir: PathBuf,
    inner: RwLock<Inner>,
    durability: Arc<Durability>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
    log_id: String,
    /// Every group's cursor, as last saved to `groups.json`.
    group_cursors: Mutex<HashMap<String, GroupCursor>>,
    /// Age retention's cutoff, judged when read.
    age: AgeCutoff,
    /// Where age retention stands inside the held segments (it deletes whole segments only, so
    /// expired events can still be on disk). Lock order: `inner`, then this.
    expiry: Mutex<Expiry>,
    /// The claim on the data directory, released when the store is dropped (after `close`).
    _lock: DirLock,
    /// Why the last append was refused for a passing cause (no space, no inode), while no
    /// append has succeeded since ([`Store::write_blocked`]).
    blocked: Mutex<Option<Blocked>>,
    /// Tests only: cutting a failed write back off the file fails, as no real fault can be
    /// made to do on demand.
    #[cfg(test)]
    fail_cuts: std::sync::atomic::AtomicBool,
}

impl FileStore {
    /// Opens (or creates) the log in `config.dir`, recovering it as described in the module docs.
    ///
    /// # Errors
    /// [`StoreError::Locked`] if another process (or another open store) uses the directory:
    /// the lock is taken before recovery reads anything. [`StoreError::Corrupt`] for damage
    /// recovery must not cut (see the module docs); [`StoreError::Metadata`] for an unreadable
    /// `groups.json`, or a missing or unreadable `log-id` when the log holds events;
    /// [`StoreError::Io`] for I/O failures.
    pub fn open(config: FileStoreConfig) -> Result<FileStore, StoreError> {
        let started = Instant::now();
        let lock = DirLock::acquire(&config.dir)?;
        let log_dir = config.dir.join("log");
        fs::create_dir_all(&log_dir)?;
        let mut paths = segment_paths(&log_dir)?;
        let mut segments = Vec::with_capacity(paths.len());
        let last_index = paths.len().checked_sub(1);
        let mut recovered_events = 0u64;
        for (position, (base, path)) in paths.drain(..).enumerate() {
            let is_last = Some(position) == last_index;
            let segment = scan_segment(&path, base, is_last)?;
            if let Some(previous) = segments.last() {
                let previous: &Segment = previous;
                if segment.base != previous.last + 1 {
                    return Err(StoreError::Corrupt {
                        path: segment.path.clone(),
                        offset: 0,
                        reason: format!(
                            "segment starts at sequence {} but the previous one ends at {}",
                            segment.base, previous.last
                        ),
                    });
                }
            }
            recovered_events += segment.count();
            segments.push(segment);
        }
        // Identity and cursors are checked before anything is created, and before the first
        // segment exists, so a crash can never leave segments without a `log-id`.
        let has_history = segments.iter().any(|s| s.count() > 0 || s.base > 1);
        let log_id = log_id_for_open(&config.dir, has_history)?;
        let group_cursors = Mutex::new(read_group_cursors(&config.dir)?);
        if segments.is_empty() {
            segments.push(create_segment(&log_dir, 1)?);
        }
        let active = segments.last().expect("at least one segment");
        let head = active.last;
        let last_publish_time = segments.iter().rev().find_map(|s| s.last_publish_time);
        let newest_dropped_time = match segments.iter().find(|s| s.count() > 0) {
            Some(first) if first.base > 1 => first.index.first().map(|(_, _, time)| *time),
            _ => None,
        };
        info!(
            dir = %config.dir.display(),
            segments = segments.len(),
            events = recovered_events,
            head,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "file store recovered"
        );
        let (durable, _) = watch::channel(head);
        let durability = Arc::new(Durability {
            state: Mutex::new(SyncState {
                written: head,
                dirty: Vec::new(),
                failed: None,
                closing: false,
            }),
            wake: Condvar::new(),
            durable,
        });
        let syncer = {
            let durability = durability.clone();
            let policy = config.fsync;
            let timer = config.fsync_timer.clone();
            std::thread::Builder::new()
                .name("eventbus-fsync".into())
                .spawn(move || run_syncer(&durability, policy, timer.as_ref()))?
        };
        let store = FileStore {
            log_id,
            group_cursors,
            log_dir,
            inner: RwLock::new(Inner {
                segments,
                head,
                last_publish_time,
                newest_dropped_time,
                cache: VecDeque::new(),
                cache_bytes: 0,
                buffer: Vec::new(),
            }),
            durability,
            syncer: Mutex::new(Some(syncer)),
            age: AgeCutoff::new(config.retention_max_age),
            expiry: Mutex::new(Expiry::default()),
            config,
            _lock: lock,
            blocked: Mutex::new(None),
            #[cfg(test)]
            fail_cuts: std::sync::atomic::AtomicBool::new(false),
        };
        store.apply_retention(&mut store.write_inner(), SystemTime::now())?;
        Ok(store)
    }

    fn write_inner(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_inner(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn apply_retention(&self, inner: &mut Inner, now: SystemTime) -> Result<(), StoreError> {
        loop {
            if inner.segments.len() < 2 {
                return Ok(());
            }
            let events: u64 = inner.segments.iter().map(Segment::count).sum();
            let bytes: u64 = inner.segments.iter().map(|s| s.bytes).sum();
            let oldest = &inner.segments[0];
            let too_old = match (self.age.at(now), oldest.last_publish_time) {
                (Some(cutoff), Some(last)) => last < cutoff,
                _ => false,
            };
            let over = events - oldest.count() >= self.config.retention_max_events
                && events > self.config.retention_max_events;
            let over_bytes = bytes > self.config.retention_max_bytes;
            if !(too_old || over || over_bytes) {
                return Ok(());
            }
            // The file first: if it cannot be deleted the segment stays held, whole and
            // readable, and the next round tries again.
            if let Err(error) = fs::remove_file(&inner.segments[0].path) {
                error!(
                    path = %inner.segments[0].path.display(),
                    %error,
                    "retention cannot delete a segment; it stays"
                );
                return Err(error.into());
            }
            let removed = inner.segments.remove(0);
            if removed.last_publish_time.is_some() {
                inner.newest_dropped_time = removed.last_publish_time;
            }
            while inner
                .cache
                .front()
                .is_some_and(|e| e.sequence <= removed.last)
            {
                let evicted = inner.cache.pop_front().expect("checked");
                inner.cache_bytes -= evicted.held_bytes() as u64;
            }
        }
    }

    /// Stops the syncer after a last sync. Called on drop too.
    pub fn close(&self) {
        {
            let mut state = self
                .durability
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            state.closing = true;
        }
        self.durability.wake.notify_all();
        if let Some(handle) = self.syncer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
    }

    /// Remembers a passing refusal for [`Store::write_blocked`].
    fn block(&self, blocked: Blocked) {
        *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = Some(blocked);
    }

    /// Puts the store into the failed state: every later append is refused with
    /// [`StoreError::Failed`], [`Store::durability_error`] reports `reason`, and waiters for
    /// durability are woken to find it. Only a restart (recovery) clears it.
    fn fail(&self, reason: String) {
        error!(reason = %reason, "the file store failed: it refuses further writes");
        let mut state = self
            .durability
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        state.failed.get_or_insert(reason);
        drop(state);
        self.durability.durable.send_modify(|_| {});
    }

    /// [`Store::read_after`] as of `now`.
    fn read_after_at(
        &self,
        after: u64,
        max: usize,
        now: SystemTime,
    ) -> Result<Vec<SharedEvent>, StoreError> {
        self.read_within_at(after, max, usize::MAX, now)
    }

    /// [`Store::read_after_within`] as of `now`.
    fn read_within_at(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
        now: SystemTime,
    ) -> Result<Vec<SharedEvent>, StoreError> {
        let inner = self.read_inner();
        let after = match self.age.at(now) {
            Some(cutoff) => after.max(self.expiry(&inner, cutoff).first_live - 1),
            None => after,
        };
        self.read_held(&inner, after, max, &mut WithinBytes::new(max_bytes))
    }

    /// [`Store::first_sequence_at_or_after`] as of `now`: nothing expired is found, since
    /// publish times never go backwards.
    fn first_sequence_at_or_after_at(
        &self,
        time: SystemTime,
        now: SystemTime,
    ) -> Result<Option<u64>, StoreError> {
        let time = time.max(self.age.at(now).unwrap_or(time));
        let inner = self.read_inner();
        let Some(segment) = inner
            .segments
            .iter()
            .find(|s| s.count() > 0 && s.last_publish_time.is_some_and(|last| last >= time))
        else {
            return Ok(None);
        };
        // Start at the last index entry before `time`, then read forward.
        let entry = segment.index.partition_point(|(_, _, at)| *at < time);
        let after = segment.index[entry.saturating_sub(1)].0 - 1;
        let mut after = after.max(segment.base - 1);
        loop {
            let chunk = self.read_held(&inner, after, 256, &mut WithinBytes::new(usize::MAX))?;
            if chunk.is_empty() {
                return Ok(None);
            }
            if let Some(found) = chunk.iter().find(|e| e.publish_time >= time) {
                return Ok(Some(found.sequence));
            }
            after = chunk.last().expect("non-empty").sequence;
        }
    }

    /// [`Store::bounds`] as of `now`.
    fn bounds_at(&self, now: SystemTime) -> LogBounds {
        let inner = self.read_inner();
        let mut oldest = inner
            .segments
            .iter()
            .find(|s| s.count() > 0)
            .map(|s| s.base);
        let mut newest_dropped_time = inner.newest_dropped_time;
        if let Some(cutoff) = self.age.at(now) {
            let expiry = self.expiry(&inner, cutoff);
            if expiry.newest_expired_time.is_some() {
                newest_dropped_time = newest_dropped_time.max(expiry.newest_expired_time);
            }
            oldest = oldest
                .map(|oldest| oldest.max(expiry.first_live))
                .filter(|oldest| *oldest <= inner.head);
        }
        LogBounds {
            oldest,
            head: inner.head,
            newest_dropped_time,
        }
    }

    /// [`Store::held_counts`] as of `now`.
    fn held_counts_at(&self, now: SystemTime) -> HeldCounts {
        let inner = self.read_inner();
        let mut counts = HeldCounts::new();
        let expiry = self.age.at(now).map(|cutoff| self.expiry(&inner, cutoff));
        let first_live = expiry.as_ref().map_or(0, |e| e.first_live);
        for segment in inner.segments.iter().filter(|s| s.last >= first_live) {
            for (family, count) in &segment.held_by_family {
                *counts.entry(family.clone()).or_default() += count;
            }
            let partial = expiry.as_ref().and_then(|e| e.partial.as_ref());
            if let Some((_, expired)) = partial.filter(|(base, _)| *base == segment.base) {
                for (family, count) in expired {
                    if let Some(held) = counts.get_mut(family) {
                        *held -= count;
                        if *held == 0 {
                            counts.remove(family);
                        }
                    }
                }
            }
        }
        counts
    }

    /// Moves the age boundary up to `cutoff` and returns it (locked). If the disk cannot be
    /// read, the error is logged and the boundary stays where reading stopped: a read of the
    /// events past it meets the same error and reports it.
    fn expiry<'a>(
        &'a self,
        inner: &Inner,
        cutoff: SystemTime,
    ) -> std::sync::MutexGuard<'a, Expiry> {
        let mut expiry = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = self.advance_expiry(inner, &mut expiry, cutoff) {
            error!(%error, "cannot read the log to apply age retention");
        }
        expiry
    }

    fn advance_expiry(
        &self,
        inner: &Inner,
        expiry: &mut Expiry,
        cutoff: SystemTime,
    ) -> Result<(), StoreError> {
        let oldest_base = inner.segments[0].base;
        if expiry.first_live < oldest_base {
            // Retention deleted segments past the boundary.
            expiry.first_live = oldest_base;
            expiry.first_live_time = None;
            expiry.partial = None;
        }
        if expiry.first_live_time.is_some_and(|time| time >= cutoff) {
            return Ok(());
        }
        for segment in &inner.segments {
            if segment.count() == 0 || segment.last < expiry.first_live {
                continue;
            }
            if segment.last_publish_time.is_some_and(|last| last < cutoff) {
                // The rest of this segment has expired.
                expiry.first_live = segment.last + 1;
                expiry.first_live_time = None;
                expiry.newest_expired_time = segment.last_publish_time;
                expiry.partial = None;
                continue;
            }
            // The boundary is in this segment: read forward to it, counting what expired.
            let mut after = expiry.first_live.max(segment.base) - 1;
            loop {
                let chunk = self.read_held(inner, after, 256, &mut WithinBytes::new(usize::MAX))?;
                let Some(last) = chunk.last().map(|e| e.sequence) else {
                    return Ok(());
                };
                for event in chunk {
                    if event.publish_time >= cutoff {
                        expiry.first_live = event.sequence;
                        expiry.first_live_time = Some(event.publish_time);
                        return Ok(());
                    }
                    if expiry
                        .partial
                        .as_ref()
                        .is_none_or(|(base, _)| *base != segment.base)
                    {
                        expiry.partial = Some((segment.base, HeldCounts::new()));
                    }
                    let (_, counts) = expiry.partial.as_mut().expect("just set");
                    count_family(counts, event.event.topic.family());
                    expiry.newest_expired_time = Some(event.publish_time);
                    expiry.first_live = event.sequence + 1;
                }
                after = last;
            }
        }
        // Everything held has expired.
        expiry.first_live = inner.head + 1;
        expiry.first_live_time = None;
        Ok(())
    }

    /// Up to `max` events after `after`, from the cache or the disk, expired or not.
    fn read_held(
        &self,
        inner: &Inner,
        after: u64,
        max: usize,
        within: &mut WithinBytes,
    ) -> Result<Vec<SharedEvent>, StoreError> {
        let mut out = Vec::new();
        if max == 0 || after >= inner.head {
            return Ok(out);
        }
        let cached_from = inner.cache.front().map(|e| e.sequence);
        if cached_from.is_none_or(|first| after + 1 < first) {
            let disk_max = match cached_from {
                Some(first) => max.min((first - after - 1) as usize),
                None => max,
            };
            let full = self.read_from_disk(inner, after, disk_max, within, &mut out)?;
            if full {
                return Ok(out);
            }
        }
        if let Some(first) = cached_from {
            let from = out.last().map_or(after, |e| e.sequence) + 1;
            let skip = from.saturating_sub(first) as usize;
            let room = max - out.len();
            out.extend(
                inner
                    .cache
                    .iter()
                    .skip(skip)
                    .take(room)
                    .take_while(|event| within.admits(event))
                    .cloned(),
            );
        }
        Ok(out)
    }

    /// Where the segments live.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Reads up to `max` events after `after` from the segments into `out`. Returns true when
    /// it stopped at `within`'s byte limit (the caller reads no further), false otherwise.
    fn read_from_disk(
        &self,
        inner: &Inner,
        after: u64,
        max: usize,
        within: &mut WithinBytes,
        out: &mut Vec<SharedEvent>,
    ) -> Result<bool, StoreError> {
        let mut next = after + 1;
        for segment in &inner.segments {
            if out.len() >= max {
                break;
            }
            if segment.last < next || segment.count() == 0 {
                continue;
            }
            let start = next.max(segment.base);
            let entry = segment
                .index
                .partition_point(|(sequence, _, _)| *sequence <= start);
            let mut offset = segment.index[entry.saturating_sub(1)].1;
            let mut buffer = vec![0u8; 256 * 1024];
            let mut filled = 0usize;
            let mut consumed = 0usize;
            while out.len() < max && next <= segment.last {
                match codec::decode(&buffer[consumed..filled]) {
                    Ok((stored, len)) => {
                        consumed += len;
                        if stored.sequence >= next {
                            if !within.admits(&stored) {
                                return Ok(true);
                            }
                            next = stored.sequence + 1;
                            out.push(Arc::new(stored));
                        }
                    }
                    Err(DecodeError::Incomplete { needed, .. }) => {
                        // Move what is left to the front and read more.
                        buffer.copy_within(consumed..filled, 0);
                        filled -= consumed;
                        offset += consumed as u64;
                        consumed = 0;
                        if buffer.len() < needed {
                            buffer.resize(needed, 0);
                        }
                        let read = segment
                            .file
                            .read_at(&mut buffer[filled..], offset + filled as u64)?;
                        if read == 0 {
                            return Err(StoreError::Corrupt {
                                path: segment.path.clone(),
                                offset,
                                reason: "segment ends inside a record".into(),
                            });
                        }
                        filled += read;
                    }
                    Err(error) => {
                        return Err(StoreError::Corrupt {
                            path: segment.path.clone(),
                            offset: offset + consumed as u64,
                            reason: error.to_string(),
                        })
                    }
                }
            }
        }
        Ok(false)
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl Store for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn append(&self, events: Vec<Event>, now: SystemTime) -> Result<Vec<SharedEvent>, StoreError> {
        if let Some(failed) = &self
            .durability
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed
        {
            return Err(StoreError::Failed(failed.clone()));
        }
        let mut guard = self.write_inner();
        let inner = &mut *guard;
        // Every fallible step comes before the write that makes the batch count: a full active
        // segment is rolled first, so a segment that cannot be created (no inodes, no fds, an
        // unwritable directory) refuses this batch with nothing of it stored, and the store
        // stays writable for when the cause is gone.
        let active = inner.segments.last().expect("an active segment");
        if active.bytes >= self.config.segment_bytes && active.count() > 0 {
            let segment = create_segment(&self.log_dir, inner.head + 1).inspect_err(|error| {
                error!(dir = %self.log_dir.display(), %error, "cannot roll to a new segment");
                self.block(Blocked {
                    why: format!("cannot roll to a new segment: {error}"),
                    bytes: 0,
                    inode: true,
                });
            })?;
            inner.segments.push(segment);
            // Retention is not part of this write: a segment it cannot delete is logged and
            // stays until the next roll or `expire`.
            let _ = self.apply_retention(inner, now);
        }
        let publish_time = match inner.last_publish_time {
            Some(last) if last > now => last,
            _ => now,
        };
        inner.last_publish_time = Some(publish_time);
        let mut stored = Vec::with_capacity(events.len());
        let mut buffer = std::mem::take(&mut inner.buffer);
        buffer.clear();
        let active = inner.segments.last_mut().expect("an active segment");
        let mut offset = active.bytes;
        let mut next_index_at = active
            .index
            .last()
            .map_or(0, |(_, at, _)| at + INDEX_INTERVAL_BYTES);
        let first_sequence = inner.head + 1;
        for (position, mut event) in events.into_iter().enumerate() {
            event.time.get_or_insert(publish_time);
            let sequence = first_sequence + position as u64;
            let record = StoredEvent::new(sequence, publish_time, event);
            let before = buffer.len();
            codec::encode(&record, &mut buffer);
            if offset >= next_index_at || active.index.is_empty() {
                active.index.push((sequence, offset, publish_time));
                next_index_at = offset + INDEX_INTERVAL_BYTES;
            }
            offset += (buffer.len() - before) as u64;
            stored.push(Arc::new(record));
        }
        // One write for the batch. On failure nothing of it counts: the file is cut back, so the
        // log never holds half a batch.
        if let Err(error) = (&*active.file).write_all(&buffer) {
            error!(path = %active.path.display(), %error, "cannot write to the log");
            self.block(Blocked {
                why: format!("cannot write to the log: {error}"),
                bytes: buffer.len() as u64,
                inode: false,
            });
            active
                .index
                .retain(|(sequence, _, _)| *sequence < first_sequence);
            inner.buffer = buffer;
            let cut = active.file.set_len(active.bytes);
            #[cfg(test)]
            let cut = match self.fail_cuts.load(std::sync::atomic::Ordering::Relaxed) {
                true => Err(io::Error::other("injected: the cut fails")),
                false => cut,
            };
            if let Err(cut) = cut {
                // Part of the batch may stay in the file, where the next append (the file is
                // opened for appending) would land after it: stop writing instead. Recovery
                // treats what is there on the next start like a crash's leftovers.
                self.fail(format!(
                    "cannot cut a failed write off {}: {cut}",
                    active.path.display()
                ));
            }
            return Err(error.into());
        }
        active.bytes = offset;
        *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let last = stored.last().map_or(inner.head, |e| e.sequence);
        active.last = last;
        active.last_publish_time = Some(publish_time);
        for event in &stored {
            count_family(&mut active.held_by_family, event.event.topic.family());
        }
        inner.head = last;
        for event in &stored {
            inner.cache_bytes += event.held_bytes() as u64;
            inner.cache.push_back(event.clone());
        }
        while inner.cache_bytes > self.config.cache_bytes && inner.cache.len() > 1 {
            let evicted = inner.cache.pop_front().expect("non-empty");
            inner.cache_bytes -= evicted.held_bytes() as u64;
        }
        buffer.clear();
        inner.buffer = buffer;
        let active_file = active.file.clone();
        {
            let mut state = self
                .durability
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            state.written = last;
            if !state.dirty.iter().any(|f| Arc::ptr_eq(f, &active_file)) {
                state.dirty.push(active_file);
            }
        }
        match self.config.fsync {
            // Acknowledged once synced: wake the syncer now (group commit).
            FsyncPolicy::Always => self.durability.wake.notify_one(),
            // Acknowledged once written (safe from a bus crash); the syncer's timer, or the OS,
            // makes it safe from a machine crash.
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => {
                self.durability.durable.send_replace(last);
            }
        }
        Ok(stored)
    }

    fn read_after(&self, after: u64, max: usize) -> Result<Vec<SharedEvent>, StoreError> {
        self.read_after_at(after, max, SystemTime::now())
    }

    fn read_after_within(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<SharedEvent>, StoreError> {
        self.read_within_at(after, max, max_bytes, SystemTime::now())
    }

    fn first_sequence_at_or_after(&self, time: SystemTime) -> Result<Option<u64>, StoreError> {
        self.first_sequence_at_or_after_at(time, SystemTime::now())
    }

    fn bounds(&self) -> LogBounds {
        self.bounds_at(SystemTime::now())
    }

    fn held_counts(&self) -> HeldCounts {
        self.held_counts_at(SystemTime::now())
    }

    fn usage(&self) -> super::StoreUsage {
        let inner = self.read_inner();
        super::StoreUsage {
            events: inner.segments.iter().map(Segment::count).sum(),
            bytes: inner.segments.iter().map(|s| s.bytes).sum(),
            segments: inner.segments.len() as u64,
        }
    }

    fn expire(&self, now: SystemTime) -> Result<(), StoreError> {
        self.apply_retention(&mut self.write_inner(), now)
    }

    fn durable_head(&self) -> Option<watch::Receiver<u64>> {
        Some(self.durability.durable.subscribe())
    }

    fn log_id(&self) -> &str {
        &self.log_id
    }

    fn load_group_cursors(&self) -> Result<HashMap<String, GroupCursor>, StoreError> {
        Ok(self
            .group_cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }

    fn save_group_cursor(&self, group: &str, cursor: &GroupCursor) -> Result<(), StoreError> {
        let mut cursors = self.group_cursors.lock().unwrap_or_else(|e| e.into_inner());
        cursors.insert(group.to_owned(), cursor.clone());
        let json = serde_json::to_vec_pretty(&*cursors).map_err(io::Error::other)?;
        write_atomically(&self.config.dir, GROUPS_FILE, &json).inspect_err(|error| {
            error!(dir = %self.config.dir.display(), %error, "cannot save group cursors");
        })
    }

    /// Blocked until an append succeeds, or until the file system has room again for the
    /// refused write (its bytes, or an inode for the segment it could not create, by
    /// `statvfs`), whichever comes first: a bus whose disk was full turns SERVING again once
    /// space is freed, without waiting for a client to try a publish it is steered away from.
    fn write_blocked(&self) -> Option<String> {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let room = match &*blocked {
            None => return None,
            Some(b) => free_space(&self.log_dir)
                .is_some_and(|(bytes, inodes)| bytes > b.bytes && (!b.inode || inodes > 0)),
        };
        if room {
            *blocked = None;
            return None;
        }
        blocked.as_ref().map(|b| b.why.clone())
    }

    fn durability_error(&self) -> Option<String> {
        self.durability
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed
            .clone()
    }
}

/// A write refused for a passing cause: why, and what it needed.
#[derive(Debug)]
struct Blocked {
    why: String,
    /// Bytes the refused write needed.
    bytes: u64,
    /// Whether it needed a new file (a segment roll).
    inode: bool,
}

/// Free bytes and inodes of the file system holding `dir`, as an unprivileged writer sees them
/// (`statvfs`'s `f_bavail` and `f_favail`); `None` when it cannot be asked.
fn free_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stats` is written by the call before it
    // is read, only when the call succeeds.
    let stats = unsafe {
        if libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) != 0 {
            return None;
        }
        stats.assume_init()
    };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Some((
        stats.f_bavail as u64 * stats.f_frsize as u64,
        stats.f_favail as u64,
    ))
}

fn run_syncer(durability: &Durability, policy: FsyncPolicy, timer: Option<&FsyncTimer>) {
    let mut state = durability.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        // Under `Always` the durable head waits for the sync, so it tells what is unsynced;
        // under `Interval` it moved at write time and the dirty files tell.
        let pending = match policy {
            FsyncPolicy::Always => state.written > *durability.durable.borrow(),
            FsyncPolicy::Interval(_) => !state.dirty.is_empty(),
            FsyncPolicy::Never => false,
        };
        if state.closing && !pending {
            return;
        }
        match policy {
            FsyncPolicy::Always | FsyncPolicy::Never if !pending && !state.closing => {
                state = durability
                    .wake
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            }
            FsyncPolicy::Interval(every) if !state.closing => {
                state = durability
                    .wake
                    .wait_timeout(state, every)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                if state.dirty.is_empty() && !state.closing {
                    continue;
                }
            }
            _ => {}
        }
        let written = state.written;
        let files = std::mem::take(&mut state.dirty);
        drop(state);
        let started = Instant::now();
        let result = files.iter().try_for_each(|file| file.sync_data());
        if let Some(timer) = timer {
            timer.observe(started.elapsed());
        }
        state = durability.state.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            // Appends made during the sync marked their file dirty again; the next round gets it.
            Ok(()) => {
                if policy == FsyncPolicy::Always {
                    durability.durable.send_replace(written);
                }
            }
            Err(error) => {
                // After a failed fsync the kernel may have dropped the dirty pages: nothing
                // written since the last good sync can be trusted, so the store stops taking
                // writes rather than acknowledging what it may not have.
                error!(%error, "fsync failed: the store refuses further writes");
                state.failed = Some(format!("fsync failed: {error}"));
                // Wake the waiters without moving the durable head: they find the failure.
                durability.durable.send_modify(|_| {});
                return;
            }
        }
    }
}

/// Where the cursors of MANUAL-ack groups are kept, next to `log/`.
const GROUPS_FILE: &str = "groups.json";
/// The log's identity, written once when the data directory is new.
const LOG_ID_FILE: &str = "log-id";

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old or the new file whole:
/// write a temporary file, sync it, rename it over, sync the directory.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let temporary = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temporary, dir.join(name))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The log's identity as `<dir>/log-id` holds it: `Ok(None)` when there is no such file, `Err`
/// saying why when it cannot be read or holds no id.
fn read_log_id(dir: &Path) -> Result<Option<String>, String> {
    match fs::read(dir.join(LOG_ID_FILE)) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_owned())),
            Ok(_) => Err("it is empty".into()),
            Err(_) => Err("it is not text".into()),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error.to_string()),
    }
}

/// The identity to open the log with. A log without history (no event was ever stored, so no
/// client can have seen one) gets a new one; a log with history must have its own, or clients
/// resuming on it would take it for a new log (or worse, a new log for the old one).
fn log_id_for_open(dir: &Path, has_history: bool) -> Result<String, StoreError> {
    let path = dir.join(LOG_ID_FILE);
    match read_log_id(dir) {
        Ok(Some(id)) => Ok(id),
        Ok(None) | Err(_) if !has_history => {
            let id = uuid::Uuid::now_v7().to_string();
            write_atomically(dir, LOG_ID_FILE, id.as_bytes())?;
            Ok(id)
        }
        Ok(None) => Err(StoreError::Metadata {
            path,
            reason: "the log's identity file is missing, but the log holds events: a new \
                     identity would make resuming clients take it for a new log"
                .into(),
        }),
        Err(why) => Err(StoreError::Metadata {
            path,
            reason: format!(
                "the log's identity file is unreadable ({why}), but the log holds events: a \
                 new identity would make resuming clients take it for a new log"
            ),
        }),
    }
}

fn read_group_cursors(dir: &Path) -> Result<HashMap<String, GroupCursor>, StoreError> {
    let path = dir.join(GROUPS_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| StoreError::Metadata {
            path,
            reason: format!("unreadable consumer group cursors: {error}"),
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(error) => Err(error.into()),
    }
}

fn segment_name(base: u64) -> String {
    format!("{base:020}.log")
}

fn segment_paths(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(base) = name
            .strip_suffix(".log")
            .and_then(|b| b.parse::<u64>().ok())
        else {
            continue;
        };
        paths.push((base, path));
    }
    paths.sort();
    Ok(paths)
}

fn create_segment(dir: &Path, base: u64) -> Result<Segment, StoreError> {
    let path = dir.join(segment_name(base));
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&path)?;
    // The new file's directory entry must be durable too, or a crash could lose the segment.
    File::open(dir)?.sync_all()?;
    Ok(Segment {
        path,
        file: Arc::new(file),
        base,
        last: base - 1,
        bytes: 0,
        last_publish_time: None,
        index: Vec::new(),
        held_by_family: HeldCounts::new(),
    })
}

/// Reads and checks a whole segment. Only a torn write at the end of the last segment (see
/// [`is_torn_tail`]) is cut off, and logged; any other bad record is corruption.
fn scan_segment(path: &Path, base: u64, is_last: bool) -> Result<Segment, StoreError> {
    let bytes = fs::read(path)?;
    let mut segment = Segment {
        path: path.to_owned(),
        file: Arc::new(OpenOptions::new().read(true).append(true).open(path)?),
        base,
        last: base - 1,
        bytes: 0,
        last_publish_time: None,
        index: Vec::new(),
        held_by_family: HeldCounts::new(),
    };
    let mut offset = 0usize;
    let mut next_index_at = 0u64;
    while offset < bytes.len() {
        let decoded = codec::decode(&bytes[offset..]).and_then(|(stored, len)| {
            if stored.sequence == segment.last + 1 {
                Ok((stored, len))
            } else {
                Err(DecodeError::Malformed("sequence out of order"))
            }
        });
        match decoded {
            Ok((stored, len)) => {
                if offset as u64 >= next_index_at {
                    segment
                        .index
                        .push((stored.sequence, offset as u64, stored.publish_time));
                    next_index_at = offset as u64 + INDEX_INTERVAL_BYTES;
                }
                segment.last = stored.sequence;
                segment.last_publish_time = Some(stored.publish_time);
                count_family(&mut segment.held_by_family, stored.event.topic.family());
                offset += len;
            }
            Err(error) if is_last && is_torn_tail(&bytes[offset..], &error) => {
                warn!(
                    path = %path.display(),
                    offset,
                    dropped_bytes = bytes.len() - offset,
                    %error,
                    "cutting a torn write off the end of the log"
                );
                segment.file.set_len(offset as u64)?;
                segment.file.sync_all()?;
                break;
            }
            Err(error) => {
                let more = if offset + 1 < bytes.len()
                    && codec::next_record(&bytes, offset + 1).is_some()
                {
                    ", and intact records follow it"
                } else {
                    ""
                };
                return Err(StoreError::Corrupt {
                    path: path.to_owned(),
                    offset: offset as u64,
                    reason: format!("{error}{more}"),
                });
            }
        }
    }
    segment.bytes = offset as u64;
    Ok(segment)
}

/// Whether `rest`, from a record that failed with `error` to the end of the file, is a write a
/// crash cut short: the file ends inside the record (its declared length runs past the end, or
/// not even its header is there) or in the zeros a crash can leave past the last write, and no
/// valid record follows. A complete record that fails its checksum or format is not: it was
/// written whole (and may have been acknowledged), so it is corruption, never cut.
fn is_torn_tail(rest: &[u8], error: &DecodeError) -> bool {
    let ends_inside = matches!(error, DecodeError::Incomplete { .. });
    let zeros = rest.iter().all(|byte| *byte == 0);
    (ends_inside || zeros) && codec::next_record(rest, 1).is_none()
}

/// What [`repair`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Every file written or moved under `<data-dir>/damaged/`, in order.
    pub moved: Vec<PathBuf>,
    /// Runs of intact records that followed damage and so left the log, each now a valid
    /// segment file (named by its first sequence, readable with the [`codec`]) among `moved`:
    /// (file, first sequence, last sequence).
    pub intact_set_aside: Vec<(PathBuf, u64, u64)>,
    /// The last sequence the log keeps, if it keeps any.
    pub kept_through: Option<u64>,
    /// The identity repair gave the log, when it gave it one: the log's sequences after
    /// `kept_through` will be assigned again, or its `log-id` was missing or unreadable.
    pub new_log_id: Option<String>,
    /// Groups whose saved cursor survived repair, by name.
    pub groups_kept: Vec<String>,
    /// Groups whose cursor pointed past `kept_through` and was moved back to it.
    pub groups_moved_back: Vec<String>,
    /// True when `groups.json` was unreadable: it was moved aside and only the groups in
    /// `groups_kept` could be read back from it; any other group starts as a new group.
    pub groups_file_damaged: bool,
}

impl RepairReport {
    /// Whether repair changed anything.
    pub fn changed_anything(&self) -> bool {
        !self.moved.is_empty() || self.new_log_id.is_some()
    }
}

/// `<data-dir>/damaged/repair-<unix seconds>[-n]/`, created on first use: one directory per run,
/// so repeated repairs never overwrite what an earlier one set aside.
struct DamagedDir {
    parent: PathBuf,
    dir: Option<PathBuf>,
}

impl DamagedDir {
    fn get(&mut self) -> Result<&Path, StoreError> {
        if self.dir.is_none() {
            let seconds = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            fs::create_dir_all(&self.parent)?;
            let mut attempt = 0;
            let dir = loop {
                let name = match attempt {
                    0 => format!("repair-{seconds}"),
                    n => format!("repair-{seconds}-{n}"),
                };
                let dir = self.parent.join(name);
                match fs::create_dir(&dir) {
                    Ok(()) => break dir,
                    Err(error) if error.kind() == io::ErrorKind::AlreadyExists => attempt += 1,
                    Err(error) => return Err(error.into()),
                }
            };
            File::open(&self.parent)?.sync_all()?;
            self.dir = Some(dir);
        }
        Ok(self.dir.as_deref().expect("just set"))
    }

    /// A path for `name` in the run's directory that nothing holds yet (`name.1`, `name.2`, ...
    /// if taken): nothing set aside is ever overwritten.
    fn free_path(&mut self, name: &str) -> Result<PathBuf, StoreError> {
        let dir = self.get()?;
        let mut path = dir.join(name);
        let mut n = 0;
        while path.exists() {
            n += 1;
            path = dir.join(format!("{name}.{n}"));
        }
        Ok(path)
    }

    /// Writes `bytes` as a new file `name` (durably) and returns its path.
    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let path = self.free_path(name)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(path)
    }

    /// Moves `from` in (a rename: the bytes are not copied) and returns its new path.
    fn take(&mut self, from: &Path) -> Result<PathBuf, StoreError> {
        let name = from
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a file name");
        let path = self.free_path(name)?;
        fs::rename(from, &path)?;
        Ok(path)
    }

    fn sync(&self) -> Result<(), StoreError> {
        if let Some(dir) = &self.dir {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// One piece of a damaged segment's tail: `offset` and `len` in the bytes split, and for a run
/// of intact records, its first and last sequence.
type Piece = (usize, usize, Option<(u64, u64)>);

/// Splits `bytes` (from the first bad record of a segment to its end) into damaged stretches
/// and runs of intact, consecutive records, in order. Together they cover every byte once.
fn split_damage(bytes: &[u8]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        // A damaged stretch: up to the next valid record, or the end.
        let resume = codec::next_record(bytes, at + 1).unwrap_or(bytes.len());
        pieces.push((at, resume - at, None));
        at = resume;
        // An intact run: records with consecutive sequences, until the next bad one.
        let start = at;
        let mut run: Option<(u64, u64)> = None;
        while let Ok((stored, len)) = codec::decode(&bytes[at..]) {
            match run {
                None => run = Some((stored.sequence, stored.sequence)),
                Some((first, last)) if stored.sequence == last + 1 => {
                    run = Some((first, stored.sequence))
                }
                Some(_) => break,
            }
            at += len;
        }
        if let Some(run) = run {
            pieces.push((start, at - start, Some(run)));
        }
    }
    pieces
}

/// Makes a data directory that fails recovery openable again, setting aside (never deleting)
/// what it cannot keep into `<data-dir>/damaged/repair-<time>/`. Takes the directory's lock, so
/// it refuses to run under a live bus.
///
/// - **The log.** Sequences in the log must stay consecutive (readers, retention and the
///   clients' resume rules all rely on it), so the log keeps the run of records before the first
///   damaged one. The damaged bytes go aside as `<segment>.damaged-at-<offset>`, exactly the
///   stretch from the bad record to where valid records resume; each run of intact records
///   after it goes aside as a valid segment file named by its first sequence (readable with the
///   codec, or by opening that directory as a log); later segments are moved whole. A torn
///   write at the end of the log is set aside the same way.
/// - **Identity.** When records with sequences after the kept run were set aside, those
///   sequences will be assigned again to new events, so the log gets a new `log-id` (the old
///   file is set aside): clients see a new log and start over from its earliest event, instead
///   of taking new events for ones they already saw. A missing or unreadable `log-id` of a log
///   that holds events gets a new one the same way.
/// - **Group cursors.** An unreadable `groups.json` is set aside and every group that can be
///   read from it is kept; the others start as new groups. A cursor past the kept run is moved
///   back to its end.
///
/// # Errors
/// [`StoreError::Locked`] if a bus holds the directory; [`StoreError::Io`] if reading or moving
/// fails (nothing of the log is cut before its copy is durable under `damaged/`).
pub fn repair(data_dir: &Path) -> Result<RepairReport, StoreError> {
    let _lock = DirLock::acquire(data_dir)?;
    let log_dir = data_dir.join("log");
    let segments = segment_paths(&log_dir)?;
    let mut report = RepairReport::default();

    // First, reading only: where the log stops being whole, and what it keeps.
    let mut damage: Option<Damage> = None;
    let mut has_history = false;
    let mut expected_base = None;
    for (position, (base, path)) in segments.iter().enumerate() {
        has_history |= *base > 1;
        if expected_base.is_some_and(|expected| expected != *base) {
            damage = Some(Damage {
                segment: position,
                offset: None,
                torn: false,
            });
            break;
        }
        // Scanned as not the last segment: repair sets a torn tail aside too, never cuts it.
        match scan_segment(path, *base, false) {
            Ok(segment) => {
                if segment.count() > 0 {
                    report.kept_through = Some(segment.last);
                    has_history = true;
                }
                expected_base = Some(segment.last + 1);
            }
            Err(StoreError::Corrupt { offset, .. }) => {
                let bytes = fs::read(path)?;
                let offset = offset as usize;
                let before = count_records(&bytes[..offset]);
                if before > 0 {
                    report.kept_through = Some(base - 1 + before);
                    has_history = true;
                }
                let rest = &bytes[offset..];
                let torn = position + 1 == segments.len()
                    && codec::decode(rest)
                        .err()
                        .is_some_and(|error| is_torn_tail(rest, &error));
                damage = Some(Damage {
                    segment: position,
                    offset: Some(offset),
                    torn,
                });
                break;
            }
            Err(other) => return Err(other),
        }
    }
    // Complete records (with sequences new events would be given again) leave the log.
    let sequences_set_aside = damage.as_ref().is_some_and(|d| !d.torn);
    has_history |= sequences_set_aside;
    let kept_through = report.kept_through.unwrap_or(0);
    let mut damaged = DamagedDir {
        parent: data_dir.join("damaged"),
        dir: None,
    };

    // The identity and the cursors are settled before the log is cut, so a repair cut short
    // never leaves a shortened log under its old identity: run again, it finishes the job.
    let id_path = data_dir.join(LOG_ID_FILE);
    let id_readable = matches!(read_log_id(data_dir), Ok(Some(_)));
    if sequences_set_aside || (has_history && !id_readable) {
        if id_path.exists() {
            report.moved.push(damaged.take(&id_path)?);
            damaged.sync()?;
        }
        let id = uuid::Uuid::now_v7().to_string();
        write_atomically(data_dir, LOG_ID_FILE, id.as_bytes())?;
        report.new_log_id = Some(id);
    }
    let groups_path = data_dir.join(GROUPS_FILE);
    let (mut cursors, readable) = match fs::read(&groups_path) {
        Ok(bytes) => match serde_json::from_slice::<HashMap<String, GroupCursor>>(&bytes) {
            Ok(cursors) => (cursors, true),
            Err(_) => (salvage_group_cursors(&bytes), false),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => (HashMap::new(), true),
        Err(error) => return Err(error.into()),
    };
    for (name, cursor) in &mut cursors {
        if sequences_set_aside && cursor.cursor > kept_through {
            cursor.cursor = kept_through;
            report.groups_moved_back.push(name.clone());
        }
    }
    report.groups_moved_back.sort();
    report.groups_kept = cursors.keys().cloned().collect();
    report.groups_kept.sort();
    if !readable || !report.groups_moved_back.is_empty() {
        report.groups_file_damaged = !readable;
        report.moved.push(damaged.take(&groups_path)?);
        damaged.sync()?;
        let json = serde_json::to_vec_pretty(&cursors).map_err(io::Error::other)?;
        write_atomically(data_dir, GROUPS_FILE, &json)?;
    }

    // Then the log: the damaged segment's tail is copied aside and cut, later segments moved.
    let Some(damage) = damage else {
        return Ok(report);
    };
    let mut whole_from = damage.segment;
    if let Some(offset) = damage.offset {
        whole_from += 1;
        let path = &segments[damage.segment].1;
        let bytes = fs::read(path)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a segment name");
        let rest = &bytes[offset..];
        for (at, len, run) in split_damage(rest) {
            let piece = &rest[at..at + len];
            match run {
                Some((first, last)) => {
                    let file = damaged.write(&segment_name(first), piece)?;
                    report.intact_set_aside.push((file.clone(), first, last));
                    report.moved.push(file);
                }
                None => {
                    let file =
                        damaged.write(&format!("{name}.damaged-at-{}", offset + at), piece)?;
                    report.moved.push(file);
                }
            }
        }
        damaged.sync()?;
        // Only now that every byte is durable under damaged/ is the segment cut.
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(offset as u64)?;
        file.sync_all()?;
    }
    for (_, path) in &segments[whole_from..] {
        report.moved.push(damaged.take(path)?);
    }
    damaged.sync()?;
    File::open(&log_dir)?.sync_all()?;
    Ok(report)
}

/// Where [`repair`] found the log stops being whole.
struct Damage {
    /// The position (in base order) of the first segment not kept whole.
    segment: usize,
    /// Where in that segment the first bad record starts; `None` when the segment does not
    /// follow on from the previous one and is set aside whole.
    offset: Option<usize>,
    /// Whether the bad part is a torn final write (no complete record lost).
    torn: bool,
}

/// How many records `bytes` holds, all of them valid (as recovery checked).
fn count_records(bytes: &[u8]) -> u64 {
    let mut at = 0;
    let mut count = 0;
    while let Ok((_, len)) = codec::frame(&bytes[at..]) {
        at += len;
        count += 1;
    }
    count
}

/// The groups that can still be read from a damaged `groups.json` (typically one cut short):
/// the longest prefix that ends after a whole entry, closed and parsed.
fn salvage_group_cursors(bytes: &[u8]) -> HashMap<String, GroupCursor> {
    let text = String::from_utf8_lossy(bytes);
    let mut best = HashMap::new();
    for (end, _) in text.match_indices('}') {
        let prefix = &text[..=end];
        for candidate in [format!("{prefix}}}"), prefix.to_owned()] {
            if let Ok(cursors) = serde_json::from_str::<HashMap<String, GroupCursor>>(&candidate) {
                if cursors.len() >= best.len() {
                    best = cursors;
                }
            }
        }
    }
    best
}

#[cfg(test)]
mod tests;
