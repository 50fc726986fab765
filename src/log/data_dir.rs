//! The adapter's data directory (`SMQ_MQTT_ADAPTER_DATA_DIR`): where the event spool and the
//! session journal live. One process owns it at a time, enforced by a lock file, because two
//! adapters replaying one spool or journal would duplicate or lose events.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// A data directory that cannot be used; the message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot use {path}: {source}; point it at a writable directory")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is in use by another mqtt-adapter process; give each instance its own directory"
    )]
    Locked { path: PathBuf },
}

impl DataDirError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataDirError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// An open, locked data directory. The lock is released when this is dropped (or the process
/// dies, so a `kill -9` never leaves a stale lock behind).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed and takes its lock.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        std::fs::create_dir_all(path).map_err(|e| DataDirError::io(path, e))?;
        let lock_path = path.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| DataDirError::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DataDirError::Locked {
                    path: path.to_owned(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(DataDirError::io(&lock_path, e)),
        }
        Ok(DataDir {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = DataDir::open(dir.path()).expect("first open");
        let err = DataDir::open(dir.path()).expect_err("second open must fail");
        assert!(matches!(err, DataDirError::Locked { .. }), "{err}");
        drop(first);
        DataDir::open(dir.path()).expect("open after release");
    }
}
