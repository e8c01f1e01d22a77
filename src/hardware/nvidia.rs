//! NVIDIA GPUs, from `nvidia-smi --query-gpu=name,memory.total,memory.used
//! --format=csv` (with or without `,nounits`).
//!
//! [`parse_nvidia_smi_csv`] is a pure function of the command's output;
//! [`query_nvidia_smi`] runs the command, with a time limit.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::linux::bytes_to_gib;

/// The command and its arguments.
pub const NVIDIA_SMI: &str = "nvidia-smi";
/// What is asked of it.
pub const NVIDIA_SMI_ARGS: [&str; 2] =
    ["--query-gpu=name,memory.total,memory.used", "--format=csv"];
/// How long `nvidia-smi` may take before it is given up on (a wedged driver
/// can make it hang).
pub const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(10);

/// One GPU.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NvidiaGpu {
    /// Its name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Total memory, MiB.
    pub memory_total_mib: u64,
    /// Memory in use when asked, MiB; `None` when `[N/A]`.
    pub memory_used_mib: Option<u64>,
    /// Total memory in GiB, floored.
    pub memory_gb: u32,
}

/// Why `nvidia-smi`'s output gave no GPUs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NvidiaSmiError {
    /// It ran but found no GPU ("No devices were found", or a header alone).
    #[error("nvidia-smi found no GPU ({message})")]
    NoDevices {
        /// What it said.
        message: String,
    },
    /// The first line is not the header asked for.
    #[error(
        "nvidia-smi printed {header:?} where the header \"name, memory.total [MiB], memory.used [MiB]\" was expected"
    )]
    BadHeader {
        /// The first line (or the first 200 characters of it).
        header: String,
    },
    /// A GPU line could not be read.
    #[error("nvidia-smi line {line}: {why}: {text:?}")]
    BadRow {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

const HEADER: [&str; 3] = ["name", "memory.total [MiB]", "memory.used [MiB]"];

/// A memory value: `81559 MiB`, or `81559` with `nounits`; `None` for
/// `[N/A]`.
fn mib(value: &str) -> Result<Option<u64>, &'static str> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("[N/A]") || value.eq_ignore_ascii_case("N/A") {
        return Ok(None);
    }
    let number = value.strip_suffix("MiB").unwrap_or(value).trim();
    number
        .parse::<u64>()
        .map(Some)
        .map_err(|_| "memory is not a number of MiB")
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Reads the CSV `nvidia-smi` prints, one GPU per line after the header.
///
/// ```
/// use qlora_scale::hardware::nvidia::parse_nvidia_smi_csv;
/// let out = "name, memory.total [MiB], memory.used [MiB]\n\
///            NVIDIA GeForce RTX 4090, 24564 MiB, 1 MiB\n";
/// let gpus = parse_nvidia_smi_csv(out).unwrap();
/// assert_eq!((gpus[0].name.as_str(), gpus[0].memory_gb), ("NVIDIA GeForce RTX 4090", 23));
/// assert!(parse_nvidia_smi_csv("No devices were found\n").is_err());
/// ```
pub fn parse_nvidia_smi_csv(text: &str) -> Result<Vec<NvidiaGpu>, NvidiaSmiError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(NvidiaSmiError::NoDevices {
            message: "no output".to_string(),
        });
    };
    let header = header.trim();
    if header.eq_ignore_ascii_case("No devices were found") {
        return Err(NvidiaSmiError::NoDevices {
            message: header.to_string(),
        });
    }
    let fields: Vec<&str> = header.split(',').map(str::trim).collect();
    if fields != HEADER {
        return Err(NvidiaSmiError::BadHeader {
            header: clip(header),
        });
    }
    let mut gpus = Vec::new();
    for (i, line) in lines {
        let bad = |why| NvidiaSmiError::BadRow {
            line: i + 1,
            text: clip(line),
            why,
        };
        // A name could hold a comma; the two numbers cannot.
        let mut parts = line.rsplitn(3, ',');
        let (Some(used), Some(total), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected name, total memory, used memory"));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(bad("the GPU has no name"));
        }
        let total = mib(total)
            .map_err(bad)?
            .ok_or_else(|| bad("total memory is not available"))?;
        let used = mib(used).map_err(bad)?;
        gpus.push(NvidiaGpu {
            name: name.to_string(),
            memory_total_mib: total,
            memory_used_mib: used,
            memory_gb: bytes_to_gib(total.saturating_mul(1 << 20)),
        });
    }
    if gpus.is_empty() {
        return Err(NvidiaSmiError::NoDevices {
            message: "a header and no GPU".to_string(),
        });
    }
    Ok(gpus)
}

/// Why no GPU was found on this machine.
#[derive(Debug, thiserror::Error)]
pub enum GpuProbeError {
    /// `nvidia-smi` is not installed (not an error: most machines have no
    /// NVIDIA GPU).
    #[error("nvidia-smi not found")]
    NotInstalled,
    /// It could not be run.
    #[error("cannot run nvidia-smi")]
    Run(#[source] std::io::Error),
    /// It took longer than [`NVIDIA_SMI_TIMEOUT`] and was stopped.
    #[error("nvidia-smi did not answer within {0:?}")]
    TimedOut(Duration),
    /// It failed; its message.
    #[error("nvidia-smi failed ({status}): {message}")]
    Failed {
        /// The exit status.
        status: std::process::ExitStatus,
        /// What it printed (first line).
        message: String,
    },
    /// Its output gave no GPU.
    #[error(transparent)]
    Output(#[from] NvidiaSmiError),
}

/// Runs `nvidia-smi` (at most [`NVIDIA_SMI_TIMEOUT`]) and reads its GPUs.
pub fn query_nvidia_smi() -> Result<Vec<NvidiaGpu>, GpuProbeError> {
    let mut child = match Command::new(NVIDIA_SMI)
        .args(NVIDIA_SMI_ARGS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(GpuProbeError::NotInstalled);
        }
        Err(e) => return Err(GpuProbeError::Run(e)),
    };
    // Read in a thread so a full pipe never blocks the child.
    let reader = child.stdout.take().map(|mut stdout| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stdout.read_to_end(&mut bytes);
            bytes
        })
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= NVIDIA_SMI_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(GpuProbeError::TimedOut(NVIDIA_SMI_TIMEOUT));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(GpuProbeError::Run(e)),
        }
    };
    let bytes = reader.and_then(|r| r.join().ok()).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    if !status.success() {
        // It says "No devices were found" and fails; that is no GPU, not a
        // failure.
        if let Err(e @ NvidiaSmiError::NoDevices { .. }) = parse_nvidia_smi_csv(&text) {
            return Err(e.into());
        }
        return Err(GpuProbeError::Failed {
            status,
            message: clip(text.lines().next().unwrap_or("").trim()),
        });
    }
    Ok(parse_nvidia_smi_csv(&text)?)
}
