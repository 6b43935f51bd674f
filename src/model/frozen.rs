//! Frozen projection weights (`w [out, in]`, never trained) and the two products taken against
//! them: `x w^T` (every projection's forward) and `g w` (the backward's input gradient).
//!
//! A weight is held one of three ways, by the kernel path chosen for the process
//! ([`super::cpu`]), wherever every value of the weight is a bf16 (a bf16 checkpoint's are, once
//! widened) and it lies on the CPU:
//! - `amx`: packed once into AMX tiles ([`super::amx::Packed`]);
//! - `avx512-bf16`, `avx512`: packed once as bf16 pairs ([`super::pairs::Pairs`]).
//!
//! Either is then the weight's only copy: 2 bytes a value for the forward, 2 more once a backward
//! has asked for its layout, against the f32 weight's 4. AMX and `avx512-bf16` take the other
//! operand as `hi + lo` (two bf16, 16 significant bits) against the exact weight, with f32 sums;
//! `avx512` widens the weight in registers and multiplies in f32. Anywhere else (`f32`, a weight
//! with f32-only values, a GPU) it is an f32 tensor, and its products are [`sgemm`]'s (or the
//! device's matmul).

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, bail};

use super::cpu::Kernel;
use super::host::with_host;
use super::kernels::{Mat, Threads, sgemm};
use super::mat::PackedWeight;

/// A frozen weight `[out, in]`; cloning shares it.
#[derive(Clone)]
pub struct Frozen(Arc<Repr>);

enum Repr {
    /// f32, on its device.
    Tensor(Tensor),
    /// Packed once for a CPU kernel path (`kernel`), its values bf16s.
    Packed { w: Box<dyn PackedWeight>, kernel: Kernel, device: candle_core::Device },
}

impl Frozen {
    /// The weight as loaded (any float dtype, `[out, in]`): packed for the process's CPU kernel
    /// path where it can be (`cpu::chosen`), otherwise widened to f32.
    pub fn new(w: &Tensor) -> Result<Self> {
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let (n, k) = w.dims2()?;
        if w.device().is_cpu() {
            let packed = with_host(&w, "frozen weight", |v| Ok(pack(super::cpu::chosen(), v, n, k)))?;
            if let Some((kernel, p)) = packed {
                return Ok(Self(Arc::new(Repr::Packed { w: p, kernel, device: w.device().clone() })));
            }
        }
        Ok(Self(Arc::new(Repr::Tensor(w))))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match &*self.0 {
            Repr::Tensor(t) => t.dims2().unwrap_or((0, 0)),
            Repr::Packed { w, .. } => w.dims(),
        }
    }

    /// The kernel path this weight's products run on (how it is held): `F32` for an f32 tensor,
    /// `Amx` for tiles, `Avx512Bf16` or `Avx512` for bf16 pairs (`Avx512Bf16` also under
    /// `--precision bf16`).
    pub fn runs_on(&self) -> Kernel {
        match &*self.0 {
            Repr::Tensor(_) => Kernel::F32,
            Repr::Packed { kernel, .. } => *kernel,
        }
    }

    /// Makes the backward's product ready now (a packed weight's second layout), not at the
    /// first backward: packed then, between the activations a step keeps, its 2 bytes a value
    /// land among them in the heap.
    pub fn ready_for_backward(&self) {
        if let Repr::Packed { w, .. } = &*self.0 {
            w.backward_ready();
        }
    }

    /// The weight as an f32 tensor (for the compositions of other devices and for tests): itself
    /// when it is one, rebuilt from the tiles (exactly, as a new tensor) when packed.
    pub fn tensor(&self) -> Result<Tensor> {
        match &*self.0 {
            Repr::Tensor(t) => Ok(t.clone()),
            Repr::Packed { w, device, .. } => Tensor::from_vec(w.to_f32(), w.dims(), device),
        }
    }

    /// `dst[m x out] (ld per row) = (accumulate ? dst : 0) + x w^T` on the CPU, `x [m x in]`
    /// with rows `ldx` apart.
    pub fn forward_into(&self, m: usize, x: &[f32], ldx: usize, dst: &mut [f32], ld: usize, acc: bool) -> Result<()> {
        self.product_into(false, m, x, ldx, dst, ld, acc)
    }

    /// `dst[m x in] (ld per row) = (accumulate ? dst : 0) + g w` on the CPU, `g [m x out]`
    /// with rows `ldg` apart.
    pub fn backward_into(&self, m: usize, g: &[f32], ldg: usize, dst: &mut [f32], ld: usize, acc: bool) -> Result<()> {
        self.product_into(true, m, g, ldg, dst, ld, acc)
    }

    /// `dst (+)= a w^T` (the forward) or `a w` (`backward`), `a` with `m` rows `lda` apart.
    #[allow(clippy::too_many_arguments)]
    fn product_into(
        &self,
        backward: bool,
        m: usize,
        a: &[f32],
        lda: usize,
        dst: &mut [f32],
        ld: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (n, k) = self.dims();
        // Columns of `a` (summed over) and of the result.
        let (inner, cols) = if backward { (n, k) } else { (k, n) };
        check(m, inner, a.len(), lda, "the input")?;
        check(m, cols, dst.len(), ld, "the output")?;
        match &*self.0 {
            Repr::Tensor(t) => with_host(t, "frozen weight", |w| {
                let rhs = if backward { Mat::rows(w, k) } else { Mat::rows_t(w, k) };
                sgemm(m, cols, inner, dst, ld, Mat::rows(a, lda), rhs, 1.0, accumulate, Threads::All);
                Ok(())
            }),
            Repr::Packed { w, .. } => {
                let a = Mat::rows(a, lda);
                if backward {
                    w.backward(m, a, dst, ld, accumulate)
                } else {
                    w.forward(m, a, dst, ld, accumulate)
                };
                Ok(())
            }
        }
    }

    /// `x [m, in] w^T -> [m, out]`, recording nothing (see `ops::frozen_linear` for the op
    /// that records a backward).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(false, x, |w| x.matmul(&w.t()?))
    }

    /// `g [m, out] w -> [m, in]`, recording nothing.
    pub fn backward(&self, g: &Tensor) -> Result<Tensor> {
        self.apply(true, g, |w| g.matmul(w))
    }

    /// `a w` (`backward`) or `a w^T` into a new tensor: on the CPU (f32) through
    /// [`Frozen::product_into`], elsewhere `other` on the weight's tensor.
    fn apply(&self, backward: bool, a: &Tensor, other: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if let Repr::Tensor(w) = &*self.0
            && !(a.device().is_cpu() && a.dtype() == DType::F32 && w.device().is_cpu())
        {
            return other(w);
        }
        let (n, k) = self.dims();
        let (inner, cols) = if backward { (n, k) } else { (k, n) };
        let a = a.to_dtype(DType::F32)?.contiguous()?;
        let (m, ac) = a.dims2()?;
        if ac != inner {
            bail!("frozen weight: input has {ac} columns, the weight {n} x {k} takes {inner}");
        }
        let mut out = vec![0f32; m * cols];
        with_host(&a, "frozen weight", |a| self.product_into(backward, m, a, inner, &mut out, cols, false))?;
        Tensor::from_vec(out, (m, cols), a.device())
    }
}

/// `w [n x k]` packed for `kernel`, where that path packs and every value is a bf16, with the path
/// its products then run on: under `--precision bf16`, `vdpbf16ps` on the operand rounded to bf16
/// (reported as `Avx512Bf16`) whatever path was chosen but `F32`.
fn pack(kernel: Kernel, w: &[f32], n: usize, k: usize) -> Option<(Kernel, Box<dyn PackedWeight>)> {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::precision() == super::cpu::Precision::Bf16 && kernel != Kernel::F32 {
        let p = super::pairs::Pairs::new(w, n, k, super::pairs::PairKernel::DotBf16)?;
        return Some((Kernel::Avx512Bf16, Box::new(p)));
    }
    let packed: Option<Box<dyn PackedWeight>> = match kernel {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Kernel::Amx => super::amx::Packed::new(w, n, k).map(|p| Box::new(p) as Box<dyn PackedWeight>),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => super::pairs::Pairs::new(w, n, k, super::pairs::PairKernel::Fma).map(|p| Box::new(p) as _),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => {
            super::pairs::Pairs::new(w, n, k, super::pairs::PairKernel::Dot).map(|p| Box::new(p) as _)
        }
        _ => {
            let _ = (w, n, k);
            None
        }
    };
    packed.map(|p| (kernel, p))
}

/// That `len` values hold `m` rows of `cols` at `ld` per row.
fn check(m: usize, cols: usize, len: usize, ld: usize, what: &str) -> Result<()> {
    if ld < cols || (m > 0 && len < (m - 1) * ld + cols) {
        bail!("frozen weight: {what} has {len} values, not {m} rows of {cols} at {ld} apart");
    }
    Ok(())
}
