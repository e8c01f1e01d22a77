//! The files that matter: written atomically, so that a crash, a full disk
//! or a signal leaves the old file or the new one, never a torn one; and
//! small files from strangers read with a size cap, refusing anything that
//! is not a regular file.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, flushed to disk, then renamed over `path`. A crash leaves the
/// old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tmp-");
    // A temporary file is private (0600) by default; the file it becomes
    // gets the permissions of any newly created file (0666 less the umask).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // Make the rename itself durable where the platform allows it.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Moves `staged`, a file written in full beside `path`, into place: flushed
/// to disk, readable by all (0644, as a newly created file usually is;
/// writers that stage through a private temporary file leave 0600), then
/// renamed over `path`. For files too large to hold in memory for
/// [`write_atomic`]; a crash leaves the old `path` or the new one.
pub fn commit_staged(staged: &Path, path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(staged)?;
    file.sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    drop(file);
    std::fs::rename(staged, path)?;
    if let Some(d) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Errors of reading a small file with [`read_small`].
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A FIFO, a device, a socket or a directory.
    #[error("{path} is not a regular file ({kind}): refused")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// Larger than the cap.
    #[error(
        "{path} is larger than {cap} bytes, the most read for a file of its kind (max_small_file_bytes in tables/defaults.toml)"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The cap, bytes.
        cap: u64,
    },
}

impl ReadError {
    /// Whether the file does not exist (absent is not unreadable).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Reads a small file whole: a regular file (after symlinks) of at most
/// `trainer::MAX_SMALL_FILE_BYTES` bytes. A FIFO, device or directory is
/// refused without blocking on it, and nothing past the cap is read, so a
/// stranger's file can neither hang the caller nor exhaust its memory.
pub fn read_small(path: &Path) -> Result<Vec<u8>, ReadError> {
    read_capped(path, crate::tables::trainer::MAX_SMALL_FILE_BYTES)
}

/// [`read_small`] as UTF-8 text (invalid UTF-8 is an I/O error of kind
/// `InvalidData`).
pub fn read_small_string(path: &Path) -> Result<String, ReadError> {
    let bytes = read_small(path)?;
    String::from_utf8(bytes).map_err(|e| ReadError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// [`read_small`] with the cap given.
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Opening a FIFO for reading waits for a writer: open without blocking,
    // then refuse anything that is not a regular file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "a FIFO, device or socket"
        };
        return Err(ReadError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    if meta.len() > cap {
        return Err(ReadError::TooLarge {
            path: path.to_path_buf(),
            cap,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > cap {
        return Err(ReadError::TooLarge {
            path: path.to_path_buf(),
            cap,
        });
    }
    Ok(bytes)
}
