//! Differentiable building blocks of the Qwen3 forward pass.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` record no gradient, silently, its
//! matmul backward computes a gradient for *both* operands (a weight-sized gradient per frozen
//! projection, kept until the backward ends), and a composition of ops keeps every intermediate
//! alive until the backward is done. So each block here is a CPU `CustomOp` that keeps only its
//! inputs and recomputes the rest in `bwd` (ordinary tensor ops, or a fused CPU loop), next to a
//! composition of differentiable candle ops that runs on other devices and is the reference the
//! fused form is tested against (values and every input gradient).
//!
//! `frozen_linear` is one CustomOp on every backend (the forward is the backend's own matmul, on
//! the CPU in f32 [`sgemm`] like the fused ops); its backward produces the input gradient only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use super::attention::{AttentionBlock, BlockDims, TILES, TiledAttention, Tiles};
pub use super::frozen::Frozen;
pub use super::host::RopeTables;
use super::host::{cpu_f32, norm_rope_to_heads, norm_rope_to_heads_bwd, rms_grad_row, rms_rows, with_host};
use super::kernels::{Mat, Threads, exp_approx, sgemm, vectorized};

/// `x @ w^T` for a weight that is never trained: backward yields d/dx only.
struct FrozenMatmul {
    w: Frozen,
}

/// `(m, k, n)` of `x [m, k] @ w[n, k]^T` from the two shapes, or why they do not fit.
fn wt_dims((m, k): (usize, usize), (n, kw): (usize, usize)) -> Result<(usize, usize, usize)> {
    if k != kw {
        bail!("frozen_linear: input has {k} features, weight expects {kw}");
    }
    Ok((m, k, n))
}

fn matmul_wt<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
    let (m, k, n) = wt_dims(xl.shape().dims2()?, wl.shape().dims2()?)?;
    let wt = wl.transpose(0, 1)?;
    Ok((x.matmul(w, (1, m, n, k), xl, &wt)?, Shape::from((m, n))))
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // The frozen weight's own product for f32 (sgemm's, or AMX's on packed tiles); candle's
        // matmul for other dtypes.
        if x.dtype() != DType::F32 {
            let w = self.w.tensor()?;
            let (ws, wl) = w.storage_and_layout();
            let Storage::Cpu(w) = &*ws else { bail!("frozen_linear: weight is not on the CPU") };
            return matmul_wt(x, l, w, wl);
        }
        let (m, k, n) = wt_dims(l.shape().dims2()?, self.w.dims())?;
        let mut out = vec![0f32; m * n];
        self.w.forward_into(m, cpu_f32(x, l, "frozen_linear")?, k, &mut out, n, false)?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let w = self.w.tensor()?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            Storage::Cuda(w) => matmul_wt(x, l, w, wl),
            _ => bail!("frozen_linear: weight is not on the CUDA device"),
        }
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, x: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        let w = self.w.tensor()?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            Storage::Metal(w) => matmul_wt(x, l, w, wl),
            _ => bail!("frozen_linear: weight is not on the Metal device"),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.w.backward(grad)?))
    }
}

/// `x [n, in] @ w[out, in]^T -> [n, out]`, recording a backward for `x` only.
pub fn frozen_linear(x: &Tensor, w: &Frozen) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.track_op() { x.apply_op1(FrozenMatmul { w: w.clone() }) } else { w.forward(&x) }
}

/// The fused CPU forms run on f32 CPU tensors; everything else takes the compositions.
fn runs_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// RMS norm over the last dimension, times a frozen weight.
struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "rms_norm")?;
        Ok((CpuStorage::F32(rms_rows(x, &self.w.to_vec1()?, self.eps)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rms_norm_bwd(x, &self.w, self.eps as f64, g)?))
    }
}

/// Input gradient of `rms_norm(x) * w` for output gradient `g`.
fn rms_norm_bwd(x: &Tensor, w: &Tensor, eps: f64, g: &Tensor) -> Result<Tensor> {
    // y = x r w with r = (mean(x^2) + eps)^-1/2  =>  dx = r (g w) - x r^3 mean(g w x)
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let gw = g.broadcast_mul(w)?;
    let dot = (&gw * x)?.mean_keepdim(D::Minus1)?;
    gw.broadcast_mul(&r)? - x.broadcast_mul(&(dot * r.powf(3.0)?)?)?
}

/// RMS norm over the last dimension, times `w` (not trained).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if runs_fused(x) {
        x.contiguous()?.apply_op1(RmsNorm { w: w.clone(), eps: eps as f32 })
    } else {
        rms_norm_composed(x, w, eps)
    }
}

/// The same RMS norm as a composition of differentiable ops.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

/// The same rotary embedding as a composition of differentiable ops.
pub fn rope_composed(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    let (_b, t, _h, hd) = x.dims4()?;
    let half = hd / 2;
    // [t, half] -> [1, t, 1, half] to broadcast over batch and heads
    let cos = tables.cos.narrow(0, 0, t)?.unsqueeze(0)?.unsqueeze(2)?;
    let sin = tables.sin.narrow(0, 0, t)?.unsqueeze(0)?.unsqueeze(2)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

/// Causal softmax of `scale * s` over the last dim of `s: [batch, groups, rows, keys]`, as a
/// composition of differentiable ops: row `r` is the query at position `offset + r % (keys -
/// offset)` (query heads sharing a KV head stacked along rows, after `offset` prefix keys) and
/// sees keys up to its position.
pub fn causal_softmax_composed(s: &Tensor, scale: f64, offset: usize) -> Result<Tensor> {
    let (_b, _g, rows, keys) = s.dims4()?;
    let t = keys - offset;
    let mask: Vec<f32> = (0..rows)
        .flat_map(|r| (0..keys).map(move |j| if j <= offset + r % t { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (rows, keys), s.device())?.to_dtype(s.dtype())?;
    let s = (s * scale)?.broadcast_add(&mask)?;
    candle_nn::ops::softmax(&s, D::Minus1)
}

// ---------------------------------------------------------------------------------------------
// Fused blocks that keep only their inputs for the backward pass and recompute the rest there.
// candle's graph retains every intermediate of a composition until the backward is done; these
// keep the memory of a training step to its inputs (see docs/performance.md).

/// `y = x w^T + scale ((x ⊙ mask) a^T) b^T`: a projection with its LoRA adapter.
struct LoraLinear {
    w: Frozen,
    scale: f64,
    mask: Option<Tensor>,
}

impl LoraLinear {
    /// The LoRA input: `x` with the dropout mask applied, if any.
    fn masked(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(m) => x * m,
            None => Ok(x.clone()),
        }
    }

    /// `scale ((x ⊙ mask) a^T) b^T`; the scale goes on the `[n, r]` tensor, the smallest.
    fn delta(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        (self.masked(x)?.matmul(&a.t()?)? * self.scale)?.matmul(&b.t()?)
    }
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // Straight into one output buffer: x w^T, then += (scale (x ⊙ mask) a^T) b^T, with no
        // copies of the inputs and no separate sum.
        let (n, din) = xl.shape().dims2()?;
        let ((r, ain), (dout, br)) = (al.shape().dims2()?, bl.shape().dims2()?);
        if ain != din || br != r || self.w.dims() != (dout, din) {
            bail!("lora: x {:?}, a {:?}, b {:?}, w {:?} do not fit", xl.shape(), al.shape(), bl.shape(), self.w.dims());
        }
        let (x, a, b) = (cpu_f32(x, xl, "lora")?, cpu_f32(a, al, "lora")?, cpu_f32(b, bl, "lora")?);
        let mut out = vec![0f32; n * dout];
        self.w.forward_into(n, x, din, &mut out, dout, false)?;
        let masked: Vec<f32>;
        let xm = match &self.mask {
            Some(m) => {
                let m = m.flatten_all()?.to_vec1::<f32>()?;
                masked = x.iter().zip(&m).map(|(x, m)| x * m).collect();
                &masked
            }
            None => x,
        };
        let mut t = vec![0f32; n * r];
        sgemm(n, r, din, &mut t, r, Mat::rows(xm, din), Mat::rows_t(a, din), self.scale as f32, false, Threads::One);
        sgemm(n, dout, r, &mut out, dout, Mat::rows(&t, r), Mat::rows_t(b, r), 1.0, true, Threads::All);
        Ok((CpuStorage::F32(out), Shape::from((n, dout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xm = self.masked(x)?;
        // The scale goes on the [n, r] tensors: one pass over small data instead of large.
        let ts = (xm.matmul(&a.t()?)? * self.scale)?; // [n, r]
        let gbs = (g.matmul(b)? * self.scale)?; // [n, r]
        let mut dx_lora = gbs.matmul(a)?;
        if let Some(m) = &self.mask {
            dx_lora = (dx_lora * m)?;
        }
        let dx = (self.w.backward(g)? + dx_lora)?;
        let da = gbs.t()?.matmul(&xm)?;
        let db = g.t()?.matmul(&ts)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x [n, in] @ w^T + scale ((x ⊙ mask) a^T) b^T` with `a [r, in]`, `b [out, r]`.
pub fn lora_linear(x: &Tensor, w: &Frozen, a: &Tensor, b: &Tensor, scale: f64, mask: Option<Tensor>) -> Result<Tensor> {
    let op = LoraLinear { w: w.clone(), scale, mask };
    if runs_fused(x) { x.contiguous()?.apply_op3(a, b, op) } else { frozen_linear(x, w)? + op.delta(x, a, b)? }
}

/// Causal attention `softmax(scale q k^T) v` on `q [b, g, rep * t, hd]`, `k, v [b, g, t, hd]`
/// (row `ρ t + i` at position `i`): on the CPU the tiled op of [`super::attention`], which never
/// holds a `[rows, t]` tensor; other devices use the differentiable composition.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if runs_fused(q) {
        q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, TiledAttention::new(scale as f32, 0, TILES))
    } else {
        causal_softmax_composed(&q.matmul(&k.t()?)?, scale, 0)?.matmul(v)
    }
}

/// What a layer's attention block needs besides its inputs: the q/k norm weights, the rotary
/// tables, the shape and the score scale.
#[derive(Clone, Copy)]
pub struct BlockParams<'a> {
    pub q_norm: &'a Tensor,
    pub k_norm: &'a Tensor,
    pub eps: f64,
    pub rope: &'a RopeTables,
    pub dims: BlockDims,
    pub scale: f64,
    /// The keys and values (`[1, kv_heads, p, hd]` each, normed and rotated) of a cached prefix
    /// these tokens follow; `rope` then starts at position `p`. Scoring only (no gradients).
    pub past: Option<(&'a Tensor, &'a Tensor)>,
}

/// A layer's attention from its projections: per-head RMS norm and rotary embedding of
/// `q: [b * t, heads * hd]` and `k: [b * t, kv_heads * hd]`, causal attention over `v` (like `k`),
/// back to the token-major `[b * t, heads * hd]` that `o_proj` takes. On the CPU one op
/// ([`AttentionBlock`]) that keeps only `q`, `k`, `v` for its backward; elsewhere the composition.
pub fn attention_block(q: &Tensor, k: &Tensor, v: &Tensor, p: &BlockParams) -> Result<Tensor> {
    attention_block_tiled(q, k, v, p, TILES)
}

fn attention_block_tiled(q: &Tensor, k: &Tensor, v: &Tensor, p: &BlockParams, tiles: Tiles) -> Result<Tensor> {
    // After a prefix the op has no backward: with gradients, the composition.
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if !runs_fused(q) || (p.past.is_some() && tracked) {
        return attention_block_composed(q, k, v, p);
    }
    let (qn, kn) = (p.q_norm.to_vec1()?, p.k_norm.to_vec1()?);
    let op = AttentionBlock::new(qn, kn, p.eps as f32, p.rope.clone(), p.dims, p.scale as f32, tiles);
    let Some((pk, pv)) = p.past else { return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op) };
    let op = op.after(pk.contiguous()?, pv.contiguous()?);
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// A cached prefix's keys or values (`[1, kv_heads, p, hd]`) in front of each sequence's own
/// (`x: [b, kv_heads, t, hd]`): `[b, kv_heads, p + t, hd]`.
pub(crate) fn after_prefix(past: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (b, g, _, hd) = x.dims4()?;
    Tensor::cat(&[&past.broadcast_as((b, g, past.dim(2)?, hd))?, x], 2)?.contiguous()
}

/// [`attention_block`] as a composition of differentiable candle ops (other devices, and the
/// reference the op is tested against).
pub fn attention_block_composed(q: &Tensor, k: &Tensor, v: &Tensor, p: &BlockParams) -> Result<Tensor> {
    let BlockDims { b, t, heads: h, kv_heads: hk, hd } = p.dims;
    let heads_first = |x: Tensor| x.transpose(1, 2)?.contiguous();
    let normed = |x: &Tensor, heads: usize, w: &Tensor| -> Result<Tensor> {
        heads_first(rope_composed(&rms_norm_composed(&x.reshape((b, t, heads, hd))?, w, p.eps)?, p.rope)?)
    };
    let (q, k) = (normed(q, h, p.q_norm)?, normed(k, hk, p.k_norm)?);
    let v = heads_first(v.reshape((b, t, hk, hd))?)?;
    let q = q.reshape((b, hk, (h / hk) * t, hd))?;
    let (k, v, offset) = match p.past {
        None => (k, v, 0),
        Some((pk, pv)) => (after_prefix(pk, &k)?, after_prefix(pv, &v)?, pk.dim(2)?),
    };
    let o = causal_softmax_composed(&q.matmul(&k.t()?)?, p.scale, offset)?.matmul(&v)?;
    o.reshape((b, h, t, hd))?.transpose(1, 2)?.contiguous()?.reshape((b * t, h * hd))
}

/// Attention of `q: [b, hk, rep * s, hd]` (the `s` tokens after a prefix of `offset` tokens,
/// heads sharing a KV head stacked along rows) over `k`, `v: [b, hk, offset + s, hd]` (the prefix's
/// keys and values, then the tokens' own): query row `r` is position `offset + r % s` and sees
/// keys `0..=offset + r % s`. Scoring only (no backward).
pub fn attention_after(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, offset: usize) -> Result<Tensor> {
    if runs_fused(q) {
        let op = TiledAttention::new(scale as f32, offset, TILES);
        return q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    causal_softmax_composed(&q.matmul(&k.t()?)?, scale, offset)?.matmul(v)
}

vectorized! {
    /// `o = silu(g) * u`, element by element.
    fn swiglu_row(g: &[f32], u: &[f32], o: &mut [f32]) -> () {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp_approx(-g)) * u;
        }
    }
}

vectorized! {
    /// The gradients of `silu(g) * u` with respect to `g` and `u`, for output gradient `gy`.
    fn swiglu_grad_row(g: &[f32], u: &[f32], gy: &[f32], dg: &mut [f32], du: &mut [f32]) -> () {
        for ((((dg, du), &g), &u), &gy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(gy) {
            let sig = 1.0 / (1.0 + exp_approx(-g));
            // silu'(g) = sig (1 + g (1 - sig))
            *dg = gy * u * sig * (1.0 + g * (1.0 - sig));
            *du = gy * g * sig;
        }
    }
}

/// `silu(g) * u` for every row `[g | u]` of `gu` (rows of `2 inter`).
fn swiglu_rows(gu: &[f32], inter: usize) -> Vec<f32> {
    let mut out = vec![0f32; gu.len() / 2];
    out.par_chunks_mut(inter).zip(gu.par_chunks(2 * inter)).for_each(|(o, gu)| {
        let (g, u) = gu.split_at(inter);
        swiglu_row(g, u, o);
    });
    out
}

/// The gradient with respect to `gu` (rows `[g | u]` of `2 inter`) of [`swiglu_rows`], for the
/// output gradient `gy` (rows of `inter`).
fn swiglu_grad_rows(gu: &[f32], gy: &[f32], inter: usize) -> Vec<f32> {
    let mut out = vec![0f32; gu.len()];
    out.par_chunks_mut(2 * inter).zip(gu.par_chunks(2 * inter).zip(gy.par_chunks(inter))).for_each(|(o, (x, gy))| {
        let (g, u) = x.split_at(inter);
        let (dg, du) = o.split_at_mut(inter);
        swiglu_grad_row(g, u, gy, dg, du);
    });
    out
}

/// `silu(gate) * up` on `gu [n, 2 inter]` (gate first, as the fused projection lays it out).
struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "swiglu")?;
        let (n, two_i) = l.shape().dims2()?;
        Ok((CpuStorage::F32(swiglu_rows(x, two_i / 2)), Shape::from((n, two_i / 2))))
    }

    fn bwd(&self, gu: &Tensor, _res: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gu.apply_op2_no_bwd(&gy.contiguous()?, &SwiGluBwd)?))
    }
}

/// Gradient of `silu(g) * u` with respect to `gu = [g | u]`, given the output gradient (CPU).
struct SwiGluBwd;

impl candle_core::CustomOp2 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(&self, gu: &CpuStorage, gl: &Layout, gy: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gu, gy) = (cpu_f32(gu, gl, "swiglu_bwd")?, cpu_f32(gy, yl, "swiglu_bwd")?);
        Ok((CpuStorage::F32(swiglu_grad_rows(gu, gy, gl.shape().dims2()?.1 / 2)), gl.shape().clone()))
    }
}

/// `silu(gu[:, :inter]) * gu[:, inter:]`.
pub fn swiglu(gu: &Tensor) -> Result<Tensor> {
    if runs_fused(gu) {
        gu.contiguous()?.apply_op1(SwiGlu)
    } else {
        let i = gu.dim(1)? / 2;
        gu.narrow(1, 0, i)?.silu()? * gu.narrow(1, i, i)?
    }
}

/// A frozen MLP with its residual, `y = x + down(silu(gate(n)) * up(n))` with `n = rms_norm(x) w`,
/// as one op on `x [rows, d]`. Candle's graph would keep the normed input, gate|up, the SwiGLU
/// output and the MLP output until the backward ends; this op keeps `x` (its input) and gate|up
/// (held inside it, and dropped as soon as its backward has run), and recomputes the norm and the
/// SwiGLU there.
struct MlpBlock {
    norm: Vec<f32>,
    eps: f32,
    /// `[inter, d]` each.
    gate: Frozen,
    up: Frozen,
    /// `[d, inter]`
    down: Frozen,
    /// gate|up `[rows, 2 inter]` from the forward, for the backward.
    gate_up_out: std::sync::Mutex<Vec<f32>>,
    /// Whether a backward will follow (the input tracks its ops): the forward keeps gate|up.
    keep: bool,
}

/// Rows a forward-only [`MlpBlock`] takes at a time: gate|up for 256 rows of the 0.6B shape is
/// 6 MB, reused and warm in cache for the SwiGLU and the down projection, where all 2048 rows' of
/// 8 x 256 scoring was 50 MB, which glibc maps and unmaps afresh at every layer (past its 32 MB
/// mmap threshold: 6.5% of a scoring forward's time went to page faults). Each row's result is
/// the same either way (the products sum each row on its own).
const MLP_ROWS: usize = 256;

impl CustomOp1 for MlpBlock {
    fn name(&self) -> &'static str {
        "mlp-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "mlp")?;
        let (rows, d) = l.shape().dims2()?;
        let (inter, dg) = self.gate.dims();
        let two_i = 2 * inter;
        if dg != d || self.up.dims() != (inter, d) || self.down.dims() != (d, inter) || self.norm.len() != d {
            bail!(
                "mlp: x {:?} does not fit gate {:?}, up {:?} and down {:?}",
                l.shape(),
                self.gate.dims(),
                self.up.dims(),
                self.down.dims()
            );
        }
        let mut y = x.to_vec();
        // A forward that records no backward keeps nothing, so it goes MLP_ROWS rows at a time.
        let step = if self.keep { rows.max(1) } else { MLP_ROWS };
        // gate|up side by side in one `[rows, 2 inter]`, what the SwiGLU reads.
        let mut gu = vec![0f32; step.min(rows) * two_i];
        for r0 in (0..rows).step_by(step) {
            let r = step.min(rows - r0);
            let n = rms_rows(&x[r0 * d..(r0 + r) * d], &self.norm, self.eps);
            self.gate.forward_into(r, &n, d, &mut gu, two_i, false)?;
            self.up.forward_into(r, &n, d, &mut gu[inter..], two_i, false)?;
            drop(n);
            let a = swiglu_rows(&gu[..r * two_i], inter);
            self.down.forward_into(r, &a, inter, &mut y[r0 * d..], d, true)?;
        }
        if self.keep {
            *self.gate_up_out.lock().unwrap_or_else(|e| e.into_inner()) = gu;
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (rows, d) = x.dims2()?;
        let inter = self.gate.dims().0;
        let gu = std::mem::take(&mut *self.gate_up_out.lock().unwrap_or_else(|e| e.into_inner()));
        if gu.len() != rows * 2 * inter {
            bail!("mlp: backward without its forward (or run twice)");
        }
        let g = g.contiguous()?;
        // da = g down ; dgu = swiglu'(gu) da ; dn = dgu gate_up
        let mut da = vec![0f32; rows * inter];
        with_host(&g, "mlp", |g| self.down.backward_into(rows, g, d, &mut da, inter, false))?;
        let dgu = swiglu_grad_rows(&gu, &da, inter);
        drop((gu, da));
        // dn = dg gate + du up, dg and du the two halves of dgu's rows.
        let mut dn = vec![0f32; rows * d];
        self.gate.backward_into(rows, &dgu, 2 * inter, &mut dn, d, false)?;
        self.up.backward_into(rows, &dgu[inter..], 2 * inter, &mut dn, d, true)?;
        drop(dgu);
        // The residual's gradient plus the norm's: g + r (dn w) - x r^3 mean(dn w x).
        let mut dx = vec![0f32; rows * d];
        with_host(&x.contiguous()?, "mlp", |x| {
            with_host(&g, "mlp", |g| {
                dx.par_chunks_mut(d).zip(dn.par_chunks_mut(d)).enumerate().for_each(|(row, (o, dn))| {
                    dn.iter_mut().zip(&self.norm).for_each(|(a, w)| *a *= w);
                    rms_grad_row(&x[row * d..][..d], dn, self.eps, o);
                    o.iter_mut().zip(&g[row * d..][..d]).for_each(|(o, g)| *o += g);
                });
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The frozen weights of a layer's MLP: `gate` and `up` `[inter, d]`, `down` `[d, inter]`.
pub struct MlpWeights<'a> {
    pub gate: &'a Frozen,
    pub up: &'a Frozen,
    pub down: &'a Frozen,
}

/// `x + down(silu(gate(n)) * up(n))` with `n = rms_norm(x) norm` and frozen `w`: on the CPU one
/// op ([`MlpBlock`]), elsewhere the composition.
pub fn mlp_block(x: &Tensor, norm: &Tensor, eps: f64, w: &MlpWeights) -> Result<Tensor> {
    if runs_fused(x) {
        let op = MlpBlock {
            norm: norm.to_vec1()?,
            eps: eps as f32,
            gate: w.gate.clone(),
            up: w.up.clone(),
            down: w.down.clone(),
            gate_up_out: Default::default(),
            keep: x.track_op(),
        };
        return x.contiguous()?.apply_op1(op);
    }
    mlp_block_composed(x, norm, eps, w)
}

/// [`mlp_block`] as a composition of differentiable ops.
pub fn mlp_block_composed(x: &Tensor, norm: &Tensor, eps: f64, w: &MlpWeights) -> Result<Tensor> {
    let n = rms_norm_composed(x, norm, eps)?;
    let a = (frozen_linear(&n, w.gate)?.silu()? * frozen_linear(&n, w.up)?)?;
    x + frozen_linear(&a, w.down)?
}

/// [`norm_rope_to_heads`] as a candle op on `[b, seq, heads, hd]`, keeping only its input for
/// the backward.
struct NormRope {
    w: Tensor,
    eps: f32,
    tables: RopeTables,
}

impl CustomOp1 for NormRope {
    fn name(&self) -> &'static str {
        "norm-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "norm_rope")?;
        let (b, t, h, hd) = l.shape().dims4()?;
        let y = norm_rope_to_heads(x, &self.w.to_vec1()?, self.eps, &self.tables, (t, h, hd));
        Ok((CpuStorage::F32(y), Shape::from((b, h, t, hd))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (_b, t, h, hd) = x.dims4()?;
        let (x_, g_) = (x.flatten_all()?.to_vec1::<f32>()?, g.flatten_all()?.to_vec1::<f32>()?);
        let dx = norm_rope_to_heads_bwd(&x_, &self.w.to_vec1()?, self.eps, &self.tables, &g_, (t, h, hd));
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `rope(rms_norm(x) * w)` transposed to `[b, heads, seq, hd]` (contiguous).
pub fn norm_rope(x: &Tensor, w: &Tensor, eps: f64, tables: &RopeTables) -> Result<Tensor> {
    if runs_fused(x) {
        x.contiguous()?.apply_op1(NormRope { w: w.clone(), eps: eps as f32, tables: tables.clone() })
    } else {
        rope_composed(&rms_norm_composed(x, w, eps)?, tables)?.transpose(1, 2)?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::super::attention::Tiles;
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>(), shape, &Device::Cpu)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Fused and composed forms agree in value and in the gradient of every input.
    fn check(shapes: &[&[usize]], fused: impl Fn(&[Tensor]) -> Tensor, composed: impl Fn(&[Tensor]) -> Tensor) {
        let vars: Vec<Var> =
            shapes.iter().enumerate().map(|(i, s)| Var::from_tensor(&rand(s, i as u64)).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts), composed(&ts));
        assert!(max_diff(&a, &b) < 1e-5, "forward differs by {}", max_diff(&a, &b));
        let probe = rand(a.dims(), 99);
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (x, y) = (ga.get(v.as_tensor()).expect("fused grad"), gb.get(v.as_tensor()).expect("composed grad"));
            assert!(max_diff(x, y) < 1e-5, "gradient of input {i} differs by {}", max_diff(x, y));
            assert!(x.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "input {i} got zero grad");
        }
    }

    #[test]
    fn rms_norm_matches_composition() {
        let w = rand(&[8], 3);
        check(&[&[2, 3, 8]], |t| rms_norm(&t[0], &w, 1e-6).unwrap(), |t| rms_norm_composed(&t[0], &w, 1e-6).unwrap());
    }

    #[test]
    fn frozen_linear_grads_input_only() {
        let w = rand(&[5, 4], 4);
        let f = Frozen::new(&w).unwrap();
        check(&[&[3, 4]], |t| frozen_linear(&t[0], &f).unwrap(), |t| t[0].matmul(&w.t().unwrap()).unwrap());
    }

    #[test]
    fn lora_linear_matches_composition() {
        let w = rand(&[6, 5], 7);
        let mask = rand(&[4, 5], 8).ge(0.0).unwrap().to_dtype(DType::F32).unwrap();
        for m in [None, Some(mask)] {
            let (w1, m1) = (Frozen::new(&w).unwrap(), m.clone());
            check(
                &[&[4, 5], &[3, 5], &[6, 3]],
                |t| lora_linear(&t[0], &w1, &t[1], &t[2], 2.0, m1.clone()).unwrap(),
                |t| {
                    let xm = m.as_ref().map(|m| (&t[0] * m).unwrap()).unwrap_or(t[0].clone());
                    let d = (xm.matmul(&t[1].t().unwrap()).unwrap() * 2.0).unwrap().matmul(&t[2].t().unwrap()).unwrap();
                    (t[0].matmul(&w.t().unwrap()).unwrap() + d).unwrap()
                },
            );
        }
    }

    #[test]
    fn attention_matches_composition() {
        check(
            &[&[2, 2, 6, 4], &[2, 2, 3, 4], &[2, 2, 3, 4]],
            |t| attention(&t[0], &t[1], &t[2], 0.5).unwrap(),
            |t| {
                let s = t[0].matmul(&t[1].t().unwrap()).unwrap();
                causal_softmax_composed(&s, 0.5, 0).unwrap().matmul(&t[2]).unwrap()
            },
        );
    }

    /// The composed reference for `q [b, g, rep * t, hd]` after `offset` prefix keys.
    fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, offset: usize) -> Tensor {
        let (rows, keys) = (q.dim(2).unwrap(), k.dim(2).unwrap());
        let t = keys - offset;
        let mask: Vec<f32> = (0..rows)
            .flat_map(|r| (0..keys).map(move |j| if j <= offset + r % t { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (rows, keys), q.device()).unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&mask).unwrap();
        candle_nn::ops::softmax(&s, D::Minus1).unwrap().matmul(v).unwrap()
    }

    /// The tiled attention against the composition, values and all three gradients, at lengths
    /// that end inside a tile, on a tile border and one past it, with 1 and 2 heads per KV head.
    #[test]
    fn tiled_attention_matches_composition_across_tile_borders() {
        let small = |q, k| Tiles { q, k };
        for (tiles, t, rep) in [
            (small(4, 4), 11, 2),
            (small(4, 4), 8, 1),
            (small(3, 5), 9, 2),
            (small(5, 3), 13, 2),
            (small(5, 5), 3, 2),
            (TILES, 150, 2),
            (TILES, 600, 1),
        ] {
            let (b, g, hd) = (2, 2, 8);
            check(
                &[&[b, g, rep * t, hd], &[b, g, t, hd], &[b, g, t, hd]],
                |x| x[0].apply_op3(&x[1], &x[2], TiledAttention::new(0.4, 0, tiles)).unwrap(),
                |x| attention_reference(&x[0], &x[1], &x[2], 0.4, 0),
            );
        }
    }

    /// The whole block (norms, rotary, attention, layouts) against its composition, values and
    /// the gradients of q, k and v, with small tiles so the lengths cross their borders.
    #[test]
    fn attention_block_matches_composition() {
        for (b, t, h, hk, tiles) in [(2, 11, 4, 2, Tiles { q: 4, k: 3 }), (1, 9, 2, 2, Tiles { q: 5, k: 4 })] {
            let hd = 8;
            let dims = BlockDims { b, t, heads: h, kv_heads: hk, hd };
            let (qn, kn) = (rand(&[hd], 21), rand(&[hd], 22));
            let tables = RopeTables::new(hd, t, 1e4, &Device::Cpu).unwrap();
            let p = BlockParams { q_norm: &qn, k_norm: &kn, eps: 1e-6, rope: &tables, dims, scale: 0.35, past: None };
            check(
                &[&[b * t, h * hd], &[b * t, hk * hd], &[b * t, hk * hd]],
                |x| attention_block_tiled(&x[0], &x[1], &x[2], &p, tiles).unwrap(),
                |x| attention_block_composed(&x[0], &x[1], &x[2], &p).unwrap(),
            );
        }
    }

    /// The block after a cached prefix (scoring: values only), against its composition, and the
    /// composition against the block over prefix and tokens together (the prefix's own rows).
    #[test]
    fn attention_block_after_a_prefix_matches_composition() {
        for (b, p, t, h, hk, tiles) in [(2, 5, 11, 4, 2, Tiles { q: 4, k: 3 }), (3, 9, 1, 2, 2, Tiles { q: 5, k: 4 })] {
            let hd = 8;
            let (qn, kn) = (rand(&[hd], 21), rand(&[hd], 22));
            let whole = RopeTables::new(hd, p + t, 1e4, &Device::Cpu).unwrap();
            let after = RopeTables::range(hd, p, t, 1e4, &Device::Cpu).unwrap();
            // The prefix's keys and values as the cache holds them: normed, rotated, head-major.
            let (pk_raw, pv_raw) = (rand(&[p, hk * hd], 31), rand(&[p, hk * hd], 32));
            let pk = norm_rope(
                &pk_raw.reshape((1, p, hk, hd)).unwrap(),
                &kn,
                1e-6,
                &RopeTables::new(hd, p, 1e4, &Device::Cpu).unwrap(),
            )
            .unwrap();
            let pv = pv_raw.reshape((1, p, hk, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let (q, k, v) = (rand(&[b * t, h * hd], 1), rand(&[b * t, hk * hd], 2), rand(&[b * t, hk * hd], 3));
            let dims = BlockDims { b, t, heads: h, kv_heads: hk, hd };
            let params = BlockParams {
                q_norm: &qn,
                k_norm: &kn,
                eps: 1e-6,
                rope: &after,
                dims,
                scale: 0.35,
                past: Some((&pk, &pv)),
            };
            let fused = attention_block_tiled(&q, &k, &v, &params, tiles).unwrap();
            let composed = attention_block_composed(&q, &k, &v, &params).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-5, "differs by {}", max_diff(&fused, &composed));
            // Sequence 0 with its prefix in front, all at once: its last t rows are the same.
            let cat = |pre: &Tensor, x: &Tensor| Tensor::cat(&[pre, &x.narrow(0, 0, t).unwrap()], 0).unwrap();
            let pq = rand(&[p, h * hd], 4);
            let one = BlockDims { b: 1, t: p + t, heads: h, kv_heads: hk, hd };
            let all =
                BlockParams { q_norm: &qn, k_norm: &kn, eps: 1e-6, rope: &whole, dims: one, scale: 0.35, past: None };
            let full = attention_block_composed(&cat(&pq, &q), &cat(&pk_raw, &k), &cat(&pv_raw, &v), &all).unwrap();
            let tail = full.narrow(0, p, t).unwrap();
            let head0 = fused.narrow(0, 0, t).unwrap();
            assert!(max_diff(&head0, &tail) < 1e-5, "after the prefix vs all at once: {}", max_diff(&head0, &tail));
        }
    }

    /// After a prefix of `offset` keys, as scoring after a cached prefix runs it.
    #[test]
    fn tiled_attention_after_a_prefix_matches_composition() {
        for (tiles, offset, t) in [(Tiles { q: 4, k: 3 }, 7, 10), (Tiles { q: 4, k: 4 }, 8, 1), (TILES, 70, 90)] {
            let (q, k, v) =
                (rand(&[3, 2, 2 * t, 8], 1), rand(&[3, 2, offset + t, 8], 2), rand(&[3, 2, offset + t, 8], 3));
            let a = q.apply_op3_no_bwd(&k, &v, &TiledAttention::new(0.3, offset, tiles)).unwrap();
            let want = attention_reference(&q, &k, &v, 0.3, offset);
            assert!(max_diff(&a, &want) < 1e-5, "offset {offset}: differs by {}", max_diff(&a, &want));
            let b = attention_after(&q, &k, &v, 0.3, offset).unwrap();
            assert!(max_diff(&b, &want) < 1e-5);
        }
    }

    #[test]
    fn mlp_block_matches_composition() {
        let f = |shape: &[usize], seed| Frozen::new(&rand(shape, seed)).unwrap();
        let (norm, gate, up, down) = (rand(&[6], 31), f(&[5, 6], 32), f(&[5, 6], 34), f(&[6, 5], 33));
        let w = MlpWeights { gate: &gate, up: &up, down: &down };
        check(
            &[&[7, 6]],
            |x| mlp_block(&x[0], &norm, 1e-6, &w).unwrap(),
            |x| mlp_block_composed(&x[0], &norm, 1e-6, &w).unwrap(),
        );
    }

    /// A forward that records nothing goes MLP_ROWS rows at a time (here three chunks, the last
    /// partial, with bf16 weights so that the CPU's packed path takes them where it has one): the
    /// same values as the composition and as the whole-batch forward a backward would follow.
    #[test]
    fn a_forward_only_mlp_block_goes_in_row_chunks_and_matches() {
        let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let f = |shape: &[usize], seed| Frozen::new(&bf16(rand(shape, seed))).unwrap();
        let (norm, gate, up, down) = (rand(&[64], 41), f(&[96, 64], 42), f(&[96, 64], 43), f(&[64, 96], 44));
        let w = MlpWeights { gate: &gate, up: &up, down: &down };
        let rows = 2 * MLP_ROWS + 37;
        let x = rand(&[rows, 64], 45);
        assert!(!x.track_op());
        let chunked = mlp_block(&x, &norm, 1e-6, &w).unwrap();
        let composed = mlp_block_composed(&x, &norm, 1e-6, &w).unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let whole = mlp_block(var.as_tensor(), &norm, 1e-6, &w).unwrap();
        assert!(max_diff(&chunked, &composed) < 1e-4, "chunked vs composed: {}", max_diff(&chunked, &composed));
        assert!(max_diff(&chunked, &whole) < 1e-5, "chunked vs whole: {}", max_diff(&chunked, &whole));
    }

    #[test]
    fn swiglu_matches_composition() {
        check(
            &[&[3, 8]],
            |t| swiglu(&t[0]).unwrap(),
            |t| (t[0].narrow(1, 0, 4).unwrap().silu().unwrap() * t[0].narrow(1, 4, 4).unwrap()).unwrap(),
        );
    }

    #[test]
    fn norm_rope_matches_composition() {
        let w = rand(&[8], 5);
        let tables = RopeTables::new(8, 16, 1e4, &Device::Cpu).unwrap();
        check(
            &[&[2, 5, 3, 8]],
            |t| norm_rope(&t[0], &w, 1e-6, &tables).unwrap(),
            |t| {
                rope_composed(&rms_norm_composed(&t[0], &w, 1e-6).unwrap(), &tables)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            },
        );
    }
}
