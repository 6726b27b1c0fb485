//! The exact search's inner loop: inner products of stored rows with one or
//! more probes, from f32 rows or from half-precision copies.
//!
//! On x86-64 processors with AVX-512 the loop is written with its
//! intrinsics (through `pulp`'s safe wrappers, chosen at run time): tiles of
//! 4 rows x 4 probes, 16 accumulators in registers, halves widened by
//! `vcvtph2ps`, and the rows two tiles ahead prefetched. Elsewhere a
//! portable loop (`pulp`'s widest instruction set: AVX2, NEON, ...) does the
//! same arithmetic more slowly.
//!
//! Each (row, probe) pair has its own accumulator, walked over the row in
//! the same order whichever tile, batch or neighbours it is computed with,
//! and reduced the same way: a score does not depend on how many probes or
//! rows were computed with it. A batched search therefore returns bit for
//! bit what single searches return, and a row rescored alone equals the
//! same row scored in a scan. (The two code paths may differ from each
//! other in the last bits; one process only ever uses one.)
//!
//! Rows are stored with a stride padded with zeros to a multiple of
//! [`LANES`] values (zeros add nothing), so there is never a partial vector.

use pulp::{Arch, Simd, WithSimd};

/// Every stride (values per stored row) is a multiple of this: one AVX-512
/// register of f32.
pub const LANES: usize = 16;

/// Rows computed together.
const ROW_TILE: usize = 4;

/// How many tiles ahead of the one computed the rows are prefetched.
const PREFETCH_TILES: usize = 2;

/// Alignment of stored rows and probes, in bytes: a cache line, so that no
/// 64-byte load straddles two lines (measured: unaligned rows cost a third
/// of the batched throughput).
pub const ALIGN_BYTES: usize = 64;

/// A fixed-length buffer of zeros whose first element sits on an
/// [`ALIGN_BYTES`] boundary (with strides a multiple of [`LANES`], every
/// row does). Safe code: a `Vec` a little longer than asked, used from the
/// first aligned element; it is never grown, so its memory never moves.
#[derive(Debug, Default)]
pub struct Aligned<T> {
    buffer: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    /// `len` zeros, or the allocator's refusal.
    pub fn try_zeroed(len: usize) -> Result<Self, std::collections::TryReserveError> {
        let slack = ALIGN_BYTES / size_of::<T>().max(1);
        let mut buffer = Vec::new();
        buffer.try_reserve_exact(len + slack)?;
        buffer.resize(len + slack, T::default());
        let misaligned = (buffer.as_ptr() as usize) % ALIGN_BYTES;
        let start = ((ALIGN_BYTES - misaligned) % ALIGN_BYTES) / size_of::<T>().max(1);
        Ok(Self { buffer, start, len })
    }

    /// A copy of `values`, aligned (small buffers: aborts without memory,
    /// as `Vec` does).
    pub fn copied(values: &[T]) -> Self {
        let mut aligned = Self::try_zeroed(values.len()).unwrap_or_else(|_| {
            std::alloc::handle_alloc_error(std::alloc::Layout::array::<T>(values.len()).expect("layout"))
        });
        aligned.copy_from_slice(values);
        aligned
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.buffer[self.start..self.start + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buffer[self.start..self.start + self.len]
    }
}

/// The stride for `dim`-d rows.
pub fn stride_for(dim: usize) -> usize {
    dim.div_ceil(LANES).max(1) * LANES
}

/// Half-precision copies of `values`, rounded to nearest; `None` when one
/// does not fit a half (|x| > 65504): such a row is never searched in halves.
pub fn to_halves(values: &[f32]) -> Option<Vec<u16>> {
    values
        .iter()
        .map(|&x| {
            let h = half::f16::from_f32(x);
            h.is_finite().then_some(h.to_bits())
        })
        .collect()
}

/// The f32 value of a stored half.
pub fn half_value(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// The instruction set the search runs with, chosen once.
#[derive(Debug, Clone, Copy)]
pub enum Kernel {
    /// AVX-512 (F, BW, CD, DQ, VL) with FMA.
    #[cfg(target_arch = "x86_64")]
    Avx512(pulp::x86::V4),
    /// `pulp`'s widest available instruction set.
    Portable(Arch),
}

impl Kernel {
    /// The fastest kernel this processor runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(v4) = pulp::x86::V4::try_new() {
            return Self::Avx512(v4);
        }
        Self::Portable(Arch::new())
    }

    /// The portable kernel, whatever the processor (tests).
    pub fn portable() -> Self {
        Self::Portable(Arch::new())
    }

    /// Its name, for logs and benchmarks.
    pub fn name(&self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512(_) => "avx512",
            Self::Portable(_) => "portable",
        }
    }

    /// `out[p * n + r]` = row `r` · probe `p`, for `n` rows and `q` probes
    /// of `stride` values each (`rows.len()` and `probes.len()` multiples
    /// of it, `out` one value per pair, probe by probe).
    pub fn scores(self, rows: &[f32], probes: &[f32], stride: usize, out: &mut [f32]) {
        self.run(rows, probes, stride, out);
    }

    /// Like [`Kernel::scores`] for rows of halves ([`to_halves`]).
    pub fn scores_half(self, rows: &[u16], probes: &[f32], stride: usize, out: &mut [f32]) {
        self.run(rows, probes, stride, out);
    }

    fn run<T: Element>(self, rows: &[T], probes: &[f32], stride: usize, out: &mut [f32]) {
        let n = rows.len() / stride;
        let full = n / ROW_TILE * ROW_TILE;
        self.run_tiles(&rows[..full * stride], probes, stride, out, n);
        if full < n {
            // The last rows padded with zero rows to a whole tile: the
            // same arithmetic as in a scan, for the real rows.
            let q = probes.len() / stride;
            let mut padded = vec![T::default(); stride * ROW_TILE];
            padded[..(n - full) * stride].copy_from_slice(&rows[full * stride..n * stride]);
            let mut scores = vec![0.0; q * ROW_TILE];
            self.run_tiles(&padded, probes, stride, &mut scores, ROW_TILE);
            for p in 0..q {
                out[p * n + full..(p + 1) * n]
                    .copy_from_slice(&scores[p * ROW_TILE..p * ROW_TILE + n - full]);
            }
        }
    }

    /// Whole tiles of `rows` into the first rows of `out`, whose probes
    /// are `out_rows` apart.
    fn run_tiles<T: Element>(
        self,
        rows: &[T],
        probes: &[f32],
        stride: usize,
        out: &mut [f32],
        out_rows: usize,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512(v4) => <pulp::x86::V4 as Simd>::vectorize(
                v4,
                avx512::Tiles {
                    v4,
                    rows,
                    probes,
                    stride,
                    out,
                    out_rows,
                },
            ),
            Self::Portable(arch) => arch.dispatch(Portable {
                rows,
                probes,
                stride,
                out,
                out_rows,
            }),
        }
    }
}

/// A stored value: f32 or the bits of a half.
pub trait Element: Copy + Default + Send + Sync + 'static {
    /// Its value.
    fn value(self) -> f32;
    /// 16 values widened into an AVX-512 register.
    #[cfg(target_arch = "x86_64")]
    fn load16(v4: pulp::x86::V4, values: &[Self; 16]) -> core::arch::x86_64::__m512;
}

impl Element for f32 {
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn load16(_: pulp::x86::V4, values: &[f32; 16]) -> core::arch::x86_64::__m512 {
        pulp::bytemuck::cast(*values)
    }
}

impl Element for u16 {
    #[inline(always)]
    fn value(self) -> f32 {
        half_value(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn load16(v4: pulp::x86::V4, values: &[u16; 16]) -> core::arch::x86_64::__m512 {
        v4.avx512f._mm512_cvtph_ps(pulp::bytemuck::cast(*values))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::{__m512, _MM_HINT_T0};

    use pulp::{Simd, WithSimd};

    use super::{Element, PREFETCH_TILES, ROW_TILE};

    /// Probes computed together with each tile of rows.
    const PROBE_TILE: usize = 4;

    /// Cache lines prefetched per step: a tile is `ROW_TILE` rows of
    /// `stride / 16` steps, each step's rows spanning `ROW_TILE` lines of
    /// f32 (half as many of halves).
    const LINES_PER_STEP: usize = ROW_TILE;

    pub(super) struct Tiles<'a, T> {
        pub v4: pulp::x86::V4,
        pub rows: &'a [T],
        pub probes: &'a [f32],
        pub stride: usize,
        pub out: &'a mut [f32],
        pub out_rows: usize,
    }

    impl<T: Element> WithSimd for Tiles<'_, T> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            let Self {
                v4,
                rows,
                probes,
                stride,
                out,
                out_rows,
            } = self;
            let f = v4.avx512f;
            let q = probes.len() / stride;
            if q == 0 {
                return;
            }
            let vectors = stride / 16;
            let probes: Vec<&[[f32; 16]]> = probes
                .chunks_exact(stride)
                .map(|p| &pulp::as_arrays::<16, f32>(p).0[..vectors])
                .collect();
            let tile_len = stride * ROW_TILE;
            for (t, tile) in rows.chunks_exact(tile_len).enumerate() {
                // The tile PREFETCH_TILES ahead, a few lines per step of
                // the first probe group (a burst would stall on the line
                // fill buffers).
                let ahead = (t + PREFETCH_TILES) * tile_len;
                let next = rows.get(ahead..ahead + tile_len).unwrap_or_default();
                let mut lines = next.chunks(64 / size_of::<T>()).map(|line| line.as_ptr());
                let tile: [&[[T; 16]]; ROW_TILE] = std::array::from_fn(|r| {
                    &pulp::as_arrays::<16, T>(&tile[r * stride..(r + 1) * stride]).0[..vectors]
                });
                for p0 in (0..q).step_by(PROBE_TILE) {
                    // A short last group repeats its last probe (the extra
                    // scores are dropped).
                    let group: [&[[f32; 16]]; PROBE_TILE] =
                        std::array::from_fn(|j| probes[(p0 + j).min(q - 1)]);
                    let mut acc = [[f._mm512_setzero_ps(); PROBE_TILE]; ROW_TILE];
                    // Zipped slices: one length check, none per step.
                    for ((((r0, r1), r2), r3), (((y0, y1), y2), y3)) in tile[0]
                        .iter()
                        .zip(tile[1])
                        .zip(tile[2])
                        .zip(tile[3])
                        .zip(group[0].iter().zip(group[1]).zip(group[2]).zip(group[3]))
                    {
                        if p0 == 0 {
                            for line in lines.by_ref().take(LINES_PER_STEP) {
                                v4.sse._mm_prefetch::<_MM_HINT_T0>(line.cast());
                            }
                        }
                        let x = [
                            T::load16(v4, r0),
                            T::load16(v4, r1),
                            T::load16(v4, r2),
                            T::load16(v4, r3),
                        ];
                        for (j, y) in [y0, y1, y2, y3].into_iter().enumerate() {
                            let y: __m512 = pulp::bytemuck::cast(*y);
                            for r in 0..ROW_TILE {
                                acc[r][j] = f._mm512_fmadd_ps(x[r], y, acc[r][j]);
                            }
                        }
                    }
                    // Lane 4j + r of the sums: row r with probe j.
                    let sums: [f32; 16] = pulp::bytemuck::cast(reduce16(v4, acc));
                    let base = t * ROW_TILE;
                    for (j, four) in sums.chunks_exact(ROW_TILE).enumerate().take(q - p0) {
                        let at = (p0 + j) * out_rows + base;
                        out[at..at + ROW_TILE].copy_from_slice(four);
                    }
                }
            }
        }
    }

    /// The 16 accumulators' sums in one register, lane `4 j + r` holding
    /// `acc[r][j]`'s: a tree of shuffles and adds (15 adds for 16 sums
    /// instead of 64 in 16 separate reductions). Every accumulator goes
    /// through the same steps wherever it sits, so its sum does not depend
    /// on its place in the tile: `(B0 + B2) + (B1 + B3)` over its four
    /// 128-bit blocks, then `(e0 + e2) + (e1 + e3)` over the four values.
    #[inline(always)]
    fn reduce16(v4: pulp::x86::V4, acc: [[__m512; PROBE_TILE]; ROW_TILE]) -> __m512 {
        let f = v4.avx512f;
        // m = 4 r + j.
        let m: [__m512; 16] = std::array::from_fn(|m| acc[m / 4][m % 4]);
        // Blocks [a(B0+B2), a(B1+B3), b(B0+B2), b(B1+B3)] of pairs (a, b).
        let s: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (m[2 * i], m[2 * i + 1]);
            f._mm512_add_ps(
                f._mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                f._mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            )
        });
        // Block k of u[i]: accumulator 4 i + k folded to 128 bits.
        let u: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (s[2 * i], s[2 * i + 1]);
            f._mm512_add_ps(
                f._mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                f._mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        });
        // Within each block: [u(e0+e2), u(e1+e3), v(e0+e2), v(e1+e3)].
        let w: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (u[2 * i], u[2 * i + 1]);
            f._mm512_add_ps(
                f._mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                f._mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        });
        // Block k, value e: accumulator 4 e + k, that is lane 4 j + r.
        f._mm512_add_ps(
            f._mm512_shuffle_ps::<0b10_00_10_00>(w[0], w[1]),
            f._mm512_shuffle_ps::<0b11_01_11_01>(w[0], w[1]),
        )
    }
}

/// The portable loop: `pulp`'s vectors, one accumulator per (row, probe)
/// pair, rows in tiles of four against one probe at a time.
struct Portable<'a, T> {
    rows: &'a [T],
    probes: &'a [f32],
    stride: usize,
    out: &'a mut [f32],
    out_rows: usize,
}

impl<T: Element> WithSimd for Portable<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            rows,
            probes,
            stride,
            out,
            out_rows,
        } = self;
        let q = probes.len() / stride;
        if q == 0 {
            return;
        }
        let probes: Vec<&[S::f32s]> = probes
            .chunks_exact(stride)
            .map(|p| S::as_simd_f32s(p).0)
            .collect();
        let mut widened = vec![0.0f32; stride * ROW_TILE];
        for (t, tile) in rows.chunks_exact(stride * ROW_TILE).enumerate() {
            for (w, &v) in widened.iter_mut().zip(tile) {
                *w = v.value();
            }
            let tile: [&[S::f32s]; ROW_TILE] =
                std::array::from_fn(|r| S::as_simd_f32s(&widened[r * stride..(r + 1) * stride]).0);
            let len = tile[0].len();
            let tile = tile.map(|r| &r[..len]);
            for (p, probe) in probes.iter().enumerate() {
                let probe = &probe[..len];
                let mut acc = [simd.splat_f32s(0.0); ROW_TILE];
                for i in 0..len {
                    for r in 0..ROW_TILE {
                        acc[r] = simd.mul_add_f32s(tile[r][i], probe[i], acc[r]);
                    }
                }
                for (r, a) in acc.into_iter().enumerate() {
                    out[p * out_rows + t * ROW_TILE + r] = simd.reduce_sum_f32s(a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn kernels() -> Vec<Kernel> {
        vec![Kernel::detect(), Kernel::portable()]
    }

    #[test]
    fn scores_match_f64_products_and_do_not_depend_on_the_batch() {
        let (dim, n, q) = (40, 11, 7);
        let stride = stride_for(dim);
        assert_eq!(stride, 48);
        let mut seed = 3;
        let mut rows = vec![0.0f32; n * stride];
        let mut probes = vec![0.0f32; q * stride];
        for r in 0..n {
            for d in 0..dim {
                rows[r * stride + d] = lcg(&mut seed);
            }
        }
        for p in 0..q {
            for d in 0..dim {
                probes[p * stride + d] = lcg(&mut seed);
            }
        }
        for kernel in kernels() {
            let mut all = vec![0.0f32; n * q];
            kernel.scores(&rows, &probes, stride, &mut all);
            for r in 0..n {
                for p in 0..q {
                    let exact: f64 = (0..dim)
                        .map(|d| f64::from(rows[r * stride + d]) * f64::from(probes[p * stride + d]))
                        .sum();
                    assert!(
                        (f64::from(all[p * n + r]) - exact).abs() < 1e-5,
                        "{}",
                        kernel.name()
                    );
                    // One row against one probe: the same bits.
                    let mut one = [0.0f32];
                    kernel.scores(
                        &rows[r * stride..(r + 1) * stride],
                        &probes[p * stride..(p + 1) * stride],
                        stride,
                        &mut one,
                    );
                    assert_eq!(
                        one[0].to_bits(),
                        all[p * n + r].to_bits(),
                        "{} r{r} p{p}",
                        kernel.name()
                    );
                }
            }
        }
    }

    #[test]
    fn halves_are_widened_exactly() {
        let (dim, n) = (32, 5);
        let mut seed = 9;
        let values: Vec<f32> = (0..n * dim).map(|_| lcg(&mut seed) * 1e-3).collect();
        let halves = to_halves(&values).expect("small values fit");
        let widened: Vec<f32> = halves.iter().map(|&h| half_value(h)).collect();
        let probe: Vec<f32> = (0..dim).map(|_| lcg(&mut seed)).collect();
        for kernel in kernels() {
            let (mut from_halves, mut from_widened) = (vec![0.0; n], vec![0.0; n]);
            kernel.scores_half(&halves, &probe, dim, &mut from_halves);
            kernel.scores(&widened, &probe, dim, &mut from_widened);
            assert_eq!(from_halves, from_widened, "{}", kernel.name());
        }
        assert!(to_halves(&[1.0, 70_000.0]).is_none());
        // A subnormal half survives the round trip.
        assert_eq!(
            half_value(to_halves(&[1e-6]).expect("fits")[0]),
            half::f16::from_f32(1e-6).to_f32()
        );
    }
}
