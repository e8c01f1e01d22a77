//! `profile`: detect model sizes, inspect the hardware, create the saved
//! hardware profile, recommend models and print the profile scaled for a model.
//!
//! The subcommands and their output formats are the interface that scripts
//! rely on (README.md, "The `profile` command"); `tests/cli_profile.rs` runs
//! them and snapshots every `--help`.
//!
//! The subcommands live in `src/bin/profile/` (a crate root looks for its
//! modules beside it, hence the `#[path]`s).

#[path = "profile/args.rs"]
mod args;
#[path = "profile/detect_model.rs"]
mod detect_model;
#[path = "profile/hardware.rs"]
mod hardware;
#[path = "profile/recommend.rs"]
mod recommend;
#[path = "profile/render.rs"]
mod render;
#[path = "profile/scale.rs"]
mod scale;
#[path = "profile/setup.rs"]
mod setup;
#[path = "profile/show.rs"]
mod show;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

use args::{Cli, Command};
use qlora_scale::report::error_message;

/// What every subcommand needs besides its own arguments.
pub struct Context {
    /// Where the saved profile lives (already resolved: flag, env var, config
    /// directory).
    pub profile_path: PathBuf,
}

impl Context {
    fn from_cli(cli_path: Option<PathBuf>) -> anyhow::Result<Context> {
        let profile_path = match cli_path {
            Some(p) => p,
            None => qlora_scale::saved_profile::default_profile_path()
                .context("cannot tell where the saved profile lives")?,
        };
        Ok(Context { profile_path })
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    // Resolved only by the subcommands that use it: a machine without a config
    // directory can still detect names.
    let path = cli.profile_path;
    let ctx = || Context::from_cli(path.clone());
    match cli.command {
        Command::DetectModel(a) => detect_model::run(&a, &mut out),
        Command::Hardware(a) => hardware::run(&a, &mut out),
        Command::Setup(a) => {
            let stdin = io::stdin();
            setup::run(&a, &ctx()?, &mut stdin.lock(), &mut out)
        }
        Command::Recommend(a) => recommend::run(&a, &ctx()?, &mut out),
        Command::Show(a) => show::run(&a, &ctx()?, &mut out),
        Command::Scale(a) => scale::run(&a, &ctx()?, &mut out),
    }?;
    out.flush().context("cannot write to stdout")
}

/// Whether `err` comes from writing to a closed pipe (`profile ... | head`).
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away; nothing more to say, and nobody to say it to.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(io::stderr().lock(), "error: {}", error_message(&err));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_is_printed_in_order() {
        let inner = io::Error::other("disk on fire");
        let outer = anyhow::Error::new(inner).context("cannot save");
        assert_eq!(error_message(&outer), "cannot save: disk on fire");
        let outer = anyhow::anyhow!("root cause").context("while saving");
        assert_eq!(error_message(&outer), "while saving: root cause");
        // Nothing is stripped: a message that quotes its cause says it twice,
        // which is that message's bug, not the printer's.
        let inner = io::Error::other("disk on fire");
        let outer = anyhow::Error::new(inner).context("cannot save: disk on fire");
        assert_eq!(
            error_message(&outer),
            "cannot save: disk on fire: disk on fire"
        );
    }

    #[test]
    fn broken_pipes_are_recognised_through_context() {
        let err = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("cannot write to stdout");
        assert!(is_broken_pipe(&err));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
