//! Tiled causal attention on the CPU, forward and backward (the flash-attention algorithm).
//!
//! Queries are cut into tiles of `tiles.q` rows and keys into tiles of `tiles.k` columns. The forward
//! walks each query tile's key tiles up to the diagonal only (the masked upper triangle is never
//! computed), keeping a running row maximum and sum (online softmax) and rescaling the output
//! accumulator as the maximum grows; it keeps the rows' log-sum-exp for the backward. The
//! backward recomputes each tile's probabilities from that log-sum-exp and accumulates the query,
//! key and value gradients tile by tile. Nothing of size `[heads, length, length]` exists at any
//! time: the largest transient is two `tiles.q x tiles.k` blocks per thread.
//!
//! Layout (as [`crate::model::qwen3`] builds it, grouped-query attention without K/V copies):
//! `q: [b, g, rep * t, hd]` (the `rep` query heads sharing a KV head stacked along rows, row
//! `ρ * t + i` is head ρ at position `offset + i`), `k, v: [b, g, offset + t, hd]`. Key `j` is
//! visible to the query at position `p` when `j <= p`.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::sync::Mutex;

use super::host::{RopeTables, cpu_f32, norm_rope_to_heads, norm_rope_to_heads_bwd, with_host};
use super::kernels::{Mat, Threads, exp_shifted_sum, max_of, sgemm, vectorized};

/// Query rows and key columns per tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiles {
    pub q: usize,
    pub k: usize,
}

/// Chosen with `cargo bench --bench attention` (Qwen3-0.6B's heads at 1024 and 2048 tokens):
/// wide key tiles make each product large enough to run near the matmul's speed.
pub const TILES: Tiles = Tiles { q: 128, k: 512 };

/// The shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// batch x KV heads
    pub groups: usize,
    /// query heads per KV head
    pub rep: usize,
    /// query positions per head
    pub t: usize,
    /// keys per group: `offset + t`
    pub keys: usize,
    pub hd: usize,
    /// position of the first query (tokens of a cached prefix before it)
    pub offset: usize,
}

impl Dims {
    /// From `q: [b, g, rep * t, hd]` and `k: [b, g, offset + t, hd]`.
    pub fn of(q: &Shape, k: &Shape, offset: usize) -> Result<Self> {
        let (b, g, rows, hd) = q.dims4()?;
        let (kb, kg, keys, khd) = k.dims4()?;
        if (kb, kg, khd) != (b, g, hd) || keys <= offset {
            bail!("attention: q {q:?} and k {k:?} do not fit together (offset {offset})");
        }
        let t = keys - offset;
        if rows % t != 0 {
            bail!("attention: {rows} query rows are not a multiple of {t} positions");
        }
        Ok(Self { groups: b * g, rep: rows / t, t, keys, hd, offset })
    }
}

/// Keys visible to query row `r` of a tile starting at `i0`, within a key tile `[j0, j0 + bc)`.
fn visible(d: &Dims, i0: usize, r: usize, j0: usize, bc: usize) -> usize {
    (d.offset + i0 + r + 1).saturating_sub(j0).min(bc)
}

/// Output `[groups * rep * t, hd]` (q's layout) and each query row's log-sum-exp of its scaled
/// scores.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], d: &Dims, scale: f32, tiles: Tiles) -> (Vec<f32>, Vec<f32>) {
    let (t, hd) = (d.t, d.hd);
    let mut out = vec![0f32; d.groups * d.rep * t * hd];
    let mut lse = vec![0f32; d.groups * d.rep * t];
    out.par_chunks_mut(t * hd).zip(lse.par_chunks_mut(t)).enumerate().for_each(|(head, (oh, lh))| {
        let g = head / d.rep;
        let qh = &q[head * t * hd..(head + 1) * t * hd];
        let (kg, vg) = (&k[g * d.keys * hd..(g + 1) * d.keys * hd], &v[g * d.keys * hd..(g + 1) * d.keys * hd]);
        let (tq, tk) = (tiles.q, tiles.k);
        let mut s = vec![0f32; tq * tk];
        let (mut m, mut l) = (vec![0f32; tq], vec![0f32; tq]);
        for i0 in (0..t).step_by(tq) {
            let br = tq.min(t - i0);
            let acc = &mut oh[i0 * hd..(i0 + br) * hd];
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            let kend = d.offset + i0 + br;
            for j0 in (0..kend).step_by(tk) {
                let bc = tk.min(kend - j0);
                sgemm(
                    br,
                    bc,
                    hd,
                    &mut s,
                    tk,
                    Mat::rows(&qh[i0 * hd..], hd),
                    Mat::rows_t(&kg[j0 * hd..], hd),
                    scale,
                    false,
                    Threads::One,
                );
                for r in 0..br {
                    let row = &mut s[r * tk..r * tk + bc];
                    let vis = visible(d, i0, r, j0, bc);
                    row[vis..].fill(0.0);
                    if vis == 0 {
                        continue;
                    }
                    let m_new = max_of(&row[..vis], m[r]);
                    let corr = if m[r] == f32::NEG_INFINITY { 0.0 } else { (m[r] - m_new).exp() };
                    l[r] = l[r] * corr + exp_shifted_sum(&mut row[..vis], m_new);
                    if corr != 1.0 {
                        acc[r * hd..(r + 1) * hd].iter_mut().for_each(|a| *a *= corr);
                    }
                    m[r] = m_new;
                }
                sgemm(br, hd, bc, acc, hd, Mat::rows(&s, tk), Mat::rows(&vg[j0 * hd..], hd), 1.0, true, Threads::One);
            }
            for r in 0..br {
                let inv = 1.0 / l[r];
                acc[r * hd..(r + 1) * hd].iter_mut().for_each(|a| *a *= inv);
                lh[i0 + r] = m[r] + l[r].ln();
            }
        }
    });
    (out, lse)
}

vectorized! {
    /// `ds = scale * p * (dp - delta)` in place over `dp`.
    fn softmax_grad(dp: &mut [f32], p: &[f32], delta: f32, scale: f32) -> () {
        for (x, &p) in dp.iter_mut().zip(p) {
            *x = scale * p * (*x - delta);
        }
    }
}

/// Gradients `(dq, dk, dv)` in the layouts of `q`, `k`, `v`, given the forward's output `o`, its
/// log-sum-exp and the output gradient `dout`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    d: &Dims,
    scale: f32,
    tiles: Tiles,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, hd, rep) = (d.t, d.hd, d.rep);
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    // One task per KV group: it owns its keys' gradients and its query heads' rows, so the
    // accumulations need no synchronization.
    dq.par_chunks_mut(rep * t * hd)
        .zip(dk.par_chunks_mut(d.keys * hd).zip(dv.par_chunks_mut(d.keys * hd)))
        .enumerate()
        .for_each(|(g, (dqg, (dkg, dvg)))| {
            let (kg, vg) = (&k[g * d.keys * hd..(g + 1) * d.keys * hd], &v[g * d.keys * hd..(g + 1) * d.keys * hd]);
            let (tq, tk) = (tiles.q, tiles.k);
            let mut s = vec![0f32; tq * tk];
            let mut dp = vec![0f32; tq * tk];
            let mut delta = vec![0f32; tq];
            for rho in 0..rep {
                let head = g * rep + rho;
                let span = head * t * hd..(head + 1) * t * hd;
                let (qh, oh, doh) = (&q[span.clone()], &o[span.clone()], &dout[span]);
                let lh = &lse[head * t..(head + 1) * t];
                let dqh = &mut dqg[rho * t * hd..(rho + 1) * t * hd];
                for i0 in (0..t).step_by(tq) {
                    let br = tq.min(t - i0);
                    for (r, dr) in delta[..br].iter_mut().enumerate() {
                        let row = (i0 + r) * hd..(i0 + r + 1) * hd;
                        *dr = oh[row.clone()].iter().zip(&doh[row]).map(|(a, b)| a * b).sum();
                    }
                    let kend = d.offset + i0 + br;
                    for j0 in (0..kend).step_by(tk) {
                        let bc = tk.min(kend - j0);
                        let (qi, doi) = (Mat::rows(&qh[i0 * hd..], hd), Mat::rows(&doh[i0 * hd..], hd));
                        sgemm(br, bc, hd, &mut s, tk, qi, Mat::rows_t(&kg[j0 * hd..], hd), scale, false, Threads::One);
                        for r in 0..br {
                            let row = &mut s[r * tk..r * tk + bc];
                            let vis = visible(d, i0, r, j0, bc);
                            exp_shifted_sum(&mut row[..vis], lh[i0 + r]);
                            row[vis..].fill(0.0);
                        }
                        // dV_j += P^T dO_i
                        sgemm(bc, hd, br, &mut dvg[j0 * hd..], hd, Mat::rows_t(&s, tk), doi, 1.0, true, Threads::One);
                        // dP = dO_i V_j^T, then dS = scale P (dP - delta)
                        sgemm(br, bc, hd, &mut dp, tk, doi, Mat::rows_t(&vg[j0 * hd..], hd), 1.0, false, Threads::One);
                        for (r, &dr) in delta[..br].iter().enumerate() {
                            let span = r * tk..r * tk + bc;
                            softmax_grad(&mut dp[span.clone()], &s[span], dr, scale);
                        }
                        // dQ_i += dS K_j ; dK_j += dS^T Q_i
                        sgemm(
                            br,
                            hd,
                            bc,
                            &mut dqh[i0 * hd..],
                            hd,
                            Mat::rows(&dp, tk),
                            Mat::rows(&kg[j0 * hd..], hd),
                            1.0,
                            true,
                            Threads::One,
                        );
                        sgemm(bc, hd, br, &mut dkg[j0 * hd..], hd, Mat::rows_t(&dp, tk), qi, 1.0, true, Threads::One);
                    }
                }
            }
        });
    (dq, dk, dv)
}

/// The contiguous f32 data of a CPU tensor (copied only if it is not contiguous).
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// The log-sum-exp a forward left in `slot`, checked against the rows of `d`.
fn saved_lse(slot: &Mutex<Vec<f32>>, d: &Dims) -> Result<Vec<f32>> {
    let lse = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if lse.len() != d.groups * d.rep * d.t {
        bail!("attention: backward without its forward's log-sum-exp");
    }
    Ok(lse)
}

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Three host gradients as tensors shaped like (and on the device of) `q`, `k`, `v`.
fn grads3(dq: Vec<f32>, dk: Vec<f32>, dv: Vec<f32>, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Grads3> {
    let dev = q.device();
    Ok((
        Some(Tensor::from_vec(dq, q.shape(), dev)?),
        Some(Tensor::from_vec(dk, k.shape(), dev)?),
        Some(Tensor::from_vec(dv, v.shape(), dev)?),
    ))
}

/// The candle op: [`forward`] on the CPU, [`backward`] for its gradients.
pub struct TiledAttention {
    pub scale: f32,
    pub offset: usize,
    pub tiles: Tiles,
    /// The rows' log-sum-exp from the forward, for the backward.
    lse: Mutex<Vec<f32>>,
}

impl TiledAttention {
    pub fn new(scale: f32, offset: usize, tiles: Tiles) -> Self {
        let tiles = Tiles { q: tiles.q.max(1), k: tiles.k.max(1) };
        Self { scale, offset, tiles, lse: Mutex::new(Vec::new()) }
    }
}

impl candle_core::CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "tiled-causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(ql.shape(), kl.shape(), self.offset)?;
        if vl.shape() != kl.shape() {
            bail!("attention: v {:?} differs from k {:?}", vl.shape(), kl.shape());
        }
        let (o, lse) = forward(
            cpu_f32(q, ql, "attention")?,
            cpu_f32(k, kl, "attention")?,
            cpu_f32(v, vl, "attention")?,
            &d,
            self.scale,
            self.tiles,
        );
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((CpuStorage::F32(o), ql.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, res: &Tensor, g: &Tensor) -> Result<Grads3> {
        let d = Dims::of(q.shape(), k.shape(), self.offset)?;
        let lse = saved_lse(&self.lse, &d)?;
        let (q_, k_, v_, o_, g_) = (host_f32(q)?, host_f32(k)?, host_f32(v)?, host_f32(res)?, host_f32(g)?);
        let (dq, dk, dv) = backward(&q_, &k_, &v_, &o_, &lse, &g_, &d, self.scale, self.tiles);
        grads3(dq, dk, dv, q, k, v)
    }
}

// ---------------------------------------------------------------------------------------------
// The whole attention block of a layer as one op: per-head RMS norm and rotary embedding of q and
// k, the tiled attention, and the moves between the projections' token-major layout and the
// kernel's head-major one. It keeps only the raw projections (and its output, which `o_proj`
// keeps anyway): normed, rotated and transposed copies exist only inside its forward and
// backward, instead of five more tensors per layer held until the backward ends.

/// The shape of an attention block: `b` sequences of `t` tokens, `heads` query heads over
/// `kv_heads` key/value heads of `hd`.
#[derive(Debug, Clone, Copy)]
pub struct BlockDims {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
}

impl BlockDims {
    /// The kernel's dimensions, after `offset` keys of a cached prefix.
    fn kernel(&self, offset: usize) -> Dims {
        let (b, t, hd) = (self.b, self.t, self.hd);
        Dims { groups: b * self.kv_heads, rep: self.heads / self.kv_heads, t, keys: offset + t, hd, offset }
    }
}

/// `[b, g, t, hd]` after `past` (`[g, p, hd]`, the same for every sequence): `[b, g, p + t, hd]`.
fn after_past(past: &[f32], x: &[f32], b: usize, g: usize, p: usize, t: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; b * g * (p + t) * hd];
    out.par_chunks_mut((p + t) * hd).enumerate().for_each(|(bg, o)| {
        let (bi, gi) = (bg / g, bg % g);
        o[..p * hd].copy_from_slice(&past[gi * p * hd..][..p * hd]);
        o[p * hd..].copy_from_slice(&x[(bi * g + gi) * t * hd..][..t * hd]);
    });
    out
}

/// `[b * t, heads * hd]` -> `[b, heads, t, hd]`.
fn to_heads(x: &[f32], t: usize, heads: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(t * hd).enumerate().for_each(|(bh, o)| {
        let (bi, head) = (bh / heads, bh % heads);
        for i in 0..t {
            o[i * hd..(i + 1) * hd].copy_from_slice(&x[((bi * t + i) * heads + head) * hd..][..hd]);
        }
    });
    out
}

/// `[b, heads, t, hd]` -> `[b * t, heads * hd]`.
fn from_heads(x: &[f32], t: usize, heads: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(heads * hd).enumerate().for_each(|(row, o)| {
        let (bi, i) = (row / t, row % t);
        for head in 0..heads {
            o[head * hd..(head + 1) * hd].copy_from_slice(&x[((bi * heads + head) * t + i) * hd..][..hd]);
        }
    });
    out
}

/// The candle op on `q: [b * t, heads * hd]`, `k, v: [b * t, kv_heads * hd]` (the projections'
/// outputs), giving `[b * t, heads * hd]` (what `o_proj` takes).
pub struct AttentionBlock {
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    pub eps: f32,
    pub rope: RopeTables,
    pub dims: BlockDims,
    pub scale: f32,
    pub tiles: Tiles,
    /// The keys and values (`[1, kv_heads, p, hd]` each, normed and rotated, as
    /// [`crate::model::PrefixCache`] holds them) of a cached prefix these tokens follow (scoring
    /// only: no backward then).
    past: Option<(Tensor, Tensor)>,
    lse: Mutex<Vec<f32>>,
}

impl AttentionBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        q_norm: Vec<f32>,
        k_norm: Vec<f32>,
        eps: f32,
        rope: RopeTables,
        dims: BlockDims,
        scale: f32,
        tiles: Tiles,
    ) -> Self {
        let tiles = Tiles { q: tiles.q.max(1), k: tiles.k.max(1) };
        Self { q_norm, k_norm, eps, rope, dims, scale, tiles, past: None, lse: Mutex::new(Vec::new()) }
    }

    /// The same block after a cached prefix's keys and values (its `rope` must start at the
    /// prefix's length).
    pub fn after(self, k: Tensor, v: Tensor) -> Self {
        Self { past: Some((k, v)), ..self }
    }

    /// `(t, heads, hd)` of q, and of k and v.
    fn q_dims(&self) -> (usize, usize, usize) {
        (self.dims.t, self.dims.heads, self.dims.hd)
    }

    fn kv_dims(&self) -> (usize, usize, usize) {
        (self.dims.t, self.dims.kv_heads, self.dims.hd)
    }

    fn check(&self, q: &Shape, k: &Shape, v: &Shape) -> Result<()> {
        let BlockDims { b, t, heads, kv_heads, hd } = self.dims;
        let rope_ok = self.rope.cos_host.len() >= t * (hd / 2) && self.rope.sin_host.len() >= t * (hd / 2);
        let norms_ok = self.q_norm.len() == hd && self.k_norm.len() == hd;
        if q.dims() != [b * t, heads * hd]
            || k.dims() != [b * t, kv_heads * hd]
            || v.dims() != k.dims()
            || !rope_ok
            || !norms_ok
            || heads % kv_heads != 0
            || self.past.as_ref().is_some_and(|(pk, pv)| {
                let d = pk.dims();
                d.len() != 4 || d[0] != 1 || d[1] != kv_heads || d[3] != hd || pv.dims() != d
            })
        {
            bail!("attention block: q {q:?}, k {k:?}, v {v:?} do not fit {:?}", self.dims);
        }
        Ok(())
    }

    /// q and k normed and rotated, v: all head-major.
    fn heads(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let BlockDims { t, kv_heads, hd, .. } = self.dims;
        (
            norm_rope_to_heads(q, &self.q_norm, self.eps, &self.rope, self.q_dims()),
            norm_rope_to_heads(k, &self.k_norm, self.eps, &self.rope, self.kv_dims()),
            to_heads(v, t, kv_heads, hd),
        )
    }
}

impl candle_core::CustomOp3 for AttentionBlock {
    fn name(&self) -> &'static str {
        "attention-block"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(ql.shape(), kl.shape(), vl.shape())?;
        let (qh, kh, vh) =
            self.heads(cpu_f32(q, ql, "attention")?, cpu_f32(k, kl, "attention")?, cpu_f32(v, vl, "attention")?);
        let o = match &self.past {
            None => {
                let (o, lse) = forward(&qh, &kh, &vh, &self.dims.kernel(0), self.scale, self.tiles);
                *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
                o
            }
            Some((pk, pv)) => {
                let BlockDims { b, t, kv_heads: g, hd, .. } = self.dims;
                let p = pk.dim(2)?;
                let (kh, vh) = with_host(pk, "attention", |pk| {
                    with_host(pv, "attention", |pv| {
                        Ok((after_past(pk, &kh, b, g, p, t, hd), after_past(pv, &vh, b, g, p, t, hd)))
                    })
                })?;
                forward(&qh, &kh, &vh, &self.dims.kernel(p), self.scale, self.tiles).0
            }
        };
        drop((qh, kh, vh));
        let BlockDims { t, heads, hd, .. } = self.dims;
        Ok((CpuStorage::F32(from_heads(&o, t, heads, hd)), ql.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, res: &Tensor, g: &Tensor) -> Result<Grads3> {
        self.check(q.shape(), k.shape(), v.shape())?;
        if self.past.is_some() {
            bail!("attention block: no backward after a cached prefix (scoring only)");
        }
        let d = self.dims.kernel(0);
        let lse = saved_lse(&self.lse, &d)?;
        let BlockDims { t, heads, kv_heads, hd, .. } = self.dims;
        let (q_, k_, v_) = (host_f32(q)?, host_f32(k)?, host_f32(v)?);
        let (qh, kh, vh) = self.heads(&q_, &k_, &v_);
        let oh = to_heads(&host_f32(res)?, t, heads, hd);
        let gh = to_heads(&host_f32(g)?, t, heads, hd);
        let (dqh, dkh, dvh) = backward(&qh, &kh, &vh, &oh, &lse, &gh, &d, self.scale, self.tiles);
        drop((qh, kh, vh, oh, gh));
        let dq = norm_rope_to_heads_bwd(&q_, &self.q_norm, self.eps, &self.rope, &dqh, self.q_dims());
        let dk = norm_rope_to_heads_bwd(&k_, &self.k_norm, self.eps, &self.rope, &dkh, self.kv_dims());
        let dv = from_heads(&dvh, t, kv_heads, hd);
        grads3(dq, dk, dv, q, k, v)
    }
}
