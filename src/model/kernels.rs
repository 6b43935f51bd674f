//! CPU numeric kernels the fused ops are built from: a strided single-precision matrix product
//! (the `gemm` crate, the one candle's own CPU matmul runs on) and a vectorized `exp`.
//!
//! `exp` is a Cephes-style range reduction and degree-6 polynomial (relative error below 3e-7, about two units in the last place,
//! over the range softmax and SiLU use), written as plain arithmetic so that, inlined into a
//! function compiled for AVX-512 or AVX2 (picked at run time), the loop runs 16 or 8 lanes wide.
//! libm's `expf` is scalar, and on long sequences the softmax's exponentials cost as much as a
//! matmul.

pub use super::mat::Mat;
pub(crate) use super::mat::SendPtr;

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
    if m == 0 || n == 0 {
        return;
    }
    assert!(ld_dst >= n && dst.len() >= (m - 1) * ld_dst + n, "sgemm: destination too small");
    lhs.check(m, k, "sgemm: lhs");
    rhs.check(k, n, "sgemm: rhs");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ld_dst..r * ld_dst + n].fill(0.0);
            }
        }
        return;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if threads == Threads::All && super::amx::takes(m, n, k, lhs, rhs) {
        // SAFETY: dst, lhs and rhs are bounds-checked above; `takes` is true only where the CPU
        // has AMX and AVX-512 and this thread may use the tiles.
        unsafe { super::amx::product(m, n, k, dst.as_mut_ptr(), ld_dst, lhs, rhs, scale, accumulate) };
        return;
    }
    if through_transpose(m, n, k, rhs, threads) {
        // Into a column-major scratch (gemm then reads the weight as it lies instead of packing
        // it transposed), then transposed into place.
        let mut t = SCRATCH.with(std::cell::Cell::take);
        t.resize(t.len().max(m * n), 0.0);
        // SAFETY: t holds m x n elements, column-major (m contiguous); lhs and rhs are checked.
        unsafe { raw_gemm(m, n, k, t.as_mut_ptr(), 1, m as isize, false, lhs, rhs, scale, threads) };
        transpose_into(&t[..m * n], n, m, dst, ld_dst, accumulate);
        SCRATCH.with(|s| s.set(t));
        return;
    }
    let parts = column_parts(n, rhs, threads);
    if parts > 1 {
        // Each thread its own columns, so each packs only its own part of rhs.
        let per = n.div_ceil(parts).next_multiple_of(16);
        let out = SendPtr::new(dst);
        let (out, lhs, rhs) = (&out, &lhs, &rhs);
        rayon::scope(|s| {
            for j0 in (0..n).step_by(per) {
                s.spawn(move |_| {
                    let cols = per.min(n - j0);
                    let part = rhs.from(j0 * rhs.cs());
                    // SAFETY: columns j0..j0+cols of dst and of rhs (inside both, as checked
                    // above); the parts' columns are disjoint.
                    unsafe {
                        raw_gemm(
                            m,
                            cols,
                            k,
                            out.0.add(j0),
                            ld_dst as isize,
                            1,
                            accumulate,
                            *lhs,
                            part,
                            scale,
                            Threads::One,
                        )
                    }
                });
            }
        });
        return;
    }
    // SAFETY: dst, lhs (m x k) and rhs (k x n) are bounds-checked above.
    unsafe { raw_gemm(m, n, k, dst.as_mut_ptr(), ld_dst as isize, 1, accumulate, lhs, rhs, scale, threads) }
}

/// What carries [`sgemm`]'s large products on this thread now, for reports: `f32` (gemm), or
/// AMX's bf16x3 for the large forward products (the default where the CPU has AMX, outside
/// [`training`]) or for all (`RERANKD_AMX=all`). Products against packed frozen weights are
/// AMX's or bf16 pairs' whatever this says (`Qwen3::weights_kind`).
pub fn matmul_kind() -> &'static str {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    match super::amx::active() {
        super::amx::Mode::Large => return "amx-bf16x3",
        super::amx::Mode::All => return "amx-bf16x3-all",
        super::amx::Mode::Off => {}
    }
    "f32"
}

/// `f`, a training step's forward and backward, with [`sgemm`]'s products in f32: AMX's bf16x3
/// stays for scoring (see `amx::suspended` for why); `RERANKD_AMX=all` still sends them through
/// it. The products against packed frozen weights (`frozen::Frozen`) run on AMX here too: they
/// pack nothing of the weight per call, which is what bf16x3 lost on.
pub fn training<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    return super::amx::suspended(f);
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    f()
}

/// Into how many column blocks, one per thread, [`sgemm`] splits a product against a transposed
/// weight itself rather than leave the threads to gemm: at 1024 columns gemm's own split ran
/// 3-26% slower than one block per thread, each packing only its own part of the weight (5
/// shapes of a layer's projections, 1024-2048 rows, two rounds). Wider products (2048+ columns)
/// gemm splits as well as this does, and a weight used as it lies (the backward's `g w`) gained
/// 0-5%, within the noise.
fn column_parts(n: usize, rhs: Mat, threads: Threads) -> usize {
    let t = if threads == Threads::All { rayon::current_num_threads() } else { 1 };
    if t > 1 && rhs.is_transposed() && n >= 256 * t && n <= 1024 { t } else { 1 }
}

thread_local! {
    /// [`sgemm`]'s column-major scratch for products against a transposed weight; kept per
    /// thread (at most `m x n` of the largest such product, with `4 m <= k`).
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Whether `lhs [m x k] rhs [k x n]` runs as `(rhs^T lhs^T)^T` through a scratch buffer: for a
/// transposed right-hand side (a weight `w [n x k]` used as `x w^T`, as every projection's
/// forward is) with few rows. gemm packs such a weight transposed, which at 256 rows cost more
/// than the product (80-150 GFLOP/s, against 130-195 this way, the two alternating on the Xeon
/// docs/performance.md's numbers come from); with `m` small against `k` the transposed result is the
/// smaller thing to move. At 8 rows (the last layer's, one per sequence) this way is 2.5-4x
/// faster; at 1 row the two are even (gemm has a vector path).
fn through_transpose(m: usize, n: usize, k: usize, rhs: Mat, threads: Threads) -> bool {
    threads == Threads::All && rhs.is_transposed() && m >= 2 && 4 * m <= k && n >= 64
}

/// gemm's call: `dst (rows rs_dst apart, columns cs_dst) = (accumulate ? dst : 0) + scale lhs rhs`.
///
/// # Safety
/// `dst` must be valid for writes of `m x n` at its strides, and no other reference may alias
/// those elements; `lhs` ([`Mat::check`]ed for `m x k`) and `rhs` (for `k x n`) must lie inside
/// their slices.
#[allow(clippy::too_many_arguments)]
unsafe fn raw_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    rs_dst: isize,
    cs_dst: isize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    threads: Threads,
) {
    let parallelism = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            cs_dst,
            rs_dst,
            accumulate,
            lhs.ptr(),
            lhs.cs() as isize,
            lhs.rs() as isize,
            rhs.ptr(),
            rhs.cs() as isize,
            rhs.rs() as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `dst[j][i] = src[i][j]` (or `+=` with `add`) for `src [rows x cols]` row-major and `dst`
/// `[cols x rows]` with `ld_dst` elements per row; in 64 x 64 tiles, bands of `dst` rows in
/// parallel.
pub fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32], ld_dst: usize, add: bool) {
    use rayon::prelude::*;
    const TILE: usize = 64;
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(src.len() >= rows * cols, "transpose: source too small");
    assert!(ld_dst >= rows && dst.len() >= (cols - 1) * ld_dst + rows, "transpose: destination too small");
    dst[..(cols - 1) * ld_dst + rows].par_chunks_mut(TILE * ld_dst).enumerate().for_each(|(b, band)| {
        let j0 = b * TILE;
        let nc = TILE.min(cols - j0);
        for i0 in (0..rows).step_by(TILE) {
            let nr = TILE.min(rows - i0);
            // SAFETY: the tile reads src rows i0..i0+nr, columns j0..j0+nc (inside rows x cols)
            // and writes band rows 0..nc, columns i0..i0+nr (inside the band: its last row
            // holds at least `rows` elements).
            unsafe {
                transpose_tile(src.as_ptr().add(i0 * cols + j0), cols, band.as_mut_ptr().add(i0), ld_dst, nr, nc, add)
            }
        }
    });
}

/// One tile of [`transpose_into`]: 8 x 8 blocks in AVX registers where the CPU has AVX.
///
/// # Safety
/// `src` valid for `nr` rows of `ls` (reading `nc` of each), `dst` for `nc` rows of `ld` (`nr`
/// of each).
unsafe fn transpose_tile(src: *const f32, ls: usize, dst: *mut f32, ld: usize, nr: usize, nc: usize, add: bool) {
    let (mut nr8, mut nc8) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx") {
        (nr8, nc8) = (nr / 8 * 8, nc / 8 * 8);
        // SAFETY: the CPU has AVX; the blocks lie inside the tile.
        unsafe { transpose_blocks_avx(src, ls, dst, ld, nr8, nc8, add) };
    }
    // The edges (all of it without AVX).
    for i in 0..nr {
        let j_from = if i < nr8 { nc8 } else { 0 };
        for j in j_from..nc {
            // SAFETY: inside the tile.
            unsafe {
                let (s, d) = (*src.add(i * ls + j), dst.add(j * ld + i));
                *d = if add { *d + s } else { s };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_blocks_avx(
    src: *const f32,
    ls: usize,
    dst: *mut f32,
    ld: usize,
    nr8: usize,
    nc8: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    for i in (0..nr8).step_by(8) {
        for j in (0..nc8).step_by(8) {
            // SAFETY: rows i..i+8, columns j..j+8 of the tile (the caller's contract).
            unsafe {
                let s = src.add(i * ls + j);
                let r: [__m256; 8] = std::array::from_fn(|q| _mm256_loadu_ps(s.add(q * ls)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u = [
                    _mm256_shuffle_ps::<0x44>(t0, t2),
                    _mm256_shuffle_ps::<0xEE>(t0, t2),
                    _mm256_shuffle_ps::<0x44>(t1, t3),
                    _mm256_shuffle_ps::<0xEE>(t1, t3),
                    _mm256_shuffle_ps::<0x44>(t4, t6),
                    _mm256_shuffle_ps::<0xEE>(t4, t6),
                    _mm256_shuffle_ps::<0x44>(t5, t7),
                    _mm256_shuffle_ps::<0xEE>(t5, t7),
                ];
                let d = dst.add(j * ld + i);
                for q in 0..4 {
                    let lo = _mm256_permute2f128_ps::<0x20>(u[q], u[q + 4]);
                    let hi = _mm256_permute2f128_ps::<0x31>(u[q], u[q + 4]);
                    let (dlo, dhi) = (d.add(q * ld), d.add((q + 4) * ld));
                    if add {
                        _mm256_storeu_ps(dlo, _mm256_add_ps(_mm256_loadu_ps(dlo), lo));
                        _mm256_storeu_ps(dhi, _mm256_add_ps(_mm256_loadu_ps(dhi), hi));
                    } else {
                        _mm256_storeu_ps(dlo, lo);
                        _mm256_storeu_ps(dhi, hi);
                    }
                }
            }
        }
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
    fn transpose_into_matches_naive_at_odd_sizes() {
        for (rows, cols, ld) in [(67, 45, 70), (8, 8, 8), (130, 3, 131), (1, 17, 1), (64, 129, 64)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 7.0).collect();
            let base: Vec<f32> = (0..(cols - 1) * ld + rows).map(|i| (i % 13) as f32).collect();
            for add in [false, true] {
                let mut dst = base.clone();
                transpose_into(&src, rows, cols, &mut dst, ld, add);
                for j in 0..cols {
                    for i in 0..ld.min(dst.len() - j * ld) {
                        let want = if i >= rows {
                            base[j * ld + i]
                        } else if add {
                            base[j * ld + i] + src[i * cols + j]
                        } else {
                            src[i * cols + j]
                        };
                        assert_eq!(dst[j * ld + i], want, "{rows}x{cols} ld {ld} add {add} at ({j}, {i})");
                    }
                }
            }
        }
    }

    #[test]
    fn sgemm_split_and_transposed_paths_match_the_direct_product() {
        // x [m, k] w^T with w [n, k]: few rows against a long inner dimension take the
        // scratch-and-transpose path, 512-1024 columns the column split; x w with w [k, n] goes
        // to gemm's threads as it is. The direct path (one thread) is the reference.
        for (m, n, k, transposed) in [(19, 70, 96, true), (3, 70, 96, true), (40, 600, 32, true), (40, 600, 32, false)]
        {
            let t = Threads::All;
            let probe = if transposed { Mat::rows_t(&[], k) } else { Mat::rows(&[], n) };
            let split = through_transpose(m, n, k, probe, t) || column_parts(n, probe, t) > 1;
            assert_eq!(split, transposed && rayon::current_num_threads() > 1 || 4 * m <= k, "{m}x{n}x{k}");
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let rhs = if transposed { Mat::rows_t(&w, k) } else { Mat::rows(&w, n) };
            let ld = n + 3;
            let start: Vec<f32> = (0..m * ld).map(|i| (i % 7) as f32).collect();
            for accumulate in [false, true] {
                let (mut want, mut got) = (start.clone(), start.clone());
                sgemm(m, n, k, &mut want, ld, Mat::rows(&x, k), rhs, 0.5, accumulate, Threads::One);
                sgemm(m, n, k, &mut got, ld, Mat::rows(&x, k), rhs, 0.5, accumulate, t);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{m}x{n}x{k} accumulate {accumulate} at {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Every safe entry point refuses a shape its slices cannot hold: a clean panic naming the
    /// operand, never a read or write past a buffer.
    #[test]
    fn too_short_operands_panic_cleanly_and_never_read_past_them() {
        let caught = |what: &str, f: &mut dyn FnMut()| {
            let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err(what);
            let msg = err.downcast_ref::<String>().cloned().or(err.downcast_ref::<&str>().map(|s| s.to_string()));
            let msg = msg.unwrap_or_default();
            assert!(msg.contains(what), "{what}: {msg}");
        };
        let (a, b) = (vec![1.0f32; 12], vec![1.0f32; 12]);
        let mut d = vec![0.0f32; 16];
        for t in [Threads::One, Threads::All] {
            caught("lhs", &mut || sgemm(4, 4, 4, &mut d, 4, Mat::rows(&a, 4), Mat::rows(&b, 3), 1.0, false, t));
            caught("rhs", &mut || sgemm(3, 4, 4, &mut d, 4, Mat::rows(&a, 4), Mat::rows(&b, 4), 1.0, false, t));
            caught("rhs", &mut || sgemm(3, 4, 4, &mut d, 4, Mat::rows(&a, 4), Mat::rows_t(&b, 4), 1.0, false, t));
            caught("lhs", &mut || sgemm(4, 4, 4, &mut d, 4, Mat::rows(&[0.0], 4), Mat::rows(&b, 3), 1.0, false, t));
            caught("destination", &mut || {
                sgemm(3, 4, 3, &mut d[..10], 4, Mat::rows(&a, 3), Mat::rows(&b, 4), 1.0, false, t)
            });
        }
        // Strides whose product overflows are refused, not wrapped around.
        caught("lhs", &mut || {
            sgemm(3, 1, 1, &mut d, 1, Mat::rows(&a, usize::MAX / 2 + 1), Mat::rows(&b, 1), 1.0, false, Threads::One)
        });
        caught("source", &mut || transpose_into(&a, 4, 4, &mut d, 4, false));
        caught("destination", &mut || transpose_into(&a, 3, 4, &mut d[..12], 4, false));
        // What fits is fine, the last element exactly at the end included.
        sgemm(3, 3, 4, &mut d, 3, Mat::rows(&a, 4), Mat::rows(&b, 3).from(0), 1.0, false, Threads::One);
        assert_eq!(&d[..9], &[4.0; 9]);
        Mat::rows(&a, 4).check(3, 4, "exact");
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
