//! Finding and reading a Qwen3 checkpoint: a directory, or a Hugging Face repo id resolved through
//! the local Hugging Face cache; one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`; bf16, f16 or f32. Also a source of random weights of any config,
//! for benchmarks (real weights cannot be downloaded everywhere).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::{ModelError, Qwen3Config, Result};

/// A checkpoint directory on disk: where its three kinds of file are.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Vec<PathBuf>,
}

impl CheckpointDir {
    /// `spec` is a directory, or a repo id like `Qwen/Qwen3-Reranker-0.6B` found in the HF cache.
    pub fn resolve(spec: &str) -> Result<Self> {
        let as_path = Path::new(spec);
        let dir = if as_path.is_dir() {
            as_path.to_path_buf()
        } else if looks_like_repo_id(spec) {
            hf_cache_snapshot(spec)?
        } else {
            return Err(ModelError::Invalid(format!(
                "model `{spec}`: not a directory, and not a Hugging Face repo id (owner/name)"
            )));
        };
        Self::open(&dir)
    }

    /// Checks that a directory holds a config, a tokenizer and weights.
    pub fn open(dir: &Path) -> Result<Self> {
        let need = |name: &str| {
            let p = dir.join(name);
            if p.is_file() { Ok(p) } else { Err(ModelError::file(&p, None, "missing from the checkpoint directory")) }
        };
        let config = need("config.json")?;
        let tokenizer = need("tokenizer.json")?;
        let index = dir.join("model.safetensors.index.json");
        let weights = if index.is_file() { shard_files(&index)? } else { vec![need("model.safetensors")?] };
        Ok(Self { dir: dir.to_path_buf(), config, tokenizer, weights })
    }

    pub fn read_config(&self) -> Result<Qwen3Config> {
        Qwen3Config::from_file(&self.config)
    }
}

fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

/// The Hugging Face hub cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// `models--Owner--Name/snapshots/<rev>` where `<rev>` is what `refs/main` names, else the only
/// (or newest) snapshot.
fn hf_cache_snapshot(repo: &str) -> Result<PathBuf> {
    let cache = hf_hub_cache().ok_or_else(|| ModelError::Invalid("no HF_HOME and no HOME to find the cache".into()))?;
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs/main")) {
        let p = snapshots.join(rev.trim());
        if p.is_dir() {
            return Ok(p);
        }
    }
    let entries = std::fs::read_dir(&snapshots).map_err(|_| {
        ModelError::Invalid(format!(
            "model `{repo}` is not in the Hugging Face cache (looked in {}); download it with \
             `huggingface-cli download {repo}` or give a checkpoint directory",
            snapshots.display()
        ))
    })?;
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .ok_or_else(|| ModelError::file(&snapshots, None, "no snapshot in the cache"))
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, "reading", e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::file(index, None, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::file(index, Some("weight_map".into()), "missing or not an object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let f = file
            .as_str()
            .filter(|f| !f.contains('/') && !f.starts_with('.'))
            .ok_or_else(|| ModelError::file(index, Some(format!("weight_map.{name}")), "must be a file name"))?;
        files.insert(f.to_string());
    }
    files
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            if p.is_file() { Ok(p) } else { Err(ModelError::file(&p, None, "shard named in the index is missing")) }
        })
        .collect()
}

/// Where the model's tensors come from.
pub trait WeightSource {
    /// The tensor `name` (a Hugging Face name, e.g. `model.norm.weight`), checked against `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether the checkpoint has this tensor (used for the optional `lm_head.weight`).
    fn has(&self, name: &str) -> bool;
}

/// Memory-mapped safetensors files.
pub struct SafetensorsWeights {
    st: MmapedSafetensors,
    files: Vec<PathBuf>,
    names: HashSet<String>,
    device: Device,
}

impl SafetensorsWeights {
    pub fn open(files: &[PathBuf], device: &Device) -> Result<Self> {
        for f in files {
            // Read the header ourselves first so a bad file is an error that names it.
            check_safetensors_header(f)?;
        }
        // SAFETY: the files are mapped read-only; like every safetensors reader we rely on them
        // not being truncated while mapped.
        let st = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| ModelError::Invalid(format!("reading {}: {e}", display_list(files))))?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self { st, files: files.to_vec(), names, device: device.clone() })
    }

    /// Bytes per element of a stored tensor, read from the header (nothing is loaded).
    pub fn dtype_bytes(&self, name: &str) -> Option<usize> {
        let key = self.resolve_name(name)?;
        self.st.get(&key).ok().map(|v| v.dtype().bitsize().div_ceil(8))
    }

    fn resolve_name(&self, name: &str) -> Option<String> {
        // Qwen3ForCausalLM keeps `model.` in front; a bare Qwen3Model checkpoint does not.
        [name.to_string(), name.strip_prefix("model.").unwrap_or(name).to_string()]
            .into_iter()
            .find(|n| self.names.contains(n))
    }
}

fn display_list(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, "opening", e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| ModelError::file(path, None, "too short to be a safetensors file"))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map_err(|e| ModelError::io(path, "reading metadata of", e))?.len();
    if n == 0 || n > 100_000_000 || n + 8 > size {
        return Err(ModelError::file(path, None, format!("not a safetensors file (header length {n})")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| ModelError::io(path, "reading", e))?;
    serde_json::from_slice::<serde_json::Value>(&header)
        .map_err(|e| ModelError::file(path, None, format!("safetensors header is not valid JSON: {e}")))?;
    Ok(())
}

impl WeightSource for SafetensorsWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let key = self
            .resolve_name(name)
            .ok_or_else(|| ModelError::Invalid(format!("{}: tensor `{name}` is missing", display_list(&self.files))))?;
        let t = self.st.load(&key, &self.device)?;
        if t.dims() != shape {
            return Err(ModelError::Invalid(format!(
                "{}: tensor `{key}` has shape {:?}, the config implies {:?}",
                display_list(&self.files),
                t.dims(),
                shape
            )));
        }
        match t.dtype() {
            DType::BF16 | DType::F16 | DType::F32 => Ok(t),
            other => Err(ModelError::Invalid(format!(
                "{}: tensor `{key}` is {other:?}; only bf16, f16 and f32 are supported",
                display_list(&self.files)
            ))),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.resolve_name(name).is_some()
    }
}
