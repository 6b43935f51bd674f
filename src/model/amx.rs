//! Intel AMX: the products against frozen weights packed once ([`Packed`], what
//! `super::frozen::Frozen` holds for a bf16 checkpoint), and [`super::kernels::sgemm`]'s other
//! large products as "bf16x3".
//!
//! AMX multiplies tiles of bf16 into f32 sums. A bf16 keeps 8 bits of an f32's 24-bit
//! significand, so an f32 operand is split as `hi + lo` (two bf16, 16 bits of the value).
//! - Against a [`Packed`] weight, whose values are bf16s already (`lo` zero), a product is
//!   `hi·w + lo·w`: two tile products, the weight exact, only the other operand packed per call.
//! - bf16x3, for two f32 operands: `hi·hi + lo·hi + hi·lo`, three tile products, both operands
//!   packed per call.
//!
//! What is dropped is `lo·lo` (bf16x3) and the bits past the 16th of a split operand: a relative
//! error near 2^-16 per term, a few times f32's on the layer's products (measured by
//! `cargo bench --bench amx`).
//!
//! Tiles: the activation as rows of 32 consecutive k, the other operand as pairs of consecutive k
//! for 16 columns, zero-padded to whole tiles; the threads split the output's columns, 32 x 32
//! blocks of four accumulator tiles, 256 rows of the activation at a time so they stay in L2
//! while the thread's columns pass over them.
//!
//! Where: [`Packed`] weights whenever AMX is on ([`mode`] not `Off`); bf16x3 where [`takes`] says
//! (by default the forward's large products, `x w^T` with 1024 rows or more; `RERANKD_AMX=all`
//! every product of a layout it takes, whatever its size, as CI runs the fixture tests;
//! `RERANKD_AMX=off` none), and only where the CPU has AMX-BF16 and AVX-512 and Linux grants the
//! tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); anywhere else weights stay f32 and sgemm in
//! f32. Measurements: docs/performance.md.

use std::arch::asm;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use rayon::prelude::*;

use super::mat::bf16_split as split;
use super::mat::{Mat, PackedWeight, SendPtr};

/// bf16 elements of one tile: 16 rows of 64 bytes.
const TILE: usize = 512;

/// Activation rows one pass of a thread's columns covers (256 rows of k = 1024: 1 MB of packed hi
/// and lo, inside a 2 MB L2).
const ROWS_PER_PASS: usize = 256;

/// Whether products go through AMX: never (`RERANKD_AMX=off`), the large forward ones (the
/// default), or every one it takes (`RERANKD_AMX=all`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Off = 0,
    Large,
    All,
}

/// The mode this process runs in: what `RERANKD_AMX` asks for (or [`set_mode`] since), `Off` where
/// the CPU or the kernel cannot.
pub fn mode() -> Mode {
    match CHOSEN.load(Ordering::Relaxed) {
        0 => Mode::Off,
        1 => Mode::Large,
        2 => Mode::All,
        _ => {
            let asked = match std::env::var("RERANKD_AMX").as_deref() {
                Ok("off" | "0") => Mode::Off,
                Ok("all") => Mode::All,
                _ => Mode::Large,
            };
            // AMX only where it is the path chosen for this process (`RERANKD_KERNEL`).
            set_mode(if super::cpu::chosen() == super::cpu::Kernel::Amx { asked } else { Mode::Off })
        }
    }
}

/// Asks for `mode` (a benchmark's alternating rounds); returns what was granted, `Off` where AMX
/// cannot be used.
pub fn set_mode(mode: Mode) -> Mode {
    let granted = if unusable().is_none() { mode } else { Mode::Off };
    CHOSEN.store(granted as u8, Ordering::Relaxed);
    granted
}

/// Why this process cannot use AMX, if it cannot (`cpu::amx_unusable`).
pub fn unusable() -> Option<&'static str> {
    super::cpu::amx_unusable()
}

/// The chosen mode as a `Mode` discriminant; `u8::MAX` before the first call.
static CHOSEN: AtomicU8 = AtomicU8::new(u8::MAX);

/// Whether [`product`] takes `lhs [m x k] rhs [k x n]`. Its layouts: rows of `lhs` contiguous,
/// `rhs` either a transposed weight (`w [n x k]` as `x w^T`, every projection's forward) or
/// row-major (the backward's `g w`). By default (`Large`) only the forward's layout with at least
/// 1024 rows, where it was measured to pay: scoring 8 x 256 and 1 x 1024 and 20 documents took
/// 17-34% less time with it, in two alternating rounds, while a training step at 256 rows took
/// 23-31% more (both operands are packed per call, which few rows do not repay) and at 1024 rows,
/// with the backward's products through it too, 6% more.
pub fn takes(m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat) -> bool {
    let layout = lhs.cs() == 1 && (rhs.rs() == 1 || rhs.cs() == 1);
    layout
        && match active() {
            Mode::Off => false,
            Mode::All => true,
            Mode::Large => rhs.is_transposed() && m >= 1024 && n >= 256 && k >= 256,
        }
}

/// The mode for the products this thread asks for now: [`mode`], with `Large` off inside
/// [`suspended`].
pub fn active() -> Mode {
    match mode() {
        Mode::Large if SUSPENDED.with(std::cell::Cell::get) => Mode::Off,
        m => m,
    }
}

/// `f` with AMX's default use suspended for the products this thread asks for (a training step:
/// `RERANKD_AMX=all` still takes them). A training step with its forward's products through AMX
/// took 2-10% longer than in f32 over four alternating rounds at 1 x 1024 (its backward, in f32
/// either way, slower after them), while scoring forwards took 4-45% less time.
pub fn suspended<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SUSPENDED.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SUSPENDED.with(|s| s.replace(true)));
    f()
}

thread_local! {
    /// Whether [`suspended`] is running on this thread.
    static SUSPENDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A zeroed run of 64-byte lines (a tile row across two lines loads about 3x slower, and `vec!`
/// gives no such alignment), viewed as `len` u16.
struct Lines {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

thread_local! {
    /// The thread's buffer for activations' tiles ([`Lines::kept`]): as large as the largest
    /// product this thread has asked for (25 MB at 2048 rows of k = 3072).
    static KEPT: std::cell::Cell<Lines> = const { std::cell::Cell::new(Lines { lines: Vec::new(), len: 0 }) };
}

impl Lines {
    fn zeroed(len: usize) -> Self {
        Self { lines: vec![Line([0; 64]); (2 * len).div_ceil(64)], len }
    }

    /// `len` u16 of the calling thread's kept buffer for an activation's tiles (grown, zeroed,
    /// when too small; its old contents otherwise, which the packers overwrite), to hand back
    /// with [`Lines::keep`]. Kept rather than allocated per product: per-product buffers of up
    /// to 25 MB, freed between the activations a training step keeps, left holes in glibc's heap
    /// that raised a 1 x 2048 step's peak by 0.8 GB. A call made while the thread's buffer is
    /// out (a product inside a product's threads) gets a fresh one.
    fn kept(len: usize) -> Self {
        let mut l = KEPT.with(|k| k.replace(Lines { lines: Vec::new(), len: 0 }));
        if l.lines.len() * 32 < len {
            l = Self::zeroed(len);
        }
        l.len = len;
        l
    }

    /// Hands a buffer from [`Lines::kept`] back to the thread.
    fn keep(self) {
        KEPT.with(|k| k.set(self));
    }

    fn as_slice(&self) -> &[u16] {
        // SAFETY: `len` u16 fit in the lines, which are aligned for u16, and any bits are a u16.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u16] {
        // SAFETY: as for `as_slice`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// 32 values from `src` (zero past its end) split into `hi` and `lo`: fixed-size arrays, so that
/// the loop runs 16 lanes wide.
#[inline(always)]
fn split32(src: &[f32]) -> ([u16; 32], [u16; 32]) {
    let mut v = [0f32; 32];
    v[..src.len().min(32)].copy_from_slice(&src[..src.len().min(32)]);
    let (mut hi, mut lo) = ([0u16; 32], [0u16; 32]);
    for i in 0..32 {
        (hi[i], lo[i]) = split(v[i]);
    }
    (hi, lo)
}

/// One 16-row panel of `lhs` (rows `r0..r0 + 16`, those past `m` zero) as A tiles: `[hi, lo][kt]`
/// tiles of 16 rows of 32 consecutive k, past `k` zero.
///
/// # Safety
/// AVX-512 available on this CPU (the rows are read through `lhs`'s slice, bounds-checked).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_rows_panel(panel: &mut [u16], lhs: Mat, m: usize, k: usize, r0: usize, kt: usize) {
    let (hi, lo) = panel.split_at_mut(kt * TILE);
    for r in 0..16 {
        // A row below m has its k elements inside lhs (checked by `line`).
        let src = if r0 + r < m { lhs.line((r0 + r) * lhs.rs(), k) } else { &[] };
        for t in 0..kt {
            let (h, l) = split32(src.get(t * 32..).unwrap_or(&[]));
            hi[t * TILE + r * 32..][..32].copy_from_slice(&h);
            lo[t * TILE + r * 32..][..32].copy_from_slice(&l);
        }
    }
}

/// One 16-column panel (columns `c0..c0 + 16`, those past `n` zero) of `rhs [k x n]` as B tiles:
/// `[hi, lo][kt]` tiles whose row `p` holds the pairs (k = 2p, 2p + 1) of the 16 columns.
///
/// # Safety
/// AVX-512 available on this CPU (`rhs` is read through its slice, bounds-checked; its rows or
/// its columns contiguous).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_cols_panel(panel: &mut [u16], rhs: Mat, n: usize, k: usize, c0: usize, kt: usize) {
    let (hi, lo) = panel.split_at_mut(kt * TILE);
    let cols = n.saturating_sub(c0).min(16);
    if rhs.rs() == 1 {
        // A transposed weight: column c is the weight's row, k contiguous. Each column's 32 k
        // split, as 16 pairs, then the 16 x 16 pairs transposed into the tile.
        let src: [&[f32]; 16] = std::array::from_fn(|c| {
            // A column below n has its k elements contiguous (checked by `line`).
            if c < cols { rhs.line((c0 + c) * rhs.cs(), k) } else { &[] }
        });
        for t in 0..kt {
            let (mut h, mut l) = ([[0u32; 16]; 16], [[0u32; 16]; 16]);
            for c in 0..16 {
                let (hc, lc) = split32(src[c].get(t * 32..).unwrap_or(&[]));
                for p in 0..16 {
                    h[p][c] = u32::from(hc[2 * p]) | u32::from(hc[2 * p + 1]) << 16;
                    l[p][c] = u32::from(lc[2 * p]) | u32::from(lc[2 * p + 1]) << 16;
                }
            }
            for (tile, pairs) in [(&mut hi[t * TILE..][..TILE], &h), (&mut lo[t * TILE..][..TILE], &l)] {
                for (dst, &v) in tile.chunks_exact_mut(2).zip(pairs.as_flattened()) {
                    dst.copy_from_slice(&[v as u16, (v >> 16) as u16]);
                }
            }
        }
    } else {
        // Row-major: row kk holds every column's k-th element; rows 2p and 2p + 1 interleave.
        let mut rows = [[0f32; 16]; 2];
        for kk in (0..kt * 32).step_by(2) {
            for (i, row) in rows.iter_mut().enumerate() {
                // A row below k has columns c0..c0 + cols (below n) contiguous (checked by `line`).
                let src = if kk + i < k { rhs.line((kk + i) * rhs.rs() + c0, cols) } else { &[] };
                *row = [0.0; 16];
                row[..src.len()].copy_from_slice(src);
            }
            let at = (kk / 32) * TILE + (kk % 32 / 2) * 32;
            for c in 0..16 {
                let ((h0, l0), (h1, l1)) = (split(rows[0][c]), split(rows[1][c]));
                hi[at + 2 * c..][..2].copy_from_slice(&[h0, h1]);
                lo[at + 2 * c..][..2].copy_from_slice(&[l0, l1]);
            }
        }
    }
}

/// `dst[m x n] (ld_dst per row) = (accumulate ? dst : 0) + scale lhs rhs` through AMX; the
/// caller checked [`takes`] and that `dst` holds the rows.
///
/// # Safety
/// - AMX and AVX-512 are usable: the CPU has them and the kernel let this process use the tile
///   data ([`takes`] is true only then: [`mode`] is `Off` otherwise);
/// - `dst` is valid for writes of `m` rows of `ld_dst >= n` elements and nothing else reads or
///   writes them meanwhile.
///
/// `lhs` and `rhs` are read through their slices, bounds-checked, so a shape that does not fit
/// them panics rather than reads past them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld_dst: usize,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    accumulate: bool,
) {
    let b = pack_cols(rhs, n, k, true);
    // SAFETY: the caller's; b holds rhs's panels with their lo tiles.
    unsafe { drive(m, n, k, dst, ld_dst, lhs, b.as_slice(), true, scale, accumulate) }
}

/// `rhs [k x n]` as B panels of 16 columns, `kt` tiles each, with their `lo` tiles after the
/// `hi` ones (`with_lo`) or without.
fn pack_cols(rhs: Mat, n: usize, k: usize, with_lo: bool) -> Lines {
    let kt = k.div_ceil(32);
    let panel = if with_lo { 2 } else { 1 } * kt * TILE;
    let mut b = Lines::zeroed(n.next_multiple_of(32) / 16 * panel);
    b.as_mut_slice().par_chunks_mut(panel).enumerate().for_each(|(p, s)| {
        if with_lo {
            // SAFETY: AVX-512 checked by mode() (the caller's, or Packed's existence).
            unsafe { pack_cols_panel(s, rhs, n, k, 16 * p, kt) }
        } else {
            let mut both = vec![0u16; 2 * kt * TILE];
            // SAFETY: as above.
            unsafe { pack_cols_panel(&mut both, rhs, n, k, 16 * p, kt) };
            s.copy_from_slice(&both[..kt * TILE]);
        }
    });
    b
}

/// The product with `b` packed already (`b_lo`: whether its panels hold `lo` tiles): `lhs` packed
/// as A panels, then the threads' columns of 32 x 32 blocks.
///
/// # Safety
/// AMX and AVX-512 usable (as for [`product`]); `b` packed for `n` and `k`; `dst` valid for
/// writes of `m` rows of `ld_dst >= n`, touched by no one else meanwhile.
///
/// INVARIANT (the tile registers): each thread configures the tiles, runs its blocks and
/// releases them, and nothing in between calls into rayon: a nested `join` could run another
/// product's task on this thread, which would reconfigure and release the tiles under it. The
/// accumulators and B tiles that [`block`] keeps across its separate `asm!` blocks stay as left
/// only because LLVM allocates no `tmm` register in this crate and no other code runs there.
#[allow(clippy::too_many_arguments)]
unsafe fn drive(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld_dst: usize,
    lhs: Mat,
    b: &[u16],
    b_lo: bool,
    scale: f32,
    accumulate: bool,
) {
    PRODUCTS.fetch_add(1, Ordering::Relaxed);
    let (mp, np, kt) = (m.next_multiple_of(32), n.next_multiple_of(32), k.div_ceil(32));
    let panel = 2 * kt * TILE;
    let b_panel = if b_lo { 2 } else { 1 } * kt * TILE;
    assert!(b.len() >= np / 16 * b_panel, "amx: B packed for fewer columns");
    let mut kept = Lines::kept(mp / 16 * panel);
    // Every element of the panels is written (rows past m and k past its end as zeros).
    kept.as_mut_slice().par_chunks_mut(panel).enumerate().for_each(|(p, s)| {
        // SAFETY: mode() checked AVX-512; lhs is read through its slice.
        unsafe { pack_rows_panel(s, lhs, m, k, 16 * p, kt) }
    });
    let a = kept.as_slice();
    let blocks = np / 32;
    let parts = rayon::current_num_threads().min(blocks);
    // SAFETY: dst is valid for these writes and only this product writes it (this fn's contract).
    let out = unsafe { SendPtr::from_raw(dst) };
    let out = &out;
    (0..parts).into_par_iter().for_each(|t| {
        configure();
        let mut c = Block([0.0; 1024]);
        for first in (0..mp / 32).step_by(ROWS_PER_PASS / 32) {
            for nb in blocks * t / parts..blocks * (t + 1) / parts {
                for mb in first..(first + ROWS_PER_PASS / 32).min(mp / 32) {
                    // SAFETY: tiles configured; a and b packed for kt; c is 32 x 32.
                    unsafe { block(a, b, &mut c, 2 * mb, 2 * nb, kt, b_lo) };
                    let (rows, cols) = ((m - 32 * mb).min(32), (n - 32 * nb).min(32));
                    // SAFETY: rows 32 mb.. below m, columns 32 nb.. below n: inside dst, and this
                    // thread's columns only; AVX-512 checked by mode().
                    unsafe {
                        write_block(&c, out.0.add(32 * mb * ld_dst + 32 * nb), ld_dst, rows, cols, scale, accumulate)
                    };
                }
            }
        }
        release();
    });
    kept.keep();
}

/// That `a [m x inner]` (rows contiguous) and `dst` (`m` rows of `cols` at `ld`) fit the product.
fn check_operands(m: usize, inner: usize, cols: usize, a: Mat, dst: &[f32], ld: usize) {
    assert!(a.cs() == 1, "amx: the activation's rows must be contiguous");
    a.check(m, inner, "amx: activation");
    assert!(ld >= cols && (m == 0 || dst.len() >= (m - 1) * ld + cols), "amx: destination too small");
}

/// A frozen weight `w [n x k]` whose every value is a bf16 (as a bf16 checkpoint's are once
/// widened), packed once as B tiles for both products against it: `x w^T` (the forward) and
/// `g w` (the backward's input gradient, its tiles packed at the first backward). With `lo`
/// zero, a product is `hi·w + lo·w` of the other operand: two tile products instead of
/// bf16x3's three, and no packing of the weight per call. It takes 2 bytes a value per layout
/// (the f32 weight took 4), and it is the weight's only copy.
pub struct Packed {
    n: usize,
    k: usize,
    fwd: Lines,
    bwd: OnceLock<Lines>,
}

impl Packed {
    /// `w [n x k]` packed, or `None` when a value is not a bf16 (its low 16 bits not zero) or
    /// AMX is off for this process.
    pub fn new(w: &[f32], n: usize, k: usize) -> Option<Self> {
        assert_eq!(w.len(), n * k, "amx: weight of {} values for {n} x {k}", w.len());
        if mode() == Mode::Off || w.par_iter().any(|v| v.to_bits() & 0xffff != 0) {
            return None;
        }
        Some(Self { n, k, fwd: pack_cols(Mat::rows_t(w, k), n, k, false), bwd: OnceLock::new() })
    }

    /// The backward's tiles (`w` as `g w` reads it), packed at the first call.
    fn backward_tiles(&self) -> &Lines {
        self.bwd.get_or_init(|| {
            let w = self.to_f32();
            pack_cols(Mat::rows(&w, self.k), self.k, self.n, false)
        })
    }
}

impl PackedWeight for Packed {
    /// `(n, k)`: the weight's rows and columns.
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The weight again, `[n x k]` row-major f32 (exact: the tiles hold its values).
    fn to_f32(&self) -> Vec<f32> {
        let (n, k, kt) = (self.n, self.k, self.k.div_ceil(32));
        let fwd = self.fwd.as_slice();
        let mut w = vec![0f32; n * k];
        w.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
            let base = (r / 16) * kt * TILE + (r % 16) * 2;
            for (kk, v) in row.iter_mut().enumerate() {
                let bits = fwd[base + (kk / 32) * TILE + (kk % 32 / 2) * 32 + kk % 2];
                *v = f32::from_bits(u32::from(bits) << 16);
            }
        });
        w
    }

    /// `dst[m x n] (ld_dst per row) = (accumulate ? dst : 0) + x w^T`, `x [m x k]` with its rows
    /// contiguous. Panics if `x` or `dst` is too small for the shape.
    fn forward(&self, m: usize, x: Mat, dst: &mut [f32], ld_dst: usize, accumulate: bool) {
        check_operands(m, self.k, self.n, x, dst, ld_dst);
        // SAFETY: a Packed exists only where AMX is usable (`new`); dst checked above; fwd holds
        // w^T's panels without lo tiles.
        unsafe { drive(m, self.n, self.k, dst.as_mut_ptr(), ld_dst, x, self.fwd.as_slice(), false, 1.0, accumulate) }
    }

    /// `dst[m x k] (ld_dst per row) = (accumulate ? dst : 0) + g w`, `g [m x n]` with its rows
    /// contiguous. Panics if `g` or `dst` is too small for the shape.
    fn backward(&self, m: usize, g: Mat, dst: &mut [f32], ld_dst: usize, accumulate: bool) {
        check_operands(m, self.n, self.k, g, dst, ld_dst);
        let b = self.backward_tiles().as_slice();
        // SAFETY: as in `forward`; the backward's tiles hold w's panels without lo tiles.
        unsafe { drive(m, self.k, self.n, dst.as_mut_ptr(), ld_dst, g, b, false, 1.0, accumulate) }
    }

    fn backward_ready(&self) {
        self.backward_tiles();
    }
}

/// `rows x cols` of `c` into `d` (`ld` per row): `d = (accumulate ? d : 0) + scale c`.
///
/// # Safety
/// AVX-512 available; `d` valid for `rows` rows of `cols` at `ld`, written by no one else meanwhile.
#[target_feature(enable = "avx512f")]
unsafe fn write_block(c: &Block, d: *mut f32, ld: usize, rows: usize, cols: usize, scale: f32, accumulate: bool) {
    for i in 0..rows {
        // SAFETY: the caller's.
        let d = unsafe { std::slice::from_raw_parts_mut(d.add(i * ld), cols) };
        let s = &c.0[32 * i..][..cols];
        if accumulate {
            d.iter_mut().zip(s).for_each(|(d, s)| *d += scale * s);
        } else {
            d.iter_mut().zip(s).for_each(|(d, s)| *d = scale * s);
        }
    }
}

/// Products [`product`] has run in this process (what a test checks to know AMX took them).
pub fn products_run() -> u64 {
    PRODUCTS.load(Ordering::Relaxed)
}

static PRODUCTS: AtomicU64 = AtomicU64::new(0);

/// One 32 x 32 block of results, row-major, on a 64-byte line.
#[repr(C, align(64))]
struct Block([f32; 1024]);

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
    // SAFETY: a valid palette-1 configuration; mode() enabled AMX for this process.
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr()) };
}

fn release() {
    // SAFETY: drops this thread's tile state.
    unsafe { asm!("tilerelease") };
}

/// The 32 x 32 block at row panel `pa` (16 rows each) and column panel `pb` into `c`. With `b`'s
/// `lo` tiles (`b_lo`, bf16x3), per 32 of k ten tile loads and twelve products (`hi·hi`, `lo·hi`,
/// `hi·lo` for each of the four accumulators, the `hi` of B kept for the second and the `hi` of A
/// loaded again for the third); without (a [`Packed`] weight), six loads and eight products
/// (`hi·w` and `lo·w`).
///
/// # Safety
/// Tiles configured on this thread; `a` packed for `kt` with `lo` tiles, `b` for `kt` with them
/// or not as `b_lo` says.
unsafe fn block(a: &[u16], b: &[u16], c: &mut Block, pa: usize, pb: usize, kt: usize, b_lo: bool) {
    let (panel, b_panel) = (2 * kt * TILE, if b_lo { 2 } else { 1 } * kt * TILE);
    assert!(a.len() >= (pa + 2) * panel && b.len() >= (pb + 2) * b_panel);
    let (a0, a1) = (a[pa * panel..].as_ptr(), a[(pa + 1) * panel..].as_ptr());
    let (b0, b1) = (b[pb * b_panel..].as_ptr(), b[(pb + 1) * b_panel..].as_ptr());
    let lo = kt * TILE;
    // SAFETY: every load stays inside the four panels asserted above; the stores inside `c`.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3");
        for t in 0..kt {
            let o = t * TILE;
            four_products(a0.add(o), a1.add(o), b0.add(o), b1.add(o));
            with_b_kept(a0.add(lo + o), a1.add(lo + o));
            if b_lo {
                four_products(a0.add(o), a1.add(o), b0.add(lo + o), b1.add(lo + o));
            }
        }
        let cp = c.0.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) cp,
            c1 = in(reg) cp.add(16),
            c2 = in(reg) cp.add(16 * 32),
            c3 = in(reg) cp.add(16 * 32 + 16),
            s = in(reg) 128usize,
        );
    }
}

/// Loads A tiles `a0`, `a1` and B tiles `b0`, `b1` and adds their four products to the
/// accumulators `tmm0..tmm3` (`tmm0 += a0 b0`, `tmm1 += a0 b1`, `tmm2 += a1 b0`, `tmm3 += a1 b1`).
///
/// # Safety
/// Tiles configured on this thread; each pointer valid for one packed tile (16 rows of 64 bytes).
#[inline(always)]
unsafe fn four_products(a0: *const u16, a1: *const u16, b0: *const u16, b1: *const u16) {
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
        )
    }
}

/// [`four_products`] with new A tiles `a0`, `a1` against the B tiles it loaded last (still in
/// `tmm6`, `tmm7`).
///
/// # Safety
/// As for [`four_products`], right after it on this thread.
#[inline(always)]
unsafe fn with_b_kept(a0: *const u16, a1: *const u16) {
    // SAFETY: the caller's.
    unsafe {
        asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) a1,
            s = in(reg) 64usize,
        )
    }
}

/// `tdpbf16ps` GFLOP/s of the calling thread's core: with the operands in tile registers (the
/// unit's ceiling), then with [`block`]'s pattern of loads (ten 1 KB tile loads per twelve
/// products, 32 x 32 blocks over k = 128) from buffers that stay in L1. `None` where AMX is unusable.
pub fn tile_rates() -> Option<(f64, f64)> {
    if unusable().is_some() {
        return None;
    }
    // Two panels of four tile pairs each (k = 128): 32 KB in all, inside L1.
    let (a, b) = (Lines::zeroed(16 * TILE), Lines::zeroed(16 * TILE));
    let reps = 200_000;
    let flop = |products: usize| (reps * products * 16 * 16 * 32 * 2) as f64;
    configure();
    let t0 = std::time::Instant::now();
    // SAFETY: tiles configured; the loads read inside `a`.
    unsafe {
        asm!(
            "tileloadd tmm4, [{p} + {s}*1]",
            "tileloadd tmm5, [{p} + {s}*1]",
            "tileloadd tmm6, [{p} + {s}*1]",
            "tileloadd tmm7, [{p} + {s}*1]",
            p = in(reg) a.as_slice().as_ptr(),
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
    let registers = flop(4) / t0.elapsed().as_secs_f64() / 1e9;
    let mut c = Block([0.0; 1024]);
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        // SAFETY: tiles configured; a and b hold two panels packed for kt = 4.
        unsafe { block(a.as_slice(), b.as_slice(), &mut c, 0, 0, 4, true) };
    }
    let with_loads = flop(48) / t0.elapsed().as_secs_f64() / 1e9;
    release();
    Some((registers, with_loads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Odd sizes that cross tile borders in every dimension.
    const SIZES: [(usize, usize, usize); 5] = [(1, 1, 1), (17, 33, 31), (45, 70, 100), (300, 97, 65), (33, 260, 513)];

    /// Values in [-1, 1) from a seeded generator.
    fn values(seed: u64) -> impl FnMut() -> f32 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        move || rng.random_range(-1.0f32..1.0)
    }

    /// Runs `product(dst, ld, accumulate)` into `m` rows of `cols` (at `ld = cols + 3`, from
    /// random contents, accumulating and not) and holds every entry to `init + scale Σ lhs rhs`
    /// over `inner`, computed in f64, within 2^-16 of `scale Σ |terms|`; the columns past `cols`
    /// untouched.
    #[allow(clippy::too_many_arguments)]
    fn check_product(
        what: &str,
        m: usize,
        cols: usize,
        inner: usize,
        scale: f64,
        next: &mut impl FnMut() -> f32,
        lhs: impl Fn(usize, usize) -> f32,
        rhs: impl Fn(usize, usize) -> f32,
        product: impl Fn(&mut [f32], usize, bool),
    ) {
        for accumulate in [false, true] {
            let ld = cols + 3;
            let init: Vec<f32> = (0..m * ld).map(|_| next()).collect();
            let mut d = init.clone();
            product(&mut d, ld, accumulate);
            for i in 0..m {
                for j in 0..cols {
                    let terms = (0..inner).map(|kk| f64::from(lhs(i, kk)) * f64::from(rhs(kk, j)));
                    let (sum, mag) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                    let want = if accumulate { f64::from(init[i * ld + j]) } else { 0.0 } + scale * sum;
                    let got = f64::from(d[i * ld + j]);
                    assert!(
                        (got - want).abs() <= scale * mag / 65536.0 + 1e-6,
                        "{what} acc {accumulate} at ({i},{j}): {got} against {want}"
                    );
                }
                for j in cols..ld {
                    assert_eq!(d[i * ld + j], init[i * ld + j], "{what}: wrote past column {cols}");
                }
            }
        }
    }

    /// A weight of bf16 values packed once: both products against f64 (the same 2^-16 bar: only
    /// the other operand is split), and the weight read back exactly. A weight with a value that
    /// is not a bf16 is not packed.
    #[test]
    fn packed_weight_products_match_f64() {
        if let Some(why) = unusable() {
            crate::testhooks::skipped("model::amx::tests", "amx", why);
            return;
        }
        let mut next = values(11);
        let bf16 = |v: f32| f32::from_bits(u32::from(split(v).0) << 16);
        for (m, n, k) in SIZES {
            let w: Vec<f32> = (0..n * k).map(|_| bf16(next())).collect();
            let p = Packed::new(&w, n, k).expect("bf16 values are packed");
            assert_eq!(p.to_f32(), w, "{m}x{n}x{k}: the weight read back");
            let mut off = w.clone();
            off[n * k / 2] = f32::from_bits(off[n * k / 2].to_bits() | 1);
            assert!(Packed::new(&off, n, k).is_none(), "{m}x{n}x{k}: a value that is not a bf16 was packed");
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let g: Vec<f32> = (0..m * n).map(|_| next()).collect();
            for backward in [false, true] {
                // x w^T sums over k into n columns; g w over n into k.
                let (a, cols, inner) = if backward { (&g, k, n) } else { (&x, n, k) };
                let what = format!("backward {backward} {m}x{n}x{k}");
                let wv = |kk: usize, j: usize| if backward { w[kk * k + j] } else { w[j * k + kk] };
                check_product(
                    &what,
                    m,
                    cols,
                    inner,
                    1.0,
                    &mut next,
                    |i, kk| a[i * inner + kk],
                    wv,
                    |d, ld, acc| {
                        let a = Mat::rows(a, inner);
                        if backward { p.backward(m, a, d, ld, acc) } else { p.forward(m, a, d, ld, acc) }
                    },
                );
            }
        }
    }

    /// A packed weight's products check their operands before anything runs (on every CPU: the
    /// check is the same code whether or not AMX is here).
    #[test]
    fn packed_products_refuse_operands_that_do_not_fit() {
        let x = vec![0f32; 10];
        let d = vec![0f32; 12];
        let caught = |what: &str, f: &mut dyn FnMut()| {
            let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err(what);
            let msg = err.downcast_ref::<String>().cloned().or(err.downcast_ref::<&str>().map(|s| s.to_string()));
            assert!(msg.unwrap_or_default().contains(what), "{what}");
        };
        caught("activation", &mut || check_operands(3, 4, 4, Mat::rows(&x, 4), &d, 4));
        caught("contiguous", &mut || check_operands(2, 4, 4, Mat::rows_t(&x, 2), &d, 4));
        caught("destination", &mut || check_operands(2, 4, 7, Mat::rows(&x, 4), &d, 7));
        check_operands(2, 4, 4, Mat::rows(&x, 4), &d, 4);
    }

    /// bf16x3 through AMX where this machine has it (otherwise nothing to test): both layouts of
    /// the right-hand side, scale and accumulate, against an f64 product.
    #[test]
    fn amx_products_match_f64_at_odd_sizes() {
        if let Some(why) = unusable() {
            crate::testhooks::skipped("model::amx::tests", "amx", why);
            return;
        }
        let mut next = values(7);
        for (m, n, k) in SIZES {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            for (rhs, what) in [(Mat::rows_t(&w, k), "transposed"), (Mat::rows(&wt, n), "row-major")] {
                let what = format!("{what} {m}x{n}x{k}");
                check_product(
                    &what,
                    m,
                    n,
                    k,
                    0.5,
                    &mut next,
                    |i, kk| x[i * k + kk],
                    |kk, j| w[j * k + kk],
                    |d, ld, acc| {
                        // SAFETY: AMX usable (checked above); d holds m rows of ld.
                        unsafe { product(m, n, k, d.as_mut_ptr(), ld, Mat::rows(&x, k), rhs, 0.5, acc) }
                    },
                );
            }
        }
    }
}
