//! `cargo bench --bench amx [-- ROWS...]`: a probe of whether Intel AMX could carry the f32
//! projections, measured beside the matmul rerankd runs today. Not used by rerankd itself.
//!
//! AMX multiplies bf16 tiles into f32 sums. A bf16 keeps 8 bits of an f32's 24-bit significand, so
//! each f32 operand is split as `hi + lo` (two bf16) and the product taken as
//! `hi·hi + lo·hi + hi·lo` ("bf16x3": three AMX products, 16 bits of each operand, the f32 sums
//! AMX keeps). The probe prints, as JSON lines:
//! - the `tdpbf16ps` rate of one core with the operands in tile registers (the unit's ceiling),
//!   and with the kernel's loads (four 1 KB tile loads per four products) from an L1-hot buffer
//!   (the kernel's ceiling). Every tile buffer starts on a 64-byte line: a tile row that straddles
//!   two lines loads about 3x slower, which an unaligned `vec!` buffer makes happen by chance;
//! - for each projection shape of a Qwen3-0.6B layer (`x [rows, in] @ w[out, in]^T`, the weight as
//!   the checkpoint lays it out), rounds alternating between `kernels::sgemm` in f32 (what the
//!   fused ops call, all threads) and a plain AMX kernel (32 x 32 blocks of four accumulator tiles,
//!   all threads, the activation's split and packing timed with it; the weight's packing, done once
//!   per model in a real design, reported on its own): medians, GFLOP/s counted as f32 work, and
//!   each one's largest error against an f64 product over a sample of entries.
//!
//! Needs x86_64 Linux with AMX (`amx-bf16`, `amx-tile`) and a kernel that grants the tile state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); anywhere else it says so and stops.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() {
    let rows: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rows = if rows.is_empty() { vec![256, 2048] } else { rows };
    if let Err(why) = amx::enable() {
        println!("{{\"amx\":false,\"why\":\"{why}\"}}");
        return;
    }
    let (registers, with_loads) = amx::peak_one_core();
    println!(
        "{{\"amx\":true,\"one_core_bf16_gflops\":{{\"tiles_in_registers\":{registers:.0},\"with_l1_tile_loads\":{with_loads:.0}}}}}"
    );
    // q (k and v are half of it), gate|up, down, o.
    for m in rows {
        for (name, n, k) in [("q", 2048, 1024), ("gate_up", 6144, 1024), ("down", 1024, 3072), ("o", 1024, 2048)] {
            amx::compare(name, m, n, k);
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    println!("{{\"amx\":false,\"why\":\"the probe is for x86_64 Linux\"}}");
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use std::arch::asm;
    use std::time::Instant;

    use rayon::prelude::*;
    use rerankd::model::kernels::{Mat, Threads, sgemm};

    /// Activation rows one pass of a thread's weight columns covers (256 rows of k = 1024: 1 MB of
    /// packed hi and lo, inside a 2 MB L2).
    const ROWS_PER_PASS: usize = 256;

    /// bf16 elements of one tile: 16 rows of 64 bytes.
    const TILE: usize = 512;

    /// CPUID says AMX-BF16 and AMX-TILE, and the kernel lets this process use the tile state.
    pub fn enable() -> Result<(), String> {
        let l7 = std::arch::x86_64::__cpuid_count(7, 0);
        if l7.edx & (1 << 22) == 0 || l7.edx & (1 << 24) == 0 {
            return Err("this CPU has no AMX-BF16".into());
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only asks for a permission.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        if r != 0 {
            return Err(format!("the kernel refused the AMX tile state: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Palette 1, the eight tiles all 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    fn configure() {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
        }
        let cfg = TileConfig(c);
        // SAFETY: a valid palette-1 configuration; AMX was enabled for this process.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr()) };
    }

    fn release() {
        // SAFETY: drops this thread's tile state.
        unsafe { asm!("tilerelease") };
    }

    /// A zeroed buffer of `len` u16 or f32 that starts on a 64-byte line: a tile row (64 bytes) that
    /// straddles two lines loads about 3x slower, and `vec!` gives no such alignment.
    struct Lines<T> {
        lines: Vec<Line>,
        len: usize,
        _t: std::marker::PhantomData<T>,
    }

    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u8; 64]);

    /// Element types whose all-zero bytes are a valid value.
    trait Zeroable: Copy {}
    impl Zeroable for u16 {}
    impl Zeroable for f32 {}

    impl<T: Zeroable> Lines<T> {
        fn zeroed(len: usize) -> Self {
            let lines = vec![Line([0; 64]); (len * size_of::<T>()).div_ceil(64)];
            Self { lines, len, _t: std::marker::PhantomData }
        }
    }

    impl<T: Zeroable> std::ops::Deref for Lines<T> {
        type Target = [T];
        fn deref(&self) -> &[T] {
            // SAFETY: `len` elements fit in the lines, which are aligned for T and hold valid values.
            unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
        }
    }

    impl<T: Zeroable> std::ops::DerefMut for Lines<T> {
        fn deref_mut(&mut self) -> &mut [T] {
            // SAFETY: as for `deref`, borrowed mutably.
            unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
        }
    }

    /// `x` rounded to the nearest bf16 (ties to even), and the bf16 nearest to what is left.
    /// Finite values only, so no NaN branch. `half::bf16::from_f32` (a dependency already) gives the
    /// same bits, but with it the probe's speedups, which time the activation's packing, came out
    /// 14-26% lower against this in alternating runs.
    fn split(x: f32) -> (u16, u16) {
        fn round(v: f32) -> u16 {
            let b = v.to_bits();
            ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
        }
        let hi = round(x);
        (hi, round(x - f32::from_bits(u32::from(hi) << 16)))
    }

    /// `src [rows, k]` split into bf16 `hi` and `lo`, in panels of 16 rows: `[rows/16][hi, lo][k/32]`
    /// tiles of 512, the element at (row `r` of the panel, `kk`) placed at `at(r, kk % 32)`.
    fn pack(src: &[f32], rows: usize, k: usize, at: impl Fn(usize, usize) -> usize + Sync) -> Lines<u16> {
        let kt = k / 32;
        let mut p = Lines::zeroed(rows * k * 2);
        p.par_chunks_mut(2 * kt * TILE).enumerate().for_each(|(pb, panel)| {
            for r in 0..16 {
                for (kk, &v) in src[(pb * 16 + r) * k..][..k].iter().enumerate() {
                    let (h, l) = split(v);
                    let i = (kk / 32) * TILE + at(r, kk % 32);
                    panel[i] = h;
                    panel[kt * TILE + i] = l;
                }
            }
        });
        p
    }

    /// The activation `x [m, k]` as A tiles: a tile is 16 rows of 32 consecutive k.
    fn pack_rows(x: &[f32], m: usize, k: usize) -> Lines<u16> {
        pack(x, m, k, |r, kk| r * 32 + kk)
    }

    /// The weight `w [n, k]`, used as `w^T`, as B tiles: a tile row holds 16 columns' pairs of
    /// consecutive k (`[16 pairs][16 columns][2]`).
    fn pack_weight(w: &[f32], n: usize, k: usize) -> Lines<u16> {
        pack(w, n, k, |c, kk| (kk / 2) * 32 + c * 2 + kk % 2)
    }

    /// The kernel's step: four 1 KB tile loads (two 16-row A tiles, two B tiles) and the four
    /// products into the accumulators `tmm0`-`tmm3` they feed.
    ///
    /// # Safety
    /// Tiles configured on this thread; each pointer has a whole tile (64-byte rows) behind it.
    #[inline(always)]
    unsafe fn step(a0: *const u16, a1: *const u16, b0: *const u16, b1: *const u16) {
        // SAFETY: the caller's.
        unsafe {
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                s = in(reg) 64usize,
            );
        }
    }

    /// `c[32 x 32]` at row block `mb` (16 rows each) and column block `nb`: the three products over
    /// the whole of k in four accumulator tiles.
    ///
    /// # Safety
    /// Tiles configured on this thread; `a`, `b` packed for `k`; the block inside `c` (`ldc` wide).
    unsafe fn block(a: &[u16], b: &[u16], c: *mut f32, ldc: usize, mb: usize, nb: usize, kt: usize) {
        let panel = 2 * kt * TILE;
        assert!(a.len() >= (mb + 2) * panel && b.len() >= (nb + 2) * panel);
        let (a0, a1) = (a[mb * panel..].as_ptr(), a[(mb + 1) * panel..].as_ptr());
        let (b0, b1) = (b[nb * panel..].as_ptr(), b[(nb + 1) * panel..].as_ptr());
        // SAFETY: every pointer below stays inside the panels asserted above, or inside `c`.
        unsafe {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3");
            for (ao, bo) in [(0, 0), (kt * TILE, 0), (0, kt * TILE)] {
                for t in 0..kt {
                    let o = t * TILE;
                    step(a0.add(ao + o), a1.add(ao + o), b0.add(bo + o), b1.add(bo + o));
                }
            }
            let cp = c.add(mb * 16 * ldc + nb * 16);
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) cp,
                c1 = in(reg) cp.add(16),
                c2 = in(reg) cp.add(16 * ldc),
                c3 = in(reg) cp.add(16 * ldc + 16),
                s = in(reg) ldc * 4,
            );
        }
    }

    struct Out(*mut f32);
    // SAFETY: the threads write disjoint column blocks.
    unsafe impl Sync for Out {}

    /// `c [m, n] = x w^T` in bf16x3, `m`, `n` multiples of 32, `k` of 32; `wp` from `pack_weight`.
    fn product(x: &[f32], wp: &[u16], c: &mut [f32], m: usize, n: usize, k: usize) {
        let ap = pack_rows(x, m, k);
        let out = Out(c.as_mut_ptr());
        let threads = rayon::current_num_threads();
        let blocks = n / 32;
        (0..threads).into_par_iter().for_each(|t| {
            let out = &out;
            configure();
            // Row blocks of ROWS_PER_PASS at a time, so the activation's tiles stay in L2 while the
            // thread's weight columns pass over them.
            for first in (0..m / 32).step_by(ROWS_PER_PASS / 32) {
                for nb in blocks * t / threads..blocks * (t + 1) / threads {
                    for mb in first..(first + ROWS_PER_PASS / 32).min(m / 32) {
                        // SAFETY: configured above; packed for k; the block is inside `c`.
                        unsafe { block(&ap, wp, out.0, n, 2 * mb, 2 * nb, k / 32) };
                    }
                }
            }
            release();
        });
    }

    /// `tdpbf16ps` GFLOP/s of one core: with its operands in tile registers, then with the
    /// kernel's four tile loads per four products, from a 4 KB buffer that stays in L1.
    pub fn peak_one_core() -> (f64, f64) {
        let buf = Lines::<u16>::zeroed(4 * TILE);
        let p = buf.as_ptr();
        let reps = 1_000_000u64;
        let flop = (reps * 4 * 16 * 16 * 32 * 2) as f64;
        configure();
        let t0 = Instant::now();
        // SAFETY: tiles configured; every load reads inside `buf`.
        unsafe {
            asm!(
                "tileloadd tmm4, [{b} + {s}*1]",
                "tileloadd tmm5, [{b} + {s}*1]",
                "tileloadd tmm6, [{b} + {s}*1]",
                "tileloadd tmm7, [{b} + {s}*1]",
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                b = in(reg) p,
                s = in(reg) 64usize,
            );
            for _ in 0..reps {
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7"
                );
            }
        }
        let registers = flop / t0.elapsed().as_secs_f64() / 1e9;
        let t0 = Instant::now();
        // SAFETY: as above.
        unsafe {
            for _ in 0..reps {
                step(p, p.add(TILE), p.add(2 * TILE), p.add(3 * TILE));
            }
        }
        let with_loads = flop / t0.elapsed().as_secs_f64() / 1e9;
        release();
        (registers, with_loads)
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Largest `|c - x w^T|` against f64 over a sample of entries.
    fn error(c: &[f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> f64 {
        let mut worst = 0f64;
        for i in (0..m).step_by(7) {
            for j in (0..n).step_by(13) {
                let exact: f64 = (0..k).map(|kk| f64::from(x[i * k + kk]) * f64::from(w[j * k + kk])).sum();
                worst = worst.max((f64::from(c[i * n + j]) - exact).abs());
            }
        }
        worst
    }

    pub fn compare(name: &str, m: usize, n: usize, k: usize) {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| next() * 0.05).collect();
        let t0 = Instant::now();
        let wp = pack_weight(&w, n, k);
        let pack_w = t0.elapsed().as_secs_f64();
        let (mut c32, mut c3) = (vec![0f32; m * n], Lines::<f32>::zeroed(m * n));
        let (mut f32_s, mut amx_s) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            sgemm(m, n, k, &mut c32, n, Mat::rows(&x, k), Mat::rows_t(&w, k), 1.0, false, Threads::All);
            f32_s.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            product(&x, &wp, &mut c3, m, n, k);
            amx_s.push(t.elapsed().as_secs_f64());
        }
        let (f, a) = (median(f32_s), median(amx_s));
        let flop = 2.0 * (m * n * k) as f64;
        println!(
            "{{\"proj\":\"{name}\",\"m\":{m},\"n\":{n},\"k\":{k},\"f32_ms\":{:.2},\"bf16x3_ms\":{:.2},\"f32_gflops\":{:.0},\"bf16x3_gflops\":{:.0},\"speedup\":{:.2},\"weight_pack_ms\":{:.1},\"f32_max_err\":{:.2e},\"bf16x3_max_err\":{:.2e}}}",
            f * 1e3,
            a * 1e3,
            flop / f / 1e9,
            flop / a / 1e9,
            f / a,
            pack_w * 1e3,
            error(&c32, &x, &w, m, n, k),
            error(&c3, &x, &w, m, n, k),
        );
    }
}
