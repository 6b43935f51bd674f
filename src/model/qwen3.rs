//! Qwen3 body with optional LoRA, computing only what a yes/no reranker needs: the final hidden
//! state at each row's last real token. Nothing of size batch x length x vocab (or batch x vocab)
//! is ever built; the head is two rows of the embedding (or lm_head) matrix.
//!
//! Frozen projection weights are `Frozen` (AMX tiles where it can, otherwise f32, widened once at
//! load); the embedding table stays in the checkpoint's dtype and only the looked-up rows are
//! widened, which is exact.

use candle_core::{D, DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::attention::BlockDims;
use super::checkpoint::WeightSource;
use super::lora::{LoraSet, Target};
use super::ops::{
    BlockParams, Frozen, MlpWeights, RopeTables, after_prefix, attention, attention_after, attention_block,
    frozen_linear, lora_linear, mlp_block, norm_rope, rms_norm, swiglu,
};
use super::{Qwen3Config, Result};

/// One decoder layer: its projections frozen (`Frozen`: AMX tiles or f32), its norms f32.
struct Layer {
    q_proj: Frozen,    // [q, hidden]
    k_proj: Frozen,    // [kv, hidden]
    v_proj: Frozen,    // [kv, hidden]
    o_proj: Frozen,    // [hidden, q]
    gate_proj: Frozen, // [inter, hidden]
    up_proj: Frozen,   // [inter, hidden]
    down_proj: Frozen, // [hidden, inter]
    q_norm: Tensor,    // [head_dim]
    k_norm: Tensor,    // [head_dim]
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
}

impl Layer {
    /// The seven projection weights.
    fn projections(&self) -> [&Frozen; 7] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

/// Dropout on LoRA inputs during training: seeded, so runs are reproducible.
pub struct Dropout {
    pub p: f64,
    rng: rand::rngs::StdRng,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        Self { p, rng: rand::rngs::StdRng::seed_from_u64(seed) }
    }

    /// The masks of optimizer step `step`, derived from (seed, step) alone: a resumed run draws
    /// the same masks without saving any generator state.
    pub fn for_step(p: f64, seed: u64, step: u64) -> Self {
        Self::new(p, seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
    }

    /// A fresh mask for `x` (kept entries scaled by 1/(1-p)), or None when p is 0.
    fn mask(&mut self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.p <= 0.0 {
            return Ok(None);
        }
        let keep = 1.0 - self.p;
        let n = x.elem_count();
        let mask: Vec<f32> =
            (0..n).map(|_| if self.rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
        Ok(Some(Tensor::from_vec(mask, x.shape(), x.device())?))
    }
}

/// What a forward pass adds on top of the frozen model.
pub struct Adapters<'a> {
    pub lora: Option<&'a LoraSet>,
    /// Some only in training; scoring never applies dropout.
    pub dropout: Option<&'a mut Dropout>,
    /// Record a graph for the LoRA tensors (training). Scoring builds no graph at all, so each
    /// intermediate is freed as soon as the next layer has used it.
    pub train: bool,
}

/// Token ids of several prompts, right-padded to the longest.
pub struct Batch {
    /// `[batch, seq]` u32
    pub ids: Tensor,
    /// Index of each row's last real token.
    pub last: Vec<usize>,
    /// batch x seq, padding included (what the step computes on).
    pub tokens: usize,
}

impl Batch {
    pub fn new(seqs: &[&[u32]], pad_id: u32, device: &Device) -> Result<Self> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        if t == 0 || seqs.iter().any(|s| s.is_empty()) {
            return Err(super::ModelError::Invalid("empty batch or empty sequence".into()));
        }
        let mut flat = Vec::with_capacity(seqs.len() * t);
        for s in seqs {
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(pad_id, t - s.len()));
        }
        let ids = Tensor::from_vec(flat, (seqs.len(), t), device)?;
        Ok(Batch { ids, last: seqs.iter().map(|s| s.len() - 1).collect(), tokens: seqs.len() * t })
    }
}

/// The keys and values of a token prefix at every layer (`[1, hk, len, hd]` each).
#[derive(Clone)]
pub struct PrefixCache {
    /// The prefix's tokens.
    pub tokens: Vec<u32>,
    /// How many of its leading tokens were taken from an earlier cache rather than computed.
    pub reused: usize,
    kv: Vec<(Tensor, Tensor)>,
}

impl PrefixCache {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The cache of its first `n` tokens. Exact: a position's keys and values depend only on
    /// the tokens up to it.
    pub fn truncated(&self, n: usize) -> Result<PrefixCache> {
        let n = n.min(self.len());
        let kv = self.kv.iter().map(|(k, v)| Ok((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?))).collect::<Result<_>>()?;
        Ok(PrefixCache { tokens: self.tokens[..n].to_vec(), reused: self.reused.min(n), kv })
    }
}

pub struct Qwen3 {
    pub cfg: Qwen3Config,
    embed_tokens: Tensor, // [vocab, hidden], checkpoint dtype
    layers: Vec<Layer>,
    norm: Tensor,
    /// Rows [no, yes] of the output head, f32: `[2, hidden]`.
    head: Tensor,
    device: Device,
}

impl Qwen3 {
    /// Builds the model from a weight source; `yes_id` / `no_id` pick the head rows.
    pub fn load(cfg: &Qwen3Config, w: &dyn WeightSource, yes_id: u32, no_id: u32, device: &Device) -> Result<Self> {
        let (d, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let f32w = |name: &str, shape: &[usize]| -> Result<Tensor> { Ok(w.get(name, shape)?.to_dtype(DType::F32)?) };
        let frozen = |name: &str, shape: &[usize]| -> Result<Frozen> { Ok(Frozen::new(&w.get(name, shape)?)?) };
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    q_proj: frozen(&format!("{p}.self_attn.q_proj.weight"), &[q, d])?,
                    k_proj: frozen(&format!("{p}.self_attn.k_proj.weight"), &[kv, d])?,
                    v_proj: frozen(&format!("{p}.self_attn.v_proj.weight"), &[kv, d])?,
                    o_proj: frozen(&format!("{p}.self_attn.o_proj.weight"), &[d, q])?,
                    gate_proj: frozen(&format!("{p}.mlp.gate_proj.weight"), &[inter, d])?,
                    up_proj: frozen(&format!("{p}.mlp.up_proj.weight"), &[inter, d])?,
                    down_proj: frozen(&format!("{p}.mlp.down_proj.weight"), &[d, inter])?,
                    q_norm: f32w(&format!("{p}.self_attn.q_norm.weight"), &[hd])?,
                    k_norm: f32w(&format!("{p}.self_attn.k_norm.weight"), &[hd])?,
                    input_layernorm: f32w(&format!("{p}.input_layernorm.weight"), &[d])?,
                    post_attention_layernorm: f32w(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = f32w("model.norm.weight", &[d])?;
        let ids = Tensor::new(&[no_id, yes_id], device)?;
        let head = if w.has("score.weight") {
            // A single-logit classifier (an export in seq-cls form): its row is E[yes] - E[no],
            // so it is the `yes` row against a `no` row of zeros: yes - no = the logit.
            let row = w.get("score.weight", &[1, d])?.to_dtype(DType::F32)?;
            Tensor::cat(&[&row.zeros_like()?, &row], 0)?
        } else if !cfg.tie_word_embeddings && w.has("lm_head.weight") {
            w.get("lm_head.weight", &[cfg.vocab_size, d])?.index_select(&ids, 0)?
        } else {
            embed_tokens.index_select(&ids, 0)?
        }
        .to_dtype(DType::F32)?;
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers, norm, head, device: device.clone() })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Readies the frozen weights for backward passes (a packed weight's second layout, see
    /// `Frozen::ready_for_backward`); [`Qwen3::micro_step`] calls it, and once done it is free.
    pub fn ready_for_training(&self) {
        self.layers.iter().flat_map(Layer::projections).for_each(Frozen::ready_for_backward);
    }

    /// The kernel path the projections' products run on (`Frozen::runs_on`), the same for all
    /// of them or `None` (mixed: a weight with values that are not bf16s stays f32).
    pub fn weights_kernel(&self) -> Option<super::cpu::Kernel> {
        let mut kinds = self.layers.iter().flat_map(Layer::projections).map(Frozen::runs_on);
        let first = kinds.next().unwrap_or(super::cpu::Kernel::F32);
        kinds.all(|k| k == first).then_some(first)
    }

    /// [`Qwen3::weights_kernel`]'s name, for reports: `amx`, `avx512-bf16`, `avx512`, `f32` or `mixed`.
    pub fn weights_kind(&self) -> &'static str {
        self.weights_kernel().map_or("mixed", super::cpu::Kernel::name)
    }

    /// `[batch, 2]` logits `[no, yes]` at each row's last real token.
    /// `ids: [batch, seq]` right-padded; `last[b]` is the index of row b's last real token.
    pub fn yes_no_logits(&self, batch: &Batch, ad: &mut Adapters) -> Result<Tensor> {
        self.logits_after(None, batch, ad)
    }

    /// The keys and values of every layer for one token sequence (a prefix shared by several
    /// prompts), computed once: [`Qwen3::yes_no_logits_after`] runs only what follows it.
    pub fn prefix_cache(&self, ids: &[u32], ad: &mut Adapters) -> Result<PrefixCache> {
        self.cache_after(None, ids, ad)
    }

    /// The cache of `prefix` followed by `ids`, running only `ids`' tokens (after `prefix`'s
    /// keys and values, as [`Qwen3::yes_no_logits_after`] does).
    pub fn extend_prefix(&self, prefix: &PrefixCache, ids: &[u32], ad: &mut Adapters) -> Result<PrefixCache> {
        self.cache_after(Some(prefix), ids, ad)
    }

    /// `[batch, 2]` logits `[no, yes]` of prompts that are `prefix` followed by each row of
    /// `batch` (right-padded continuations; `last` indexes the continuation). The same numbers
    /// as [`Qwen3::yes_no_logits`] on the whole prompts, to rounding.
    pub fn yes_no_logits_after(&self, prefix: &PrefixCache, batch: &Batch, ad: &mut Adapters) -> Result<Tensor> {
        self.logits_after(Some(prefix), batch, ad)
    }

    /// The embedded tokens, f32: `[n, d]`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.index_select(ids, 0)?.to_dtype(DType::F32)?)
    }

    /// Rotary tables for `t` tokens after `prefix`.
    fn rope_after(&self, prefix: Option<&PrefixCache>, t: usize) -> Result<RopeTables> {
        let start = prefix.map_or(0, PrefixCache::len);
        Ok(RopeTables::range(self.cfg.head_dim, start, t, self.cfg.rope_theta, &self.device)?)
    }

    fn logits_after(&self, prefix: Option<&PrefixCache>, batch: &Batch, ad: &mut Adapters) -> Result<Tensor> {
        let (ids, last) = (&batch.ids, &batch.last);
        let (b, t) = ids.dims2()?;
        // Right padding + causal attention: real tokens never see the padding, so no pad mask.
        let mut x = self.embed(&ids.flatten_all()?)?; // [b*t, d]
        let rope = self.rope_after(prefix, t)?;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            let past = prefix.map(|p| (&p.kv[i].0, &p.kv[i].1));
            // The last layer computes only the rows the head reads.
            let only = (i + 1 == n).then_some(last.as_slice());
            x = self.layer_forward(i, layer, &x, b, t, &rope, past, None, only, ad)?;
        }
        let h = rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?; // [b, d]
        Ok(h.matmul(&self.head.t()?)?) // [b, 2]
    }

    fn cache_after(&self, prefix: Option<&PrefixCache>, ids: &[u32], ad: &mut Adapters) -> Result<PrefixCache> {
        let t = ids.len();
        let mut x = self.embed(&Tensor::new(ids, &self.device)?)?; // [t, d]
        let rope = self.rope_after(prefix, t)?;
        let mut kv = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let past = prefix.map(|p| (&p.kv[i].0, &p.kv[i].1));
            x = self.layer_forward(i, layer, &x, 1, t, &rope, past, Some(&mut kv), None, ad)?;
        }
        let Some(prefix) = prefix else { return Ok(PrefixCache { tokens: ids.to_vec(), reused: 0, kv }) };
        // `kv` holds the new tokens' keys and values: after the prefix's.
        let kv = prefix
            .kv
            .iter()
            .zip(kv)
            .map(|((pk, pv), (k, v))| {
                Ok((Tensor::cat(&[pk, &k], 2)?.contiguous()?, Tensor::cat(&[pv, &v], 2)?.contiguous()?))
            })
            .collect::<Result<_>>()?;
        Ok(PrefixCache { tokens: [prefix.tokens.as_slice(), ids].concat(), reused: prefix.len(), kv })
    }

    /// Projection `t` of layer `i` over `x` with frozen weight `w`, plus its LoRA if it has one.
    fn proj(&self, i: usize, t: Target, x: &Tensor, w: &Frozen, ad: &mut Adapters) -> Result<Tensor> {
        let Some(p) = ad.lora.and_then(|l| l.get(i, t)) else { return Ok(frozen_linear(x, w)?) };
        let scale = ad.lora.map(|l| l.cfg.scale()).unwrap_or(1.0);
        let mask = match ad.dropout.as_deref_mut() {
            Some(d) => d.mask(x)?,
            None => None,
        };
        let (a, b) = if ad.train {
            (p.a.as_tensor().clone(), p.b.as_tensor().clone())
        } else {
            (p.a.as_tensor().detach(), p.b.as_tensor().detach())
        };
        Ok(lora_linear(x, w, &a, &b, scale, mask)?)
    }

    /// One layer. `past`: the keys and values of a cached prefix (`[1, hk, p, hd]`) that these
    /// `t` tokens follow; `keep`: where to store this layer's keys and values (for a cache);
    /// `only`: compute the output of one row per sequence only, row `only[r]` of sequence `r`
    /// (the last layer: the head reads nothing else), returning `[b, d]`.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        i: usize,
        l: &Layer,
        x: &Tensor,
        b: usize,
        t: usize,
        rope: &RopeTables,
        past: Option<(&Tensor, &Tensor)>,
        keep: Option<&mut Vec<(Tensor, Tensor)>>,
        only: Option<&[usize]>,
        ad: &mut Adapters,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (h, hk, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (qd, rep) = (h * hd, h / hk);
        let eps = c.rms_norm_eps;

        let hn = rms_norm(x, &l.input_layernorm, eps)?; // [b*t, d]
        let k = self.proj(i, Target::K, &hn, &l.k_proj, ad)?; // [b*t, kv]
        let v = self.proj(i, Target::V, &hn, &l.v_proj, ad)?;
        if let Some(only) = only {
            return self.last_rows_forward(i, l, x, &hn, &k, &v, b, t, rope, past, only, ad);
        }
        let q = self.proj(i, Target::Q, &hn, &l.q_proj, ad)?; // [b*t, q]
        let scale = 1.0 / (hd as f64).sqrt();
        if keep.is_none() {
            let dims = BlockDims { b, t, heads: h, kv_heads: hk, hd };
            let p = BlockParams { q_norm: &l.q_norm, k_norm: &l.k_norm, eps, rope, dims, scale, past };
            let o = attention_block(&q, &k, &v, &p)?; // [b*t, q]
            let o = self.proj(i, Target::O, &o, &l.o_proj, ad)?;
            return self.mlp(i, l, &(x + o)?, ad);
        }

        // Building a prefix cache: its normed, rotated keys and values are kept, so they are
        // computed here as tensors (prompt prefixes are short; documents take the block above).
        let q = norm_rope(&q.reshape((b, t, h, hd))?, &l.q_norm, eps, rope)?; // [b, h, t, hd]
        // Heads sharing a KV head are consecutive: stack them along rows, no K/V copies.
        let q = q.reshape((b, hk, rep * t, hd))?;
        let k = norm_rope(&k.reshape((b, t, hk, hd))?, &l.k_norm, eps, rope)?; // [b, hk, t, hd]
        let v = v.reshape((b, t, hk, hd))?.transpose(1, 2)?.contiguous()?; // [b, hk, t, hd]

        if let Some(keep) = keep {
            keep.push((k.clone(), v.clone()));
        }
        let o = match past {
            None => attention(&q, &k, &v, scale)?, // [b, hk, rep*t, hd]
            Some((pk, pv)) => {
                let (k, v) = (after_prefix(pk, &k)?, after_prefix(pv, &v)?);
                attention_after(&q.contiguous()?, &k, &v, scale, pk.dim(2)?)?
            }
        };
        let o = o.reshape((b, h, t, hd))?.transpose(1, 2)?.contiguous()?.reshape((b * t, qd))?;
        let o = self.proj(i, Target::O, &o, &l.o_proj, ad)?;
        self.mlp(i, l, &(x + o)?, ad)
    }

    /// The residual MLP half of layer `i` on `x [n, d]`.
    fn mlp(&self, i: usize, l: &Layer, x: &Tensor, ad: &mut Adapters) -> Result<Tensor> {
        let c = &self.cfg;
        let lora_any =
            ad.lora.is_some_and(|lo| [Target::Gate, Target::Up, Target::Down].iter().any(|&t| lo.get(i, t).is_some()));
        if !lora_any {
            let w = MlpWeights { gate: &l.gate_proj, up: &l.up_proj, down: &l.down_proj };
            return Ok(mlp_block(x, &l.post_attention_layernorm, c.rms_norm_eps, &w)?);
        }
        let hn = rms_norm(x, &l.post_attention_layernorm, c.rms_norm_eps)?;
        let lora_mlp = ad.lora.is_some_and(|lo| lo.get(i, Target::Gate).is_some() || lo.get(i, Target::Up).is_some());
        let a = if lora_mlp {
            let g = self.proj(i, Target::Gate, &hn, &l.gate_proj, ad)?;
            let u = self.proj(i, Target::Up, &hn, &l.up_proj, ad)?;
            (g.silu()? * u)?
        } else {
            // gate|up side by side, what the fused SwiGLU reads.
            let gu = Tensor::cat(&[frozen_linear(&hn, &l.gate_proj)?, frozen_linear(&hn, &l.up_proj)?], 1)?;
            swiglu(&gu)? // [b*t, inter]
        };
        let m = self.proj(i, Target::Down, &a, &l.down_proj, ad)?;
        Ok((x + m)?)
    }

    /// Layer `i` for one query row per sequence (`only[r]` of sequence `r`, after `past` when
    /// there is a prefix), given the whole sequences' normed input `hn` and projected keys `k`
    /// and values `v`: attention of those rows over every visible key, then `o_proj` and the MLP
    /// on `b` rows instead of `b * t`. Composed candle ops, on every device: its tensors are
    /// `[b, heads, keys]` at most.
    #[allow(clippy::too_many_arguments)]
    fn last_rows_forward(
        &self,
        i: usize,
        l: &Layer,
        x: &Tensor,
        hn: &Tensor,
        k: &Tensor,
        v: &Tensor,
        b: usize,
        t: usize,
        rope: &RopeTables,
        past: Option<(&Tensor, &Tensor)>,
        only: &[usize],
        ad: &mut Adapters,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (h, hk, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (qd, rep, half) = (h * hd, h / hk, hd / 2);
        let eps = c.rms_norm_eps;
        let dev = &self.device;
        let rows: Vec<u32> = only.iter().enumerate().map(|(r, &p)| (r * t + p) as u32).collect();
        let rows = Tensor::new(rows.as_slice(), dev)?;
        let pos = Tensor::new(only.iter().map(|&p| p as u32).collect::<Vec<_>>().as_slice(), dev)?;

        // q of the selected rows, normed and rotated to their positions: [b, h, hd]
        let q = self.proj(i, Target::Q, &hn.index_select(&rows, 0)?, &l.q_proj, ad)?;
        let q = rms_norm(&q.reshape((b, h, hd))?, &l.q_norm, eps)?;
        let (cos, sin) = (rope.cos.index_select(&pos, 0)?.unsqueeze(1)?, rope.sin.index_select(&pos, 0)?.unsqueeze(1)?);
        let (q1, q2) = (q.narrow(2, 0, half)?, q.narrow(2, half, half)?);
        let q = Tensor::cat(
            &[
                (q1.broadcast_mul(&cos)? - q2.broadcast_mul(&sin)?)?,
                (q2.broadcast_mul(&cos)? + q1.broadcast_mul(&sin)?)?,
            ],
            2,
        )?;

        let mut k = norm_rope(&k.reshape((b, t, hk, hd))?, &l.k_norm, eps, rope)?; // [b, hk, t, hd]
        let mut v = v.reshape((b, t, hk, hd))?.transpose(1, 2)?.contiguous()?;
        let p = match past {
            Some((pk, pv)) => {
                (k, v) = (after_prefix(pk, &k)?, after_prefix(pv, &v)?);
                pk.dim(2)?
            }
            None => 0,
        };
        let keys = p + t;
        // Row r sees keys 0..=p + only[r].
        let mask: Vec<f32> = only
            .iter()
            .flat_map(|&o| (0..keys).map(move |j| if j <= p + o { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, keys), dev)?;
        let q = q.reshape((b, hk, rep, hd))?.contiguous()?;
        let scores = (q.matmul(&k.contiguous()?.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&mask)?; // [b, hk, rep, keys]
        let o = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v.contiguous()?)?.reshape((b, qd))?;
        let o = self.proj(i, Target::O, &o, &l.o_proj, ad)?;
        self.mlp(i, l, &(x.index_select(&rows, 0)? + o)?, ad)
    }

    /// Forward + backward of one micro-batch. Returns the loss value (weighted as asked) and the
    /// gradient of every LoRA tensor, in `lora.vars()` order. Fails if any tensor got none.
    pub fn micro_step(
        &self,
        batch: &Batch,
        labels: &[f32],
        weights: &[f32],
        lora: &LoraSet,
        dropout: Option<&mut Dropout>,
    ) -> Result<(f32, Vec<Tensor>)> {
        self.ready_for_training();
        let mut ad = Adapters { lora: Some(lora), dropout, train: true };
        let (loss, mut grads) = super::kernels::training(|| -> Result<_> {
            let logits = self.yes_no_logits(batch, &mut ad)?;
            let loss = yes_no_loss(&logits, labels, weights)?;
            let grads = loss.backward()?;
            Ok((loss, grads))
        })?;
        let value = loss.to_scalar::<f32>()?;
        lora.named()
            .into_iter()
            .map(|(name, v)| {
                grads
                    .remove(v.as_tensor())
                    .ok_or_else(|| super::ModelError::Invalid(format!("LoRA tensor {name} received no gradient")))
            })
            .collect::<Result<Vec<_>>>()
            .map(|g| (value, g))
    }
}

/// Mean (weighted) 2-way cross-entropy over `[no, yes]` logits; `labels[b]` is 1.0 for relevant.
/// `weights[b]` scales each row's loss (1/batch for a mean, 1/effective-batch under accumulation).
pub fn yes_no_loss(logits: &Tensor, labels: &[f32], weights: &[f32]) -> Result<Tensor> {
    let dev = logits.device();
    let b = labels.len();
    let onehot: Vec<f32> = labels.iter().flat_map(|&y| [1.0 - y, y]).collect();
    let onehot = Tensor::from_vec(onehot, (b, 2), dev)?;
    let w = Tensor::from_vec(weights.to_vec(), b, dev)?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?; // stable: max subtracted
    let nll = (logp * onehot)?.sum(D::Minus1)?.neg()?; // [b]
    Ok((nll * w)?.sum_all()?)
}
