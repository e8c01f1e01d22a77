//! `profile show`: the saved profile.

use std::io::Write;

use anyhow::Context as _;
use qlora_scale::saved_profile::load_profile;
use serde_json::Value;

use crate::Context;
use crate::args::JsonArgs;
use crate::render::{write_hardware_profile, write_json_pretty};

/// Runs `show`. No saved profile is not an error: it says so (JSON: `null`).
/// A file that is not a valid profile is an error naming it; it is only read.
pub fn run(args: &JsonArgs, ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let path = &ctx.profile_path;
    let profile = load_profile(path)?;
    let written = match (profile, args.json) {
        (Some(p), true) => write_json_pretty(out, &p),
        (None, true) => write_json_pretty(out, &Value::Null),
        (Some(p), false) => writeln!(out, "Saved profile: {}", path.display())
            .and_then(|()| write_hardware_profile(out, &p)),
        (None, false) => writeln!(
            out,
            "No saved profile at {}.\n\
             Create one with `profile setup` (interactive), or \
             `profile setup --generation GEN --chip VARIANT --memory GB --yes`.",
            path.display()
        ),
    };
    written.context("cannot write to stdout")
}
