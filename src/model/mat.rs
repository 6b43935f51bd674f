//! The matrix view the CPU kernels ([`super::kernels`], [`super::amx`], [`super::pairs`]) take: a
//! slice with its strides, checked before every product; the destination pointer their threads
//! share; and the split of an f32 into two bf16s that AMX and `vdpbf16ps` multiply.

/// A matrix view over a slice: element (i, j) is `data[i rs + j cs]`. It borrows the slice, so it
/// cannot outlive it, and every product checks ([`Mat::check`]) that its shape lies inside the
/// slice before reading: no safe call can read past a buffer.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `ld` elements per row, starting at `data[0]`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Self { data, rs: ld, cs: 1 }
    }

    /// The transpose of a row-major matrix with `ld` elements per row.
    pub fn rows_t(data: &'a [f32], ld: usize) -> Self {
        Self { data, rs: 1, cs: ld }
    }

    /// The stride between rows, in elements.
    pub fn rs(&self) -> usize {
        self.rs
    }

    /// The stride between columns, in elements.
    pub fn cs(&self) -> usize {
        self.cs
    }

    /// Whether this is such a transpose (a weight `w [n x k]` viewed as `w^T`, as `x w^T` reads
    /// it): rows one element apart, columns further.
    pub(crate) fn is_transposed(&self) -> bool {
        self.rs == 1 && self.cs != 1
    }

    /// Panics (naming `what`) unless a `rows x cols` matrix at these strides lies inside the
    /// slice: its last element, `(rows - 1) rs + (cols - 1) cs`, is below the slice's length.
    /// O(1); with both strides non-negative every other element lies below the last.
    pub fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last =
            (rows - 1).checked_mul(self.rs).zip((cols - 1).checked_mul(self.cs)).and_then(|(a, b)| a.checked_add(b));
        assert!(
            last.is_some_and(|l| l < self.data.len()),
            "{what}: a {rows} x {cols} matrix with strides ({}, {}) does not fit in {} elements",
            self.rs,
            self.cs,
            self.data.len()
        );
    }

    /// The view from element `at` of the slice on (a block of rows or columns); panics past its end.
    pub fn from(&self, at: usize) -> Self {
        Self { data: &self.data[at..], ..*self }
    }

    /// `len` consecutive elements from `start` (a contiguous row or column); panics past the end.
    pub fn line(&self, start: usize, len: usize) -> &'a [f32] {
        &self.data[start..start + len]
    }

    /// Where element (0, 0) lies, for the foreign kernel; valid as far as [`Mat::check`] said.
    pub(crate) fn ptr(&self) -> *const f32 {
        self.data.as_ptr()
    }
}

/// A frozen weight `w [n x k]` packed once for one of the CPU kernel paths (`super::cpu`): AMX
/// tiles or bf16 pairs. One interface for `super::frozen::Frozen`, whatever the path.
pub trait PackedWeight: Send + Sync {
    /// `(n, k)`: the weight's rows and columns.
    fn dims(&self) -> (usize, usize);
    /// The weight again, `[n x k]` row-major f32 (exact).
    fn to_f32(&self) -> Vec<f32>;
    /// `dst[m x n] (ld per row) = (accumulate ? dst : 0) + x w^T`, `x [m x k]` with its rows
    /// contiguous. Panics if `x` or `dst` is too small for the shape.
    fn forward(&self, m: usize, x: Mat, dst: &mut [f32], ld: usize, accumulate: bool);
    /// `dst[m x k] (ld per row) = (accumulate ? dst : 0) + g w`, `g [m x n]` with its rows
    /// contiguous. Panics if `g` or `dst` is too small for the shape.
    fn backward(&self, m: usize, g: Mat, dst: &mut [f32], ld: usize, accumulate: bool);
    /// Packs the backward's layout now rather than at the first backward.
    fn backward_ready(&self);
}

/// A product's destination handed to the threads of a column split (sgemm's, the bf16 pairs',
/// AMX's), each writing its own columns. It holds the destination's borrow for `'a`, so it can
/// never outlive it; that the threads' columns are disjoint is each caller's SAFETY argument.
pub(crate) struct SendPtr<'a>(pub(crate) *mut f32, std::marker::PhantomData<&'a mut [f32]>);

impl<'a> SendPtr<'a> {
    pub(crate) fn new(dst: &'a mut [f32]) -> Self {
        Self(dst.as_mut_ptr(), std::marker::PhantomData)
    }

    /// # Safety
    /// `dst` is valid for writes for `'a` and written by no one else meanwhile (but the threads
    /// given this pointer, each in its own part).
    pub(crate) unsafe fn from_raw(dst: *mut f32) -> Self {
        Self(dst, std::marker::PhantomData)
    }
}

// SAFETY: a `&mut [f32]`'s pointer, shared only for disjoint column blocks, and bound to the
// borrow's lifetime (the threads that hold it end before the product returns).
unsafe impl Send for SendPtr<'_> {}
unsafe impl Sync for SendPtr<'_> {}

/// `x` rounded to the nearest bf16 (ties to even), and the bf16 nearest to what is left. Finite
/// values only (no NaN branch; a NaN or infinity comes out a NaN or infinity either way, with a
/// meaningless `lo`). Plain integer arithmetic so that the packing loops vectorize; `half`'s
/// conversion gives the same bits, slower.
#[inline(always)]
pub(crate) fn bf16_split(x: f32) -> (u16, u16) {
    #[inline(always)]
    fn round(v: f32) -> u16 {
        let b = v.to_bits();
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
    let hi = round(x);
    (hi, round(x - f32::from_bits(u32::from(hi) << 16)))
}
