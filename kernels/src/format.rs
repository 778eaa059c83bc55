//! The hybrid tile format: a weight `W[K, N]` in ONNX layout (K is the reduction dimension)
//! split into tiles, each either dense or 2:4 sparse along K.
//!
//! # Storage (one format for every backend)
//!
//! All the kernels (CPU here, CUDA and wgpu elsewhere) read the *same* bytes produced by
//! [`pack`]; there is no second packer. The layout is that of the tensor-core operand
//! `A = Wᵀ` (rows = output columns `n`, reduction = `k`), stored as 32-bit registers:
//!
//! * Tiles are stored **tile-column major**: for tile column `j`, all tile rows `i` in order,
//!   so one output column panel streams contiguously. Every tile starts on a 64-byte boundary.
//! * A tile covers rows `k0 .. k0 + kh` and columns `n0 .. n0 + nw` (ragged at the edges).
//!   Its K extent is padded with zeros to `kpad = round_up(kh, 4)`.
//! * **Dense tile**: element `(k, c)` (tile-local) lives at element index
//!   `((k / 2) * nw + c) * 2 + (k % 2)` — K-pairs interleaved, columns contiguous. For 16-bit
//!   dtypes a pair is exactly one 32-bit `A` fragment register of `mma.m16n8k16` (two
//!   consecutive-k elements of one row of `Wᵀ`), and consecutive rows (`c`) are consecutive
//!   words, so a warp's loads coalesce.
//! * **2:4 tile**: group `g` covers tile rows `4g .. 4g + 4`. For every column `c` and group
//!   `g`, exactly two slots are stored: value slot `s ∈ {0, 1}` at element index
//!   `(g * nw + c) * 2 + s` (the compressed `A` operand of `mma.sp`, one 32-bit register per
//!   (row, group) for 16-bit dtypes), and their positions `i0 < i1` (0..=3 inside the group) as
//!   the 4-bit nibble `i0 | i1 << 2` — the per-group encoding of `mma.sp` metadata.
//!   Nibbles are packed into `u32` words: word `(w, c)` at index `w * nw + c` of the tile's
//!   metadata holds groups `8w .. 8w + 8` of column `c`, group `8w + q` in bits `4q .. 4q + 4`.
//!   One word is therefore the 32-bit metadata operand `e` that `mma.sp.m16n8k32` (f16/bf16,
//!   `.sp::ordered_metadata`) takes for one row of `A` over a 32-wide K chunk; words of
//!   consecutive rows are contiguous, so the thread that supplies a row's metadata loads one
//!   aligned word. Groups past the end of the tile in the last word are encoded `0b0100`
//!   (`i0 = 0, i1 = 1`), the canonical "nothing" pattern, and have no stored values.
//!   Groups with fewer than two kept elements are completed with the lowest unused positions
//!   and a stored zero, so `i0 < i1` always holds (as the hardware requires).
//!
//! The CPU kernel reads this directly: for 16 output columns and one group it loads 16
//! value pairs (one 64-byte line in bf16) and 16 metadata words (one line per 8 groups), and
//! `vpermilps` selects `x[4g + i0]` / `x[4g + i1]` per lane from the low two bits of the
//! (shifted) metadata word — no unpacking pass, no second layout.

use std::fmt;
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};
use thiserror::Error;

/// Element type of packed weights. Accumulation is always in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    /// Bytes per stored element.
    pub const fn size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
        }
    }

    /// Every dtype, for tests and benchmarks.
    pub const ALL: [WeightDtype; 3] = [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16];
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
        })
    }
}

/// A scalar type that can be stored in a packed weight.
pub trait WeightElement: Pod + PartialEq + fmt::Debug + Send + Sync + 'static {
    const DTYPE: WeightDtype;
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even conversion.
    fn from_f32(v: f32) -> Self;
}

impl WeightElement for f32 {
    const DTYPE: WeightDtype = WeightDtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl WeightElement for bf16 {
    const DTYPE: WeightDtype = WeightDtype::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl WeightElement for f16 {
    const DTYPE: WeightDtype = WeightDtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Tile extent: `k` rows of the reduction dimension by `n` output columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileShape {
    pub k: usize,
    pub n: usize,
}

impl Default for TileShape {
    fn default() -> Self {
        TileShape { k: 128, n: 128 }
    }
}

impl TileShape {
    pub fn new(k: usize, n: usize) -> Result<Self, PackError> {
        let t = TileShape { k, n };
        t.validate()?;
        Ok(t)
    }

    fn validate(&self) -> Result<(), PackError> {
        if self.k == 0 || !self.k.is_multiple_of(4) || self.n == 0 {
            return Err(PackError::BadTileShape {
                tile_k: self.k,
                tile_n: self.n,
            });
        }
        Ok(())
    }

    /// Number of tile rows and tile columns covering a `[k, n]` weight.
    pub fn grid(&self, k: usize, n: usize) -> (usize, usize) {
        (k.div_ceil(self.k), n.div_ceil(self.n))
    }
}

/// Whether a tile is stored dense or 2:4 along K.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TileKind {
    Dense,
    Sparse24,
}

/// Which tiles are dense and which 2:4, row-major over the tile grid `(i, j)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TileMap {
    k_tiles: usize,
    n_tiles: usize,
    kinds: Vec<TileKind>,
}

impl TileMap {
    /// Every tile of the grid has the same kind.
    pub fn uniform(k_tiles: usize, n_tiles: usize, kind: TileKind) -> Self {
        TileMap {
            k_tiles,
            n_tiles,
            kinds: vec![kind; k_tiles * n_tiles],
        }
    }

    /// From explicit kinds, row-major over `(tile_row, tile_col)`.
    pub fn from_kinds(
        k_tiles: usize,
        n_tiles: usize,
        kinds: Vec<TileKind>,
    ) -> Result<Self, PackError> {
        if kinds.len() != k_tiles * n_tiles {
            return Err(PackError::TileMapMismatch {
                expected: (k_tiles, n_tiles),
                got_len: kinds.len(),
            });
        }
        Ok(TileMap {
            k_tiles,
            n_tiles,
            kinds,
        })
    }

    /// A map where a fraction `sparse_fraction` of the tiles is 2:4, spread evenly over the
    /// storage order (so every thread's column range gets its share). Global weight sparsity
    /// is then about `sparse_fraction / 2`.
    pub fn spread(k_tiles: usize, n_tiles: usize, sparse_fraction: f64) -> Self {
        let total = k_tiles * n_tiles;
        let f = sparse_fraction.clamp(0.0, 1.0);
        let mut kinds = vec![TileKind::Dense; total];
        for t in 0..total {
            // Storage order is tile-column major.
            let (j, i) = (t / k_tiles.max(1), t % k_tiles.max(1));
            let before = (t as f64 * f).round() as usize;
            let after = ((t + 1) as f64 * f).round() as usize;
            if after > before {
                kinds[i * n_tiles + j] = TileKind::Sparse24;
            }
        }
        TileMap {
            k_tiles,
            n_tiles,
            kinds,
        }
    }

    pub fn k_tiles(&self) -> usize {
        self.k_tiles
    }
    pub fn n_tiles(&self) -> usize {
        self.n_tiles
    }
    pub fn get(&self, i: usize, j: usize) -> TileKind {
        self.kinds[i * self.n_tiles + j]
    }
    pub fn set(&mut self, i: usize, j: usize, kind: TileKind) {
        self.kinds[i * self.n_tiles + j] = kind;
    }
    pub fn kinds(&self) -> &[TileKind] {
        &self.kinds
    }
    /// Fraction of tiles that are 2:4.
    pub fn sparse_fraction(&self) -> f64 {
        if self.kinds.is_empty() {
            return 0.0;
        }
        self.kinds
            .iter()
            .filter(|k| **k == TileKind::Sparse24)
            .count() as f64
            / self.kinds.len() as f64
    }
}

/// Errors from building or validating a packed weight.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PackError {
    #[error("bad tile shape {tile_k}x{tile_n}: the K extent must be a positive multiple of 4 and the N extent positive")]
    BadTileShape { tile_k: usize, tile_n: usize },
    #[error("{what} has {got} elements, expected {expected} for a [{k}, {n}] weight")]
    LenMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
        k: usize,
        n: usize,
    },
    #[error("tile map is {got_len} entries, expected a {}x{} grid", expected.0, expected.1)]
    TileMapMismatch {
        expected: (usize, usize),
        got_len: usize,
    },
    #[error("mask breaks 2:4 in sparse tile ({tile_row}, {tile_col}): column {column}, group {group} (rows {k_start}..{}) keeps {kept} of 4", k_start + 4)]
    MaskBreaks24 {
        tile_row: usize,
        tile_col: usize,
        /// Global output column.
        column: usize,
        /// Group index inside the tile.
        group: usize,
        /// First global K row of the group.
        k_start: usize,
        kept: usize,
    },
    #[error("packed data is inconsistent: {0}")]
    Corrupt(String),
}

/// Where one tile lives and what it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileInfo {
    pub row: usize,
    pub col: usize,
    pub kind: TileKind,
    /// First global K row.
    pub k0: usize,
    /// Rows actually covered (≤ tile K extent).
    pub kh: usize,
    /// `kh` rounded up to a multiple of 4 (zero padded).
    pub kpad: usize,
    /// First global output column.
    pub n0: usize,
    /// Columns covered.
    pub nw: usize,
    /// Byte offset of the tile's values in [`PackedWeight::values`].
    pub val_offset: usize,
    /// Word offset of the tile's metadata in [`PackedWeight::meta`] (2:4 tiles only).
    pub meta_offset: usize,
}

impl TileInfo {
    /// Number of stored elements.
    pub fn value_count(&self) -> usize {
        match self.kind {
            TileKind::Dense => self.kpad * self.nw,
            TileKind::Sparse24 => self.kpad / 2 * self.nw,
        }
    }
    /// Number of metadata words (0 for dense tiles).
    pub fn meta_words(&self) -> usize {
        match self.kind {
            TileKind::Dense => 0,
            TileKind::Sparse24 => (self.kpad / 4).div_ceil(8) * self.nw,
        }
    }
    /// Number of 4-row groups.
    pub fn groups(&self) -> usize {
        self.kpad / 4
    }
}

/// One 64-byte line: the allocation unit of packed values, so every tile is line-aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);
// SAFETY: `Line` is `repr(C)` around a byte array of its full size (64 bytes, align 64, no
// padding), so the all-zero pattern is valid.
unsafe impl Zeroable for Line {}
// SAFETY: as above, and every bit pattern of `[u8; 64]` is valid; it is `Copy + 'static`.
unsafe impl Pod for Line {}

/// Nibble of a group with nothing kept: positions 0 and 1, values zero.
pub const EMPTY_GROUP_NIBBLE: u32 = 0b0100;

/// Bytes owned elsewhere (a memory-mapped bundle, say) that a [`PackedWeight`] can borrow.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where a packed weight's bytes live: built by [`pack`], or borrowed from a loaded file.
#[derive(Clone)]
enum Storage {
    Owned {
        values: Vec<Line>,
        meta: Vec<u32>,
    },
    Shared {
        values: SharedBytes,
        meta: SharedBytes,
    },
}

/// A packed hybrid weight. Build it with [`pack`], or wrap stored bytes with
/// [`PackedWeight::from_parts`].
#[derive(Clone)]
pub struct PackedWeight {
    k: usize,
    n: usize,
    tile: TileShape,
    dtype: WeightDtype,
    map: TileMap,
    /// Row-major over the tile grid `(i, j)`.
    tiles: Vec<TileInfo>,
    storage: Storage,
}

impl fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackedWeight")
            .field("k", &self.k)
            .field("n", &self.n)
            .field("tile", &self.tile)
            .field("dtype", &self.dtype)
            .field("sparse_fraction", &self.map.sparse_fraction())
            .field("bytes", &self.packed_bytes())
            .finish()
    }
}

impl PackedWeight {
    /// A packed weight over bytes stored elsewhere: `values` and `meta` exactly as
    /// [`values`](Self::values) and [`meta`](Self::meta) return them for the same `k`, `n`,
    /// tile shape, dtype and map. Lengths are checked against the layout, and `meta` must be
    /// 4-byte aligned; the bytes are not copied.
    pub fn from_parts(
        k: usize,
        n: usize,
        tile: TileShape,
        dtype: WeightDtype,
        map: TileMap,
        values: SharedBytes,
        meta: SharedBytes,
    ) -> Result<PackedWeight, PackError> {
        tile.validate()?;
        let (kt, nt) = tile.grid(k, n);
        if map.k_tiles != kt || map.n_tiles != nt {
            return Err(PackError::TileMapMismatch {
                expected: (kt, nt),
                got_len: map.kinds.len(),
            });
        }
        let (tiles, val_bytes, meta_words) = layout(k, n, tile, &map, dtype.size());
        let (vlen, mbytes) = ((*values).as_ref().len(), (*meta).as_ref().len());
        if vlen != val_bytes || mbytes != meta_words * 4 {
            return Err(PackError::Corrupt(format!(
                "a {k}x{n} {dtype:?} weight with this tile map needs {val_bytes} value bytes and \
                 {} metadata bytes, got {vlen} and {mbytes}",
                meta_words * 4
            )));
        }
        if bytemuck::try_cast_slice::<u8, u32>((*meta).as_ref()).is_err() {
            return Err(PackError::Corrupt(
                "metadata is not 4-byte aligned".to_string(),
            ));
        }
        Ok(PackedWeight {
            k,
            n,
            tile,
            dtype,
            map,
            tiles,
            storage: Storage::Shared { values, meta },
        })
    }

    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn tile_shape(&self) -> TileShape {
        self.tile
    }
    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }
    pub fn tile_map(&self) -> &TileMap {
        &self.map
    }
    /// Tile `(i, j)`.
    pub fn tile(&self, i: usize, j: usize) -> &TileInfo {
        &self.tiles[i * self.map.n_tiles + j]
    }
    pub fn tiles(&self) -> &[TileInfo] {
        &self.tiles
    }
    /// All stored values (tiles at their `val_offset`, 64-byte aligned, gaps zero).
    pub fn values(&self) -> &[u8] {
        match &self.storage {
            Storage::Owned { values, .. } => bytemuck::cast_slice(values),
            Storage::Shared { values, .. } => (**values).as_ref(),
        }
    }
    /// All metadata words.
    pub fn meta(&self) -> &[u32] {
        match &self.storage {
            Storage::Owned { meta, .. } => meta,
            // Alignment and length were checked in `from_parts`.
            Storage::Shared { meta, .. } => bytemuck::cast_slice((**meta).as_ref()),
        }
    }
    /// Bytes a kernel must read: stored values plus metadata (alignment gaps excluded).
    pub fn packed_bytes(&self) -> usize {
        self.tiles
            .iter()
            .map(|t| t.value_count() * self.dtype.size() + t.meta_words() * 4)
            .sum()
    }
    /// Bytes of the same weight stored all dense.
    pub fn dense_bytes(&self) -> usize {
        self.tiles
            .iter()
            .map(|t| t.kpad * t.nw * self.dtype.size())
            .sum()
    }

    /// Values of one tile as typed elements.
    pub fn tile_values<T: WeightElement>(&self, t: &TileInfo) -> &[T] {
        assert_eq!(T::DTYPE, self.dtype, "tile_values: dtype mismatch");
        let bytes = &self.values()[t.val_offset..t.val_offset + t.value_count() * T::DTYPE.size()];
        bytemuck::cast_slice(bytes)
    }
    /// Metadata words of one tile (empty for dense tiles).
    pub fn tile_meta(&self, t: &TileInfo) -> &[u32] {
        &self.meta()[t.meta_offset..t.meta_offset + t.meta_words()]
    }

    /// Rebuilds the dense `[K, N]` weight (pruned elements are zero). Exact inverse of
    /// [`pack`] on `w ⊙ mask`.
    pub fn unpack<T: WeightElement>(&self) -> Vec<T> {
        let zero = T::from_f32(0.0);
        let mut out = vec![zero; self.k * self.n];
        for t in &self.tiles {
            let vals = self.tile_values::<T>(t);
            match t.kind {
                TileKind::Dense => {
                    for kk in 0..t.kh {
                        for c in 0..t.nw {
                            out[(t.k0 + kk) * self.n + t.n0 + c] =
                                vals[((kk / 2) * t.nw + c) * 2 + (kk % 2)];
                        }
                    }
                }
                TileKind::Sparse24 => {
                    let meta = self.tile_meta(t);
                    for g in 0..t.groups() {
                        for c in 0..t.nw {
                            let nib = (meta[(g / 8) * t.nw + c] >> (4 * (g % 8))) & 0xF;
                            for s in 0..2 {
                                let kk = 4 * g + ((nib >> (2 * s)) & 3) as usize;
                                if kk < t.kh {
                                    out[(t.k0 + kk) * self.n + t.n0 + c] =
                                        vals[(g * t.nw + c) * 2 + s];
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// [`unpack`](Self::unpack) converted to f32, whatever the stored dtype.
    pub fn unpack_f32(&self) -> Vec<f32> {
        match self.dtype {
            WeightDtype::F32 => self.unpack::<f32>(),
            WeightDtype::Bf16 => self
                .unpack::<bf16>()
                .into_iter()
                .map(|v| v.to_f32())
                .collect(),
            WeightDtype::F16 => self
                .unpack::<f16>()
                .into_iter()
                .map(|v| v.to_f32())
                .collect(),
        }
    }
}

/// Lays out the tiles of a `[k, n]` weight for `map` (offsets only, no data).
fn layout(
    k: usize,
    n: usize,
    tile: TileShape,
    map: &TileMap,
    esize: usize,
) -> (Vec<TileInfo>, usize, usize) {
    let (kt, nt) = (map.k_tiles, map.n_tiles);
    let mut tiles = vec![None; kt * nt];
    let mut val_bytes = 0usize;
    let mut meta_words = 0usize;
    for j in 0..nt {
        for i in 0..kt {
            let k0 = i * tile.k;
            let n0 = j * tile.n;
            let kh = tile.k.min(k - k0);
            let mut info = TileInfo {
                row: i,
                col: j,
                kind: map.get(i, j),
                k0,
                kh,
                kpad: kh.div_ceil(4) * 4,
                n0,
                nw: tile.n.min(n - n0),
                val_offset: val_bytes,
                meta_offset: meta_words,
            };
            info.val_offset = val_bytes;
            val_bytes += (info.value_count() * esize).div_ceil(64) * 64;
            meta_words += info.meta_words();
            tiles[i * nt + j] = Some(info);
        }
    }
    let tiles = tiles
        .into_iter()
        .map(|t| t.expect("every tile laid out"))
        .collect();
    (tiles, val_bytes, meta_words)
}

/// Packs a dense `[k, n]` weight (row-major, ONNX layout) into the hybrid format.
///
/// `mask[kk * n + c] == true` keeps element `(kk, c)`; pruned elements of dense tiles are
/// stored as zeros. With `mask = None` every nonzero element is kept (so 2:4 tiles need
/// weights that are already 2:4). A 2:4 tile whose mask keeps more than two elements of a
/// group of four is rejected with [`PackError::MaskBreaks24`].
pub fn pack<T: WeightElement>(
    w: &[T],
    k: usize,
    n: usize,
    tile: TileShape,
    map: &TileMap,
    mask: Option<&[bool]>,
) -> Result<PackedWeight, PackError> {
    tile.validate()?;
    if w.len() != k * n {
        return Err(PackError::LenMismatch {
            what: "weight",
            expected: k * n,
            got: w.len(),
            k,
            n,
        });
    }
    if let Some(m) = mask {
        if m.len() != k * n {
            return Err(PackError::LenMismatch {
                what: "mask",
                expected: k * n,
                got: m.len(),
                k,
                n,
            });
        }
    }
    let (kt, nt) = tile.grid(k, n);
    if map.k_tiles != kt || map.n_tiles != nt {
        return Err(PackError::TileMapMismatch {
            expected: (kt, nt),
            got_len: map.kinds.len(),
        });
    }
    let esize = T::DTYPE.size();
    let (tiles, val_bytes, meta_words) = layout(k, n, tile, map, esize);
    let mut values = vec![Line([0; 64]); val_bytes / 64];
    let mut meta = vec![0u32; meta_words];
    let zero = T::from_f32(0.0);
    let keep = |kk: usize, c: usize| -> bool {
        match mask {
            Some(m) => m[kk * n + c],
            None => w[kk * n + c].to_f32() != 0.0,
        }
    };
    {
        let all: &mut [T] = bytemuck::cast_slice_mut(&mut values[..]);
        for t in &tiles {
            let base = t.val_offset / esize;
            let vals = &mut all[base..base + t.value_count()];
            match t.kind {
                TileKind::Dense => {
                    for kk in 0..t.kh {
                        let gk = t.k0 + kk;
                        for c in 0..t.nw {
                            let gc = t.n0 + c;
                            vals[((kk / 2) * t.nw + c) * 2 + (kk % 2)] =
                                if keep(gk, gc) { w[gk * n + gc] } else { zero };
                        }
                    }
                }
                TileKind::Sparse24 => {
                    let tm = &mut meta[t.meta_offset..t.meta_offset + t.meta_words()];
                    // Unused nibbles of the last word: the canonical empty pattern.
                    for word in tm.iter_mut() {
                        *word = 0x4444_4444;
                    }
                    for g in 0..t.groups() {
                        for c in 0..t.nw {
                            let gc = t.n0 + c;
                            let mut pos = [0usize; 4];
                            let mut kept = 0;
                            for p in 0..4 {
                                let kk = 4 * g + p;
                                if kk < t.kh && keep(t.k0 + kk, gc) {
                                    if kept < 4 {
                                        pos[kept] = p;
                                    }
                                    kept += 1;
                                }
                            }
                            if kept > 2 {
                                return Err(PackError::MaskBreaks24 {
                                    tile_row: t.row,
                                    tile_col: t.col,
                                    column: gc,
                                    group: g,
                                    k_start: t.k0 + 4 * g,
                                    kept,
                                });
                            }
                            // Complete with the lowest unused positions, keep ascending.
                            let mut sel = [usize::MAX; 2];
                            let mut is_kept = [false; 2];
                            sel[..kept].copy_from_slice(&pos[..kept]);
                            is_kept[..kept].fill(true);
                            let mut fill = 0;
                            for slot in kept..2 {
                                while sel[..slot].contains(&fill) {
                                    fill += 1;
                                }
                                sel[slot] = fill;
                                fill += 1;
                            }
                            if sel[0] > sel[1] {
                                sel.swap(0, 1);
                                is_kept.swap(0, 1);
                            }
                            for s in 0..2 {
                                vals[(g * t.nw + c) * 2 + s] = if is_kept[s] {
                                    w[(t.k0 + 4 * g + sel[s]) * n + gc]
                                } else {
                                    zero
                                };
                            }
                            let nib = (sel[0] | (sel[1] << 2)) as u32;
                            let word = &mut tm[(g / 8) * t.nw + c];
                            let shift = 4 * (g % 8);
                            *word = (*word & !(0xF << shift)) | (nib << shift);
                        }
                    }
                }
            }
        }
    }
    Ok(PackedWeight {
        k,
        n,
        tile,
        dtype: T::DTYPE,
        map: map.clone(),
        tiles,
        storage: Storage::Owned { values, meta },
    })
}

/// A mask that keeps everything in dense tiles and, in 2:4 tiles, the two largest-magnitude
/// elements of every group of four (ties: lower position). Rows past `k` are ignored.
pub fn magnitude_24_mask<T: WeightElement>(
    w: &[T],
    k: usize,
    n: usize,
    tile: TileShape,
    map: &TileMap,
) -> Result<Vec<bool>, PackError> {
    tile.validate()?;
    if w.len() != k * n {
        return Err(PackError::LenMismatch {
            what: "weight",
            expected: k * n,
            got: w.len(),
            k,
            n,
        });
    }
    let mut mask = vec![true; k * n];
    for i in 0..map.k_tiles {
        for j in 0..map.n_tiles {
            if map.get(i, j) != TileKind::Sparse24 {
                continue;
            }
            let k0 = i * tile.k;
            let k1 = (k0 + tile.k).min(k);
            let n0 = j * tile.n;
            let n1 = (n0 + tile.n).min(n);
            for gk in (k0..k1).step_by(4) {
                let len = (gk + 4).min(k1) - gk;
                for c in n0..n1 {
                    let mut idx = [0usize, 1, 2, 3];
                    let mag = |p: usize| w[(gk + p) * n + c].to_f32().abs();
                    // Stable insertion sort by descending magnitude (ties: lower position).
                    for a in 1..len {
                        let mut b = a;
                        while b > 0 && mag(idx[b]).total_cmp(&mag(idx[b - 1])).is_gt() {
                            idx.swap(b, b - 1);
                            b -= 1;
                        }
                    }
                    for &p in &idx[2.min(len)..len] {
                        mask[(gk + p) * n + c] = false;
                    }
                }
            }
        }
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_example_matches_docs() {
        // One 8x3 sparse tile: group 0 keeps rows 1 and 3 of column 0.
        let (k, n) = (8, 3);
        let mut w = vec![0f32; k * n];
        w[n] = 1.0; // (1, 0)
        w[3 * n] = 2.0; // (3, 0)
        w[4 * n + 2] = 5.0; // (4, 2) alone in its group
        let tile = TileShape::new(8, 4).unwrap();
        let map = TileMap::uniform(1, 1, TileKind::Sparse24);
        let p = pack(&w, k, n, tile, &map, None).unwrap();
        let t = *p.tile(0, 0);
        assert_eq!(t.meta_words(), 3);
        let meta = p.tile_meta(&t);
        // Column 0: group 0 = {1, 3} -> 0b1101, group 1 empty -> 0b0100, rest empty.
        assert_eq!(meta[0], 0x4444_444D);
        // Column 2: group 1 keeps position 0 plus filler 1 -> 0b0100.
        assert_eq!(meta[2] & 0xFF, 0x44);
        let vals = p.tile_values::<f32>(&t);
        assert_eq!(&vals[0..2], &[1.0, 2.0]);
        assert_eq!(vals[(3 + 2) * 2], 5.0);
        assert_eq!(p.unpack::<f32>(), w);
    }

    #[test]
    fn bad_mask_is_rejected_with_location() {
        let (k, n) = (12, 5);
        let w = vec![1f32; k * n];
        let tile = TileShape::new(8, 4).unwrap();
        let mut map = TileMap::uniform(2, 2, TileKind::Dense);
        map.set(1, 1, TileKind::Sparse24);
        let mut mask = magnitude_24_mask(&w, k, n, tile, &map).unwrap();
        assert!(pack(&w, k, n, tile, &map, Some(&mask)).is_ok());
        // Break column 4, rows 8..12 (tile (1, 1), group 0).
        mask[8 * n + 4] = true;
        mask[9 * n + 4] = true;
        mask[10 * n + 4] = true;
        let err = pack(&w, k, n, tile, &map, Some(&mask)).unwrap_err();
        assert_eq!(
            err,
            PackError::MaskBreaks24 {
                tile_row: 1,
                tile_col: 1,
                column: 4,
                group: 0,
                k_start: 8,
                kept: 3
            }
        );
        assert!(err.to_string().contains("column 4"));
        // Without a mask, nonzeros define the pattern: an all-ones 2:4 tile is rejected.
        assert!(matches!(
            pack(&w, k, n, tile, &map, None),
            Err(PackError::MaskBreaks24 { .. })
        ));
    }

    #[test]
    fn bad_shapes_are_rejected() {
        assert!(matches!(
            TileShape::new(6, 4),
            Err(PackError::BadTileShape { .. })
        ));
        let tile = TileShape::default();
        let map = TileMap::uniform(1, 1, TileKind::Dense);
        assert!(matches!(
            pack(&[0f32; 5], 2, 3, tile, &map, None),
            Err(PackError::LenMismatch { .. })
        ));
        let map2 = TileMap::uniform(2, 1, TileKind::Dense);
        assert!(matches!(
            pack(&[0f32; 6], 2, 3, tile, &map2, None),
            Err(PackError::TileMapMismatch { .. })
        ));
    }

    #[test]
    fn spread_map_hits_the_fraction() {
        let m = TileMap::spread(32, 86, 0.7);
        assert!((m.sparse_fraction() - 0.7).abs() < 0.01);
        assert_eq!(TileMap::spread(4, 4, 0.0).sparse_fraction(), 0.0);
        assert_eq!(TileMap::spread(4, 4, 1.0).sparse_fraction(), 1.0);
    }

    #[test]
    fn byte_ratio_of_sparse_bf16_tile() {
        let (k, n) = (128, 128);
        let w = vec![bf16::from_f32(1.0); k * n];
        let map = TileMap::uniform(1, 1, TileKind::Sparse24);
        let mask = magnitude_24_mask(&w, k, n, TileShape::default(), &map).unwrap();
        let p = pack(&w, k, n, TileShape::default(), &map, Some(&mask)).unwrap();
        assert_eq!(p.packed_bytes() * 16, p.dense_bytes() * 9); // 0.5625
    }
}
