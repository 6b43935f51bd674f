//! rerankd: fine-tunes a Qwen3 yes/no cross-encoder reranker with LoRA on a user's own relevance
//! feedback, as a job-queue daemon. See README.md and docs/.
//!
//! - [`model`]: Qwen3 + LoRA + fused differentiable ops + prompt + scoring (pure candle).
//! - [`train`]: optimizer, schedule, clipping, accumulation, the training loop.
//! - [`job`]: the job file, validated into an effective job.
//! - [`report`]: report.svg, the picture of a run.
//! - [`serve`]: the resident HTTP rerank service with hot reload.
//! - [`store`]: the run store; the only code that touches files under the state root.

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
