//! Linux: the memory a run may use (`/proc/meminfo`, cgroup v1 and v2 memory
//! limits) and the CPU (`/proc/cpuinfo`: model, cores, SIMD flags).
//!
//! The parsers are pure functions of a file's text; [`read_linux_cpu`] reads
//! the files under a root directory (`/` on a real machine, a fixture tree in
//! tests). Bad input gives `None`, never a panic.

use std::path::{Component, Path, PathBuf};

use crate::tables::SIMD_FEATURES;

/// cgroup v1 reports "no limit" as a huge number (`LONG_MAX` rounded down to
/// the page size: 9223372036854771712 with 4 KiB pages). Any limit from here
/// up is read as unlimited; no machine has 4 EiB of memory.
pub const CGROUP_V1_UNLIMITED_FROM: u64 = 1 << 62;

/// A cgroup memory limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLimit {
    /// No limit (`max` in cgroup v2, the huge value in cgroup v1).
    Unlimited,
    /// At most this many bytes.
    Bytes(u64),
}

impl CgroupLimit {
    /// The limit in bytes, `None` when unlimited.
    pub fn bytes(self) -> Option<u64> {
        match self {
            CgroupLimit::Unlimited => None,
            CgroupLimit::Bytes(b) => Some(b),
        }
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
///
/// ```
/// use qlora_scale::hardware::linux::parse_meminfo_total;
/// let text = "MemTotal:       16314660 kB\nMemFree:  1 kB\n";
/// assert_eq!(parse_meminfo_total(text), Some(16314660 * 1024));
/// assert_eq!(parse_meminfo_total("garbage"), None);
/// ```
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    let value = text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "MemTotal").then_some(value)
    })?;
    let kib = value.trim().strip_suffix("kB")?.trim();
    kib.parse::<u64>().ok()?.checked_mul(1024)
}

/// cgroup v2 `memory.max`: `max` or a number of bytes.
///
/// ```
/// use qlora_scale::hardware::linux::{parse_cgroup_v2_max, CgroupLimit};
/// assert_eq!(parse_cgroup_v2_max("max\n"), Some(CgroupLimit::Unlimited));
/// assert_eq!(parse_cgroup_v2_max("4294967296\n"), Some(CgroupLimit::Bytes(1 << 32)));
/// assert_eq!(parse_cgroup_v2_max("-1"), None);
/// ```
pub fn parse_cgroup_v2_max(text: &str) -> Option<CgroupLimit> {
    match text.trim() {
        "max" => Some(CgroupLimit::Unlimited),
        n => n.parse::<u64>().ok().map(CgroupLimit::Bytes),
    }
}

/// cgroup v1 `memory.limit_in_bytes`: a number of bytes; from
/// [`CGROUP_V1_UNLIMITED_FROM`] up it means no limit.
///
/// ```
/// use qlora_scale::hardware::linux::{parse_cgroup_v1_limit, CgroupLimit};
/// assert_eq!(parse_cgroup_v1_limit("9223372036854771712\n"), Some(CgroupLimit::Unlimited));
/// assert_eq!(parse_cgroup_v1_limit("2147483648"), Some(CgroupLimit::Bytes(1 << 31)));
/// ```
pub fn parse_cgroup_v1_limit(text: &str) -> Option<CgroupLimit> {
    let n = text.trim().parse::<u64>().ok()?;
    Some(if n >= CGROUP_V1_UNLIMITED_FROM {
        CgroupLimit::Unlimited
    } else {
        CgroupLimit::Bytes(n)
    })
}

/// The cgroups a process is in, from `/proc/self/cgroup`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupPaths {
    /// The cgroup v2 path (the `0::PATH` line).
    pub v2: Option<String>,
    /// The path in the cgroup v1 hierarchy holding the `memory` controller.
    pub v1_memory: Option<String>,
}

/// Reads `/proc/self/cgroup` (`ID:CONTROLLERS:PATH` lines).
///
/// ```
/// use qlora_scale::hardware::linux::parse_proc_cgroup;
/// let p = parse_proc_cgroup("4:memory:/docker/abc\n0::/\n");
/// assert_eq!(p.v1_memory.as_deref(), Some("/docker/abc"));
/// assert_eq!(p.v2.as_deref(), Some("/"));
/// ```
pub fn parse_proc_cgroup(text: &str) -> CgroupPaths {
    let mut paths = CgroupPaths::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            paths.v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            paths.v1_memory = Some(path.to_string());
        }
    }
    paths
}

/// What `/proc/cpuinfo` says about the CPU.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CpuInfo {
    /// `model name` (x86 and some Arm kernels) or `Model` (boards); `None`
    /// when the kernel gives no name.
    pub model_name: Option<String>,
    /// Logical CPUs (`processor` entries).
    pub logical_cpus: u32,
    /// Physical cores: distinct (`physical id`, `core id`) pairs, when every
    /// processor gives both.
    pub physical_cores: Option<u32>,
    /// The `flags` (x86) or `Features` (Arm) of the first processor.
    #[serde(skip)]
    pub flags: Vec<String>,
}

/// Reads `/proc/cpuinfo`; `None` when it lists no processor.
///
/// ```
/// use qlora_scale::hardware::linux::parse_cpuinfo;
/// let text = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n\n\
///             processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n";
/// let cpu = parse_cpuinfo(text).unwrap();
/// assert_eq!((cpu.logical_cpus, cpu.model_name.as_deref()), (2, Some("AMD EPYC")));
/// assert!(cpu.flags.iter().any(|f| f == "avx2"));
/// ```
pub fn parse_cpuinfo(text: &str) -> Option<CpuInfo> {
    let mut logical = 0u32;
    let mut model_name = None;
    let mut board_model = None;
    let mut flags: Option<Vec<String>> = None;
    let mut cores = std::collections::BTreeSet::new();
    let mut every_processor_has_ids = true;
    for block in text.split("\n\n") {
        let mut is_processor = false;
        let (mut physical_id, mut core_id) = (None, None);
        for line in block.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "processor" => is_processor = value.parse::<u32>().is_ok(),
                "model name" if model_name.is_none() && !value.is_empty() => {
                    model_name = Some(value.to_string());
                }
                "Model" if board_model.is_none() && !value.is_empty() => {
                    board_model = Some(value.to_string());
                }
                "flags" | "Features" if flags.is_none() => {
                    flags = Some(value.split_whitespace().map(str::to_string).collect());
                }
                "physical id" => physical_id = Some(value.to_string()),
                "core id" => core_id = Some(value.to_string()),
                _ => {}
            }
        }
        if is_processor {
            logical = logical.saturating_add(1);
            match (physical_id, core_id) {
                (Some(p), Some(c)) => {
                    cores.insert((p, c));
                }
                _ => every_processor_has_ids = false,
            }
        }
    }
    if logical == 0 {
        return None;
    }
    let physical_cores = (every_processor_has_ids && !cores.is_empty())
        .then(|| u32::try_from(cores.len()).unwrap_or(u32::MAX));
    Some(CpuInfo {
        model_name: model_name.or(board_model),
        logical_cpus: logical,
        physical_cores,
        flags: flags.unwrap_or_default(),
    })
}

/// The SIMD features (`tables/hardware.toml`, `[[cpu.simd]]`) that `flags`
/// show, in table order.
///
/// ```
/// use qlora_scale::hardware::linux::simd_features;
/// let flags = ["fp", "asimd", "sve"].map(String::from);
/// assert_eq!(simd_features(&flags), ["neon", "sve"]);
/// ```
pub fn simd_features(flags: &[String]) -> Vec<&'static str> {
    SIMD_FEATURES
        .iter()
        .filter(|f| {
            f.flags
                .iter()
                .any(|want| flags.iter().any(|have| have == want))
        })
        .map(|f| f.name)
        .collect()
}

/// A Linux machine's CPU and the memory a run on it may use.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LinuxCpu {
    /// The CPU, when `/proc/cpuinfo` could be read.
    pub cpu: Option<CpuInfo>,
    /// SIMD features of the CPU, in table order.
    pub simd: Vec<&'static str>,
    /// `MemTotal`, bytes.
    pub physical_memory_bytes: u64,
    /// The tightest cgroup memory limit on this process, bytes; `None` when
    /// unlimited or unreadable.
    pub cgroup_limit_bytes: Option<u64>,
    /// The memory a run may use, in GiB floored: the smaller of the physical
    /// memory and the cgroup limit.
    pub memory_gb: u32,
}

/// Bytes to GiB, floored.
pub fn bytes_to_gib(bytes: u64) -> u32 {
    u32::try_from(bytes >> 30).unwrap_or(u32::MAX)
}

/// The directories from `base` down to `base/rel`, keeping only plain path
/// components of `rel` (a cgroup path never climbs out of its hierarchy).
fn cgroup_dirs(base: &Path, rel: &str) -> Vec<PathBuf> {
    let mut dirs = vec![base.to_path_buf()];
    let mut dir = base.to_path_buf();
    for component in Path::new(rel).components() {
        if let Component::Normal(part) = component {
            dir.push(part);
            dirs.push(dir.clone());
        }
    }
    dirs
}

/// The tightest memory limit on the process's cgroup and its ancestors (a
/// parent's limit binds its children too), in bytes.
fn cgroup_limit(root: &Path, paths: &CgroupPaths) -> Option<u64> {
    type Parse = fn(&str) -> Option<CgroupLimit>;
    let mut limits = Vec::new();
    let hierarchies: [(Option<&str>, PathBuf, &str, Parse); 2] = [
        (
            paths.v2.as_deref(),
            root.join("sys/fs/cgroup"),
            "memory.max",
            parse_cgroup_v2_max,
        ),
        (
            paths.v1_memory.as_deref(),
            root.join("sys/fs/cgroup/memory"),
            "memory.limit_in_bytes",
            parse_cgroup_v1_limit,
        ),
    ];
    for (path, base, file, parse) in hierarchies {
        let Some(path) = path else { continue };
        for dir in cgroup_dirs(&base, path) {
            let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
                continue;
            };
            if let Some(b) = parse(&text).and_then(CgroupLimit::bytes) {
                limits.push(b);
            }
        }
    }
    limits.into_iter().min()
}

/// Reads the CPU and memory of the Linux system under `root` (`/` on a real
/// machine): `proc/meminfo`, `proc/cpuinfo`, `proc/self/cgroup` and the
/// cgroup files under `sys/fs/cgroup`. `None` when `MemTotal` cannot be read;
/// every other file is optional.
pub fn read_linux_cpu(root: &Path) -> Option<LinuxCpu> {
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).ok();
    let physical = parse_meminfo_total(&read("proc/meminfo")?)?;
    let paths = read("proc/self/cgroup")
        .map(|t| parse_proc_cgroup(&t))
        .unwrap_or_default();
    let cgroup_limit_bytes = cgroup_limit(root, &paths);
    let cpu = read("proc/cpuinfo").and_then(|t| parse_cpuinfo(&t));
    let simd = cpu
        .as_ref()
        .map(|c| simd_features(&c.flags))
        .unwrap_or_default();
    let effective = cgroup_limit_bytes.map_or(physical, |l| l.min(physical));
    Some(LinuxCpu {
        cpu,
        simd,
        physical_memory_bytes: physical,
        cgroup_limit_bytes,
        memory_gb: bytes_to_gib(effective),
    })
}
