//! Frozen weights held as bf16 pairs, for the AVX-512 paths of [`super::cpu`]: a weight whose
//! every value is a bf16 (a bf16 checkpoint's, once widened) is packed once into panels of 32
//! output columns, each 32-bit lane holding two consecutive values of the summed index, the
//! layout `vdpbf16ps` multiplies. 2 bytes a value per layout (the f32 weight took 4), and it is the
//! weight's only copy; the backward's layout (`g w`) is packed at the first backward.
//!
//! Two kernels run on it, both exact in the weight:
//! - [`Dot`](PairKernel::Dot) (`avx512-bf16`): the other operand split as `hi + lo` (two bf16s, 16
//!   significant bits), two `vdpbf16ps` per pair of the summed index, f32 sums; what is dropped is
//!   the operand's bits past the 16th (a relative error near 2^-16 per term, as AMX's).
//! - [`DotBf16`](PairKernel::DotBf16) (`--precision bf16`, opt-in for scoring): the operand
//!   rounded to one bf16, one `vdpbf16ps` per pair: not exact (a relative error near 2^-9 per
//!   term), twice the products per instruction of the others.
//! - [`Fma`](PairKernel::Fma) (`avx512`): each pair widened to two f32 vectors in registers (a
//!   shift and a mask) and multiplied by AVX-512 FMA against the f32 operand: the f32 product.
//!
//! Blocking: 8 rows x 32 columns of sums in 16 registers; the threads split the panels (each
//! reads only its own part of the weight), and rows go in blocks whose operand stays in L2 while
//! the thread's panels pass over it.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::mat::{Mat, PackedWeight, SendPtr, bf16_split};

/// Output columns of one panel.
const NR: usize = 32;
/// Rows of one strip (the microkernel's).
const MR: usize = 8;

/// Which microkernel a packed weight's products run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairKernel {
    /// `vdpbf16ps`, the operand as `hi + lo` (AVX512_BF16).
    Dot,
    /// `vdpbf16ps`, the operand rounded to bf16 (AVX512_BF16): reduced precision, opt-in.
    DotBf16,
    /// Widened to f32, AVX-512 FMA.
    Fma,
}

impl PairKernel {
    /// Why this CPU cannot run it, if it cannot.
    pub fn unavailable(self) -> Option<String> {
        match self {
            PairKernel::Dot | PairKernel::DotBf16 => super::cpu::Kernel::Avx512Bf16.unavailable(),
            PairKernel::Fma => super::cpu::Kernel::Avx512.unavailable(),
        }
    }
}

/// Two u32 lanes' worth of alignment: a panel's pair row is 128 bytes, two 64-byte lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A matrix `[cols x inner]` (a weight as one product reads it) in panels of [`NR`] columns:
/// panel `p`, pair `q` is lines `2 (p kp + q)` and `+1`, lane `c` of them
/// `bits(v[32p + c][2q]) | bits(v[32p + c][2q + 1]) << 16` (the bf16 bits; zero past the ends).
struct Panels {
    lines: Vec<Line>,
    cols: usize,
    inner: usize,
}

impl Panels {
    /// Packs `get(col, i)`, the bf16 bits of the value at output column `col`, summed index `i`.
    fn pack(cols: usize, inner: usize, get: impl Fn(usize, usize) -> u16 + Sync) -> Self {
        let kp = inner.div_ceil(2);
        let mut lines = vec![Line([0; 16]); cols.div_ceil(NR) * kp * 2];
        lines.par_chunks_mut(kp * 2).enumerate().for_each(|(p, panel)| {
            for c in 0..NR.min(cols - p * NR) {
                let col = p * NR + c;
                for q in 0..kp {
                    let lo = u32::from(get(col, 2 * q));
                    let hi = if 2 * q + 1 < inner { u32::from(get(col, 2 * q + 1)) } else { 0 };
                    panel[2 * q + c / 16].0[c % 16] = lo | hi << 16;
                }
            }
        });
        Self { lines, cols, inner }
    }

    fn kp(&self) -> usize {
        self.inner.div_ceil(2)
    }

    /// The bf16 bits at `(col, i)`.
    fn get(&self, col: usize, i: usize) -> u16 {
        let (p, c, q) = (col / NR, col % NR, i / 2);
        let lane = self.lines[(p * self.kp() + q) * 2 + c / 16].0[c % 16];
        (lane >> (16 * (i % 2))) as u16
    }
}

/// A frozen weight `w [n x k]` of bf16 values as bf16 pairs: the forward's panels (`x w^T`) and,
/// from the first backward, the backward's (`g w`).
pub struct Pairs {
    n: usize,
    k: usize,
    kernel: PairKernel,
    fwd: Panels,
    bwd: OnceLock<Panels>,
}

impl Pairs {
    /// `w [n x k]` packed for `kernel`, or `None` when a value is not a bf16 (its low 16 bits not
    /// zero) or this CPU cannot run `kernel`.
    pub fn new(w: &[f32], n: usize, k: usize, kernel: PairKernel) -> Option<Self> {
        assert_eq!(w.len(), n * k, "pairs: weight of {} values for {n} x {k}", w.len());
        if kernel.unavailable().is_some() || w.par_iter().any(|v| v.to_bits() & 0xffff != 0) {
            return None;
        }
        let fwd = Panels::pack(n, k, |c, i| (w[c * k + i].to_bits() >> 16) as u16);
        Some(Self { n, k, kernel, fwd, bwd: OnceLock::new() })
    }

    pub fn kernel(&self) -> PairKernel {
        self.kernel
    }

    fn backward_panels(&self) -> &Panels {
        self.bwd.get_or_init(|| Panels::pack(self.k, self.n, |j, i| self.fwd.get(i, j)))
    }

    fn product(&self, b: &Panels, m: usize, a: Mat, dst: &mut [f32], ld: usize, accumulate: bool) {
        let (cols, inner) = (b.cols, b.inner);
        assert!(a.cs() == 1, "pairs: the activation's rows must be contiguous");
        a.check(m, inner, "pairs: activation");
        assert!(ld >= cols && (m == 0 || dst.len() >= (m - 1) * ld + cols), "pairs: destination too small");
        if m == 0 || cols == 0 {
            return;
        }
        match self.kernel {
            // SAFETY: a Pairs with this kernel exists only where the CPU runs it (`new`); a, b
            // and dst checked above.
            PairKernel::Dot => unsafe { drive_dot::<true>(m, a, b, dst, ld, accumulate) },
            PairKernel::DotBf16 => unsafe { drive_dot::<false>(m, a, b, dst, ld, accumulate) },
            PairKernel::Fma => unsafe { drive_fma(m, a, b, dst, ld, accumulate) },
        }
    }
}

impl PackedWeight for Pairs {
    /// `(n, k)`: the weight's rows and columns.
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The weight again, `[n x k]` row-major f32 (exact: the panels hold its values).
    fn to_f32(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(self.k.max(1)).enumerate().for_each(|(r, row)| {
            for (i, v) in row.iter_mut().enumerate() {
                *v = f32::from_bits(u32::from(self.fwd.get(r, i)) << 16);
            }
        });
        w
    }

    /// `dst[m x n] (ld_dst per row) = (accumulate ? dst : 0) + x w^T`, `x [m x k]` with its rows
    /// contiguous. Panics if `x` or `dst` is too small for the shape.
    fn forward(&self, m: usize, x: Mat, dst: &mut [f32], ld_dst: usize, accumulate: bool) {
        self.product(&self.fwd, m, x, dst, ld_dst, accumulate)
    }

    /// `dst[m x k] (ld_dst per row) = (accumulate ? dst : 0) + g w`, `g [m x n]` with its rows
    /// contiguous. Panics if `g` or `dst` is too small for the shape.
    fn backward(&self, m: usize, g: Mat, dst: &mut [f32], ld_dst: usize, accumulate: bool) {
        self.product(self.backward_panels(), m, g, dst, ld_dst, accumulate)
    }

    /// The backward's panels (`w` as `g w` reads it), packed at the first call.
    fn backward_ready(&self) {
        self.backward_panels();
    }
}

/// Rows per block: as many 8-row strips as keep the block's operand (4 bytes a value either
/// way) within 256 KB of L2, at least one strip.
fn rows_per_block(inner: usize) -> usize {
    ((256 * 1024 / (4 * inner.max(1))) / MR * MR).max(MR)
}

/// The threads' split of the panels, then row blocks, then panels, then strips: `strip(rows, r0,
/// panel, out)` computes rows `r0..r0 + rows` (at most [`MR`]) of one panel into `out`.
fn drive(m: usize, b: &Panels, dst: &mut [f32], ld: usize, strip: impl Fn(usize, usize, usize, *mut f32) + Sync) {
    let panels = b.cols.div_ceil(NR);
    let parts = rayon::current_num_threads().min(panels).max(1);
    let block = rows_per_block(b.inner);
    let out = SendPtr::new(dst);
    let (out, strip) = (&out, &strip);
    (0..parts).into_par_iter().for_each(|t| {
        for r0 in (0..m).step_by(block) {
            for p in panels * t / parts..panels * (t + 1) / parts {
                for s in (r0..(r0 + block).min(m)).step_by(MR) {
                    // The strip's rows and the panel's columns: inside dst (checked by the
                    // caller), and this thread's columns only.
                    strip(MR.min(m - s), s, p, out.0.wrapping_add(s * ld + p * NR));
                }
            }
        }
    });
}

/// `x [m x inner]` as bf16 `hi` and `lo` rows of `inner` rounded up to even (zero past `inner`):
/// consecutive pairs as u32 lanes, the operand `vdpbf16ps` broadcasts. Into the calling thread's
/// kept buffer (`m * w` u16 each), handed back by [`keep_split`]: fresh buffers per product (50 MB
/// at 2048 rows of 6144) cost their page faults at every call.
fn split_rows<const LO: bool>(a: Mat, m: usize, inner: usize) -> Vec<u16> {
    let w = inner.next_multiple_of(2);
    let mut both = SPLIT.with(std::cell::Cell::take);
    both.clear();
    both.resize(if LO { 2 } else { 1 } * m * w, 0);
    if LO {
        let (hi, lo) = both.split_at_mut(m * w);
        hi.par_chunks_mut(w).zip(lo.par_chunks_mut(w)).enumerate().for_each(|(r, (h, l))| {
            for (i, &v) in a.line(r * a.rs(), inner).iter().enumerate() {
                (h[i], l[i]) = bf16_split(v);
            }
        });
    } else {
        both.par_chunks_mut(w).enumerate().for_each(|(r, h)| {
            for (i, &v) in a.line(r * a.rs(), inner).iter().enumerate() {
                h[i] = bf16_split(v).0;
            }
        });
    }
    both
}

/// Hands [`split_rows`]'s buffer back to the thread.
fn keep_split(both: Vec<u16>) {
    SPLIT.with(|s| s.set(both));
}

thread_local! {
    static SPLIT: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `LO`: the operand as `hi + lo` (exact to 16 bits), else as `hi` alone (`--precision bf16`).
///
/// # Safety
/// AVX512_BF16 on this CPU; `a`, `b` and `dst` checked for the product by the caller.
unsafe fn drive_dot<const LO: bool>(m: usize, a: Mat, b: &Panels, dst: &mut [f32], ld: usize, accumulate: bool) {
    let both = split_rows::<LO>(a, m, b.inner);
    let (kp, cols) = (b.kp(), b.cols);
    let (hi, lo) = both.split_at(m * 2 * kp);
    drive(m, b, dst, ld, |rows, r0, p, out| {
        let w = &b.lines[p * kp * 2..][..kp * 2];
        let h = &hi[r0 * 2 * kp..][..rows * 2 * kp];
        let l = if LO { &lo[r0 * 2 * kp..][..rows * 2 * kp] } else { &[][..] };
        let valid = NR.min(cols - p * NR);
        // SAFETY: the CPU has AVX512_BF16 (the caller's); the operands are sliced to the strip
        // and the panel; out holds `rows` rows of `valid` columns at ld (the caller's checks).
        unsafe {
            match rows {
                8 => dot::<8, LO>(h, l, w, kp, out, ld, valid, accumulate),
                7 => dot::<7, LO>(h, l, w, kp, out, ld, valid, accumulate),
                6 => dot::<6, LO>(h, l, w, kp, out, ld, valid, accumulate),
                5 => dot::<5, LO>(h, l, w, kp, out, ld, valid, accumulate),
                4 => dot::<4, LO>(h, l, w, kp, out, ld, valid, accumulate),
                3 => dot::<3, LO>(h, l, w, kp, out, ld, valid, accumulate),
                2 => dot::<2, LO>(h, l, w, kp, out, ld, valid, accumulate),
                _ => dot::<1, LO>(h, l, w, kp, out, ld, valid, accumulate),
            }
        }
    });
    keep_split(both);
}

/// # Safety
/// AVX-512F on this CPU; `a`, `b` and `dst` checked for the product by the caller.
unsafe fn drive_fma(m: usize, a: Mat, b: &Panels, dst: &mut [f32], ld: usize, accumulate: bool) {
    let (kp, cols, inner) = (b.kp(), b.cols, b.inner);
    drive(m, b, dst, ld, |rows, r0, p, out| {
        let w = &b.lines[p * kp * 2..][..kp * 2];
        let x = a.from(r0 * a.rs());
        x.check(rows, inner, "pairs: strip");
        let valid = NR.min(cols - p * NR);
        // SAFETY: the CPU has AVX-512F (the caller's); x holds the strip's rows (checked), w the
        // panel; out holds `rows` rows of `valid` columns at ld (the caller's checks).
        unsafe {
            match rows {
                8 => fma::<8>(x, inner, w, out, ld, valid, accumulate),
                7 => fma::<7>(x, inner, w, out, ld, valid, accumulate),
                6 => fma::<6>(x, inner, w, out, ld, valid, accumulate),
                5 => fma::<5>(x, inner, w, out, ld, valid, accumulate),
                4 => fma::<4>(x, inner, w, out, ld, valid, accumulate),
                3 => fma::<3>(x, inner, w, out, ld, valid, accumulate),
                2 => fma::<2>(x, inner, w, out, ld, valid, accumulate),
                _ => fma::<1>(x, inner, w, out, ld, valid, accumulate),
            }
        }
    });
}

use std::arch::x86_64::*;

/// `R` rows of sums (two vectors of 16 columns each) into `out`: `out = (accumulate ? out : 0) +
/// sums`, the first `valid` columns only.
///
/// # Safety
/// AVX-512F; `out` valid for `R` rows of `valid <= 32` at `ld`, written by no one else meanwhile.
#[target_feature(enable = "avx512f")]
unsafe fn store<const R: usize>(acc: &[__m512; 16], out: *mut f32, ld: usize, valid: usize, accumulate: bool) {
    for h in 0..2 {
        let n = valid.saturating_sub(16 * h).min(16);
        if n == 0 {
            continue;
        }
        let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
        for r in 0..R {
            // SAFETY: row r, columns 16h..16h + n of out (the caller's).
            unsafe {
                let p = out.add(r * ld + 16 * h);
                let v = if accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), acc[2 * r + h])
                } else {
                    acc[2 * r + h]
                };
                _mm512_mask_storeu_ps(p, mask, v);
            }
        }
    }
}

/// One strip by `vdpbf16ps`: `hi`, `lo` the strip's `R` rows of `2 kp` bf16 (`lo` only with
/// `LO`), `w` the panel's `2 kp` lines.
///
/// # Safety
/// AVX512_BF16; `out` as for [`store`].
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot<const R: usize, const LO: bool>(
    hi: &[u16],
    lo: &[u16],
    w: &[Line],
    kp: usize,
    out: *mut f32,
    ld: usize,
    valid: usize,
    accumulate: bool,
) {
    assert!(hi.len() >= R * 2 * kp && (!LO || lo.len() >= R * 2 * kp) && w.len() >= 2 * kp);
    let mut acc = [_mm512_setzero_ps(); 16];
    let (hp, lp, wp) = (hi.as_ptr().cast::<i32>(), lo.as_ptr().cast::<i32>(), w.as_ptr());
    for q in 0..kp {
        // SAFETY: pair q of the panel (2 kp lines) and of each of the R rows (kp lanes each).
        unsafe {
            let w0: __m512bh = std::mem::transmute(_mm512_load_si512(wp.add(2 * q).cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_load_si512(wp.add(2 * q + 1).cast()));
            for r in 0..R {
                let h: __m512bh = std::mem::transmute(_mm512_set1_epi32(hp.add(r * kp + q).read_unaligned()));
                acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], h, w0);
                acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], h, w1);
                if LO {
                    let l: __m512bh = std::mem::transmute(_mm512_set1_epi32(lp.add(r * kp + q).read_unaligned()));
                    acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], l, w0);
                    acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], l, w1);
                }
            }
        }
    }
    // SAFETY: the caller's.
    unsafe { store::<R>(&acc, out, ld, valid, accumulate) }
}

/// One strip by FMA: `x` the strip's `R` rows of `inner` f32, `w` the panel's lines.
///
/// # Safety
/// AVX-512F; `x` checked for `R x inner`; `out` as for [`store`].
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn fma<const R: usize>(
    x: Mat,
    inner: usize,
    w: &[Line],
    out: *mut f32,
    ld: usize,
    valid: usize,
    accumulate: bool,
) {
    let kp = inner.div_ceil(2);
    assert!(w.len() >= 2 * kp);
    let (xp, rs, wp) = (x.ptr(), x.rs(), w.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 16];
    let mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let full = inner / 2;
    for q in 0..kp {
        // SAFETY: pair q of the panel; elements 2q and (below inner) 2q + 1 of each row.
        unsafe {
            let w0 = _mm512_load_si512(wp.add(2 * q).cast());
            let w1 = _mm512_load_si512(wp.add(2 * q + 1).cast());
            let (e0, e1) =
                (_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)));
            if q < full {
                let (o0, o1) =
                    (_mm512_castsi512_ps(_mm512_and_si512(w0, mask)), _mm512_castsi512_ps(_mm512_and_si512(w1, mask)));
                for r in 0..R {
                    let (a, b) = (_mm512_set1_ps(*xp.add(r * rs + 2 * q)), _mm512_set1_ps(*xp.add(r * rs + 2 * q + 1)));
                    acc[2 * r] = _mm512_fmadd_ps(a, e0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(a, e1, acc[2 * r + 1]);
                    acc[2 * r] = _mm512_fmadd_ps(b, o0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(b, o1, acc[2 * r + 1]);
                }
            } else {
                for r in 0..R {
                    let a = _mm512_set1_ps(*xp.add(r * rs + 2 * q));
                    acc[2 * r] = _mm512_fmadd_ps(a, e0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(a, e1, acc[2 * r + 1]);
                }
            }
        }
    }
    // SAFETY: the caller's.
    unsafe { store::<R>(&acc, out, ld, valid, accumulate) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Odd sizes that cross panel, pair and strip borders in every dimension.
    const SIZES: [(usize, usize, usize); 6] =
        [(1, 1, 1), (17, 33, 31), (45, 70, 100), (300, 97, 65), (33, 260, 513), (9, 1024, 64)];

    /// Both products of a packed weight, for each kernel this CPU runs, against an f64 product:
    /// within 2^-16 of the sum of the terms' magnitudes for `Dot` (the operand split in two
    /// bf16s), 2^-8 for `DotBf16` (the operand rounded to one bf16, at most 2^-9 of each term),
    /// 2^-20 for `Fma` (f32 sums); accumulating and not; the columns past the product's
    /// untouched; the weight read back exactly; a weight with a value that is not a bf16 not packed.
    /// A kernel this CPU lacks is reported as skipped.
    #[test]
    fn pair_products_match_f64_for_every_kernel_this_cpu_runs() {
        for (kernel, tol) in [(PairKernel::Dot, 65536.0), (PairKernel::DotBf16, 256.0), (PairKernel::Fma, 1048576.0)] {
            if let Some(why) = kernel.unavailable() {
                let needs = if kernel == PairKernel::Fma { "avx512" } else { "avx512bf16" };
                crate::testhooks::skipped("model::pairs::tests", needs, &why);
                continue;
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let mut next = move || rng.random_range(-1.0f32..1.0);
            let bf16 = |v: f32| f32::from_bits(u32::from(bf16_split(v).0) << 16);
            for (m, n, k) in SIZES {
                let w: Vec<f32> = (0..n * k).map(|_| bf16(next())).collect();
                let p = Pairs::new(&w, n, k, kernel).expect("bf16 values are packed");
                assert_eq!(p.to_f32(), w, "{kernel:?} {m}x{n}x{k}: the weight read back");
                let mut off = w.clone();
                off[n * k / 2] = f32::from_bits(off[n * k / 2].to_bits() | 1);
                assert!(Pairs::new(&off, n, k, kernel).is_none(), "a value that is not a bf16 was packed");
                for backward in [false, true] {
                    let (cols, inner) = if backward { (k, n) } else { (n, k) };
                    let a: Vec<f32> = (0..m * inner).map(|_| next()).collect();
                    let wv = |i: usize, j: usize| if backward { w[i * k + j] } else { w[j * k + i] };
                    for accumulate in [false, true] {
                        let ld = cols + 3;
                        let init: Vec<f32> = (0..m * ld).map(|_| next()).collect();
                        let mut d = init.clone();
                        let am = Mat::rows(&a, inner);
                        if backward {
                            p.backward(m, am, &mut d, ld, accumulate)
                        } else {
                            p.forward(m, am, &mut d, ld, accumulate)
                        }
                        for r in 0..m {
                            for j in 0..cols {
                                let terms = (0..inner).map(|i| f64::from(a[r * inner + i]) * f64::from(wv(i, j)));
                                let (sum, mag) = terms.fold((0.0, 0.0), |(s, t), x| (s + x, t + x.abs()));
                                let want = if accumulate { f64::from(init[r * ld + j]) } else { 0.0 } + sum;
                                let got = f64::from(d[r * ld + j]);
                                assert!(
                                    (got - want).abs() <= mag / tol + 1e-6,
                                    "{kernel:?} backward {backward} {m}x{n}x{k} acc {accumulate} at ({r},{j}): {got} against {want}"
                                );
                            }
                            for j in cols..ld {
                                assert_eq!(d[r * ld + j], init[r * ld + j], "{kernel:?}: wrote past column {cols}");
                            }
                        }
                    }
                }
            }
        }
    }
}
