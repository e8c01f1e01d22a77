//! Running the built `train` binary from tests, sandboxed: its working
//! directory and home in the test's own directory, no profile path from the
//! environment, no colour, no machine detection (so no test depends on the
//! machine it runs on).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use qlora_scale::storage::PROFILE_PATH_ENV;

/// The `train` binary Cargo built for these tests.
pub const TRAIN: &str = env!("CARGO_BIN_EXE_train");

/// Puts `cmd` (`train`, or `mpirun` starting it) in the sandbox `dir`.
pub fn sandbox<'a>(cmd: &'a mut Command, dir: &Path) -> &'a mut Command {
    cmd.current_dir(dir)
        .env("HOME", dir)
        .env_remove(PROFILE_PATH_ENV)
        .env("NO_COLOR", "1")
        .env("QLORA_SCALE_DETECT", "off")
}

/// `train` in the sandbox `dir`, without arguments.
pub fn train_in(dir: &Path) -> Command {
    let mut cmd = Command::new(TRAIN);
    sandbox(&mut cmd, dir);
    cmd
}

/// `train --profile-path DIR/no-profile.json` in the sandbox: a profile
/// path where no profile is saved.
pub fn train_without_profile(dir: &Path) -> Command {
    let mut cmd = train_in(dir);
    cmd.arg("--profile-path").arg(dir.join("no-profile.json"));
    cmd
}
