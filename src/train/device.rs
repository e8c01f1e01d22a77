//! `--device auto|cpu|cuda[:N]`: where a run computes, and in which dtype.
//! The CPU computes in `f32`; a CUDA GPU (a `cuda` build) in `bf16` with
//! `f32` adapters, optimizer moments and loss. A CUDA device that this
//! build or this machine cannot give is an error saying what is missing,
//! never a silent fall back to the CPU (only `auto` falls back).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// The device asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// GPU 0 when this is a `cuda` build and a GPU is visible, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

/// A `--device` value that cannot be parsed or cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// Not `auto`, `cpu`, `cuda` or `cuda:N`.
    #[error(
        "unknown device {0:?}: expected auto, cpu, cuda or cuda:N (N a GPU ordinal, 0, 1, ...)"
    )]
    Unknown(String),
    /// A CUDA device asked of a binary built without the `cuda` feature.
    #[error(
        "--device cuda:{0}: this train was built without CUDA; build it with \
         `source scripts/cuda_env.sh && cargo build --release --features cuda` \
         (README, \"Building with CUDA\")"
    )]
    NotBuilt(usize),
    /// The GPU cannot be opened (no driver, no such ordinal, ...).
    #[error("--device cuda:{ordinal}: cannot open the GPU: {message}")]
    Unavailable {
        /// The ordinal asked for.
        ordinal: usize,
        /// The driver's or Candle's words.
        message: String,
    },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || DeviceError::Unknown(s.to_owned());
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => {
                let ordinal = s.strip_prefix("cuda:").ok_or_else(unknown)?;
                // Digits only: usize's parser would also take a leading '+'.
                if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(unknown());
                }
                ordinal.parse().map(Self::Cuda).map_err(|_| unknown())
            }
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device: the CPU, or the CUDA GPU asked for (`auto`: GPU 0
    /// in a `cuda` build when a GPU opens, else the CPU).
    pub fn resolve(self) -> Result<Compute, DeviceError> {
        match self {
            Self::Cpu => Ok(Compute::cpu()),
            Self::Auto if cfg!(feature = "cuda") => {
                Ok(Self::Cuda(0).resolve().unwrap_or_else(|_| Compute::cpu()))
            }
            Self::Auto => Ok(Compute::cpu()),
            Self::Cuda(n) if cfg!(feature = "cuda") => match Device::new_cuda(n) {
                Ok(device) => Ok(Compute {
                    device,
                    dtype: DType::BF16,
                }),
                Err(e) => Err(DeviceError::Unavailable {
                    ordinal: n,
                    message: e.to_string(),
                }),
            },
            Self::Cuda(n) => Err(DeviceError::NotBuilt(n)),
        }
    }
}

/// Where a run computes and in which dtype.
#[derive(Debug, Clone)]
pub struct Compute {
    /// The device of activations, adapters and optimizer state.
    pub device: Device,
    /// The dtype of activations (`f32` on the CPU, `bf16` on a GPU); the
    /// adapters are trained in `f32` under a 16-bit dtype.
    pub dtype: DType,
}

impl Default for Compute {
    fn default() -> Self {
        Self::cpu()
    }
}

impl Compute {
    /// The CPU in `f32`.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// The device as `--device` names it: `cpu` or `cuda:N`.
    pub fn name(&self) -> String {
        match self.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }

    /// A GPU's memory, MiB: the most its allocations have held since the
    /// process started (the CUDA context's own few hundred MiB not
    /// counted), and its total. `None` on the CPU.
    pub fn gpu_memory_mib(&self) -> Option<(f64, f64)> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &self.device {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            return crate::qlora::cuda::memory(d)
                .ok()
                .map(|(high, total)| (mib(high), mib(total)));
        }
        None
    }

    /// The compute dtype's name (`f32`, `bf16`).
    pub fn dtype_name(&self) -> &'static str {
        self.dtype.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_names_a_bad_value() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        for bad in [
            "", "gpu", "cuda:", "cuda:+1", "cuda:-1", "cuda:x", "CPU", "cuda:1:2",
        ] {
            assert_eq!(
                bad.parse::<DeviceChoice>(),
                Err(DeviceError::Unknown(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn the_cpu_computes_in_f32_and_auto_finds_a_device() {
        let c = DeviceChoice::Cpu.resolve().unwrap();
        assert!(c.device.is_cpu());
        assert_eq!((c.name().as_str(), c.dtype_name()), ("cpu", "f32"));
        let auto = DeviceChoice::Auto.resolve().unwrap();
        if auto.device.is_cpu() {
            assert_eq!(auto.dtype, DType::F32);
        } else {
            assert_eq!((auto.name().as_str(), auto.dtype), ("cuda:0", DType::BF16));
        }
    }

    #[test]
    fn cuda_is_refused_with_what_is_missing() {
        // Ordinal 4096: no machine has that GPU.
        let err = DeviceChoice::Cuda(4096).resolve().unwrap_err();
        if cfg!(feature = "cuda") {
            assert!(
                matches!(err, DeviceError::Unavailable { ordinal: 4096, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("cannot open the GPU"), "{err}");
        } else {
            assert_eq!(err, DeviceError::NotBuilt(4096));
            assert!(err.to_string().contains("--features cuda"), "{err}");
        }
    }
}
