//! Differentiable building blocks of the Qwen3 forward pass.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` record no gradient, silently, and its
//! matmul backward computes a gradient for *both* operands, so a frozen weight would cost a full
//! weight-sized gradient per layer, kept until the end of the backward pass. Each op here therefore
//! comes in two forms:
//! - a fused CPU `CustomOp1` whose `bwd` is written with ordinary tensor ops, and
//! - a composition of differentiable candle ops, used on other devices (and as the slow reference
//!   the fused forms are tested against).
//!
//! `frozen_linear` is the exception: it is one CustomOp on every backend (the forward is the
//! backend's own matmul), and its backward produces the input gradient only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

/// `x @ w^T` for a weight that is never trained: backward yields d/dx only.
struct FrozenMatmul {
    w: Tensor,
}

fn matmul_wt<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, kw) = wl.shape().dims2()?;
    if k != kw {
        bail!("frozen_linear: input has {k} features, weight expects {kw}");
    }
    let wt = wl.transpose(0, 1)?;
    Ok((x.matmul(w, (1, m, n, k), xl, &wt)?, Shape::from((m, n))))
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(w) => matmul_wt(x, l, w, wl),
            _ => bail!("frozen_linear: weight is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cuda(w) => matmul_wt(x, l, w, wl),
            _ => bail!("frozen_linear: weight is not on the CUDA device"),
        }
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Metal(w) => matmul_wt(x, l, w, wl),
            _ => bail!("frozen_linear: weight is not on the Metal device"),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x [n, in] @ w[out, in]^T -> [n, out]`, recording a backward for `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(FrozenMatmul { w: w.clone() })
    } else {
        x.matmul(&w.t()?)
    }
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// RMS norm over the last dimension, times a frozen weight.
struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "rms_norm")?;
        let w: Vec<f32> = self.w.to_vec1()?;
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, x)| {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((o, x), w) in o.iter_mut().zip(x).zip(&w) {
                    *o = x * r * w;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // y = x r w with r = (mean(x^2) + eps)^-1/2  =>  dx = r (g w) - x r^3 mean(g w x)
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?
            .sqrt()?
            .recip()?;
        let gw = g.broadcast_mul(&self.w)?;
        let dot = (&gw * x)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(dot * r.powf(3.0)?)?)?)?;
        Ok(Some(dx))
    }
}

/// RMS norm over the last dimension, times `w` (not trained).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(RmsNorm {
            w: w.clone(),
            eps: eps as f32,
        })
    } else {
        rms_norm_composed(x, w, eps)
    }
}

/// The same RMS norm as a composition of differentiable ops.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

/// Rotary tables for positions `0..len`: `cos`, `sin` of shape `[len, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    pub fn new(
        head_dim: usize,
        len: usize,
        theta: f64,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (len, half), device)?,
            sin: Tensor::from_vec(sin, (len, half), device)?,
        })
    }
}

/// Rotary embedding (rotate-half layout) on `[batch, seq, heads, head_dim]`, position = seq index.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// +1 applies the rotation, -1 its inverse (the backward).
    sign: f32,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "rope")?;
        let (_b, t, h, hd) = l.shape().dims4()?;
        let half = hd / 2;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * h * hd)
            .zip(x.par_chunks(t * h * hd))
            .for_each(|(o, x)| {
                for p in 0..t {
                    let (cos, sin) = (
                        &self.cos[p * half..(p + 1) * half],
                        &self.sin[p * half..(p + 1) * half],
                    );
                    for head in 0..h {
                        let base = (p * h + head) * hd;
                        let (x1, x2) = x[base..base + hd].split_at(half);
                        let (o1, o2) = o[base..base + hd].split_at_mut(half);
                        for i in 0..half {
                            let s = self.sign * sin[i];
                            o1[i] = x1[i] * cos[i] - x2[i] * s;
                            o2[i] = x2[i] * cos[i] + x1[i] * s;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            sign: -self.sign,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// Rotary embedding on `x: [batch, seq, heads, head_dim]`.
pub fn rope(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    let t = x.dim(1)?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let op = Rope {
            cos: tables.cos.narrow(0, 0, t)?.flatten_all()?.to_vec1()?,
            sin: tables.sin.narrow(0, 0, t)?.flatten_all()?.to_vec1()?,
            sign: 1.0,
        };
        x.contiguous()?.apply_op1(op)
    } else {
        rope_composed(x, tables)
    }
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

/// Causal softmax of `scale * s` over the last dim of `s: [batch, groups, rows, seq]`, where row `i`
/// is query position `i % seq` (query heads sharing a KV head are stacked along `rows`).
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "causal_softmax")?;
        let t = l.shape().dims4()?.3;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t)
            .zip(x.par_chunks(t))
            .enumerate()
            .for_each(|(row, (o, x))| {
                let q = row % t;
                let max = x[..=q].iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) * self.scale;
                let mut sum = 0f32;
                for j in 0..=q {
                    let e = (x[j] * self.scale - max).exp();
                    o[j] = e;
                    sum += e;
                }
                let inv = 1.0 / sum;
                o[..=q].iter_mut().for_each(|v| *v *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // d/ds softmax(c s) = c y (g - sum(g y)); masked entries have y = 0 and get 0.
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some(
            (g.broadcast_sub(&dot)? * y)?.affine(self.scale as f64, 0.0)?,
        ))
    }
}

/// Causal softmax of `scale * s`, `s: [batch, groups, rows, seq]`, row `i` at position `i % seq`.
pub fn causal_softmax(s: &Tensor, scale: f64) -> Result<Tensor> {
    if s.device().is_cpu() && s.dtype() == DType::F32 {
        s.contiguous()?.apply_op1(CausalSoftmax {
            scale: scale as f32,
        })
    } else {
        causal_softmax_composed(s, scale)
    }
}

/// The same causal softmax as a composition of differentiable ops.
pub fn causal_softmax_composed(s: &Tensor, scale: f64) -> Result<Tensor> {
    let (_b, _g, rows, t) = s.dims4()?;
    let mask: Vec<f32> = (0..rows)
        .flat_map(|r| (0..t).map(move |j| if j <= r % t { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (rows, t), s.device())?.to_dtype(s.dtype())?;
    let s = (s * scale)?.broadcast_add(&mask)?;
    candle_nn::ops::softmax(&s, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Forward and input-gradient of `fused` and `composed` agree (loss = sum(out * probe)).
    fn check(
        shape: &[usize],
        fused: impl Fn(&Tensor) -> Tensor,
        composed: impl Fn(&Tensor) -> Tensor,
    ) {
        let x = Var::from_tensor(&rand(shape, 1)).unwrap();
        let a = fused(x.as_tensor());
        let b = composed(x.as_tensor());
        assert!(
            max_diff(&a, &b) < 1e-5,
            "forward differs by {}",
            max_diff(&a, &b)
        );
        let probe = rand(a.dims(), 2);
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(ga, gb) < 1e-5,
            "gradient differs by {}",
            max_diff(ga, gb)
        );
        assert!(
            ga.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn fused_rms_norm_matches_composition() {
        let w = rand(&[8], 3);
        check(
            &[2, 3, 8],
            |x| rms_norm(x, &w, 1e-6).unwrap(),
            |x| rms_norm_composed(x, &w, 1e-6).unwrap(),
        );
    }

    #[test]
    fn fused_rope_matches_composition() {
        let t = RopeTables::new(8, 16, 10000.0, &Device::Cpu).unwrap();
        check(
            &[2, 5, 3, 8],
            |x| rope(x, &t).unwrap(),
            |x| rope_composed(x, &t).unwrap(),
        );
    }

    #[test]
    fn fused_causal_softmax_matches_composition() {
        check(
            &[2, 2, 6, 3],
            |x| causal_softmax(x, 0.7).unwrap(),
            |x| causal_softmax_composed(x, 0.7).unwrap(),
        );
    }

    #[test]
    fn frozen_linear_grads_input_only() {
        let w = rand(&[5, 4], 4);
        check(
            &[3, 4],
            |x| frozen_linear(x, &w).unwrap(),
            |x| x.matmul(&w.t().unwrap()).unwrap(),
        );
    }
}
