//! The memory governor's arithmetic: what one training micro-step will need, and the largest
//! micro-batch (then the shortest cut of max_length) that fits a budget, keeping the effective
//! batch (micro-batch x accumulation) as asked.
//!
//! The estimate is per token, not per batch: the fused ops keep only their inputs for the
//! backward, so what stays alive is a fixed set of hidden-sized tensors per layer and token
//! (counted in [`Estimate::for_model`]), plus the weights. The constants were fitted to the
//! measured peaks of `rerankd bench` on the Qwen3-0.6B shape (docs/performance.md) and err high.
//!
//! On the CPU, attention is the tiled op (`model::attention`): it holds no `[heads, length,
//! length]` tensor, so the estimate has no quadratic term there. On other devices attention is a
//! composition of candle ops whose score and probability tensors are quadratic in the length.

use serde::Serialize;

use crate::model::Qwen3Config;
use crate::model::lora::Target;

/// MB of a micro-step: `fixed_mb + rows * (length * per_token_mb + length^2 * per_row_sq_mb)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub fixed_mb: f64,
    pub per_token_mb: f64,
    /// Attention's transient `[heads, length, length]` tensors (scores or probabilities, their
    /// gradient, the score gradient and a transposed copy live together in one layer's
    /// backward), per row and length squared: 0 where attention is tiled (the CPU).
    pub per_row_sq_mb: f64,
}

/// The process itself, the tokenizer, allocator slack: measured about 150 MB with the tiny model.
const RUNTIME_MB: f64 = 200.0;
/// Backward transients (a layer's gradients and recomputed tensors) and allocator slack on top
/// of what the forward keeps: fitted to the bench peaks (1.98 MB/token measured at 1024 -> 2048
/// tokens, 1.84 counted, on the CPU with both blocks fused).
const TRANSIENT_FACTOR: f64 = 1.15;

/// Which fused blocks a training step runs; they decide what is kept for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    /// The layer's attention as one op (norms, rotary, tiled attention): the CPU.
    pub attention: bool,
    /// The frozen MLP with its residual as one op: the CPU, when LoRA targets none of
    /// gate/up/down.
    pub mlp: bool,
}

impl Blocks {
    pub fn for_run(cpu: bool, targets: &[Target]) -> Self {
        let mlp_lora = targets.iter().any(|t| matches!(t, Target::Gate | Target::Up | Target::Down));
        Self { attention: cpu, mlp: cpu && !mlp_lora }
    }
}

impl Estimate {
    /// `embed_bytes`: bytes per element of the embedding table as stored (2 for bf16/f16).
    pub fn for_model(c: &Qwen3Config, lora_params: u64, embed_bytes: u64, blocks: Blocks) -> Self {
        let mb = |bytes: f64| bytes / (1024.0 * 1024.0);
        let (d, i) = (c.hidden_size as f64, c.intermediate_size as f64);
        let q = (c.num_attention_heads * c.head_dim) as f64;
        let kv = (c.num_key_value_heads * c.head_dim) as f64;
        // f32 weights of the body, the embedding table as stored, LoRA with AdamW's two moments,
        // the gradient accumulator and a best-epoch snapshot.
        let weights = c.body_params() as f64 * 4.0 + (c.vocab_size * c.hidden_size) as f64 * embed_bytes as f64;
        let lora = lora_params as f64 * 4.0 * 5.0;
        // Kept per token and layer (f32 elements). Attention as one op: the input norm, q, k, v,
        // the attention output, o_proj's output and the residual sum. Composed: q, k, v also
        // normed, rotated and transposed, the output transposed.
        let attention = if blocks.attention { 3.0 * d + 2.0 * q + 2.0 * kv } else { 4.0 * d + 4.0 * q + 4.0 * kv };
        // The MLP as one op: gate|up (held inside it) and its output. Otherwise also the norm,
        // gate and up apart, the SwiGLU output and the projection's output.
        let mlp = if blocks.mlp { d + 2.0 * i } else { 3.0 * d + 4.0 * i };
        let per_layer = (attention + mlp) * 4.0;
        Self {
            fixed_mb: RUNTIME_MB + mb(weights + lora),
            per_token_mb: mb(per_layer * c.num_hidden_layers as f64) * TRANSIENT_FACTOR,
            per_row_sq_mb: if blocks.attention { 0.0 } else { mb(4.0 * c.num_attention_heads as f64 * 4.0) },
        }
    }

    /// MB of one row of `length` tokens, beyond the fixed part.
    pub fn row_mb(&self, length: usize) -> f64 {
        let l = length as f64;
        l * self.per_token_mb + l * l * self.per_row_sq_mb
    }

    pub fn step_mb(&self, micro_batch: usize, length: usize) -> f64 {
        self.fixed_mb + micro_batch as f64 * self.row_mb(length)
    }
}

/// One change the governor made: the `cap` event's type.
pub use crate::store::events::Cap;

/// What training will run with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub max_length: usize,
    pub estimate_mb: f64,
    pub budget_mb: u64,
    pub caps: Vec<Cap>,
}

/// The shortest `max_length` the governor will cut to before giving up.
pub const MIN_LENGTH: usize = 128;

/// Fits (micro, accum, max_length) under `budget_mb`: the largest micro-batch that fits at
/// `max_length`, accumulation raised so micro x accum is at least what was asked; if even one
/// row does not fit, `max_length` is halved down to [`MIN_LENGTH`]. Err when nothing fits.
pub fn plan(est: &Estimate, budget_mb: u64, micro: usize, accum: usize, max_length: usize) -> Result<Plan, String> {
    let budget = budget_mb as f64;
    if est.fixed_mb >= budget {
        return Err(format!(
            "the model alone needs about {:.0} MB, more than the memory budget of {budget_mb} MB",
            est.fixed_mb
        ));
    }
    let mut caps = Vec::new();
    let mut length = max_length;
    while est.step_mb(1, length) > budget {
        if length / 2 < MIN_LENGTH {
            return Err(format!(
                "one sequence of {length} tokens needs about {:.0} MB, more than the memory budget of {budget_mb} MB",
                est.step_mb(1, length)
            ));
        }
        length /= 2;
    }
    if length != max_length {
        let why = format!(
            "one row of {max_length} tokens would need {:.0} MB > budget {budget_mb} MB",
            est.step_mb(1, max_length)
        );
        caps.push(Cap { field: "train.max_length".into(), from: max_length as u64, to: length as u64, why });
    }
    let fits = ((budget - est.fixed_mb) / est.row_mb(length)).floor().max(1.0) as usize;
    let (mut m, mut a) = (micro, accum);
    if fits < micro {
        let why = format!(
            "a micro-batch of {micro} x {length} tokens would need {:.0} MB > budget {budget_mb} MB",
            est.step_mb(micro, length)
        );
        caps.push(Cap { field: "train.batch_size".into(), from: micro as u64, to: fits as u64, why });
        m = fits;
        a = (micro * accum).div_ceil(m);
        caps.push(Cap {
            field: "train.grad_accum".into(),
            from: accum as u64,
            to: a as u64,
            why: format!("keeps the effective batch at {} or more ({m} x {a})", micro * accum),
        });
    }
    Ok(Plan { micro_batch: m, grad_accum: a, max_length: length, estimate_mb: est.step_mb(m, length), budget_mb, caps })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen06() -> Qwen3Config {
        let text = include_str!("../../tests/fixtures/qwen3-0.6b.config.json");
        Qwen3Config::from_value(&serde_json::from_str(text).unwrap()).unwrap()
    }

    #[test]
    fn estimate_is_close_to_the_measured_peaks_and_errs_high() {
        // rerankd bench on the CPU, LoRA r16 q/k/v/o (docs/performance.md): peak RSS.
        let lora = 28 * 16 * ((1024 + 2048) + 2 * (1024 + 1024) + (2048 + 1024)) as u64;
        let qkvo = [Target::Q, Target::K, Target::V, Target::O];
        let e = Estimate::for_model(&qwen06(), lora, 2, Blocks::for_run(true, &qkvo));
        for (b, l, measured) in MEASURED_PEAKS_MB {
            let est = e.step_mb(b, l);
            assert!(
                est >= measured && est <= measured * 1.2,
                "{b}x{l}: estimate {est:.0} MB vs measured {measured} MB"
            );
        }
    }

    /// (micro-batch, length, peak MB) of `rerankd bench --only train` on the Qwen3-0.6B shape.
    const MEASURED_PEAKS_MB: [(usize, usize, f64); 4] =
        [(1, 256, 2540.0), (4, 256, 4020.0), (1, 1024, 4037.0), (1, 2048, 6037.0)];

    #[test]
    fn lora_on_the_mlp_keeps_more_per_token() {
        let fused = Estimate::for_model(&qwen06(), 0, 2, Blocks::for_run(true, &[Target::Q, Target::V]));
        let mlp_lora = Estimate::for_model(&qwen06(), 0, 2, Blocks::for_run(true, &[Target::Q, Target::Down]));
        assert!(!Blocks::for_run(true, &[Target::Up]).mlp && Blocks::for_run(true, &[Target::O]).mlp);
        assert!(mlp_lora.per_token_mb > 1.3 * fused.per_token_mb, "{mlp_lora:?} vs {fused:?}");
    }

    #[test]
    fn plan_keeps_the_effective_batch_and_caps_length_last() {
        let e = Estimate { fixed_mb: 2000.0, per_token_mb: 4.0, per_row_sq_mb: 0.0 };
        let p = plan(&e, 10_000, 16, 2, 512).unwrap();
        assert_eq!(p.micro_batch, 3); // (10000 - 2000) / (512 * 4) = 3.9
        assert_eq!(p.grad_accum, 11); // 32 / 3 rounded up
        assert!(p.micro_batch * p.grad_accum >= 32);
        assert_eq!(
            p.caps.iter().map(|c| c.field.as_str()).collect::<Vec<_>>(),
            ["train.batch_size", "train.grad_accum"]
        );
        assert!(p.estimate_mb <= 10_000.0);
        let p = plan(&e, 10_000, 2, 4, 256).unwrap();
        assert!(p.caps.is_empty() && p.micro_batch == 2 && p.grad_accum == 4);
        let p = plan(&e, 3000, 4, 1, 1024).unwrap();
        assert_eq!((p.micro_batch, p.max_length), (1, 128));
        assert_eq!(p.caps[0].field, "train.max_length");
        assert!(plan(&e, 2100, 1, 1, 512).is_err());
        assert!(plan(&e, 1500, 1, 1, 512).is_err());
    }

    #[test]
    fn tiled_attention_has_no_quadratic_term_and_composed_attention_does() {
        let tiled = Estimate::for_model(&qwen06(), 0, 2, Blocks::for_run(true, &[Target::Q]));
        // Linear in the length: an 8192-token row costs exactly 4x a 2048-token one.
        assert_eq!(tiled.row_mb(8192), 4.0 * tiled.row_mb(2048));
        let p = plan(&tiled, 48_000, 1, 1, 8192).unwrap();
        assert!(p.caps.is_empty() && p.max_length == 8192, "{p:?}");
        // Composed (GPU) attention: 16 heads x 4 tensors x 4 bytes x 8192^2, 16 GB of transients.
        let composed = Estimate::for_model(&qwen06(), 0, 2, Blocks::for_run(false, &[Target::Q]));
        assert!(composed.row_mb(8192) - 8192.0 * composed.per_token_mb > 16_000.0);
        let p = plan(&composed, 16_000, 4, 1, 8192).unwrap();
        assert!(p.max_length < 8192 && p.estimate_mb <= 16_000.0, "{p:?}");
    }
}
