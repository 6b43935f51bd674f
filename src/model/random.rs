//! Random weights of a real checkpoint's shape, for benchmarks where the real weights cannot be
//! downloaded: a [`WeightSource`] that makes them, and a checkpoint directory written from it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::checkpoint::WeightSource;
use super::{ModelError, Qwen3Config, Result};

/// Random weights (uniform, std 0.02; norms 1), deterministic per tensor name and seed.
pub struct RandomWeights {
    pub seed: u64,
    pub dtype: DType,
    pub device: Device,
}

impl WeightSource for RandomWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            let h =
                name.bytes().fold(self.seed ^ 0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
            let bound = 0.02 * 3f32.sqrt();
            // Generate in parallel chunks, each with its own stream, so large tables are quick.
            let mut v = vec![0f32; n];
            use rayon::prelude::*;
            v.par_chunks_mut(1 << 20).enumerate().for_each(|(i, c)| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(h.wrapping_add(i as u64));
                c.iter_mut().for_each(|x| *x = rng.random_range(-bound..bound));
            });
            v
        };
        Ok(Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    fn has(&self, _name: &str) -> bool {
        false
    }
}

/// Hands out another source's tensors and keeps each, so loading a model once names them all.
struct Recording<'a> {
    inner: &'a dyn WeightSource,
    kept: std::sync::Mutex<Vec<(String, Tensor)>>,
}

impl WeightSource for Recording<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.inner.get(name, shape)?;
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).push((name.to_string(), t.clone()));
        Ok(t)
    }
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }
}

/// Writes a checkpoint directory of random weights (bf16) of `config` with `tokenizer`: every
/// tensor `Qwen3::load` reads, under its Hugging Face name. For benchmarks of the real shapes
/// where real weights cannot be downloaded.
pub fn write_random_checkpoint(config: &Path, tokenizer: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, "creating", e))?;
    std::fs::copy(config, dir.join("config.json")).map_err(|e| ModelError::io(config, "copying", e))?;
    std::fs::copy(tokenizer, dir.join("tokenizer.json")).map_err(|e| ModelError::io(tokenizer, "copying", e))?;
    let cfg = Qwen3Config::from_file(config)?;
    let random = RandomWeights { seed: 0, dtype: DType::BF16, device: Device::Cpu };
    let rec = Recording { inner: &random, kept: std::sync::Mutex::new(Vec::new()) };
    drop(super::qwen3::Qwen3::load(&cfg, &rec, 1, 2, &Device::Cpu)?);
    let kept: std::collections::HashMap<String, Tensor> =
        rec.kept.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().collect();
    candle_core::safetensors::save(&kept, dir.join("model.safetensors"))?;
    Ok(())
}
