//! `profile setup`: the wizard that creates the saved profile of an Apple
//! Silicon Mac. (Other machines need none: `profile hardware` and `profile
//! scale` detect NVIDIA GPUs and the CPU.)
//!
//! Each of generation, chip variant and memory not given as a flag is asked
//! for, with the detected value as the default. A bad answer is explained and
//! asked again, [`MAX_ATTEMPTS`] times at most; the end of input is an error,
//! never a hang. The profile is shown, then saved atomically after
//! confirmation (or at once with `--yes`).

use std::io::{self, BufRead, IsTerminal, Write};

use anyhow::{Context as _, bail};
use qlora_scale::hardware::{DetectedHardware, detect_hardware};
use qlora_scale::report::chain_message;
use qlora_scale::saved_profile::{StoreError, load_profile, save_profile};
use qlora_scale::tables::MEMORY_OPTIONS_GB;
use qlora_scale::{ChipVariant, Generation, optimized_profile};

use crate::Context;
use crate::args::{SetupArgs, join};
use crate::render::{chip_name, write_hardware_profile};

/// Said when the machine is not an Apple Silicon Mac: the wizard still asks,
/// for a profile to use on a Mac.
pub const NOT_APPLE_HINT: &str = "This wizard saves Apple Silicon profiles; \
     for this machine see `profile hardware`, or `profile scale --gpu-memory/--cpu-memory`.";

/// How many answers to one question are read before giving up.
pub const MAX_ATTEMPTS: usize = 3;

/// Runs `setup` on the process's stdin.
pub fn run(
    args: &SetupArgs,
    ctx: &Context,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    // Piped answers are not echoed by a terminal: echo them so the transcript
    // reads as a dialogue.
    let echo = !io::stdin().is_terminal();
    let mut prompter = Prompter { input, out, echo };
    wizard(args, ctx, detect_hardware(), &mut prompter)
}

/// Reads answers from `input`, writing questions (and, with `echo`, the
/// answers) to `out`.
pub struct Prompter<'a> {
    /// Where answers come from.
    pub input: &'a mut dyn BufRead,
    /// Where questions go.
    pub out: &'a mut dyn Write,
    /// Write each answer after its question.
    pub echo: bool,
}

impl Prompter<'_> {
    /// Asks `question` until `parse` accepts the answer. An empty answer is
    /// `default` when there is one. `what` and `flag` name the value in
    /// errors.
    pub fn ask<T>(
        &mut self,
        what: &str,
        flag: &str,
        question: &str,
        default: Option<&str>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<T> {
        for _ in 0..MAX_ATTEMPTS {
            match default {
                Some(d) => write!(self.out, "{question} [{d}]: "),
                None => write!(self.out, "{question}: "),
            }
            .and_then(|()| self.out.flush())
            .context("cannot write to stdout")?;
            let mut line = Vec::new();
            let n = self
                .input
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read the {what} from stdin"))?;
            if n == 0 {
                writeln!(self.out).context("cannot write to stdout")?;
                bail!(
                    "input ended before the {what} was given (pass {flag} to give it without asking)"
                );
            }
            let answer = String::from_utf8_lossy(&line);
            let answer = answer.trim();
            if self.echo {
                writeln!(self.out, "{answer}").context("cannot write to stdout")?;
            }
            let result = if std::str::from_utf8(&line).is_err() {
                Err("the answer is not valid UTF-8".to_string())
            } else if answer.is_empty() {
                default.map_or_else(|| Err("an answer is needed".to_string()), &parse)
            } else {
                parse(answer)
            };
            match result {
                Ok(value) => return Ok(value),
                Err(why) => writeln!(self.out, "  {why}").context("cannot write to stdout")?,
            }
        }
        bail!(
            "no valid {what} after {MAX_ATTEMPTS} answers (pass {flag} to give it without asking)"
        )
    }
}

fn parse_generation(answer: &str) -> Result<Generation, String> {
    answer.parse::<Generation>().map_err(|e| e.to_string())
}

fn parse_variant(answer: &str) -> Result<ChipVariant, String> {
    answer.parse::<ChipVariant>().map_err(|e| e.to_string())
}

/// A memory answer: one of `choices`.
fn parse_memory(answer: &str, choices: &[u32], chip: &str) -> Result<u32, String> {
    match answer.parse::<u32>() {
        Ok(m) if choices.contains(&m) => Ok(m),
        _ => Err(format!(
            "\"{answer}\" is not a memory size of the {chip}; choose one of {} (GB)",
            join(choices)
        )),
    }
}

/// The memory sizes the wizard accepts for `variant`: those it is sold with,
/// and the detected size.
fn memory_choices(variant: ChipVariant, detected: Option<u32>) -> Vec<u32> {
    let mut choices = MEMORY_OPTIONS_GB[variant.index()].to_vec();
    if let Some(m) = detected.filter(|m| *m > 0 && !choices.contains(m)) {
        choices.push(m);
        choices.sort_unstable();
    }
    choices
}

/// The wizard itself, with detection and the terminal given.
pub fn wizard(
    args: &SetupArgs,
    ctx: &Context,
    detected: Option<DetectedHardware>,
    p: &mut Prompter<'_>,
) -> anyhow::Result<()> {
    let flags = &args.hardware;
    let detected_memory = detected.map(|d| d.memory_gb).filter(|m| *m > 0);
    if !flags.missing().is_empty() {
        let intro = match (
            detected.and_then(|d| d.generation.zip(d.variant)),
            detected_memory,
        ) {
            (Some((g, v)), Some(m)) => {
                format!(
                    "Detected {}, {m} GB (press Enter to accept a detected value).",
                    chip_name(g, v)
                )
            }
            (None, Some(m)) => format!(
                "Detected {m} GB of memory, but not an Apple Silicon chip. {NOT_APPLE_HINT}"
            ),
            _ => format!(
                "Could not detect an Apple Silicon Mac; no defaults to offer. {NOT_APPLE_HINT}"
            ),
        };
        writeln!(p.out, "{intro}").context("cannot write to stdout")?;
    }

    let generation = match flags.generation {
        Some(g) => g,
        None => {
            let default = detected.and_then(|d| d.generation).map(Generation::name);
            let question = format!(
                "Chip generation ({})",
                join(&Generation::ALL.map(Generation::name))
            );
            p.ask(
                "generation",
                "--generation",
                &question,
                default,
                parse_generation,
            )?
        }
    };
    let variant = match flags.chip {
        Some(v) => v,
        None => {
            let default = detected.and_then(|d| d.variant).map(ChipVariant::name);
            let question = format!(
                "Chip variant ({})",
                join(&ChipVariant::ALL.map(ChipVariant::name))
            );
            p.ask("chip variant", "--chip", &question, default, parse_variant)?
        }
    };
    let chip = chip_name(generation, variant);
    let choices = memory_choices(variant, detected_memory);
    let memory = match flags.memory {
        Some(m) => {
            if !choices.contains(&m) {
                let sold = join(MEMORY_OPTIONS_GB[variant.index()]);
                writeln!(
                    p.out,
                    "note: the {chip} is not sold with {m} GB ({sold} GB are); \
                     the profile row with the nearest memory applies"
                )
                .context("cannot write to stdout")?;
            }
            m
        }
        None => {
            let default = detected_memory.map(|m| m.to_string());
            let question = format!("Memory in GB for the {chip} ({})", join(&choices));
            let parse = |answer: &str| parse_memory(answer, &choices, &chip);
            p.ask("memory", "--memory", &question, default.as_deref(), parse)?
        }
    };

    let profile = optimized_profile(generation, variant, memory);
    writeln!(p.out).context("cannot write to stdout")?;
    write_hardware_profile(p.out, &profile).context("cannot write to stdout")?;
    writeln!(p.out).context("cannot write to stdout")?;

    confirm_and_save(args, &ctx.profile_path, &profile, p)
}

/// Asks before writing `profile` to `path` (replacing a saved or unusable
/// file only on a yes, or with `--yes`), then saves it.
fn confirm_and_save(
    args: &SetupArgs,
    path: &std::path::Path,
    profile: &qlora_scale::HardwareProfile,
    p: &mut Prompter<'_>,
) -> anyhow::Result<()> {
    let question = match load_profile(path) {
        Ok(None) => format!("Save it to {}? (y/n)", path.display()),
        Ok(Some(_)) => format!("Replace the saved profile at {}? (y/n)", path.display()),
        Err(e) => {
            // Only a yes (or --yes) replaces a file that cannot be read.
            let why = match &e {
                StoreError::Corrupt { source, .. } => {
                    format!("is not a valid profile ({})", chain_message(source))
                }
                StoreError::Read { source, .. } => {
                    format!("cannot be read ({})", chain_message(source))
                }
                other => format!("cannot be used ({})", chain_message(other)),
            };
            writeln!(p.out, "note: the existing file {} {why}", path.display())
                .context("cannot write to stdout")?;
            "Replace it with this profile? (y/n)".to_string()
        }
    };
    let save = args.yes
        || p.ask(
            "confirmation",
            "--yes",
            &question,
            Some("y"),
            |answer| match answer.to_ascii_lowercase().as_str() {
                "y" | "yes" => Ok(true),
                "n" | "no" => Ok(false),
                _ => Err(format!("\"{answer}\": answer y or n")),
            },
        )?;
    if !save {
        writeln!(p.out, "Not saved.").context("cannot write to stdout")?;
        return Ok(());
    }
    save_profile(path, profile)?;
    writeln!(
        p.out,
        "Saved to {}. Show it with `profile show`.",
        path.display()
    )
    .context("cannot write to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::HardwareFlags;
    use qlora_scale::hardware::parse_sysctl;

    struct Run {
        transcript: String,
        result: anyhow::Result<()>,
        dir: tempfile::TempDir,
    }

    impl Run {
        fn saved(&self) -> Option<qlora_scale::HardwareProfile> {
            load_profile(&self.dir.path().join("p.json")).unwrap()
        }
    }

    fn run_wizard(
        flags: HardwareFlags,
        yes: bool,
        detected: Option<DetectedHardware>,
        input: &str,
    ) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context {
            profile_path: dir.path().join("p.json"),
        };
        let args = SetupArgs {
            hardware: flags,
            yes,
        };
        let mut out = Vec::new();
        let mut input = input.as_bytes();
        let mut p = Prompter {
            input: &mut input,
            out: &mut out,
            echo: false,
        };
        let result = wizard(&args, &ctx, detected, &mut p);
        Run {
            transcript: String::from_utf8(out).unwrap(),
            result,
            dir,
        }
    }

    #[test]
    fn detected_values_are_defaults() {
        // An M3 Pro with 36 GiB: Enter accepts everything.
        let detected = parse_sysctl("Apple M3 Pro", "38654705664");
        let run = run_wizard(HardwareFlags::default(), false, detected, "\n\n\n\n");
        run.result.as_ref().unwrap();
        assert!(
            run.transcript
                .contains("Chip generation (m1, m2, m3, m4) [m3]: "),
            "{}",
            run.transcript
        );
        let saved = run.saved().unwrap();
        assert_eq!(
            (saved.generation, saved.variant, saved.memory_gb),
            (Generation::M3, ChipVariant::Pro, 36)
        );
    }

    #[test]
    fn bad_answers_are_explained_and_asked_again() {
        let run = run_wizard(
            HardwareFlags::default(),
            true,
            None,
            "m9\nm2\nhuge\nultra\n200\n192\n",
        );
        run.result.as_ref().unwrap();
        assert!(
            run.transcript.contains("unknown generation \"m9\""),
            "{}",
            run.transcript
        );
        assert!(
            run.transcript.contains("unknown chip variant \"huge\""),
            "{}",
            run.transcript
        );
        assert!(
            run.transcript
                .contains("\"200\" is not a memory size of the M2 Ultra"),
            "{}",
            run.transcript
        );
        assert_eq!(run.saved().unwrap().profile.lora_rank, 256);
    }

    #[test]
    fn off_apple_silicon_the_wizard_says_it_is_apple_only() {
        let run = run_wizard(HardwareFlags::default(), true, None, "m2\nultra\n192\n");
        run.result.as_ref().unwrap();
        assert!(
            run.transcript.starts_with(&format!(
                "Could not detect an Apple Silicon Mac; no defaults to offer. {NOT_APPLE_HINT}\n"
            )),
            "{}",
            run.transcript
        );
        let intel = parse_sysctl("Intel(R) Core(TM) i9-9980HK", "17179869184");
        let run = run_wizard(HardwareFlags::default(), true, intel, "m2\nultra\n192\n");
        assert!(
            run.transcript.starts_with(&format!(
                "Detected 16 GB of memory, but not an Apple Silicon chip. {NOT_APPLE_HINT}\n"
            )),
            "{}",
            run.transcript
        );
    }

    #[test]
    fn too_many_bad_answers_is_an_error() {
        let run = run_wizard(HardwareFlags::default(), true, None, "x\ny\nz\nm2\n");
        let msg = format!("{:#}", run.result.as_ref().unwrap_err());
        assert!(msg.contains("no valid generation after 3 answers"), "{msg}");
        assert!(run.saved().is_none());
    }

    #[test]
    fn end_of_input_is_an_error_naming_the_flag() {
        let run = run_wizard(HardwareFlags::default(), true, None, "m2\n");
        let msg = format!("{:#}", run.result.as_ref().unwrap_err());
        assert!(
            msg.contains("input ended before the chip variant was given (pass --chip"),
            "{msg}"
        );
    }

    #[test]
    fn declining_saves_nothing() {
        let flags = HardwareFlags {
            generation: Some(Generation::M1),
            chip: Some(ChipVariant::Max),
            memory: Some(64),
        };
        let run = run_wizard(flags, false, None, "maybe\nn\n");
        run.result.as_ref().unwrap();
        assert!(
            run.transcript.contains("\"maybe\": answer y or n"),
            "{}",
            run.transcript
        );
        assert!(
            run.transcript.ends_with("Not saved.\n"),
            "{}",
            run.transcript
        );
        assert!(run.saved().is_none());
    }
}
