//! `--device auto|cpu|cuda[:N]`: where the run computes. The trainer runs
//! on the CPU only (issue #20 makes it a GPU trainer), so `cuda` is refused
//! with what is missing, never run on the CPU in silence.

use std::fmt;
use std::str::FromStr;

/// The device asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU until GPU training exists (then a visible GPU).
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
    /// A CUDA device asked of a `cuda` build, whose trainer is still CPU-only.
    #[error(
        "--device cuda:{0}: GPU training is not built yet (issue #20): this \
         build links CUDA but the trainer computes on the CPU only; use \
         --device cpu"
    )]
    NoGpuTrainer(usize),
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
    /// Whether this binary can train on the device: `auto` and `cpu` are
    /// the CPU; a CUDA device is an error that says what is missing.
    pub fn check(self) -> Result<(), DeviceError> {
        match self {
            Self::Auto | Self::Cpu => Ok(()),
            Self::Cuda(n) if cfg!(feature = "cuda") => Err(DeviceError::NoGpuTrainer(n)),
            Self::Cuda(n) => Err(DeviceError::NotBuilt(n)),
        }
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
    fn cuda_is_refused_with_what_is_missing() {
        assert_eq!(DeviceChoice::Auto.check(), Ok(()));
        assert_eq!(DeviceChoice::Cpu.check(), Ok(()));
        let err = DeviceChoice::Cuda(1).check().unwrap_err();
        if cfg!(feature = "cuda") {
            assert_eq!(err, DeviceError::NoGpuTrainer(1));
            assert!(err.to_string().contains("issue #20"), "{err}");
        } else {
            assert_eq!(err, DeviceError::NotBuilt(1));
            assert!(err.to_string().contains("--features cuda"), "{err}");
        }
    }
}
