//! Property tests: every SIMD path against its scalar twin, the scalar twin against the
//! reference GEMM, pack/unpack round trips, and rejection of masks that break 2:4.

use patch_kernels::reference::gemm_f32;
use patch_kernels::{
    bf16, f16, magnitude_24_mask, pack, CpuKernels, GemvPolicy, GroupProduct, KernelError,
    PackError, PackedWeight, SimdPath, TileKind, TileMap, TileShape, WeightDtype, WeightElement,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug)]
enum Mix {
    AllDense,
    AllSparse,
    Mixed,
}

fn tile_map(kt: usize, nt: usize, mix: Mix, rng: &mut impl Rng) -> TileMap {
    match mix {
        Mix::AllDense => TileMap::uniform(kt, nt, TileKind::Dense),
        Mix::AllSparse => TileMap::uniform(kt, nt, TileKind::Sparse24),
        Mix::Mixed => {
            let kinds = (0..kt * nt)
                .map(|_| {
                    if rng.gen_bool(0.5) {
                        TileKind::Sparse24
                    } else {
                        TileKind::Dense
                    }
                })
                .collect();
            TileMap::from_kinds(kt, nt, kinds).unwrap()
        }
    }
}

/// Random weights of type `T`, a map and a mask (2:4 by magnitude, plus random extra pruning
/// everywhere so groups with 0 or 1 kept elements occur too).
fn random_packed<T: WeightElement>(
    k: usize,
    n: usize,
    tile: TileShape,
    mix: Mix,
    seed: u64,
) -> (Vec<T>, Vec<bool>, PackedWeight) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let w: Vec<T> = (0..k * n)
        .map(|_| T::from_f32(rng.gen_range(-1.0f32..1.0)))
        .collect();
    let (kt, nt) = tile.grid(k, n);
    let map = tile_map(kt, nt, mix, &mut rng);
    let mut mask = magnitude_24_mask(&w, k, n, tile, &map).unwrap();
    for m in mask.iter_mut() {
        if rng.gen_bool(0.1) {
            *m = false;
        }
    }
    let packed = pack(&w, k, n, tile, &map, Some(&mask)).unwrap();
    (w, mask, packed)
}

fn packed_of(
    dtype: WeightDtype,
    k: usize,
    n: usize,
    tile: TileShape,
    mix: Mix,
    seed: u64,
) -> PackedWeight {
    match dtype {
        WeightDtype::F32 => random_packed::<f32>(k, n, tile, mix, seed).2,
        WeightDtype::Bf16 => random_packed::<bf16>(k, n, tile, mix, seed).2,
        WeightDtype::F16 => random_packed::<f16>(k, n, tile, mix, seed).2,
    }
}

fn check_round_trip<T: WeightElement>(k: usize, n: usize, tile: TileShape, mix: Mix, seed: u64) {
    let (w, mask, p) = random_packed::<T>(k, n, tile, mix, seed);
    let want: Vec<T> = w
        .iter()
        .zip(&mask)
        .map(|(&v, &keep)| if keep { v } else { T::from_f32(0.0) })
        .collect();
    let got = p.unpack::<T>();
    assert!(
        bytemuck::cast_slice::<T, u8>(&got) == bytemuck::cast_slice::<T, u8>(&want),
        "round trip differs for {k}x{n} tile {tile:?} {mix:?}"
    );
    // Repacking the unpacked weight without a mask gives the same bytes.
    let again = pack(&got, k, n, tile, p.tile_map(), None).unwrap();
    assert_eq!(again.values(), p.values());
    assert!(p.packed_bytes() <= p.dense_bytes());
}

/// Runs `w` on `path` and checks it against the scalar twin and the f32 reference.
fn check_paths(m: usize, w: &PackedWeight, with_bias: bool, threads: usize, seed: u64) {
    let (k, n) = (w.k(), w.n());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let bias: Option<Vec<f32>> =
        with_bias.then(|| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect());
    let dense = w.unpack_f32();
    let mut want = vec![0f32; m * n];
    gemm_f32(m, k, n, &x, &dense, bias.as_deref(), &mut want);
    // Tolerance from the magnitude of the terms.
    let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let wa: Vec<f32> = dense.iter().map(|v| v.abs()).collect();
    let mut mag = vec![0f32; m * n];
    gemm_f32(m, k, n, &xa, &wa, None, &mut mag);

    let scalar = CpuKernels::new(SimdPath::Scalar, 1).unwrap();
    let mut twin = vec![f32::NAN; m * n];
    scalar.matmul(m, &x, w, bias.as_deref(), &mut twin).unwrap();
    for i in 0..m * n {
        let tol = 1e-5 * (mag[i] + 1.0);
        assert!(
            (twin[i] - want[i]).abs() <= tol,
            "scalar twin vs reference at {i} ({m}x{k}x{n}): {} vs {}",
            twin[i],
            want[i]
        );
    }
    // Paths that round X to bf16 have the scalar path on the rounded X as their twin, which
    // in turn stays within the rounding's bound (2^-8 relative per element) of the f32 one.
    let x_bf16: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let mut twin_bf16 = vec![f32::NAN; m * n];
    scalar
        .matmul(m, &x_bf16, w, bias.as_deref(), &mut twin_bf16)
        .unwrap();
    for i in 0..m * n {
        let tol = mag[i] / 256.0 + 1e-5 * (mag[i] + 1.0);
        assert!(
            (twin_bf16[i] - twin[i]).abs() <= tol,
            "bf16-X twin vs f32 twin at {i} ({m}x{k}x{n}, mag {}): {} vs {}",
            mag[i],
            twin_bf16[i],
            twin[i]
        );
    }
    for (path, gemv) in SimdPath::available()
        .into_iter()
        .flat_map(|p| GemvPolicy::ALL.map(|g| (p, g)))
    {
        let kern = CpuKernels::new(path, threads).unwrap().with_gemv(gemv);
        let mut got = vec![f32::NAN; m * n];
        kern.matmul(m, &x, w, bias.as_deref(), &mut got).unwrap();
        let (twin, what) = if path.rounds_activations(m, w.dtype()) {
            (&twin_bf16, "scalar twin on bf16 X")
        } else {
            (&twin, "scalar twin")
        };
        for i in 0..m * n {
            let tol = 1e-5 * (mag[i] + 1.0);
            assert!(
                (got[i] - twin[i]).abs() <= tol,
                "{path} (GEMV {gemv}, {threads} threads) vs {what} at row {} col {} ({m}x{k}x{n}, {:?}): {} vs {}",
                i / n,
                i % n,
                w.dtype(),
                got[i],
                twin[i]
            );
        }
    }
}

fn dtype_strategy() -> impl Strategy<Value = WeightDtype> {
    prop_oneof![
        Just(WeightDtype::F32),
        Just(WeightDtype::Bf16),
        Just(WeightDtype::F16)
    ]
}

fn mix_strategy() -> impl Strategy<Value = Mix> {
    prop_oneof![Just(Mix::AllDense), Just(Mix::AllSparse), Just(Mix::Mixed)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pack_unpack_round_trips_exactly(
        k in 1usize..150, n in 1usize..150, tk in 1usize..20, tn in 1usize..70,
        dtype in dtype_strategy(), mix in mix_strategy(), seed in any::<u64>(),
    ) {
        let tile = TileShape::new(4 * tk, tn).unwrap();
        match dtype {
            WeightDtype::F32 => check_round_trip::<f32>(k, n, tile, mix, seed),
            WeightDtype::Bf16 => check_round_trip::<bf16>(k, n, tile, mix, seed),
            WeightDtype::F16 => check_round_trip::<f16>(k, n, tile, mix, seed),
        }
    }

    #[test]
    fn every_path_matches_scalar_twin(
        m in 1usize..40, k in 1usize..200, n in 1usize..200,
        tk in 1usize..20, tn in 1usize..80,
        dtype in dtype_strategy(), mix in mix_strategy(),
        with_bias in any::<bool>(), threads in 1usize..4, seed in any::<u64>(),
    ) {
        let tile = TileShape::new(4 * tk, tn).unwrap();
        let w = packed_of(dtype, k, n, tile, mix, seed);
        check_paths(m, &w, with_bias, threads, seed ^ 0x5eed);
    }

    #[test]
    fn mask_breaking_24_is_rejected_with_its_location(
        k in 4usize..64, n in 1usize..40, seed in any::<u64>(),
    ) {
        let tile = TileShape::new(8, 16).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w: Vec<f32> = (0..k * n).map(|_| rng.gen_range(0.5f32..1.0)).collect();
        let (kt, nt) = tile.grid(k, n);
        let map = TileMap::uniform(kt, nt, TileKind::Sparse24);
        let mut mask = magnitude_24_mask(&w, k, n, tile, &map).unwrap();
        prop_assert!(pack(&w, k, n, tile, &map, Some(&mask)).is_ok());
        // Keep three elements of one full group.
        let g_row = 4 * rng.gen_range(0..k / 4);
        let col = rng.gen_range(0..n);
        for r in g_row..g_row + 3 {
            mask[r * n + col] = true;
        }
        let err = pack(&w, k, n, tile, &map, Some(&mask)).unwrap_err();
        let first_bad = (0..k).step_by(4).flat_map(|g| (0..n).map(move |c| (g, c)))
            .find(|&(g, c)| (g..(g + 4).min(k)).filter(|r| mask[r * n + c]).count() > 2);
        let (tile_k0, _) = (g_row / 8 * 8, 0);
        prop_assert!(first_bad.is_some());
        match err {
            PackError::MaskBreaks24 { tile_row, tile_col, column, k_start, kept, group } => {
                prop_assert_eq!(column, col);
                prop_assert_eq!(k_start, g_row);
                prop_assert_eq!(tile_row, g_row / 8);
                prop_assert_eq!(tile_col, col / 16);
                prop_assert_eq!(group, (g_row - tile_k0) / 4);
                prop_assert!(kept >= 3);
            }
            other => prop_assert!(false, "unexpected error {other:?}"),
        }
    }
}

/// Default 128x128 tiles on ragged shapes, M values that hit the GEMV kernel, every GEMM
/// row-tail, more than one row chunk, and both thread counts.
#[test]
fn default_tiles_ragged_shapes_all_paths() {
    let tile = TileShape::default();
    let mut seed = 1;
    for &(m, k, n) in &[
        (1, 300, 200),
        (1, 576, 576),
        (2, 200, 250),
        (3, 130, 290),
        (9, 257, 144),
        (17, 129, 33),
        (261, 36, 40),
    ] {
        for dtype in WeightDtype::ALL {
            for mix in [Mix::AllDense, Mix::AllSparse, Mix::Mixed] {
                let w = packed_of(dtype, k, n, tile, mix, seed);
                check_paths(m, &w, seed % 2 == 0, 2, seed);
                seed += 1;
            }
        }
    }
}

/// Tiles wider than one GEMV pass of the AVX2 kernel (16 vectors of 8 columns): the
/// accumulator chunks of one tile row, with a ragged last chunk.
#[test]
fn gemv_on_tiles_wider_than_one_pass() {
    let tile = TileShape::new(16, 300).unwrap();
    let mut seed = 90;
    for (k, n) in [(40, 600), (33, 301)] {
        for dtype in WeightDtype::ALL {
            for mix in [Mix::AllDense, Mix::AllSparse, Mix::Mixed] {
                let w = packed_of(dtype, k, n, tile, mix, seed);
                check_paths(1, &w, seed % 2 == 0, 1 + seed as usize % 2, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn shape_errors_are_structured() {
    let tile = TileShape::default();
    let w = packed_of(WeightDtype::F32, 8, 4, tile, Mix::AllDense, 3);
    let kern = CpuKernels::new(SimdPath::Scalar, 1).unwrap();
    let mut y = vec![0f32; 4];
    let err = kern.matmul(1, &[0.0; 7], &w, None, &mut y).unwrap_err();
    assert_eq!(
        err,
        KernelError::Shape {
            what: "x",
            expected: 8,
            got: 7,
            m: 1,
            k: 8,
            n: 4
        }
    );
    assert!(matches!(
        kern.matmul(1, &[0.0; 8], &w, Some(&[1.0; 3]), &mut y),
        Err(KernelError::Shape { what: "bias", .. })
    ));
    assert!(matches!(
        CpuKernels::new(SimdPath::Scalar, 0),
        Err(KernelError::BadThreads(_))
    ));
}

#[test]
fn empty_reduction_gives_bias() {
    let tile = TileShape::default();
    let map = TileMap::uniform(0, 1, TileKind::Dense);
    let w = pack::<f32>(&[], 0, 3, tile, &map, None).unwrap();
    for path in SimdPath::available() {
        let kern = CpuKernels::new(path, 2).unwrap();
        let mut y = vec![f32::NAN; 6];
        kern.matmul(2, &[], &w, Some(&[1.0, 2.0, 3.0]), &mut y)
            .unwrap();
        assert_eq!(y, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }
}

/// A group of sibling products (mixed widths, dtypes and tile kinds, one shared X) gives
/// bit for bit what the products give one by one, on every path and thread count, on both
/// sides of the bf16-rounding row threshold.
#[test]
fn a_group_of_products_equals_the_products_one_by_one() {
    let tile = TileShape::new(32, 16).unwrap();
    let k = 70;
    let ws = [
        packed_of(WeightDtype::Bf16, k, 45, tile, Mix::Mixed, 1),
        packed_of(WeightDtype::Bf16, k, 16, tile, Mix::AllSparse, 2),
        packed_of(WeightDtype::F32, k, 33, tile, Mix::AllDense, 3),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let bias: Vec<f32> = (0..45).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    for path in SimdPath::available() {
        for threads in [1, 2, 3] {
            let kern = CpuKernels::new(path, threads).unwrap();
            for m in [1, 5, 20] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let biases = [Some(&bias[..]), None, None];
                let mut alone: Vec<Vec<f32>> = Vec::new();
                for (w, b) in ws.iter().zip(biases) {
                    let mut y = vec![0f32; m * w.n()];
                    kern.matmul(m, &x, w, b, &mut y).unwrap();
                    alone.push(y);
                }
                let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.n()]).collect();
                let mut group: Vec<GroupProduct<'_>> = ws
                    .iter()
                    .zip(biases)
                    .zip(ys.iter_mut())
                    .map(|((w, bias), y)| GroupProduct { w, bias, y })
                    .collect();
                kern.matmul_group(m, &x, &mut group).unwrap();
                drop(group);
                assert_eq!(ys, alone, "{path:?}, {threads} threads, m = {m}");
            }
        }
    }
}

/// bf16 GEMMs on every AMX block shape (2 x 2, 2 x 1, 1 x 2, 1 x 1 accumulator tiles), with
/// rows past a multiple of 16, K past a multiple of 32, 2:4 tiles expanded, and more than
/// one row chunk. On CPUs without AMX this checks the other paths on the same shapes.
#[test]
fn bf16_gemms_on_every_amx_block_shape() {
    let mut seed = 700;
    for &(m, k, n, tile) in &[
        (16, 32, 16, TileShape::new(32, 16).unwrap()),
        (32, 64, 32, TileShape::new(64, 32).unwrap()),
        (48, 96, 48, TileShape::new(32, 48).unwrap()),
        (47, 100, 80, TileShape::default()),
        (100, 576, 200, TileShape::default()),
        (300, 130, 64, TileShape::new(64, 64).unwrap()),
    ] {
        for mix in [Mix::AllDense, Mix::AllSparse, Mix::Mixed] {
            let w = packed_of(WeightDtype::Bf16, k, n, tile, mix, seed);
            check_paths(m, &w, seed % 2 == 0, 1 + seed as usize % 2, seed);
            seed += 1;
        }
    }
}
