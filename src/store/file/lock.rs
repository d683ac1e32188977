//! The claim on a data directory: one process at a time may write it.
//!
//! Two buses on one `--data-dir` would both append to the active segment and corrupt each
//! other's log, and `eventbus repair` under a running bus would cut files the bus still writes.
//! So every writer first takes an exclusive `flock` on `<data-dir>/LOCK` (std's
//! [`File::try_lock`]) and keeps it for as long as it uses the directory. The kernel drops the
//! lock when the holder's file is closed or the process dies (even by SIGKILL), so a stale
//! `LOCK` file never blocks a restart; it is therefore never deleted (deleting it would let a
//! second process lock a new file while the first still holds the old one). The holder writes
//! its pid into the file, only so that a refused process can name it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use crate::store::StoreError;

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// An exclusive claim on a data directory, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    /// Kept open: closing it releases the lock.
    _file: File,
}

impl DirLock {
    /// Creates `dir` if needed and locks it for this process.
    ///
    /// # Errors
    /// [`StoreError::Locked`] (naming `dir` and, when it could be read, the holder's pid) if
    /// another process, or another open store in this process, holds it;
    /// [`StoreError::Io`] if the lock file cannot be created or locked.
    pub fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(StoreError::Locked {
                    dir: dir.to_owned(),
                    holder,
                });
            }
            Err(TryLockError::Error(error)) => return Err(error.into()),
        }
        // Only a hint for whoever is refused next: no sync needed, a crash ends the lock anyway.
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(DirLock { _file: file })
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Unlock explicitly rather than by closing: a child forked by another thread of this
        // process shares the open file (until its exec closes it) and would keep the lock
        // held for a moment after the store is gone.
        let _ = self._file.unlock();
    }
}

/// How a refusal names the holder.
pub(crate) fn describe_holder(holder: &Option<u32>) -> String {
    match holder {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_owned(),
    }
}
