//! CPU numeric kernels the fused ops are built from: a strided single-precision matrix product
//! (the `gemm` crate, the one candle's own CPU matmul runs on) and a vectorized `exp`.
//!
//! `exp` is a Cephes-style range reduction and degree-6 polynomial (relative error below 3e-7, about two units in the last place,
//! over the range softmax and SiLU use), written as plain arithmetic so that, inlined into a
//! function compiled for AVX-512 or AVX2 (picked at run time), the loop runs 16 or 8 lanes wide.
//! libm's `expf` is scalar, and on long sequences the softmax's exponentials cost as much as a
//! matmul.

/// A matrix view: `ptr` to element (0, 0), `rs` / `cs` the strides (in elements) between rows
/// and between columns.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// A row-major matrix with `ld` elements per row, starting at `data[0]`.
    pub fn rows(data: &[f32], ld: usize) -> Self {
        Self { ptr: data.as_ptr(), rs: ld as isize, cs: 1 }
    }

    /// The transpose of a row-major matrix with `ld` elements per row.
    pub fn rows_t(data: &[f32], ld: usize) -> Self {
        Self { ptr: data.as_ptr(), rs: 1, cs: ld as isize }
    }
}

/// Who runs a product: the calling thread (callers that parallelize over independent tiles) or
/// all of rayon's threads (one large product).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    One,
    All,
}

/// `dst[m x n] (row-major, ld_dst per row) = (accumulate ? dst : 0) + scale * lhs[m x k] rhs[k x n]`.
///
/// Panics if `dst` is too short for `m` rows of `ld_dst`; `lhs` and `rhs` must be valid for the
/// shapes and strides given (the callers build them from slices they bounds-check).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ld_dst: usize,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    accumulate: bool,
    threads: Threads,
) {
    let parallelism = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    if m == 0 || n == 0 {
        return;
    }
    assert!(ld_dst >= n && dst.len() >= (m - 1) * ld_dst + n, "sgemm: destination too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ld_dst..r * ld_dst + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: dst is bounds-checked above; lhs and rhs are views the callers built over slices
    // holding m x k and k x n elements at the given strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld_dst as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` to within 3e-7 relative for x in [-87, 88]; 0 below (softmax weights that small are 0
/// in f32 anyway), saturating above.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds x log2(e) to the nearest integer n and leaves n in the low bits
    // of the sum: no float-to-int cast, whose saturating semantics would not vectorize.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor to r^6/720 on |r| <= ln2/2: truncation below 1.2e-7.
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n: n + 127 in the exponent field.
    let pow2n = f32::from_bits(t.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127) << 23);
    p * pow2n
}

/// Runs `$body` (an expression over the arguments) compiled for AVX-512 when the CPU has it,
/// for AVX2+FMA when it has that, and for the baseline otherwise.
macro_rules! vectorized {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn generic($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret { generic($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use vectorized;

vectorized! {
    /// `x[i] = e^(x[i] - shift)`, returning the sum of the results.
    pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        // 16 partial sums, so the loop vectorizes (a single float sum is a serial chain).
        let mut acc = [0f32; 16];
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            for i in 0..16 {
                c[i] = exp_approx(c[i] - shift);
                acc[i] += c[i];
            }
        }
        for v in chunks.into_remainder() {
            *v = exp_approx(*v - shift);
            acc[0] += *v;
        }
        acc.iter().sum()
    }
}

vectorized! {
    /// The largest of `init` and the elements of `x`.
    pub fn max_of(x: &[f32], init: f32) -> f32 {
        let mut acc = [init; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
                acc[i] = acc[i].max(c[i]);
            }
        }
        chunks.remainder().iter().chain(&acc).fold(init, |m, &v| m.max(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_within_3e7_relative() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_approx(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), exp_approx(-87.0));
        assert!(exp_approx(-200.0) < 1e-37);
    }

    #[test]
    fn exp_shifted_sum_matches_scalar() {
        let mut x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let want: Vec<f32> = x.iter().map(|v| (v - 3.0).exp()).collect();
        let sum = exp_shifted_sum(&mut x, 3.0);
        for (a, b) in x.iter().zip(&want) {
            assert!((a - b).abs() <= 3e-7 * b.abs(), "{a} vs {b}");
        }
        assert!((sum - want.iter().sum::<f32>()).abs() < 1e-4 * sum);
    }

    #[test]
    fn max_of_finds_the_largest() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 17) % 37) as f32 - 20.0).collect();
        assert_eq!(max_of(&x, f32::NEG_INFINITY), 16.0);
        assert_eq!(max_of(&x, 30.0), 30.0);
        assert_eq!(max_of(&[], -1.0), -1.0);
    }

    #[test]
    fn sgemm_strided_products() {
        // a [2x3], b [3x2]; c = a b; also a b^T-style views and accumulation.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let mut c = [0.0f32; 4];
        sgemm(2, 2, 3, &mut c, 2, Mat::rows(&a, 3), Mat::rows(&b, 2), 1.0, false, Threads::One);
        assert_eq!(c, [58.0, 64.0, 139.0, 154.0]);
        // a a^T, scaled by 0.5, added to c
        sgemm(2, 2, 3, &mut c, 2, Mat::rows(&a, 3), Mat::rows_t(&a, 3), 0.5, true, Threads::All);
        assert_eq!(c, [58.0 + 7.0, 64.0 + 16.0, 139.0 + 16.0, 154.0 + 38.5]);
    }
}
