//! Text and JSON renderings shared by the subcommands.

use std::io::{self, Write};

use qlora_scale::detect::{ModelSize, format_params_billions};
use qlora_scale::hardware::{DeviceKind, MachineProfile, MemoryProfile};
use qlora_scale::tables::DEFAULT_VARIANT;
use qlora_scale::{ChipVariant, Generation, HardwareProfile, Profile};
use serde_json::{Value, json};

/// A chip as Apple names it: `M2 Ultra`, or `M2` for the base variant.
pub fn chip_name(generation: Generation, variant: ChipVariant) -> String {
    let generation = generation.name().to_ascii_uppercase();
    if variant == DEFAULT_VARIANT {
        return generation;
    }
    let mut chars = variant.name().chars();
    let variant: String = chars
        .next()
        .map(|c| c.to_ascii_uppercase())
        .into_iter()
        .chain(chars)
        .collect();
    format!("{generation} {variant}")
}

/// `on` / `off`.
pub fn on_off(flag: bool) -> &'static str {
    if flag { "on" } else { "off" }
}

/// The training settings of `profile`, one per line, indented.
pub fn write_profile(out: &mut dyn Write, profile: &Profile) -> io::Result<()> {
    writeln!(out, "  batch size         {}", profile.batch_size)?;
    writeln!(out, "  LoRA rank          {}", profile.lora_rank)?;
    writeln!(out, "  LoRA layers        {}", profile.lora_num_layers)?;
    writeln!(
        out,
        "  grad checkpoint    {}",
        on_off(profile.grad_checkpoint)
    )?;
    writeln!(out, "  model tier         {}", profile.model_tier)
}

/// A hardware profile as text: the machine, its budget, and the settings.
pub fn write_hardware_profile(out: &mut dyn Write, hw: &HardwareProfile) -> io::Result<()> {
    writeln!(
        out,
        "Profile for {}, {} GB:",
        chip_name(hw.generation, hw.variant),
        hw.memory_gb
    )?;
    writeln!(out, "  generation         {}", hw.generation)?;
    writeln!(out, "  chip variant       {}", hw.variant)?;
    writeln!(out, "  memory             {} GB", hw.memory_gb)?;
    writeln!(out, "  GPU cores          {}", hw.gpu_cores)?;
    writeln!(out, "  training budget    {} GB", hw.training_budget_gb)?;
    write_profile(out, &hw.profile)
}

/// A GPU or CPU profile as text: the device, its memory, the row, the budget
/// and the settings.
pub fn write_memory_profile(out: &mut dyn Write, p: &MemoryProfile) -> io::Result<()> {
    let device = match p.device {
        DeviceKind::Gpu => "an NVIDIA GPU",
        DeviceKind::Cpu => "the CPU",
    };
    writeln!(out, "Profile for {device}, {} GB:", p.memory_gb)?;
    writeln!(out, "  device             {}", p.device)?;
    writeln!(out, "  memory             {} GB", p.memory_gb)?;
    writeln!(out, "  table row          {} GB", p.row_memory_gb)?;
    writeln!(out, "  training budget    {} GB", p.training_budget_gb)?;
    write_profile(out, &p.profile)
}

/// Any machine's profile as text.
pub fn write_machine_profile(out: &mut dyn Write, p: &MachineProfile) -> io::Result<()> {
    match p {
        MachineProfile::Apple(hw) => write_hardware_profile(out, hw),
        MachineProfile::Memory(m) => write_memory_profile(out, m),
    }
}

/// A parameter count in billions as JSON: a number (`7`, `0.5`), or `null`
/// when unknown. Uses the same digits as the text output.
pub fn params_b_json(params: u64) -> Value {
    if params == 0 {
        return Value::Null;
    }
    format_params_billions(params)
        .parse::<serde_json::Number>()
        .map_or(Value::Null, Value::Number)
}

/// A parameter count in billions as text: `7`, `0.5`, or `-` when unknown.
pub fn params_b_text(params: u64) -> String {
    if params == 0 {
        "-".to_string()
    } else {
        format_params_billions(params)
    }
}

/// A detected size as JSON: `{"category", "params_b", "source"}`.
pub fn model_size_json(size: &ModelSize) -> Value {
    json!({
        "category": size.category.name(),
        "params_b": params_b_json(size.params),
        "source": size.source,
    })
}

/// Writes `value` as pretty JSON and a newline.
pub fn write_json_pretty(out: &mut dyn Write, value: &impl serde::Serialize) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_scale::detect_model_size;

    #[test]
    fn chip_names_follow_apple() {
        assert_eq!(chip_name(Generation::M2, ChipVariant::Ultra), "M2 Ultra");
        assert_eq!(chip_name(Generation::M3, ChipVariant::Pro), "M3 Pro");
        assert_eq!(chip_name(Generation::M1, DEFAULT_VARIANT), "M1");
    }

    #[test]
    fn params_render_the_same_in_text_and_json() {
        let size = detect_model_size("Qwen/Qwen2.5-0.5B");
        assert_eq!(params_b_text(size.params), "0.5");
        assert_eq!(params_b_json(size.params), json!(0.5));
        let size = detect_model_size("mistralai/Mistral-7B-v0.1");
        assert_eq!(params_b_text(size.params), "7");
        assert_eq!(params_b_json(size.params).to_string(), "7");
        assert_eq!(params_b_text(0), "-");
        assert_eq!(params_b_json(0), Value::Null);
    }
}
