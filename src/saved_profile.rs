//! The saved hardware profile: JSON in the per-user config directory,
//! written atomically.

use crate::safe_io::write_atomic;
use std::path::{Path, PathBuf};

use crate::hardware::HardwareProfile;

/// Environment variable that overrides where the profile is kept.
pub const PROFILE_PATH_ENV: &str = "QLORA_SCALE_PROFILE";

/// Errors reading or writing the saved profile. Each names the file; the
/// cause, if any, is the `source()`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but cannot be read.
    #[error("cannot read saved profile {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: crate::safe_io::ReadError,
    },
    /// The file is not a valid profile; it is left untouched.
    #[error("saved profile {path} is not a valid profile (left untouched; fix or delete it)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why: the parser's error, with its line and column.
        source: serde_json::Error,
    },
    /// Writing failed; any previous file is intact.
    #[error("cannot write saved profile {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No place to keep the profile could be found.
    #[error("no config directory found: set {PROFILE_PATH_ENV} or pass --profile-path")]
    NoConfigDir,
}

/// Where the profile is kept: `$QLORA_SCALE_PROFILE`, else
/// `<config dir>/qlora-scale/hardware_profile.json`.
pub fn default_profile_path() -> Result<PathBuf, StoreError> {
    if let Some(p) = std::env::var_os(PROFILE_PATH_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    dirs::config_dir()
        .map(|d| d.join("qlora-scale").join("hardware_profile.json"))
        .ok_or(StoreError::NoConfigDir)
}

/// Loads the profile at `path`. A missing file is `Ok(None)`; an unreadable
/// or invalid one is an error, and the file is not touched.
pub fn load_profile(path: &Path) -> Result<Option<HardwareProfile>, StoreError> {
    let bytes = match crate::safe_io::read_small(path) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

/// Saves `profile` to `path` atomically, as pretty JSON.
pub fn save_profile(path: &Path, profile: &HardwareProfile) -> Result<(), StoreError> {
    let mut json = serde_json::to_vec_pretty(profile).expect("a profile always serialises");
    json.push(b'\n');
    write_atomic(path, &json).map_err(|source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    })
}
