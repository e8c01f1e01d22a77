//! `profile hardware`: the detected machine and the profile chosen for it.

use std::io::Write;

use anyhow::{Context as _, bail};
use qlora_scale::hardware::{DetectedHardware, detect_hardware};
use serde_json::json;

use crate::args::JsonArgs;
use crate::render::{write_hardware_profile, write_json_pretty};

/// The message when nothing could be detected.
pub const NOT_DETECTED: &str = "could not detect hardware (not an Apple Silicon Mac?)";

/// Runs `hardware`: exit status 1 with [`NOT_DETECTED`] (or a note about a
/// chip that is not Apple Silicon) when no profile applies.
pub fn run(args: &JsonArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let Some(detected) = detect_hardware() else {
        bail!("{NOT_DETECTED}");
    };
    write_detected(out, &detected, args.json)
}

/// Writes what was detected, or fails when the chip is not one the tables
/// know.
pub fn write_detected(
    out: &mut dyn Write,
    detected: &DetectedHardware,
    json: bool,
) -> anyhow::Result<()> {
    let Some(profile) = detected.profile() else {
        bail!(
            "{NOT_DETECTED}: the chip is not Apple Silicon ({} GB of memory); \
             pass --generation, --chip and --memory to `profile setup` or `profile scale`",
            detected.memory_gb
        );
    };
    let written = if json {
        write_json_pretty(out, &json!({ "detected": detected, "profile": profile }))
    } else {
        write_hardware_profile(out, &profile)
    };
    written.context("cannot write to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_scale::hardware::parse_sysctl;

    fn render(brand: &str, memsize: &str, json: bool) -> anyhow::Result<String> {
        let detected = parse_sysctl(brand, memsize).unwrap();
        let mut out = Vec::new();
        write_detected(&mut out, &detected, json)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn apple_silicon_shows_its_profile() {
        // 96 GiB.
        let text = render("Apple M2 Ultra", "103079215104", false).unwrap();
        assert!(text.starts_with("Profile for M2 Ultra, 96 GB:\n"), "{text}");
        assert!(text.contains("GPU cores          76\n"), "{text}");
        assert!(text.contains("training budget    76 GB\n"), "{text}");
        assert!(text.contains("LoRA rank          128\n"), "{text}");
        assert!(text.contains("grad checkpoint    on\n"), "{text}");
    }

    #[test]
    fn json_holds_detection_and_profile() {
        // 36 GiB.
        let text = render("Apple M3 Pro", "38654705664", true).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["detected"]["generation"], "m3");
        assert_eq!(v["detected"]["variant"], "pro");
        assert_eq!(v["profile"]["memory_gb"], 36);
        assert_eq!(v["profile"]["lora_rank"], 64);
    }

    #[test]
    fn intel_is_an_error_naming_the_memory() {
        let err = render("Intel(R) Core(TM) i9-9980HK", "17179869184", false).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(NOT_DETECTED), "{msg}");
        assert!(msg.contains("16 GB"), "{msg}");
    }
}
