//! `profile scale`: the profile for a machine, scaled for a model, as JSON.

use std::io::Write;
use std::path::Path;

use anyhow::{Context as _, bail};
use qlora_scale::files::detect_model_size_local;
use qlora_scale::hardware::resolve::{DeviceOverride, HardwareSource, resolve_machine};
use qlora_scale::hardware::{MachineProfile, detect_machine};
use qlora_scale::{ModelSize, detect_model_size, scale_profile_for_category};
use serde_json::{Map, Value};

use crate::Context;
use crate::args::{HardwareFlags, ScaleArgs};
use crate::render::{model_size_json, write_json_pretty};

/// Resolves the hardware with [`qlora_scale::hardware::resolve::resolve_machine`];
/// with neither a base nor flags, says how to give one.
pub fn resolve_hardware(
    flags: &HardwareFlags,
    devices: DeviceOverride,
    saved_path: &Path,
    detect: impl FnOnce() -> Option<MachineProfile>,
) -> anyhow::Result<(MachineProfile, HardwareSource)> {
    match resolve_machine(&flags.to_override(), devices, saved_path, detect)? {
        Some(resolved) => Ok(resolved),
        None => bail!(
            "no hardware to scale for: no saved profile at {} and the hardware could not be \
             detected; pass --generation, --chip and --memory (Apple Silicon), --gpu-memory or \
             --cpu-memory, or run `profile setup`",
            saved_path.display()
        ),
    }
}

/// The size of `model`: from its files when it is a local path (a problem
/// reading them is reported on stderr), else from its name.
fn model_size(model: &[u8]) -> ModelSize {
    let Ok(text) = std::str::from_utf8(model) else {
        return detect_model_size(model);
    };
    let (size, problems) = detect_model_size_local(std::path::Path::new(text));
    for e in problems {
        crate::detect_model::warn_unread(&e);
    }
    size
}

/// The JSON `scale` prints: the model and its detected size, then the
/// hardware profile with its settings scaled, then where the hardware came
/// from.
pub fn scaled_json(
    model: &[u8],
    hardware: &MachineProfile,
    source: HardwareSource,
) -> anyhow::Result<Value> {
    let size = model_size(model);
    let scaled = hardware.with_profile(scale_profile_for_category(
        hardware.profile(),
        size.category,
    ));
    let mut map = Map::new();
    map.insert(
        "model".into(),
        String::from_utf8_lossy(model).into_owned().into(),
    );
    map.insert("model_size".into(), model_size_json(&size));
    match serde_json::to_value(scaled).context("cannot serialise the scaled profile")? {
        Value::Object(fields) => map.extend(fields),
        other => bail!("the scaled profile serialised to {other}, not an object"),
    }
    map.insert("hardware_source".into(), source.key().into());
    Ok(Value::Object(map))
}

/// Runs `scale`.
pub fn run(args: &ScaleArgs, ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let devices = DeviceOverride {
        gpu_memory: args.gpu_memory,
        cpu_memory: args.cpu_memory,
    };
    let (hardware, source) = resolve_hardware(&args.hardware, devices, &ctx.profile_path, || {
        detect_machine().profile()
    })?;
    let value = scaled_json(args.model.as_encoded_bytes(), &hardware, source)?;
    write_json_pretty(out, &value).context("cannot write to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_scale::hardware::{DeviceKind, memory_profile, parse_sysctl};
    use qlora_scale::optimized_profile;
    use qlora_scale::{ChipVariant, Generation};

    fn no_file() -> std::path::PathBuf {
        std::path::PathBuf::from("/nonexistent/qlora-scale-test/profile.json")
    }

    #[test]
    fn detected_hardware_is_the_base_when_nothing_is_saved() {
        // 96 GiB M2 Ultra, memory overridden.
        let flags = HardwareFlags {
            memory: Some(192),
            ..HardwareFlags::default()
        };
        let detect = || {
            parse_sysctl("Apple M2 Ultra", "103079215104")
                .and_then(|d| d.profile())
                .map(MachineProfile::from)
        };
        let none = DeviceOverride::default();
        let (p, source) = resolve_hardware(&flags, none, &no_file(), detect).unwrap();
        assert_eq!(source, HardwareSource::DetectedWithFlags);
        let MachineProfile::Apple(p) = p else {
            panic!("{p:?}")
        };
        assert_eq!(
            (p.generation, p.variant, p.memory_gb),
            (Generation::M2, ChipVariant::Ultra, 192)
        );
        let (p, source) =
            resolve_hardware(&HardwareFlags::default(), none, &no_file(), detect).unwrap();
        assert_eq!(source, HardwareSource::Detected);
        assert_eq!(p.memory_gb(), 96);
    }

    #[test]
    fn a_detected_gpu_or_cpu_is_used_as_detected() {
        let gpu = || Some(memory_profile(DeviceKind::Gpu, 23).into());
        let none = DeviceOverride::default();
        let (p, source) =
            resolve_hardware(&HardwareFlags::default(), none, &no_file(), gpu).unwrap();
        assert_eq!(source, HardwareSource::Detected);
        let MachineProfile::Memory(p) = p else {
            panic!("{p:?}")
        };
        assert_eq!((p.device, p.row_memory_gb), (DeviceKind::Gpu, 24));
        // Apple flags need an Apple base.
        let flags = HardwareFlags {
            memory: Some(64),
            ..HardwareFlags::default()
        };
        let msg = format!(
            "{:#}",
            resolve_hardware(&flags, none, &no_file(), gpu).unwrap_err()
        );
        assert!(
            msg.starts_with("missing --generation, --chip: no saved profile at "),
            "{msg}"
        );
        assert!(
            msg.contains("the detected machine is not Apple Silicon (it takes the [gpu] row)"),
            "{msg}"
        );
    }

    #[test]
    fn device_flags_build_the_profile_outright() {
        let devices = DeviceOverride {
            cpu_memory: Some(64),
            ..DeviceOverride::default()
        };
        let (p, source) =
            resolve_hardware(&HardwareFlags::default(), devices, &no_file(), || None).unwrap();
        assert_eq!(source, HardwareSource::Flags);
        let v = scaled_json(b"mistralai/Mistral-7B-v0.1", &p, source).unwrap();
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["memory_gb"], 64);
        assert_eq!(v["row_memory_gb"], 64);
        assert_eq!(v["training_budget_gb"], 44);
        assert_eq!(v["model_size"]["category"], "small");
    }

    #[test]
    fn no_base_names_missing_flags() {
        let flags = HardwareFlags {
            chip: Some(ChipVariant::Max),
            ..HardwareFlags::default()
        };
        let err =
            resolve_hardware(&flags, DeviceOverride::default(), &no_file(), || None).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.starts_with("missing --generation, --memory:"), "{msg}");
    }

    #[test]
    fn nothing_to_scale_for_names_every_way_to_give_it() {
        let err = resolve_hardware(
            &HardwareFlags::default(),
            DeviceOverride::default(),
            &no_file(),
            || None,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("pass --generation, --chip and --memory (Apple Silicon), --gpu-memory or --cpu-memory, or run `profile setup`"),
            "{msg}"
        );
    }

    #[test]
    fn json_is_flat_with_model_size() {
        let hw = optimized_profile(Generation::M2, ChipVariant::Ultra, 192).into();
        let v = scaled_json(
            b"NousResearch/Hermes-2-Pro-Mistral-7B",
            &hw,
            HardwareSource::Flags,
        )
        .unwrap();
        assert_eq!(v["model_size"]["category"], "small");
        assert_eq!(v["model_size"]["params_b"], 7);
        assert_eq!(v["model_size"]["source"], "name");
        assert_eq!(
            (v["batch_size"].as_u64(), v["lora_rank"].as_u64()),
            (Some(8), Some(32))
        );
        assert_eq!(v["training_budget_gb"], 153);
        assert_eq!(v["hardware_source"], "flags");
    }
}
