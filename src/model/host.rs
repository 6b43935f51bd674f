//! The host-side numerics under the candle ops: reading a tensor's f32 values on the CPU, the
//! rotary tables, and the RMS norm and rotation row kernels that `ops` and `attention` share.

use std::sync::Arc;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor, bail};
use rayon::prelude::*;

/// A CPU storage's contiguous f32 data, or an error naming `op`.
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// A CPU tensor's contiguous f32 data, borrowed for `f`.
pub(crate) fn with_host<T>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(cpu_f32(c, l, op)?),
        _ => bail!("{op}: tensor is not on the CPU"),
    }
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
pub(crate) fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt()
}

/// `rms_norm(x) w` row by row (rows of `w.len()`).
pub(crate) fn rms_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, x)| {
        let r = inv_rms(x, eps);
        for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
            *o = x * r * w;
        }
    });
    out
}

/// One row of the RMS norm's input gradient, given `gw` = the output gradient times the weight:
/// `out = r gw - x r^3 mean(gw x)` (the host form of [`rms_norm_bwd`]).
pub(crate) fn rms_grad_row(x: &[f32], gw: &[f32], eps: f32, out: &mut [f32]) {
    let r = inv_rms(x, eps);
    let c = gw.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() / x.len() as f32 * r * r * r;
    for ((o, gw), x) in out.iter_mut().zip(gw).zip(x) {
        *o = r * gw - x * c;
    }
}

/// Rotary tables for positions `0..len`: `cos`, `sin` of shape `[len, head_dim / 2]`, on the
/// device and (shared, for the CPU ops) on the host. Built once per forward pass.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub(crate) cos_host: Arc<[f32]>,
    pub(crate) sin_host: Arc<[f32]>,
}

impl RopeTables {
    pub fn new(head_dim: usize, len: usize, theta: f64, device: &candle_core::Device) -> Result<Self> {
        Self::range(head_dim, 0, len, theta, device)
    }

    /// Tables for positions `start..start + len`: row `p` holds position `start + p`, with the
    /// very angles [`RopeTables::new`] computes for it (tokens after a cached prefix).
    pub fn range(head_dim: usize, start: usize, len: usize, theta: f64, device: &candle_core::Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_slice(&cos, (len, half), device)?,
            sin: Tensor::from_slice(&sin, (len, half), device)?,
            cos_host: cos.into(),
            sin_host: sin.into(),
        })
    }
}

/// Per-head RMS norm (weight `w`) and rotary embedding (rotate-half, position = token index) of
/// token-major `x: [b * t, heads * hd]`, written head-major `[b, heads, t, hd]`.
/// `dims`: `(t, heads, hd)`.
pub(crate) fn norm_rope_to_heads(
    x: &[f32],
    w: &[f32],
    eps: f32,
    rope: &RopeTables,
    dims: (usize, usize, usize),
) -> Vec<f32> {
    let (t, heads, hd) = dims;
    let half = hd / 2;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(t * hd).enumerate().for_each(|(bh, o)| {
        let (bi, head) = (bh / heads, bh % heads);
        for i in 0..t {
            let src = &x[((bi * t + i) * heads + head) * hd..][..hd];
            let r = inv_rms(src, eps);
            let (cos, sin) = (&rope.cos_host[i * half..][..half], &rope.sin_host[i * half..][..half]);
            let dst = &mut o[i * hd..][..hd];
            for j in 0..half {
                let (x1, x2) = (src[j] * r * w[j], src[j + half] * r * w[j + half]);
                dst[j] = x1 * cos[j] - x2 * sin[j];
                dst[j + half] = x2 * cos[j] + x1 * sin[j];
            }
        }
    });
    out
}

/// The gradient, token-major like `x`, of [`norm_rope_to_heads`] for the head-major output
/// gradient `g`: the inverse rotation (by minus the angle), then the RMS norm's backward.
pub(crate) fn norm_rope_to_heads_bwd(
    x: &[f32],
    w: &[f32],
    eps: f32,
    rope: &RopeTables,
    g: &[f32],
    dims: (usize, usize, usize),
) -> Vec<f32> {
    let (t, heads, hd) = dims;
    let half = hd / 2;
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(heads * hd).enumerate().for_each(|(row, out)| {
        let (bi, i) = (row / t, row % t);
        let (cos, sin) = (&rope.cos_host[i * half..][..half], &rope.sin_host[i * half..][..half]);
        let mut gw = vec![0f32; hd];
        for head in 0..heads {
            let gs = &g[((bi * heads + head) * t + i) * hd..][..hd];
            for j in 0..half {
                gw[j] = (gs[j] * cos[j] + gs[j + half] * sin[j]) * w[j];
                gw[j + half] = (gs[j + half] * cos[j] - gs[j] * sin[j]) * w[j + half];
            }
            rms_grad_row(&x[(row * heads + head) * hd..][..hd], &gw, eps, &mut out[head * hd..(head + 1) * hd]);
        }
    });
    dx
}
