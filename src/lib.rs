//! rerankd: fine-tunes a Qwen3 yes/no cross-encoder reranker with LoRA on a user's own relevance
//! feedback, as a job-queue daemon. See README.md and DESIGN notes there.
//!
//! - [`model`]: Qwen3 + LoRA + fused differentiable ops + prompt + scoring (pure candle).
//! - [`train`]: optimizer, schedule, clipping, accumulation.

pub mod model;
pub mod train;
