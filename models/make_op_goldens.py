"""Per-op ONNX Runtime goldens: one tiny single-node ONNX model per case.

Every op our runtime registers in the default domain (``patchc list-ops``) gets one or more
cases here, each checked by ``tests/tests/op_goldens.rs`` against the outputs ONNX Runtime
produces. A case is written to ``fixtures/ops/<case>/``:

    model.onnx        one node; data inputs are graph inputs, and every input the importer
                      needs at compile time (shapes, axes, starts/ends, repeats, ...) is an
                      initializer
    input_<i>.pb      TensorProto of each graph input, in graph input order
    output_<i>.pb     TensorProto of each ONNX Runtime output, in graph output order

plus ``fixtures/ops/INDEX.json`` listing every case with its op type and opset.

    models/.venv/bin/python models/make_op_goldens.py      # (run by make_fixtures.sh)

Inputs are random with a fixed seed per case (seeded from the case name), so the output is
reproducible byte for byte.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures" / "ops"
DEFAULT_OPSET = 18
IR_VERSION = 8  # what ONNX Runtime 1.x accepts for opsets <= 18; raised for newer opsets


class Init:
    """An input given as an initializer (a compile-time constant) rather than a graph input."""

    def __init__(self, arr):
        self.arr = np.asarray(arr)


CASES: list[dict] = []


def case(name, op, inputs, attrs=None, opset=DEFAULT_OPSET, n_out=1, note=""):
    """Registers a case. ``inputs``: list of np arrays (graph inputs), ``Init`` (initializers)
    or ``None`` (an omitted optional input)."""
    assert all(c["name"] != name for c in CASES), f"duplicate case {name}"
    CASES.append(
        dict(name=name, op=op, inputs=inputs, attrs=attrs or {}, opset=opset, n_out=n_out, note=note)
    )


def rng_for(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


# Seeded generators; each case gets its own stream so adding a case never changes another.
_R = {}


def r(name):
    if name not in _R:
        _R[name] = rng_for(name)
    return _R[name]


def f32(name, shape, lo=-2.0, hi=2.0):
    return r(name).uniform(lo, hi, size=shape).astype(np.float32)


def i64(name, shape, lo=-10, hi=10):
    return r(name).integers(lo, hi, size=shape, endpoint=True).astype(np.int64)


def bools(name, shape):
    return r(name).integers(0, 1, size=shape, endpoint=True).astype(bool)


def ints(*v):
    return np.array(v, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Elementwise unary
# ---------------------------------------------------------------------------------------------

def unary_cases():
    ranges = {
        "Abs": (-3, 3),
        "Neg": (-3, 3),
        "Relu": (-3, 3),
        "Floor": (-5, 5),
        "Ceil": (-5, 5),
        "Exp": (-5, 5),
        "Log": (0.05, 20),
        "Sqrt": (0.0, 20),
        "Tanh": (-4, 4),
        "Erf": (-3, 3),
        "Sigmoid": (-10, 10),
        "Cos": (-7, 7),
        "Sin": (-7, 7),
        "Softplus": (-10, 10),
    }
    for op, (lo, hi) in ranges.items():
        n = f"{op}_f32"
        case(n, op, [f32(n, [2, 3, 4], lo, hi)])
    n = "Reciprocal_f32"
    x = f32(n, [3, 4], 0.25, 4.0) * np.where(bools(n + "s", [3, 4]), 1, -1).astype(np.float32)
    case(n, "Reciprocal", [x])
    # Extremes where naive formulas overflow or lose precision.
    case("Softplus_extremes", "Softplus", [np.array([-100, -30, -1e-3, 0, 1e-3, 15, 30, 88, 100], np.float32)])
    case("Sigmoid_extremes", "Sigmoid", [np.array([-100, -88, -20, -1e-4, 0, 1e-4, 20, 88, 100], np.float32)])
    case("Exp_extremes", "Exp", [np.array([-104, -88, 0, 80, 88.5, 89], np.float32)])
    case("Erf_extremes", "Erf", [np.array([-10, -4, -1e-3, 0, 1e-3, 4, 10], np.float32)])
    case("Log_zero_and_small", "Log", [np.array([0.0, 1e-30, 1e-3, 1.0, 3e38], np.float32)])
    case("Abs_i64", "Abs", [i64("Abs_i64", [2, 5])])
    case("Floor_special", "Floor", [np.array([-1.5, -0.5, -0.0, 0.5, 2.0, np.inf, -np.inf, np.nan], np.float32)])
    case("Not_bool", "Not", [bools("Not_bool", [3, 4])])
    nan_in = f32("IsNaN_f32", [3, 4])
    nan_in[0, 1] = np.nan
    nan_in[2, 3] = np.nan
    nan_in[1, 0] = np.inf
    case("IsNaN_f32", "IsNaN", [nan_in])
    inf_in = np.array([[1.0, np.inf, -np.inf, np.nan], [0.0, -3.4e38, 3.4e38, -np.inf]], np.float32)
    case("IsInf_both", "IsInf", [inf_in])
    case("IsInf_positive_only", "IsInf", [inf_in], attrs=dict(detect_negative=0))
    case("IsInf_negative_only", "IsInf", [inf_in], attrs=dict(detect_positive=0))
    case("Identity_f32", "Identity", [f32("Identity_f32", [2, 3])])
    g = f32("Gelu", [2, 3, 4], -5, 5)
    case("Gelu_none", "Gelu", [g], opset=20)
    case("Gelu_tanh", "Gelu", [g], attrs=dict(approximate="tanh"), opset=20)


# ---------------------------------------------------------------------------------------------
# Elementwise binary / variadic
# ---------------------------------------------------------------------------------------------

def binary_cases():
    for op in ["Add", "Sub", "Mul", "Div"]:
        n = f"{op}_bcast_234_31"
        b = f32(n + "b", [3, 1])
        if op == "Div":
            b = np.where(np.abs(b) < 0.3, 0.7, b).astype(np.float32)
        case(n, op, [f32(n, [2, 3, 4]), b])
    case("Add_bcast_both", "Add", [f32("Add_c", [2, 1, 4]), f32("Add_d", [3, 1])])
    case("Add_i64", "Add", [i64("Add_i64a", [2, 3]), i64("Add_i64b", [3])])
    case("Add_f16", "Add", [f32("Add_f16a", [2, 3]).astype(np.float16), f32("Add_f16b", [3]).astype(np.float16)])
    case("Mul_bcast_rank_1", "Mul", [f32("Mul_r1", [4]), f32("Mul_r3", [2, 3, 4])])
    # Integer division truncates toward zero (C semantics) in ONNX Runtime.
    num = ints(7, -7, 7, -7, 0, 9, -9, 1)
    den = ints(2, 2, -2, -2, 3, 4, 4, -3)
    case("Div_i64_negative", "Div", [num, den])
    case("Pow_f32", "Pow", [f32("Pow_b", [2, 3], 0.1, 3.0), f32("Pow_e", [2, 3], -2, 2)])
    case("Pow_bcast_scalar_exp", "Pow", [f32("Pow_b2", [2, 3, 4], 0.1, 3.0), np.array(2.0, np.float32)])
    case("Pow_neg_base_int_exp", "Pow", [np.array([-2, -1.5, 3, -0.5], np.float32), np.array([3, 2, -1, 2], np.float32)])
    case("Pow_f32_base_i64_exp", "Pow", [f32("Pow_b3", [2, 3], -2, 2), ints(0, 1, 3)])
    a = ints(7, -7, 7, -7, 5, -5, 0, 13)
    b = ints(3, 3, -3, -3, 5, 2, 4, -4)
    case("Mod_i64_fmod0", "Mod", [a, b])
    case("Mod_i64_fmod1", "Mod", [a, b], attrs=dict(fmod=1))
    case(
        "Mod_f32_fmod1",
        "Mod",
        [np.array([5.5, -5.5, 5.5, -5.5, 0.25], np.float32), np.array([2.0, 2.0, -2.0, -2.0, 0.1], np.float32)],
        attrs=dict(fmod=1),
    )
    # Comparisons: int64 (exact) and float with ties.
    ia, ib = i64("cmp_a", [3, 4], -3, 3), i64("cmp_b", [4], -3, 3)
    for op in ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"]:
        case(f"{op}_i64_bcast", op, [ia, ib])
    fa = np.round(f32("cmpf_a", [2, 3, 4], -2, 2) * 2) / 2
    fb = np.round(f32("cmpf_b", [3, 1], -2, 2) * 2) / 2
    for op in ["Less", "GreaterOrEqual"]:
        case(f"{op}_f32_bcast", op, [fa.astype(np.float32), fb.astype(np.float32)])
    case("Equal_bool", "Equal", [bools("eqb_a", [6]), bools("eqb_b", [6])], opset=18)
    for op in ["And", "Or", "Xor"]:
        case(f"{op}_bool_bcast", op, [bools(op + "a", [2, 3, 4]), bools(op + "b", [3, 1])])
    # Variadic.
    for op in ["Max", "Min", "Sum"]:
        case(f"{op}_3_inputs_bcast", op, [f32(op + "1", [2, 3, 4]), f32(op + "2", [3, 1]), f32(op + "3", [4])])
    case("Max_1_input", "Max", [f32("Max_one", [3, 2])])
    case("Min_2_i64", "Min", [i64("Min_ia", [3, 4]), i64("Min_ib", [1, 4])])
    # Where.
    case("Where_bcast", "Where", [bools("Where_c", [3, 1]), f32("Where_x", [1, 4]), f32("Where_y", [2, 3, 4])])
    case("Where_i64", "Where", [bools("Where_ci", [2, 3]), i64("Where_xi", [2, 3]), i64("Where_yi", [3])])
    case("Where_scalar_branch", "Where", [bools("Where_cs", [4]), np.array(-3.4e38, np.float32), f32("Where_ys", [4])])


def cast_cases():
    x = np.array([[-2.7, -1.5, -0.5, 0.0], [0.4, 1.5, 2.5, 1000.9]], np.float32)
    case("Cast_f32_to_i64", "Cast", [x], attrs=dict(to=TensorProto.INT64))
    xb = np.array([[-2.0, 0.0, -0.0, 0.1], [np.nan, 1.0, np.inf, 1e-30]], np.float32)
    case("Cast_f32_to_bool", "Cast", [xb], attrs=dict(to=TensorProto.BOOL))
    xh = np.array([0.1, -1.0 / 3, 65504, 70000, 1e-8, 6e-5, -np.inf, 2049.0], np.float32)
    case("Cast_f32_to_f16", "Cast", [xh], attrs=dict(to=TensorProto.FLOAT16))
    case("Cast_f16_to_f32", "Cast", [f32("Cast_h", [2, 3]).astype(np.float16)], attrs=dict(to=TensorProto.FLOAT))
    case("Cast_i64_to_f32", "Cast", [ints(-3, 0, 7, 16777217, -(2**40))], attrs=dict(to=TensorProto.FLOAT))
    case("Cast_bool_to_f32", "Cast", [bools("Cast_b", [2, 3])], attrs=dict(to=TensorProto.FLOAT))
    case("Cast_i64_to_bool", "Cast", [ints(-2, 0, 1, 5)], attrs=dict(to=TensorProto.BOOL))
    case("CastLike_f32_to_i64", "CastLike", [x, Init(ints(0))])
    case("CastLike_i64_to_f32", "CastLike", [ints(1, -2, 3), Init(np.zeros([1], np.float32))])


def clip_cases():
    x = f32("Clip", [3, 4], -3, 3)
    case("Clip_min_max", "Clip", [x, Init(np.array(-1.0, np.float32)), Init(np.array(1.5, np.float32))])
    case("Clip_min_only", "Clip", [x, Init(np.array(0.0, np.float32))])
    case("Clip_max_only", "Clip", [x, None, Init(np.array(0.5, np.float32))])
    case("Clip_no_bounds", "Clip", [x])
    case("Clip_i64", "Clip", [i64("Clip_i", [6]), Init(np.array(-2, np.int64)), Init(np.array(3, np.int64))])
    case("Clip_min_gt_max", "Clip", [x, Init(np.array(1.0, np.float32)), Init(np.array(-1.0, np.float32))])


# ---------------------------------------------------------------------------------------------
# Linear algebra
# ---------------------------------------------------------------------------------------------

def linalg_cases():
    case("MatMul_2d", "MatMul", [f32("mm_a", [3, 4]), f32("mm_b", [4, 5])])
    case("MatMul_1d_2d", "MatMul", [f32("mm_c", [4]), f32("mm_d", [4, 5])])
    case("MatMul_2d_1d", "MatMul", [f32("mm_e", [3, 4]), f32("mm_f", [4])])
    case("MatMul_1d_1d", "MatMul", [f32("mm_g", [6]), f32("mm_h", [6])])
    case("MatMul_batched_bcast", "MatMul", [f32("mm_i", [2, 1, 3, 4]), f32("mm_j", [3, 4, 5])])
    case("MatMul_3d_2d_weight", "MatMul", [f32("mm_k", [2, 3, 4]), Init(f32("mm_l", [4, 5]))])
    case("MatMul_1d_batched", "MatMul", [f32("mm_m", [4]), f32("mm_n", [2, 4, 3])])
    a, b = f32("gemm_a", [3, 4]), f32("gemm_b", [4, 5])
    case("Gemm_plain", "Gemm", [a, b])
    case("Gemm_transA", "Gemm", [a.T.copy(), b], attrs=dict(transA=1))
    case("Gemm_transB_C_row", "Gemm", [a, b.T.copy(), f32("gemm_c", [5])], attrs=dict(transB=1))
    case(
        "Gemm_transAB_alpha_beta_C_col",
        "Gemm",
        [a.T.copy(), b.T.copy(), f32("gemm_d", [3, 1])],
        attrs=dict(transA=1, transB=1, alpha=0.5, beta=2.0),
    )
    case("Gemm_C_scalar", "Gemm", [a, b, np.array([0.25], np.float32)], attrs=dict(alpha=1.5))
    case("Gemm_C_full_init", "Gemm", [a, Init(b), Init(f32("gemm_e", [3, 5]))], attrs=dict(beta=0.0))


# ---------------------------------------------------------------------------------------------
# Normalization and softmax
# ---------------------------------------------------------------------------------------------

def norm_cases():
    x = f32("ln_x", [2, 3, 8], -3, 3)
    case("LayerNormalization_last_axis", "LayerNormalization", [x, Init(f32("ln_s", [8])), Init(f32("ln_b", [8]))])
    case(
        "LayerNormalization_axis_m2",
        "LayerNormalization",
        [x, Init(f32("ln_s2", [3, 8])), Init(f32("ln_b2", [3, 8]))],
        attrs=dict(axis=-2, epsilon=1e-3),
    )
    case("LayerNormalization_no_bias", "LayerNormalization", [x, Init(f32("ln_s3", [8]))], attrs=dict(epsilon=1e-6))
    case("LayerNormalization_axis_1_bcast_scale", "LayerNormalization", [x, Init(f32("ln_s4", [1, 8]))], attrs=dict(axis=1))
    case(
        "LayerNormalization_mean_invstd",
        "LayerNormalization",
        [x, Init(f32("ln_s5", [8])), Init(f32("ln_b5", [8]))],
        n_out=3,
    )
    xs = f32("sm_x", [2, 3, 5], -4, 4)
    case("Softmax_last", "Softmax", [xs])
    case("Softmax_axis_1", "Softmax", [xs], attrs=dict(axis=1))
    case("Softmax_axis_0", "Softmax", [xs], attrs=dict(axis=0))
    masked = np.array(
        [
            [1.0, -np.inf, 2.0, -np.inf, 0.5],
            [-3.4e38, 0.0, -3.4e38, 1.0, -3.4e38],
            [-3.4e38, -3.4e38, -3.4e38, -3.4e38, -3.4e38],
            [-np.inf, -3.4e38, 3.0, -np.inf, -3.4e38],
            [80.0, 90.0, 100.0, -100.0, 0.0],
        ],
        np.float32,
    )
    case("Softmax_masked_rows", "Softmax", [masked])
    case("LogSoftmax_last", "LogSoftmax", [xs])
    case("LogSoftmax_axis_0", "LogSoftmax", [xs], attrs=dict(axis=0))
    case("LogSoftmax_large", "LogSoftmax", [np.array([[1000.0, 0.0, -1000.0], [-5.0, -5.0, -5.0]], np.float32)])
    case("Softmax_f16", "Softmax", [xs.astype(np.float16)])
    # RMSNormalization only exists from opset 23.
    case("RMSNormalization_last_axis", "RMSNormalization", [x, Init(f32("rms_s", [8]))], opset=23)
    case("RMSNormalization_axis_m2", "RMSNormalization", [x, Init(f32("rms_s2", [3, 8]))], attrs=dict(axis=-2, epsilon=1e-3), opset=23)


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------

REDUCE_OPS = [
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
]


def reduce_cases():
    for op in REDUCE_OPS:
        lo, hi = (0.1, 3.0) if op == "ReduceLogSum" else (0.5, 1.5) if op == "ReduceProd" else (-3.0, 3.0)
        x = f32(op, [2, 3, 4], lo, hi)
        case(f"{op}_axis_m1_keep", op, [x, Init(ints(-1))])
        if op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceLogSumExp"):
            case(f"{op}_axes_0_2_nokeep", op, [x, Init(ints(0, 2))], attrs=dict(keepdims=0))
    x = f32("reduce_x", [2, 3, 4])
    case("ReduceSum_all_default_axes", "ReduceSum", [x], attrs=dict(keepdims=0))
    case("ReduceSum_empty_axes_noop", "ReduceSum", [x, Init(np.zeros([0], np.int64))], attrs=dict(noop_with_empty_axes=1))
    case("ReduceMean_empty_axes_reduce_all", "ReduceMean", [x, Init(np.zeros([0], np.int64))], attrs=dict(keepdims=0))
    case("ReduceSum_op13_axes_input", "ReduceSum", [x, Init(ints(1))], opset=13)
    case("ReduceMean_op17_axes_attr", "ReduceMean", [x], attrs=dict(axes=[-1], keepdims=1), opset=17)
    case("ReduceMax_op17_axes_attr_nokeep", "ReduceMax", [x], attrs=dict(axes=[0, -1], keepdims=0), opset=17)
    case("ReduceMin_op13_no_axes", "ReduceMin", [x], opset=13)
    case("ReduceMax_i64", "ReduceMax", [i64("reduce_i", [3, 4]), Init(ints(1))], attrs=dict(keepdims=0))
    case("ReduceMax_with_inf", "ReduceMax", [np.array([[-np.inf, -np.inf], [1.0, np.inf]], np.float32), Init(ints(1))])
    case("ReduceLogSumExp_large", "ReduceLogSumExp", [np.array([[1000.0, 1000.0, -5.0], [-1000.0, -1001.0, -1002.0]], np.float32), Init(ints(1))])
    # ArgMax.
    xa = np.round(f32("argmax", [3, 4, 5], -2, 2))  # many ties
    case("ArgMax_axis_1_keep", "ArgMax", [xa], attrs=dict(axis=1))
    case("ArgMax_axis_m1_nokeep", "ArgMax", [xa], attrs=dict(axis=-1, keepdims=0))
    case("ArgMax_select_last_index", "ArgMax", [xa], attrs=dict(axis=2, select_last_index=1))
    case("ArgMax_default_axis_i64", "ArgMax", [i64("argmax_i", [4, 3], -2, 2)])


# ---------------------------------------------------------------------------------------------
# Shape manipulation
# ---------------------------------------------------------------------------------------------

def shape_cases():
    x = f32("shape_x", [2, 3, 4])
    case("Reshape_zero_copy_and_infer", "Reshape", [x, Init(ints(0, -1, 2))])
    case("Reshape_flat", "Reshape", [x, Init(ints(-1))])
    case("Reshape_allowzero_empty", "Reshape", [np.zeros([0, 3], np.float32), Init(ints(3, 0))], attrs=dict(allowzero=1))
    case("Reshape_allowzero_no_zero", "Reshape", [x, Init(ints(4, 6))], attrs=dict(allowzero=1))
    case("Transpose_perm_201", "Transpose", [x], attrs=dict(perm=[2, 0, 1]))
    case("Transpose_default_reverse", "Transpose", [x])
    case("Transpose_4d", "Transpose", [f32("tr4", [2, 3, 2, 4])], attrs=dict(perm=[0, 2, 1, 3]))
    case("Flatten_axis_1", "Flatten", [x])
    case("Flatten_axis_0", "Flatten", [x], attrs=dict(axis=0))
    case("Flatten_axis_m1", "Flatten", [x], attrs=dict(axis=-1))
    case("Concat_axis_1", "Concat", [f32("cc_a", [2, 1, 4]), f32("cc_b", [2, 3, 4])], attrs=dict(axis=1))
    case("Concat_axis_m1_3_inputs", "Concat", [f32("cc_c", [2, 2]), f32("cc_d", [2, 1]), f32("cc_e", [2, 3])], attrs=dict(axis=-1))
    case("Concat_with_empty", "Concat", [f32("cc_g", [2, 3]), np.zeros([0, 3], np.float32)], attrs=dict(axis=0))
    y = f32("split_x", [2, 6, 3])
    case("Split_equal_num_outputs", "Split", [y], attrs=dict(axis=1, num_outputs=3), n_out=3)
    case("Split_uneven_num_outputs", "Split", [f32("split_u", [7, 2])], attrs=dict(axis=0, num_outputs=3), n_out=3)
    case("Split_sizes_input", "Split", [y, Init(ints(2, 4))], attrs=dict(axis=1), n_out=2)
    case("Split_op13_sizes_neg_axis", "Split", [y, Init(ints(1, 2))], attrs=dict(axis=-1), opset=13, n_out=2)
    case("Split_op13_equal_default", "Split", [y], opset=13, n_out=2)
    z = f32("sq_x", [1, 3, 1, 2])
    case("Squeeze_axes_neg", "Squeeze", [z, Init(ints(0, -2))])
    case("Squeeze_all_ones", "Squeeze", [z])
    case("Squeeze_op13", "Squeeze", [z, Init(ints(2))], opset=13)
    case("Unsqueeze_axes_neg", "Unsqueeze", [f32("usq_x", [3, 2]), Init(ints(0, -1))])
    case("Unsqueeze_middle_unsorted", "Unsqueeze", [f32("usq_y", [3, 2]), Init(ints(3, 1))])
    case("Unsqueeze_op13", "Unsqueeze", [f32("usq_z", [3]), Init(ints(1))], opset=13)
    case("Unsqueeze_scalar", "Unsqueeze", [np.array(2.5, np.float32), Init(ints(0))])
    case("Shape_full", "Shape", [x])
    case("Shape_start_end", "Shape", [f32("shp", [2, 3, 4, 5])], attrs=dict(start=1, end=-1))
    case("Size_f32", "Size", [x])
    case("ConstantOfShape_default", "ConstantOfShape", [Init(ints(2, 3))])
    case(
        "ConstantOfShape_f32_value",
        "ConstantOfShape",
        [Init(ints(3, 1, 2))],
        attrs=dict(value=numpy_helper.from_array(np.array([1.5], np.float32), "value")),
    )
    case(
        "ConstantOfShape_i64_value",
        "ConstantOfShape",
        [Init(ints(4))],
        attrs=dict(value=numpy_helper.from_array(np.array([-7], np.int64), "value")),
    )
    case("Constant_tensor", "Constant", [], attrs=dict(value=numpy_helper.from_array(f32("const", [2, 3]), "value")))
    case("Constant_value_ints", "Constant", [], attrs=dict(value_ints=[3, -1, 4]))
    case("Expand_bcast", "Expand", [f32("exp_a", [3, 1]), Init(ints(2, 3, 4))])
    case("Expand_shape_lower_rank", "Expand", [f32("exp_b", [2, 3, 1]), Init(ints(1, 4))])
    case("Expand_shape_with_ones", "Expand", [f32("exp_c", [3, 4]), Init(ints(2, 1, 1))])
    case("Tile_3d", "Tile", [f32("tile", [2, 1, 3]), Init(ints(2, 3, 1))])
    case("Range_f32", "Range", [Init(np.array(0.5, np.float32)), Init(np.array(3.0, np.float32)), Init(np.array(0.7, np.float32))])
    case("Range_i64_negative_delta", "Range", [Init(np.array(10, np.int64)), Init(np.array(-3, np.int64)), Init(np.array(-4, np.int64))])
    case("Range_i64_empty", "Range", [Init(np.array(5, np.int64)), Init(np.array(0, np.int64)), Init(np.array(1, np.int64))])
    t = f32("trilu", [2, 4, 5])
    case("Trilu_upper", "Trilu", [t])
    case("Trilu_upper_k1", "Trilu", [t, Init(np.array(1, np.int64))])
    case("Trilu_lower_km1", "Trilu", [t, Init(np.array(-1, np.int64))], attrs=dict(upper=0))
    case("Trilu_upper_k_beyond", "Trilu", [t, Init(np.array(7, np.int64))])
    case("Trilu_lower_tall_k2", "Trilu", [f32("trilu2", [5, 3]), Init(np.array(2, np.int64))], attrs=dict(upper=0))
    case("Trilu_bool_upper", "Trilu", [np.ones([4, 4], bool), Init(np.array(1, np.int64))])
    c = f32("cumsum", [2, 3, 4])
    case("CumSum_axis_1", "CumSum", [c, Init(np.array(1, np.int64))])
    case("CumSum_exclusive", "CumSum", [c, Init(np.array(2, np.int64))], attrs=dict(exclusive=1))
    case("CumSum_reverse", "CumSum", [c, Init(np.array(-1, np.int64))], attrs=dict(reverse=1))
    case("CumSum_exclusive_reverse", "CumSum", [c, Init(np.array(0, np.int64))], attrs=dict(exclusive=1, reverse=1))
    case("CumSum_i64_axis_i32", "CumSum", [i64("cumsum_i", [2, 5]), Init(np.array(1, np.int32))])


# ---------------------------------------------------------------------------------------------
# Indexing
# ---------------------------------------------------------------------------------------------

def indexing_cases():
    data = f32("gather", [5, 4])
    case("Gather_axis0_negative", "Gather", [data, ints(0, -1, 2, -5).reshape(2, 2)])
    case("Gather_axis1", "Gather", [data, ints(3, 0, -2)], attrs=dict(axis=1))
    case("Gather_scalar_index", "Gather", [data, np.array(-2, np.int64)])
    case("Gather_i32_indices_axis_m1", "Gather", [f32("gather3", [2, 3, 4]), np.array([[1, -1]], np.int32)], attrs=dict(axis=-1))
    case("Gather_embedding_init", "Gather", [Init(f32("emb", [10, 3])), ints(1, 9, 0, 1).reshape(1, 4)])
    ge = f32("gel", [3, 4])
    case("GatherElements_axis1_negative", "GatherElements", [ge, np.array([[0, -1], [3, 2], [-4, 1]], np.int64)], attrs=dict(axis=1))
    case("GatherElements_axis0", "GatherElements", [ge, np.array([[2, 0, 1, -1]], np.int64)])
    gnd = f32("gnd", [2, 3, 4])
    case("GatherND_full_index", "GatherND", [gnd, np.array([[0, 1, 2], [1, -1, 0]], np.int64)])
    case("GatherND_slices", "GatherND", [gnd, np.array([[[1, 0]], [[0, 2]]], np.int64)])
    case("GatherND_batch_dims_1", "GatherND", [gnd, np.array([[2], [0]], np.int64)], attrs=dict(batch_dims=1))
    case("GatherND_batch_dims_1_elems", "GatherND", [gnd, np.array([[[0, 1], [2, 3]], [[1, 0], [2, 2]]], np.int64)], attrs=dict(batch_dims=1))
    sd = f32("snd", [4, 3])
    case("ScatterND_rows", "ScatterND", [sd, np.array([[1], [3]], np.int64), f32("snd_u", [2, 3])])
    case("ScatterND_elements", "ScatterND", [sd, np.array([[0, 0], [3, 2], [-1, 1]], np.int64), f32("snd_v", [3])])
    case("ScatterND_add_duplicates", "ScatterND", [sd, np.array([[1], [1], [2]], np.int64), f32("snd_w", [3, 3])], attrs=dict(reduction="add"))
    case("ScatterND_mul", "ScatterND", [sd, np.array([[0, 1], [2, 2]], np.int64), f32("snd_x", [2])], attrs=dict(reduction="mul"))
    s = f32("slice", [4, 5, 6])
    case("Slice_basic_axes", "Slice", [s, Init(ints(1, 2)), Init(ints(3, 5)), Init(ints(0, 2))])
    case("Slice_no_axes_no_steps", "Slice", [s, Init(ints(0, 1)), Init(ints(2, 4))])
    case("Slice_negative_step_full_reverse", "Slice", [s, Init(ints(-1)), Init(ints(-(2**63))), Init(ints(1)), Init(ints(-1))])
    case("Slice_negative_step_2", "Slice", [s, Init(ints(5)), Init(ints(0)), Init(ints(-1)), Init(ints(-2))])
    case("Slice_clamped_ends", "Slice", [s, Init(ints(2, -100)), Init(ints(1000, 2**62)), Init(ints(0, 2))])
    case("Slice_negative_starts_ends", "Slice", [s, Init(ints(-3)), Init(ints(-1)), Init(ints(-2))])
    case("Slice_step_3", "Slice", [s, Init(ints(0, 1)), Init(ints(6, 5)), Init(ints(2, 1)), Init(ints(3, 2))])
    case("Slice_empty_result", "Slice", [s, Init(ints(3)), Init(ints(1)), Init(ints(0))])
    case("Slice_i64_data", "Slice", [i64("slice_i", [10]), Init(ints(8)), Init(ints(1)), Init(ints(0)), Init(ints(-3))])


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def build_model(c):
    graph_inputs, inits, node_inputs, feeds = [], [], [], []
    for i, v in enumerate(c["inputs"]):
        if v is None:
            node_inputs.append("")
            continue
        if isinstance(v, Init):
            name = f"const_{i}"
            inits.append(numpy_helper.from_array(v.arr, name=name))
        else:
            name = f"x{i}"
            arr = np.asarray(v)
            dt = helper.np_dtype_to_tensor_dtype(arr.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, dt, list(arr.shape)))
            feeds.append((name, arr))
        node_inputs.append(name)
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    outputs = [f"y{j}" for j in range(c["n_out"])]
    node = helper.make_node(c["op"], node_inputs, outputs, name=c["name"], **c["attrs"])
    graph = helper.make_graph(
        [node], c["name"], graph_inputs, [onnx.ValueInfoProto(name=o) for o in outputs], initializer=inits
    )
    opset = c["opset"]
    ir = IR_VERSION if opset <= 18 else 9 if opset <= 20 else 10
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir,
        producer_name="patch-make_op_goldens",
    )
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model, feeds, outputs


def run_case(c):
    model, feeds, outputs = build_model(c)
    opts = ort.SessionOptions()
    # No graph rewrites: the reference is the op kernel itself.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    results = sess.run(outputs, {n: a for n, a in feeds})
    # Record the concrete output types ONNX Runtime produced.
    for vi, arr in zip(model.graph.output, results):
        vi.CopyFrom(helper.make_tensor_value_info(vi.name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
    return model, feeds, results


def main():
    for fn in [unary_cases, binary_cases, cast_cases, clip_cases, linalg_cases, norm_cases, reduce_cases, shape_cases, indexing_cases]:
        fn()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    index, skipped = [], []
    for c in CASES:
        try:
            model, feeds, results = run_case(c)
        except Exception as e:  # an op/variant ONNX Runtime does not implement
            skipped.append((c["name"], f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            continue
        d = OUT / c["name"]
        d.mkdir()
        onnx.save_model(model, d / "model.onnx")
        for i, (name, arr) in enumerate(feeds):
            (d / f"input_{i}.pb").write_bytes(numpy_helper.from_array(arr, name=name).SerializeToString())
        for i, (name, arr) in enumerate(zip([o.name for o in model.graph.output], results)):
            (d / f"output_{i}.pb").write_bytes(numpy_helper.from_array(np.asarray(arr), name=name).SerializeToString())
        index.append(dict(case=c["name"], op_type=c["op"], domain="ai.onnx", opset=c["opset"]))
    (OUT / "INDEX.json").write_text(
        json.dumps(
            dict(
                generator="models/make_op_goldens.py",
                onnx=onnx.__version__,
                onnxruntime=ort.__version__,
                numpy=np.__version__,
                skipped=[dict(case=n, reason=why) for n, why in skipped],
                cases=index,
            ),
            indent=1,
        )
        + "\n"
    )
    ops = sorted({c["op_type"] for c in index})
    print(f"op goldens: {len(index)} cases over {len(ops)} ops written to {OUT}")
    for n, why in skipped:
        print(f"  skipped {n}: {why}", file=sys.stderr)


if __name__ == "__main__":
    main()
