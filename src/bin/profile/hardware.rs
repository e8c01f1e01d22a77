//! `profile hardware`: what detection found on this machine, the table row
//! chosen for it, and the resulting profile.

use std::io::{self, Write};

use anyhow::{Context as _, bail};
use qlora_scale::hardware::{Choice, Machine, MachineProfile, apple_row, detect_machine};
use serde_json::{Value, json};

use crate::args::{JsonArgs, join};
use crate::render::{chip_name, write_json_pretty, write_machine_profile};

/// The message when nothing could be detected.
pub const NOT_DETECTED: &str = "could not detect hardware (no Apple Silicon chip, no NVIDIA GPU \
     through nvidia-smi, and no memory size in /proc/meminfo or sysctl)";

/// Runs `hardware`: exit status 1 with [`NOT_DETECTED`] when no memory size
/// is known at all.
pub fn run(args: &JsonArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    write_detected(out, &detect_machine(), args.json)
}

/// The row chosen, as JSON: its table (`apple`, `gpu`, `cpu`), its memory,
/// and what it was chosen by.
fn chosen_json(machine: &Machine, choice: Choice, profile: &MachineProfile) -> Value {
    match (choice, profile) {
        (Choice::Apple, MachineProfile::Apple(p)) => json!({
            "table": "apple",
            "variant": p.variant,
            "row_memory_gb": apple_row(p.variant, p.memory_gb).map(|r| r.memory_gb),
            "by": "apple_silicon",
        }),
        (_, MachineProfile::Memory(p)) => {
            let mut v = json!({
                "table": p.device,
                "row_memory_gb": p.row_memory_gb,
                "by": match choice {
                    Choice::Gpu(_) => "largest_gpu",
                    Choice::MacCpu => "mac_memory",
                    _ => "cpu_memory",
                },
            });
            if let Choice::Gpu(i) = choice {
                v["gpu_index"] = json!(i);
                v["gpu_name"] = json!(machine.gpus[i].name);
            }
            v
        }
        (_, MachineProfile::Apple(_)) => Value::Null,
    }
}

/// Writes what was found, the row chosen and the profile; fails naming what
/// is missing when no memory size is known.
pub fn write_detected(out: &mut dyn Write, machine: &Machine, json: bool) -> anyhow::Result<()> {
    let (Some(choice), Some(profile)) = (machine.choice(), machine.profile()) else {
        match &machine.gpu_note {
            Some(note) => bail!("{NOT_DETECTED}: {note}"),
            None => bail!("{NOT_DETECTED}"),
        }
    };
    let written = if json {
        write_json_pretty(
            out,
            &json!({
                "detected": machine,
                "chosen": chosen_json(machine, choice, &profile),
                "profile": profile,
            }),
        )
    } else {
        write_found(out, machine)
            .and_then(|()| write_chosen(out, machine, choice, &profile))
            .and_then(|()| write_machine_profile(out, &profile))
    };
    written.context("cannot write to stdout")
}

fn gb(bytes: u64) -> u32 {
    qlora_scale::hardware::linux::bytes_to_gib(bytes)
}

/// The "Found:" block: every part detection read.
fn write_found(out: &mut dyn Write, m: &Machine) -> io::Result<()> {
    writeln!(out, "Found:")?;
    if let Some(a) = m.apple {
        match a.generation.zip(a.variant) {
            Some((g, v)) => writeln!(out, "  chip               Apple {}", chip_name(g, v))?,
            None => writeln!(out, "  chip               not Apple Silicon")?,
        }
        writeln!(out, "  memory             {} GB", a.memory_gb)?;
    }
    if let Some(c) = &m.linux_cpu {
        if let Some(cpu) = &c.cpu {
            let cores = cpu
                .physical_cores
                .map(|n| format!(", {n} cores"))
                .unwrap_or_default();
            writeln!(
                out,
                "  CPU                {}, {} logical CPUs{cores}",
                cpu.model_name.as_deref().unwrap_or("unnamed"),
                cpu.logical_cpus
            )?;
            let simd = if c.simd.is_empty() {
                "none known".to_string()
            } else {
                join(&c.simd)
            };
            writeln!(out, "  SIMD               {simd}")?;
        }
        let limit = match c.cgroup_limit_bytes {
            Some(l) => format!("cgroup limit {} GB", gb(l)),
            None => "no cgroup limit".to_string(),
        };
        writeln!(
            out,
            "  CPU memory         {} GB usable (physical {} GB, {limit})",
            c.memory_gb,
            gb(c.physical_memory_bytes)
        )?;
    }
    if m.gpus.is_empty() {
        let note = m.gpu_note.as_deref().unwrap_or("none found");
        writeln!(out, "  NVIDIA GPUs        none ({note})")?;
    } else {
        writeln!(out, "  NVIDIA GPUs        {}", m.gpus.len())?;
        for (i, g) in m.gpus.iter().enumerate() {
            let used = g
                .memory_used_mib
                .map(|u| format!(", {u} MiB in use"))
                .unwrap_or_default();
            writeln!(
                out,
                "  GPU {i:<14} {}, {} GB ({} MiB{used})",
                g.name, g.memory_gb, g.memory_total_mib
            )?;
        }
    }
    Ok(())
}

/// `Chosen: ...`: the table row and why.
fn write_chosen(
    out: &mut dyn Write,
    m: &Machine,
    choice: Choice,
    profile: &MachineProfile,
) -> io::Result<()> {
    let nearest = |row: u32, memory: u32| {
        if row == memory {
            "the exact row".to_string()
        } else {
            format!("the nearest to {memory} GB")
        }
    };
    let line = match (choice, profile) {
        (Choice::Apple, MachineProfile::Apple(p)) => match apple_row(p.variant, p.memory_gb) {
            Some(r) => format!(
                "[apple] {} {} GB, {}",
                p.variant,
                r.memory_gb,
                nearest(r.memory_gb, p.memory_gb)
            ),
            None => format!("[apple] fallback profile (no {} row)", p.variant),
        },
        (_, MachineProfile::Memory(p)) => {
            let by = match choice {
                Choice::Gpu(i) if m.gpus.len() > 1 => format!(" (GPU {i}, the largest)"),
                Choice::Gpu(_) => " (the GPU)".to_string(),
                Choice::MacCpu => " (a Mac without Apple Silicon: the CPU)".to_string(),
                _ => " (no NVIDIA GPU: the CPU)".to_string(),
            };
            format!(
                "[{}] {} GB, {}{by}",
                p.device,
                p.row_memory_gb,
                nearest(p.row_memory_gb, p.memory_gb)
            )
        }
        (_, MachineProfile::Apple(_)) => "[apple]".to_string(),
    };
    writeln!(out, "Chosen row: {line}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_scale::hardware::linux::{CpuInfo, LinuxCpu};
    use qlora_scale::hardware::nvidia::parse_nvidia_smi_csv;
    use qlora_scale::hardware::parse_sysctl;

    fn render(machine: &Machine, json: bool) -> anyhow::Result<String> {
        let mut out = Vec::new();
        write_detected(&mut out, machine, json)?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn mac(brand: &str, memsize: &str) -> Machine {
        Machine {
            apple: parse_sysctl(brand, memsize),
            ..Machine::default()
        }
    }

    fn linux(memory_gb: u32, gpus: &str) -> Machine {
        Machine {
            apple: None,
            gpus: parse_nvidia_smi_csv(gpus).unwrap_or_default(),
            gpu_note: Some("nvidia-smi not found".to_string()),
            linux_cpu: Some(LinuxCpu {
                cpu: Some(CpuInfo {
                    model_name: Some("AMD EPYC".to_string()),
                    logical_cpus: 16,
                    physical_cores: Some(8),
                    flags: Vec::new(),
                }),
                simd: vec!["avx2", "avx512f"],
                physical_memory_bytes: 128 << 30,
                cgroup_limit_bytes: Some(u64::from(memory_gb) << 30),
                memory_gb,
            }),
        }
    }

    #[test]
    fn apple_silicon_shows_its_row_and_profile() {
        // 96 GiB.
        let text = render(&mac("Apple M2 Ultra", "103079215104"), false).unwrap();
        assert!(
            text.starts_with("Found:\n  chip               Apple M2 Ultra\n"),
            "{text}"
        );
        assert!(
            text.contains("Chosen row: [apple] ultra 96 GB, the exact row\n"),
            "{text}"
        );
        assert!(text.contains("Profile for M2 Ultra, 96 GB:\n"), "{text}");
        assert!(text.contains("GPU cores          76\n"), "{text}");
        assert!(text.contains("training budget    76 GB\n"), "{text}");
        assert!(text.contains("LoRA rank          128\n"), "{text}");
        assert!(text.contains("grad checkpoint    on\n"), "{text}");
    }

    #[test]
    fn json_holds_detection_row_and_profile() {
        // 36 GiB.
        let text = render(&mac("Apple M3 Pro", "38654705664"), true).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // As before other machines were known.
        assert_eq!(v["detected"]["generation"], "m3");
        assert_eq!(v["detected"]["variant"], "pro");
        assert_eq!(v["profile"]["memory_gb"], 36);
        assert_eq!(v["profile"]["lora_rank"], 64);
        assert_eq!(v["chosen"]["table"], "apple");
        assert_eq!(v["chosen"]["row_memory_gb"], 36);
    }

    #[test]
    fn intel_mac_takes_the_cpu_row_of_its_memory() {
        let text = render(&mac("Intel(R) Core(TM) i9-9980HK", "17179869184"), false).unwrap();
        assert!(
            text.contains("  chip               not Apple Silicon\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "Chosen row: [cpu] 16 GB, the exact row (a Mac without Apple Silicon: the CPU)\n"
            ),
            "{text}"
        );
        assert!(text.contains("Profile for the CPU, 16 GB:\n"), "{text}");
    }

    #[test]
    fn linux_cpu_shows_cores_simd_memory_and_row() {
        let text = render(&linux(23, ""), false).unwrap();
        assert!(
            text.contains("  CPU                AMD EPYC, 16 logical CPUs, 8 cores\n"),
            "{text}"
        );
        assert!(
            text.contains("  SIMD               avx2, avx512f\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "  CPU memory         23 GB usable (physical 128 GB, cgroup limit 23 GB)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  NVIDIA GPUs        none (nvidia-smi not found)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "Chosen row: [cpu] 16 GB, the nearest to 23 GB (no NVIDIA GPU: the CPU)\n"
            ),
            "{text}"
        );
        assert!(text.contains("  training budget    16 GB\n"), "{text}");
    }

    #[test]
    fn the_largest_gpu_is_chosen() {
        let smi = "name, memory.total [MiB], memory.used [MiB]\n\
                   NVIDIA GeForce RTX 3060, 12288 MiB, 300 MiB\n\
                   NVIDIA A100-SXM4-40GB, 40960 MiB, 0 MiB\n";
        let m = linux(64, smi);
        let text = render(&m, false).unwrap();
        assert!(text.contains("  NVIDIA GPUs        2\n"), "{text}");
        assert!(
            text.contains(
                "  GPU 1              NVIDIA A100-SXM4-40GB, 40 GB (40960 MiB, 0 MiB in use)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("Chosen row: [gpu] 40 GB, the exact row (GPU 1, the largest)\n"),
            "{text}"
        );
        assert!(
            text.contains("Profile for an NVIDIA GPU, 40 GB:\n"),
            "{text}"
        );
        assert!(text.contains("  training budget    36 GB\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&render(&m, true).unwrap()).unwrap();
        assert_eq!(v["chosen"]["table"], "gpu");
        assert_eq!(v["chosen"]["gpu_index"], 1);
        assert_eq!(v["profile"]["device"], "gpu");
        assert_eq!(v["profile"]["row_memory_gb"], 40);
        assert_eq!(v["detected"]["gpus"][0]["memory_total_mib"], 12288);
        assert_eq!(v["detected"]["linux_cpu"]["memory_gb"], 64);
    }

    #[test]
    fn nothing_known_is_an_error_with_the_gpu_note() {
        let m = Machine {
            gpu_note: Some("nvidia-smi not found".to_string()),
            ..Machine::default()
        };
        let msg = format!("{:#}", render(&m, false).unwrap_err());
        assert!(msg.starts_with(NOT_DETECTED), "{msg}");
        assert!(msg.ends_with(": nvidia-smi not found"), "{msg}");
    }
}
