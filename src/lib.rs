//! rerankd: fine-tunes a Qwen3 yes/no cross-encoder reranker with LoRA on a user's own relevance
//! feedback, as a job-queue daemon. See README.md and docs/.
//!
//! The layers, lowest first (docs/design.md states them; `tests/layers.rs` checks them):
//!
//! 1. [`model`] (Qwen3 + LoRA + the CPU kernels + prompt + scoring, pure candle), [`ids`] (the
//!    names that become paths), [`budget`] (the memory budget's rules), [`settings`] (how a
//!    settings file is read), [`sys`] (every OS question), [`testhooks`] (test-only fault hooks);
//! 2. [`store`]: every file under the state root;
//! 3. [`job`], [`config`], [`report`]: the job file, `config.toml`, the picture of a run;
//! 4. [`train`]: data, the loop, evaluation, promotion statistics (no files);
//! 5. [`daemon`]: intake, scheduling, supervision, the boot sweep, hooks, policy;
//! 6. [`serve`] and [`runner`]: the HTTP service and one run, each its own process.

pub mod budget;
pub mod config;
pub mod daemon;
pub mod ids;
pub mod job;
pub mod model;
pub mod report;
pub mod runner;
pub mod serve;
pub mod settings;
pub mod store;
pub mod sys;
pub mod testhooks;
pub mod train;
