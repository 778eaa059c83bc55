//! Host-side checks of the CUDA kernels that need no GPU.
//!
//! * Every kernel the runtime launches is defined, `extern "C"`, in the source it names.
//! * `TileDesc` has the layout of the C struct the kernels read.
//! * A lane-level model of `hybrid_mma` (kernels/cuda/hybrid.cu): the fragment registers each
//!   of the 32 lanes loads — transcribed from the kernel's index arithmetic — are fed to models
//!   of `mma.m16n8k16` and `mma.sp::ordered_metadata.m16n8k32` built from the PTX ISA's
//!   fragment layouts (A row = groupID (+8), column pair from threadID_in_group; B column =
//!   groupID; metadata of row r from lane 4r, of row r + 8 from lane 4r + 1, selector 0). The
//!   product must equal `X · W` of the unpacked weight: this checks that the packed format, the
//!   kernel's loads and the instructions' layouts agree, on ragged shapes and mixed tiles. It
//!   cannot check the hardware itself; the GPU tests in tests/tests/cuda.rs do, where a GPU is.

use patch_kernels::cuda::{tile_descs, TileDesc, HYBRID, KERNELS, OPS};
use patch_kernels::{bf16, magnitude_24_mask, pack, PackedWeight, TileMap, TileShape};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn every_launched_kernel_is_defined_in_its_source() {
    for (file, name) in KERNELS {
        let src = match file {
            "hybrid.cu" => HYBRID,
            "ops.cu" => OPS,
            other => panic!("unknown source {other}"),
        };
        let defined = src.match_indices(name).any(|(at, _)| {
            let before = &src[..at];
            let line_start = before.rfind("extern \"C\"").unwrap_or(0);
            let head = &src[line_start..at];
            head.starts_with("extern \"C\"")
                && head.contains("__global__")
                && !head[10..].contains(';')
                && src[at + name.len()..].trim_start().starts_with('(')
        });
        assert!(
            defined,
            "{name} is not an extern \"C\" __global__ kernel of {file}"
        );
    }
}

#[test]
fn tile_desc_has_the_c_layout() {
    // struct TileDesc { int kind, k0, kh, kpad, n0, nw; long long val, meta; }
    assert_eq!(std::mem::size_of::<TileDesc>(), 40);
    assert_eq!(std::mem::align_of::<TileDesc>(), 8);
    let d = TileDesc {
        val: 1,
        ..TileDesc::default()
    };
    let bytes: &[u8] = bytemuck::bytes_of(&d);
    assert_eq!(bytes[24], 1, "val must start at byte 24");
}

fn randoms(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn lo(w: u32) -> f32 {
    f32::from_bits(w << 16)
}
fn hi(w: u32) -> f32 {
    f32::from_bits(w & 0xffff_0000)
}
/// `cvt.rn.bf16x2.f32`: `lo` in the low half.
fn pack_bf16x2(l: f32, h: f32) -> u32 {
    u32::from(bf16::from_f32(l).to_bits()) | (u32::from(bf16::from_f32(h).to_bits()) << 16)
}

/// Per lane: 4 A registers, B registers per token group, metadata register.
struct Lane {
    g: usize,
    t: usize,
}

fn lanes() -> impl Iterator<Item = Lane> {
    (0..32).map(|l| Lane {
        g: l >> 2,
        t: l & 3,
    })
}

/// `mma.m16n8k16.row.col` (bf16 in, f32 accumulate) on per-lane fragments.
fn mma_dense(acc: &mut [[f32; 8]; 16], a: &[[u32; 4]; 32], b: &[[u32; 2]; 32]) {
    let mut am = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 16];
    for l in lanes() {
        let id = l.g * 4 + l.t;
        for (i, &reg) in a[id].iter().enumerate() {
            let row = l.g + 8 * (i % 2);
            let col = 2 * l.t + 8 * (i / 2);
            am[row][col] = lo(reg);
            am[row][col + 1] = hi(reg);
        }
        for (i, &reg) in b[id].iter().enumerate() {
            let k = 2 * l.t + 8 * i;
            bm[k][l.g] = lo(reg);
            bm[k + 1][l.g] = hi(reg);
        }
    }
    for (r, row) in acc.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v += (0..16).map(|k| am[r][k] * bm[k][c]).sum::<f32>();
        }
    }
}

/// `mma.sp::ordered_metadata.m16n8k32.row.col` (bf16, selector 0) on per-lane fragments.
fn mma_sparse(acc: &mut [[f32; 8]; 16], a: &[[u32; 4]; 32], b: &[[u32; 4]; 32], e: &[u32; 32]) {
    let mut comp = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 32];
    for l in lanes() {
        let id = l.g * 4 + l.t;
        for (i, &reg) in a[id].iter().enumerate() {
            let row = l.g + 8 * (i % 2);
            let col = 2 * l.t + 8 * (i / 2);
            comp[row][col] = lo(reg);
            comp[row][col + 1] = hi(reg);
        }
        for (i, &reg) in b[id].iter().enumerate() {
            let k = 2 * l.t + 8 * i;
            bm[k][l.g] = lo(reg);
            bm[k + 1][l.g] = hi(reg);
        }
    }
    let mut am = [[0f32; 32]; 16];
    for (r, row) in am.iter_mut().enumerate() {
        let meta = if r < 8 { e[4 * r] } else { e[4 * (r - 8) + 1] };
        for (j, &value) in comp[r].iter().enumerate() {
            let group = j / 2;
            let nibble = (meta >> (4 * group)) & 0xf;
            let (i0, i1) = (nibble & 3, nibble >> 2);
            assert!(
                i0 < i1,
                "metadata of row {r}, group {group} is not ordered: {nibble:#06b}"
            );
            let pos = if j % 2 == 0 { i0 } else { i1 } as usize;
            row[4 * group + pos] += value;
        }
    }
    for (r, row) in acc.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v += (0..32).map(|k| am[r][k] * bm[k][c]).sum::<f32>();
        }
    }
}

/// `load_x2` of hybrid.cu.
fn load_x2(x: &[f32], k: usize, tok: usize, m: usize, k0: usize, kl: usize, kh: usize) -> u32 {
    if tok >= m {
        return 0;
    }
    let row = &x[tok * k..];
    let l = if kl < kh { row[k0 + kl] } else { 0.0 };
    let h = if kl + 1 < kh { row[k0 + kl + 1] } else { 0.0 };
    pack_bf16x2(l, h)
}

/// `hybrid_mma<BF16 = true>` for every warp and block, lane by lane.
fn model_hybrid_mma(w: &PackedWeight, x: &[f32], m: usize) -> Vec<f32> {
    let (k, n) = (w.k(), w.n());
    let tiles = tile_descs(w);
    let words: &[u32] = bytemuck::cast_slice(w.values());
    let meta = w.meta();
    let (k_tiles, n_tiles, tile_n) = (
        w.tile_map().k_tiles(),
        w.tile_map().n_tiles(),
        w.tile_shape().n,
    );
    let per_col = tile_n.div_ceil(16);
    let mut y = vec![f32::NAN; m * n];
    for cb in 0..n_tiles * per_col {
        let tj = cb / per_col;
        let c_base = (cb % per_col) * 16;
        for tok0 in (0..m).step_by(32) {
            // acc[j][row][col]: the m16n8 accumulator of token group j.
            let mut acc = [[[0f32; 8]; 16]; 4];
            for ti in 0..k_tiles {
                let td = tiles[tj * k_tiles + ti];
                let (nw, kh, kpad) = (td.nw as usize, td.kh as usize, td.kpad as usize);
                let k0 = td.k0 as usize;
                if c_base >= nw {
                    continue;
                }
                let tv = &words[td.val as usize / 2..];
                let word = |p: usize, r: usize, limit: usize| {
                    if r < nw && p < limit {
                        tv[p * nw + r]
                    } else {
                        0
                    }
                };
                if td.kind == 0 {
                    let pairs = kpad / 2;
                    for kk in (0..kpad).step_by(16) {
                        let mut a = [[0u32; 4]; 32];
                        for l in lanes() {
                            let (r0, r1) = (c_base + l.g, c_base + l.g + 8);
                            let (p0, p1) = (kk / 2 + l.t, kk / 2 + l.t + 4);
                            a[l.g * 4 + l.t] = [
                                word(p0, r0, pairs),
                                word(p0, r1, pairs),
                                word(p1, r0, pairs),
                                word(p1, r1, pairs),
                            ];
                        }
                        for (j, acc_j) in acc.iter_mut().enumerate() {
                            let mut b = [[0u32; 2]; 32];
                            for l in lanes() {
                                let tok = tok0 + 8 * j + l.g;
                                b[l.g * 4 + l.t] = [
                                    load_x2(x, k, tok, m, k0, kk + 2 * l.t, kh),
                                    load_x2(x, k, tok, m, k0, kk + 2 * l.t + 8, kh),
                                ];
                            }
                            mma_dense(acc_j, &a, &b);
                        }
                    }
                } else {
                    let groups = kpad / 4;
                    let tm = &meta[td.meta as usize..];
                    let mut wi = 0;
                    while wi * 8 < groups {
                        let mut a = [[0u32; 4]; 32];
                        let mut e = [0u32; 32];
                        for l in lanes() {
                            let (r0, r1) = (c_base + l.g, c_base + l.g + 8);
                            let (q0, q1) = (8 * wi + l.t, 8 * wi + l.t + 4);
                            a[l.g * 4 + l.t] = [
                                word(q0, r0, groups),
                                word(q0, r1, groups),
                                word(q1, r0, groups),
                                word(q1, r1, groups),
                            ];
                            let er = if l.t & 1 == 1 { r1 } else { r0 };
                            e[l.g * 4 + l.t] = if er < nw {
                                tm[wi * nw + er]
                            } else {
                                0x4444_4444
                            };
                        }
                        let kk = 32 * wi;
                        for (j, acc_j) in acc.iter_mut().enumerate() {
                            let mut b = [[0u32; 4]; 32];
                            for l in lanes() {
                                let tok = tok0 + 8 * j + l.g;
                                for (r, reg) in b[l.g * 4 + l.t].iter_mut().enumerate() {
                                    *reg = load_x2(x, k, tok, m, k0, kk + 8 * r + 2 * l.t, kh);
                                }
                            }
                            mma_sparse(acc_j, &a, &b, &e);
                        }
                        wi += 1;
                    }
                }
            }
            // The kernel's write-back: lane (g, t) holds rows g, g + 8 and columns 2t, 2t + 1.
            let n_first = tj * tile_n + c_base;
            for (j, acc_j) in acc.iter().enumerate() {
                for l in lanes() {
                    for q in 0..4 {
                        let dr = l.g + if q >= 2 { 8 } else { 0 };
                        let col = n_first + dr;
                        let tok = tok0 + 8 * j + 2 * l.t + (q & 1);
                        if tok < m && col < n && c_base + dr < tile_n {
                            y[tok * n + col] = acc_j[dr][2 * l.t + (q & 1)];
                        }
                    }
                }
            }
        }
    }
    y
}

#[test]
fn the_tensor_core_path_computes_x_times_w_on_the_packed_format() {
    // (k, n, tile k, tile n, rows): ragged in K and N, tiles narrower than a warp's 16
    // columns and not multiples of 32 in K, token counts off the 32-token blocks.
    let cases = [
        (200, 72, 64, 48, 9),
        (64, 32, 32, 16, 33),
        (100, 40, 36, 24, 40),
        (96, 50, 96, 8, 17),
    ];
    for (k, n, tk, tn, m) in cases {
        let tile = TileShape::new(tk, tn).unwrap();
        let (kt, nt) = tile.grid(k, n);
        for sparse_fraction in [0.0, 0.5, 1.0] {
            let map = TileMap::spread(kt, nt, sparse_fraction);
            let wf = randoms(k * n, (k + n) as u64);
            let keep = magnitude_24_mask(&wf, k, n, tile, &map).unwrap();
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let packed = pack(&wb, k, n, tile, &map, Some(&keep)).unwrap();
            let dense = packed.unpack_f32();
            let x = randoms(m * k, m as u64);
            let got = model_hybrid_mma(&packed, &x, m);
            for r in 0..m {
                for c in 0..n {
                    let mut want = 0f64;
                    let mut mag = 0f64;
                    for i in 0..k {
                        let xv = f64::from(bf16::from_f32(x[r * k + i]).to_f32());
                        want += xv * f64::from(dense[i * n + c]);
                        mag += (xv * f64::from(dense[i * n + c])).abs();
                    }
                    let g = f64::from(got[r * n + c]);
                    assert!(
                        (g - want).abs() <= 1e-5 * mag + 1e-6,
                        "k={k} n={n} tile={tk}x{tn} m={m} sparse={sparse_fraction}: y[{r},{c}] = {g}, want {want}"
                    );
                }
            }
        }
    }
}
