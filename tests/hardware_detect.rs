//! Hardware detection beyond Apple Silicon: every parser on captured outputs
//! (`tests/fixtures/hardware/`), detection of a whole Linux system from a
//! fixture tree, the `[gpu]`/`[cpu]` rows, and saved-profile compatibility.
//!
//! `meminfo-ci-24g.txt`, `cpuinfo-epyc-avx512.txt`, `proc-self-cgroup-v1.txt`
//! and `cgroup-v1-limit-unlimited.txt` were captured on the CI machine; the
//! others are written as the kernel and `nvidia-smi` print them.

use std::path::{Path, PathBuf};

use qlora_scale::hardware::linux::{
    CgroupLimit, bytes_to_gib, parse_cgroup_v1_limit, parse_cgroup_v2_max, parse_cpuinfo,
    parse_meminfo_total, parse_proc_cgroup, read_linux_cpu, simd_features,
};
use qlora_scale::hardware::nvidia::{NvidiaSmiError, parse_nvidia_smi_csv};
use qlora_scale::hardware::{
    Choice, DeviceKind, Machine, MachineProfile, memory_profile, memory_row, parse_sysctl,
};
use qlora_scale::tables::{CPU_ROWS, GPU_ROWS};
use qlora_scale::{ChipVariant, Generation, HardwareProfile, Tier, optimized_profile};

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hardware")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------- /proc/meminfo

#[test]
fn meminfo_total() {
    assert_eq!(
        parse_meminfo_total(&fixture("meminfo-ci-24g.txt")),
        Some(24_683_656 * 1024)
    );
    let ws = parse_meminfo_total(&fixture("meminfo-workstation-64g.txt")).unwrap();
    assert_eq!(ws, 65_781_208 * 1024);
    // 62.7 GiB, floored.
    assert_eq!(bytes_to_gib(ws), 62);
}

#[test]
fn meminfo_garbage_is_none() {
    for bad in [
        "",
        "MemFree: 12 kB\n",
        "MemTotal: lots kB\n",
        "MemTotal: 12 MB\n",
        "MemTotal 12 kB\n",
        "MemTotal: 99999999999999999999 kB\n",
        "\u{0}\u{ff}MemTotal:",
    ] {
        assert_eq!(parse_meminfo_total(bad), None, "{bad:?}");
    }
}

// ---------------------------------------------------------------- cgroups

#[test]
fn cgroup_v2_memory_max() {
    assert_eq!(
        parse_cgroup_v2_max(&fixture("cgroup-v2-memory-max-unlimited.txt")),
        Some(CgroupLimit::Unlimited)
    );
    assert_eq!(
        parse_cgroup_v2_max(&fixture("cgroup-v2-memory-max-8g.txt")),
        Some(CgroupLimit::Bytes(8 << 30))
    );
    for bad in ["", "maximum", "-1", "8G", "1.5"] {
        assert_eq!(parse_cgroup_v2_max(bad), None, "{bad:?}");
    }
}

#[test]
fn cgroup_v1_limit_in_bytes() {
    // Captured: the kernel's "no limit" (LONG_MAX rounded down to 4 KiB).
    assert_eq!(
        parse_cgroup_v1_limit(&fixture("cgroup-v1-limit-unlimited.txt")),
        Some(CgroupLimit::Unlimited)
    );
    // The same with 64 KiB pages (aarch64).
    assert_eq!(
        parse_cgroup_v1_limit("9223372036854710272"),
        Some(CgroupLimit::Unlimited)
    );
    assert_eq!(
        parse_cgroup_v1_limit(&fixture("cgroup-v1-limit-4g.txt")),
        Some(CgroupLimit::Bytes(4 << 30))
    );
    for bad in ["", "max", "-1", "4 GB", "18446744073709551616"] {
        assert_eq!(parse_cgroup_v1_limit(bad), None, "{bad:?}");
    }
}

#[test]
fn proc_self_cgroup() {
    let v1 = parse_proc_cgroup(&fixture("proc-self-cgroup-v1.txt"));
    assert!(
        v1.v1_memory
            .as_deref()
            .unwrap()
            .starts_with("/process_api/")
    );
    assert_eq!(v1.v2.as_deref(), Some("/"));
    let v2 = parse_proc_cgroup(&fixture("proc-self-cgroup-v2-docker.txt"));
    assert_eq!(
        v2.v2.as_deref(),
        Some("/system.slice/docker-3f9c2a51d0b84e6f.scope")
    );
    assert_eq!(v2.v1_memory, None);
    let junk = parse_proc_cgroup("garbage\n::\n7:cpu,cpuacct\n");
    assert_eq!((junk.v2, junk.v1_memory), (None, None));
    // Several controllers on one line.
    let combined = parse_proc_cgroup("3:memory,hugetlb:/a\n");
    assert_eq!(combined.v1_memory.as_deref(), Some("/a"));
}

// ---------------------------------------------------------------- /proc/cpuinfo

#[test]
fn cpuinfo_amd_epyc_with_avx512() {
    let cpu = parse_cpuinfo(&fixture("cpuinfo-epyc-avx512.txt")).unwrap();
    assert_eq!(cpu.model_name.as_deref(), Some("AMD EPYC"));
    assert_eq!((cpu.logical_cpus, cpu.physical_cores), (2, Some(2)));
    assert_eq!(
        simd_features(&cpu.flags),
        ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    );
}

#[test]
fn cpuinfo_xeon_with_amx_and_hyperthreading() {
    let cpu = parse_cpuinfo(&fixture("cpuinfo-xeon-sapphire-rapids-amx.txt")).unwrap();
    assert_eq!(
        cpu.model_name.as_deref(),
        Some("Intel(R) Xeon(R) Platinum 8480+")
    );
    assert_eq!((cpu.logical_cpus, cpu.physical_cores), (4, Some(2)));
    assert_eq!(
        simd_features(&cpu.flags),
        ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx"]
    );
}

#[test]
fn cpuinfo_aarch64_features() {
    let cpu = parse_cpuinfo(&fixture("cpuinfo-aarch64-graviton3.txt")).unwrap();
    // Arm kernels give no model name and no core ids.
    assert_eq!(cpu.model_name, None);
    assert_eq!((cpu.logical_cpus, cpu.physical_cores), (4, None));
    assert_eq!(simd_features(&cpu.flags), ["neon", "sve"]);
}

#[test]
fn cpuinfo_garbage_is_none() {
    for bad in ["", "\n\n\n", "processor: x\n", "flags: avx2\n", "::::"] {
        assert_eq!(parse_cpuinfo(bad), None, "{bad:?}");
    }
    // A processor with nothing else is still a CPU.
    let cpu = parse_cpuinfo("processor : 0\n").unwrap();
    assert_eq!(
        (cpu.logical_cpus, cpu.model_name, cpu.physical_cores),
        (1, None, None)
    );
    assert!(simd_features(&cpu.flags).is_empty());
}

// ---------------------------------------------------------------- nvidia-smi

#[test]
fn nvidia_smi_one_gpu_with_units() {
    let gpus = parse_nvidia_smi_csv(&fixture("nvidia-smi-h100.csv")).unwrap();
    assert_eq!(gpus.len(), 1);
    let g = &gpus[0];
    assert_eq!(g.name, "NVIDIA H100 80GB HBM3");
    assert_eq!(
        (g.memory_total_mib, g.memory_used_mib, g.memory_gb),
        (81559, Some(4), 79)
    );
}

#[test]
fn nvidia_smi_several_gpus_without_units() {
    let gpus = parse_nvidia_smi_csv(&fixture("nvidia-smi-4x-a100-nounits.csv")).unwrap();
    assert_eq!(gpus.len(), 4);
    assert!(gpus.iter().all(|g| g.name == "NVIDIA A100-SXM4-80GB"));
    assert!(gpus.iter().all(|g| g.memory_gb == 80));
    assert_eq!(gpus[2].memory_used_mib, Some(17341));
    let mixed = parse_nvidia_smi_csv(&fixture("nvidia-smi-mixed.csv")).unwrap();
    assert_eq!(
        mixed.iter().map(|g| g.memory_gb).collect::<Vec<_>>(),
        [12, 23]
    );
}

#[test]
fn nvidia_smi_no_devices_and_garbage_are_errors() {
    let e = parse_nvidia_smi_csv(&fixture("nvidia-smi-no-devices.txt")).unwrap_err();
    assert_eq!(
        e,
        NvidiaSmiError::NoDevices {
            message: "No devices were found".to_string()
        }
    );
    assert_eq!(
        e.to_string(),
        "nvidia-smi found no GPU (No devices were found)"
    );
    let e = parse_nvidia_smi_csv(&fixture("nvidia-smi-driver-failure.txt")).unwrap_err();
    assert!(matches!(e, NvidiaSmiError::BadHeader { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("nvidia-smi printed \"NVIDIA-SMI has failed"),
        "{e}"
    );
    assert!(matches!(
        parse_nvidia_smi_csv(""),
        Err(NvidiaSmiError::NoDevices { .. })
    ));
    assert!(matches!(
        parse_nvidia_smi_csv("name, memory.total [MiB], memory.used [MiB]\n"),
        Err(NvidiaSmiError::NoDevices { .. })
    ));
    let header = "name, memory.total [MiB], memory.used [MiB]\n";
    for (row, why) in [
        (
            "NVIDIA H100, lots MiB, 0 MiB",
            "memory is not a number of MiB",
        ),
        (
            "NVIDIA H100 81559 MiB",
            "expected name, total memory, used memory",
        ),
        (", 81559 MiB, 0 MiB", "the GPU has no name"),
        ("NVIDIA H100, [N/A], 0 MiB", "total memory is not available"),
        (
            "NVIDIA H100, -5 MiB, 0 MiB",
            "memory is not a number of MiB",
        ),
    ] {
        let e = parse_nvidia_smi_csv(&format!("{header}{row}\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("nvidia-smi line 2: {why}: {row:?}"),
            "{row}"
        );
    }
    // Used memory may be unavailable (some virtualised GPUs).
    let gpus = parse_nvidia_smi_csv(&format!("{header}GRID A100-40C, 40960 MiB, [N/A]\n")).unwrap();
    assert_eq!(gpus[0].memory_used_mib, None);
}

// ---------------------------------------------------------------- a Linux system

/// A root directory with `proc/` and `sys/fs/cgroup/` files.
fn linux_root(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (rel, text) in files {
        let path: PathBuf = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

#[test]
fn the_tightest_cgroup_limit_of_the_cgroup_and_its_parents_wins() {
    let root = linux_root(&[
        ("proc/meminfo", &fixture("meminfo-workstation-64g.txt")),
        (
            "proc/cpuinfo",
            &fixture("cpuinfo-xeon-sapphire-rapids-amx.txt"),
        ),
        ("proc/self/cgroup", "0::/user.slice/job.scope\n"),
        (
            "sys/fs/cgroup/user.slice/memory.max",
            &fixture("cgroup-v2-memory-max-8g.txt"),
        ),
        (
            "sys/fs/cgroup/user.slice/job.scope/memory.max",
            &fixture("cgroup-v2-memory-max-unlimited.txt"),
        ),
    ]);
    let cpu = read_linux_cpu(root.path()).unwrap();
    assert_eq!(cpu.physical_memory_bytes, 65_781_208 * 1024);
    assert_eq!(cpu.cgroup_limit_bytes, Some(8 << 30));
    assert_eq!(cpu.memory_gb, 8);
    assert_eq!(cpu.cpu.as_ref().unwrap().logical_cpus, 4);
    assert!(cpu.simd.contains(&"amx"));
}

#[test]
fn cgroup_v1_unlimited_leaves_physical_memory() {
    let root = linux_root(&[
        ("proc/meminfo", &fixture("meminfo-ci-24g.txt")),
        ("proc/self/cgroup", &fixture("proc-self-cgroup-v1.txt")),
        (
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            &fixture("cgroup-v1-limit-unlimited.txt"),
        ),
    ]);
    let cpu = read_linux_cpu(root.path()).unwrap();
    assert_eq!(cpu.cgroup_limit_bytes, None);
    assert_eq!(cpu.memory_gb, 23);
    // No cpuinfo: no CPU, memory still known.
    assert_eq!((cpu.cpu, cpu.simd.len()), (None, 0));
}

#[test]
fn a_limit_above_physical_memory_changes_nothing() {
    let root = linux_root(&[
        ("proc/meminfo", &fixture("meminfo-ci-24g.txt")),
        ("proc/self/cgroup", "4:memory:/ci\n"),
        (
            "sys/fs/cgroup/memory/ci/memory.limit_in_bytes",
            "68719476736\n",
        ),
    ]);
    let cpu = read_linux_cpu(root.path()).unwrap();
    assert_eq!(cpu.cgroup_limit_bytes, Some(64 << 30));
    assert_eq!(cpu.memory_gb, 23);
}

#[test]
fn no_meminfo_is_no_linux_cpu() {
    let root = linux_root(&[("proc/cpuinfo", &fixture("cpuinfo-epyc-avx512.txt"))]);
    assert_eq!(read_linux_cpu(root.path()), None);
    let root = linux_root(&[("proc/meminfo", "garbage")]);
    assert_eq!(read_linux_cpu(root.path()), None);
}

// ---------------------------------------------------------------- choosing the row

#[test]
fn gpu_rows_for_common_cards() {
    let sizes: Vec<u32> = GPU_ROWS.iter().map(|r| r.memory_gb).collect();
    assert_eq!(sizes, [8, 12, 16, 24, 40, 48, 80]);
    // What nvidia-smi reports, in GiB floored, and the row it takes.
    for (reported, row) in [
        (7, 8),
        (11, 12),
        (15, 16),
        (23, 24),
        (39, 40),
        (47, 48),
        (79, 80),
        (139, 80),
    ] {
        assert_eq!(
            memory_row(DeviceKind::Gpu, reported).memory_gb,
            row,
            "{reported}"
        );
    }
    // Ties take the smaller row.
    assert_eq!(memory_row(DeviceKind::Gpu, 10).memory_gb, 8);
    assert_eq!(memory_row(DeviceKind::Gpu, 64).memory_gb, 48);
    assert_eq!(memory_row(DeviceKind::Gpu, 0).memory_gb, 8);
}

#[test]
fn cpu_rows_and_budgets() {
    let sizes: Vec<u32> = CPU_ROWS.iter().map(|r| r.memory_gb).collect();
    assert_eq!(sizes, [8, 16, 32, 64, 128, 256]);
    let p = memory_profile(DeviceKind::Cpu, 23);
    assert_eq!((p.row_memory_gb, p.training_budget_gb), (16, 16));
    assert_eq!(p.profile.model_tier, Tier::Entry);
    let p = memory_profile(DeviceKind::Cpu, 128);
    assert_eq!((p.row_memory_gb, p.training_budget_gb), (128, 89));
    assert_eq!(p.profile.model_tier, Tier::Large);
    let p = memory_profile(DeviceKind::Gpu, 24);
    assert_eq!(p.training_budget_gb, 21);
    assert_eq!(
        (
            p.profile.batch_size,
            p.profile.lora_rank,
            p.profile.lora_num_layers
        ),
        (2, 64, 16)
    );
}

#[test]
fn rows_grow_with_memory() {
    for rows in [&GPU_ROWS[..], &CPU_ROWS[..]] {
        for w in rows.windows(2) {
            let (a, b) = (&w[0].profile, &w[1].profile);
            assert!(w[0].memory_gb < w[1].memory_gb);
            assert!(a.batch_size <= b.batch_size && a.lora_rank <= b.lora_rank);
            assert!(a.lora_num_layers <= b.lora_num_layers && a.model_tier <= b.model_tier);
        }
    }
}

#[test]
fn machine_choice_prefers_apple_then_the_largest_gpu_then_the_cpu() {
    let gpus = parse_nvidia_smi_csv(&fixture("nvidia-smi-mixed.csv")).unwrap();
    let root = linux_root(&[("proc/meminfo", &fixture("meminfo-workstation-64g.txt"))]);
    let cpu = read_linux_cpu(root.path());
    let m = Machine {
        apple: None,
        gpus,
        gpu_note: None,
        linux_cpu: cpu,
    };
    assert_eq!(m.choice(), Some(Choice::Gpu(1)));
    let Some(MachineProfile::Memory(p)) = m.profile() else {
        panic!()
    };
    assert_eq!(
        (p.device, p.memory_gb, p.row_memory_gb),
        (DeviceKind::Gpu, 23, 24)
    );

    let m = Machine {
        gpus: Vec::new(),
        ..m
    };
    assert_eq!(m.choice(), Some(Choice::LinuxCpu));
    let Some(MachineProfile::Memory(p)) = m.profile() else {
        panic!()
    };
    assert_eq!(
        (p.device, p.memory_gb, p.row_memory_gb),
        (DeviceKind::Cpu, 62, 64)
    );

    let mac = Machine {
        apple: parse_sysctl("Apple M2 Ultra", &(192u64 << 30).to_string()),
        ..Machine::default()
    };
    assert_eq!(mac.choice(), Some(Choice::Apple));
    assert_eq!(
        mac.profile(),
        Some(MachineProfile::Apple(optimized_profile(
            Generation::M2,
            ChipVariant::Ultra,
            192
        )))
    );
    let intel = Machine {
        apple: parse_sysctl("Intel(R) Core(TM) i9-9980HK", &(32u64 << 30).to_string()),
        ..Machine::default()
    };
    assert_eq!(intel.choice(), Some(Choice::MacCpu));
    assert_eq!(Machine::default().choice(), None);
    assert_eq!(Machine::default().profile(), None);
}

// ---------------------------------------------------------------- saved profiles

/// A profile file as `profile setup` wrote it before other machines were
/// known.
const OLD_SAVED_PROFILE: &str = r#"{
  "generation": "m3",
  "variant": "max",
  "memory_gb": 64,
  "gpu_cores": 40,
  "training_budget_gb": 51,
  "batch_size": 4,
  "lora_rank": 128,
  "lora_num_layers": 20,
  "grad_checkpoint": false,
  "model_tier": "medium"
}
"#;

#[test]
fn an_old_saved_apple_profile_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hardware_profile.json");
    std::fs::write(&path, OLD_SAVED_PROFILE).unwrap();
    let expected = optimized_profile(Generation::M3, ChipVariant::Max, 64);
    assert_eq!(
        qlora_scale::saved_profile::load_profile(&path).unwrap(),
        Some(expected)
    );
    // As the machine-wide profile too: the Apple variant, unchanged.
    let any: MachineProfile = serde_json::from_str(OLD_SAVED_PROFILE).unwrap();
    assert_eq!(any, MachineProfile::Apple(expected));
    let back: HardwareProfile = serde_json::from_value(serde_json::to_value(any).unwrap()).unwrap();
    assert_eq!(back, expected);
}

#[test]
fn gpu_and_cpu_profiles_round_trip() {
    for p in [
        memory_profile(DeviceKind::Gpu, 79),
        memory_profile(DeviceKind::Cpu, 23),
    ] {
        let json = serde_json::to_value(MachineProfile::from(p)).unwrap();
        assert_eq!(json["device"], p.device.name());
        assert_eq!(json["row_memory_gb"], p.row_memory_gb);
        assert!(json.get("generation").is_none());
        let back: MachineProfile = serde_json::from_value(json).unwrap();
        assert_eq!(back, MachineProfile::Memory(p));
    }
}
