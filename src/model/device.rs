//! Device choice: `auto` picks Metal when built with it, else CUDA when built with it and present,
//! else the CPU. All device-specific code of the crate is here and in `ops::FrozenMatmul`.

use candle_core::Device;

use super::{ModelError, Result};

/// Which device a job or command asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    /// Serde's spelling (the job file's), so there is one.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        crate::settings::spelled(s)
    }
}

impl DeviceChoice {
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => Device::new_cuda(0).map_err(|e| unavailable("cuda", e)),
            Self::Metal => Device::new_metal(0).map_err(|e| unavailable("metal", e)),
            Self::Auto => {
                if cfg!(feature = "metal")
                    && let Ok(d) = Device::new_metal(0)
                {
                    return Ok(d);
                }
                if cfg!(feature = "cuda")
                    && let Ok(d) = Device::new_cuda(0)
                {
                    return Ok(d);
                }
                Ok(Device::Cpu)
            }
        }
    }
}

fn unavailable(name: &str, e: candle_core::Error) -> ModelError {
    ModelError::Invalid(format!(
        "device `{name}` is not available ({e}); rebuild with `--features {name}` on a machine that has it, or use `auto`/`cpu`"
    ))
}
