//! The embedded data directory is private: 0700, and its database files 0600, because
//! they hold every tenant's data (and, beside them, the key that seals its secrets).
//!
//! SQLite creates its `-wal` and `-shm` files with the database file's mode, so the
//! database file is created 0600 before SQLite opens it; files of earlier versions are
//! narrowed at every start.

use std::fs::{self, OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

/// Mode of the data directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files in it.
pub const FILE_MODE: u32 = 0o600;

/// Narrows `dir` to [`DIR_MODE`] and the database `file` (created empty when missing)
/// and its journal files to [`FILE_MODE`].
pub fn make_private(dir: &Path, file: &Path) -> anyhow::Result<()> {
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
        .with_context(|| format!("cannot make the data directory {} private", dir.display()))?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(file)
        .with_context(|| format!("cannot create the database file {}", file.display()))?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let path = format!("{}{suffix}", file.display());
        match fs::set_permissions(&path, Permissions::from_mode(FILE_MODE)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other.with_context(|| format!("cannot make {path} private (0600)"))?,
        }
    }
    Ok(())
}
