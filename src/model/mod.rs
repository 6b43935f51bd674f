//! The model library: Qwen3 with LoRA as a yes/no cross-encoder reranker, in pure candle.
//!
//! It knows how to load a checkpoint directory, build the reranker prompt, score pairs, and take
//! gradients into LoRA tensors; it knows nothing of runs, spools or daemons.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod amx;
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod device;
pub mod export;
pub mod frozen;
pub mod host;
pub mod kernels;
pub mod lora;
pub mod mat;
pub mod ops;
#[cfg(target_arch = "x86_64")]
pub mod pairs;
pub mod prompt;
pub mod qwen3;
pub mod random;
pub mod reranker;

use std::path::{Path, PathBuf};

pub use config::Qwen3Config;
pub use lora::{LoraConfig, LoraSet};
pub use reranker::{PairLogits, Reranker};

/// Errors of the model library. File problems name the file (and the field when there is one).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("I/O error at {path} while {action}: {source}")]
    Io { path: PathBuf, action: &'static str, source: std::io::Error },
    #[error("{path}{}: {message}", field.as_ref().map(|f| format!(": field `{f}`")).unwrap_or_default())]
    File { path: PathBuf, field: Option<String>, message: String },
    /// A file that could not be written, with the cause as its source (so that a full disk is
    /// recognised as one: `sys::is_disk_full`).
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), action, source }
    }
    pub fn file(path: &Path, field: Option<String>, message: impl Into<String>) -> Self {
        Self::File { path: path.to_path_buf(), field, message: message.into() }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
