//! Fuzzes the file store's segment reader: arbitrary bytes, as the codec sees a record and as
//! recovery sees the last segment of a log, must never panic, and recovery must either refuse
//! naming the first bad record or keep exactly the records before it.
#![no_main]

use eventbus::store::codec;
use eventbus::store::{FileStore, FileStoreConfig, FsyncPolicy, Store, StoreError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    // The codec on its own: decode record after record until the first error.
    let mut offset = 0;
    let mut complete = 0u64;
    let mut last_sequence = None;
    while offset < bytes.len() {
        match codec::decode(&bytes[offset..]) {
            Ok((event, length)) => {
                // Recovery also wants consecutive sequences starting at the segment's base.
                if event.sequence != last_sequence.map_or(1, |s: u64| s + 1) {
                    break;
                }
                last_sequence = Some(event.sequence);
                offset += length;
                complete += 1;
            }
            Err(_) => break,
        }
    }
    let offset_of_first_bad = offset;

    // Recovery of a log whose only segment holds these bytes: it either refuses (corruption:
    // a bad record that is not a torn final write) or opens keeping exactly the complete,
    // well-ordered records before the first bad one (a torn tail is cut). It never opens with
    // fewer.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    std::fs::create_dir_all(&log).unwrap();
    std::fs::write(log.join(format!("{:020}.log", 1)), bytes).unwrap();
    // A log that holds events has an identity; without one, start-up refuses (by design).
    std::fs::write(dir.path().join("log-id"), "fuzz-log").unwrap();
    match FileStore::open(FileStoreConfig {
        fsync: FsyncPolicy::Never,
        ..FileStoreConfig::new(dir.path())
    }) {
        Ok(store) => {
            assert_eq!(store.bounds().head, complete);
            assert_eq!(
                store.read_after(0, usize::MAX).unwrap().len() as u64,
                complete
            );
        }
        Err(StoreError::Corrupt { offset, .. }) => {
            assert_eq!(offset, offset_of_first_bad as u64, "refused at the first bad record");
        }
        Err(other) => panic!("recovery failed with {other}"),
    }
});
