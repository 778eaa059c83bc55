#!/usr/bin/env python3
"""Reference gradients from torch autograd for the fixture `llama_optimum_with_past`.

These goldens let the project's own reverse-mode differentiation be checked against an
autodiff that nobody here wrote (PyTorch's).

What it computes
----------------
The HF model (LlamaForCausalLM, float32, attn_implementation "eager") is rebuilt from the
fixture's `fixture.json["hf_config"]`, and its weights are LOADED FROM THE ONNX FILE's
initializers (`models/fixtures/llama_optimum_with_past/model.onnx`), so the goldens are about
exactly the committed weights. The TorchScript export inside Optimum renamed and transposed
the MatMul weights (`onnx::MatMul_733`, stored [in, out] = torch weight.T). Each torch
parameter is mapped to its initializer by name where the names match, else by exact value
match of the tensor or its transpose (the torch values used for this identification come from
re-running the init recipe of `fixture.json["weights"]`, i.e. export_fixtures.py's
build_model; the loaded values are then the ONNX ones). Independently, each mapping is
cross-checked against the module scope of the ONNX node consuming the initializer
(`/model/layers.0/self_attn/q_proj/MatMul` -> `model.layers.0.self_attn.q_proj.weight`).
Any unmapped, ambiguous or inconsistent parameter is a hard error.

Case "model": input_ids [1, 12] = numpy default_rng(11).integers(3, vocab, (1, 12)),
    attention_mask ones, position_ids 0..11, no past, use_cache=False.
    loss = mean over the 11 positions of cross_entropy(logits[0, :-1], input_ids[0, 1:]).
    Saved: loss, logits, and d loss / d every parameter.
Case "block0": x = the hidden states entering decoder layer 0 (embedding output for the same
    ids), R = default_rng(12).standard_normal(x.shape) as float32, L = sum(layer0(x) * R), with
    the layer called exactly as LlamaModel calls it (its arguments are captured by a forward
    pre-hook during a full-model forward: causal mask, position_ids, cache_position and the
    rotary (cos, sin) for positions 0..11). Saved: x, R, the layer output, dL/dx and dL/d every
    parameter of layer 0.

Every gradient is keyed by the ONNX initializer name and laid out AS THE INITIALIZER IS
STORED (transposed when the initializer is the transposed torch weight); grads.json records
the torch parameter name and whether it was transposed.

Output format (read by the Rust tests with serde_json + f32::from_le_bytes)
-------------------------------------------------------------------------
    models/fixtures/llama_optimum_with_past/grads/grads.json     index (see below)
    models/fixtures/llama_optimum_with_past/grads/<case>/<file>.f32
Each .f32 file is the raw tensor: little-endian IEEE float32, C (row-major) order, no header;
its byte length is 4 * prod(shape) (a scalar is 4 bytes, shape []). grads.json lists, per case,
"tensors" (inputs/outputs) and "grads" (keyed by ONNX initializer name, plus "grad_x" in
block0 under "tensors"), each entry with "file" (relative to grads/), "shape", "dtype": "f32",
and for grads "torch_param", "transposed", "torch_shape"; plus the ids, versions, the
model.onnx sha256 and the self-check figures.

Self-checks (printed, and recorded in grads.json; a failure raises)
--------------------------------------------------------------------
  * the loaded model reproduces the committed ONNX Runtime golden logits of cases/seq7,
    cases/seq64, cases/greedy8_full and the unpadded rows of cases/batch2_leftpad (no case has
    ids of shape [1, 12], so this validates the weight loading on the nearest ones);
  * the [1, 12] logits equal a second torch forward with attn_implementation "sdpa";
  * the block0 layer output equals the one the full forward produced (forward hook);
  * each gradient is compared with a central finite difference of the model cast to float64
    on a few coordinates (argmax |g| plus random ones), and with float64 autograd in full.

How to run (from the repository root; no GPU, no network, ~10 s)
-----------------------------------------------------------------
    models/.venv/bin/python models/make_grad_goldens.py

The venv is the one of models/make_fixtures.sh (pins in models/requirements-export.txt);
this script needs only torch, transformers, onnx and numpy from it (onnxruntime is not used):
    python3 -m venv models/.venv
    models/.venv/bin/pip install torch==2.15.0 transformers==4.57.6 onnx==1.23.2 numpy==2.4.6
Output is byte-identical from run to run (1 CPU thread, fixed seeds).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import onnx
import torch
import torch.nn.functional as F
import transformers
from onnx import numpy_helper
from transformers import LlamaConfig, LlamaForCausalLM

warnings.filterwarnings("ignore")

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "llama_optimum_with_past"
OUT = FIXTURE / "grads"

SEQ = 12
IDS_SEED = 11
COTANGENT_SEED = 12
FD_COORD_SEED = 13
FD_STEP = 1e-5
FD_RANDOM_COORDS = 4

# Tolerances of the self-checks (generous against the figures actually seen; see grads.json).
TOL_ORT_LOGITS = 1e-4
TOL_SECOND_FORWARD = 1e-5
TOL_FD_REL_F64 = 1e-6  # float64 autograd vs float64 finite difference
TOL_FD_REL_F32 = 1e-3  # the saved float32 gradient vs float64 finite difference


# ----------------------------------------------------------------------------- model + weights


def load_fixture_meta():
    return json.loads((FIXTURE / "fixture.json").read_text())


def make_config(meta, attn: str) -> LlamaConfig:
    hf = dict(meta["hf_config"])
    cfg = LlamaConfig.from_dict(hf)
    cfg._attn_implementation = attn
    return cfg


def recipe_model(meta) -> LlamaForCausalLM:
    """The init recipe of fixture.json["weights"] (= export_fixtures.build_model). Used only to
    identify which ONNX initializer holds which torch parameter."""
    w = meta["weights"]
    seed = int(w["seed"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(meta, "eager")).eval().to(torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def scope_param_names(proto: onnx.ModelProto) -> dict[str, str]:
    """initializer name -> torch parameter name implied by the consuming node's module scope
    (TorchScript names nodes /model/layers.0/self_attn/q_proj/MatMul)."""
    inits = {t.name for t in proto.graph.initializer}
    out: dict[str, str] = {}
    for node in proto.graph.node:
        for i in node.input:
            if i not in inits:
                continue
            parts = [p for p in node.name.split("/") if p][:-1]  # drop the op name
            if not parts:
                continue
            out.setdefault(i, ".".join(parts) + ".weight")
    return out


def map_parameters(model, proto: onnx.ModelProto):
    """torch parameter name -> (onnx initializer name, transposed)."""
    ref = {n: p.detach().cpu().numpy() for n, p in model.named_parameters()}
    arrs = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    scope = scope_param_names(proto)
    mapping: dict[str, tuple[str, bool]] = {}
    used: set[str] = set()
    errors = []
    for name, val in ref.items():
        if name in arrs:
            if arrs[name].shape != val.shape:
                errors.append(f"{name}: ONNX initializer of the same name has shape {arrs[name].shape}, torch {val.shape}")
                continue
            mapping[name] = (name, False)
            used.add(name)
            continue
        cands = []
        for iname, a in arrs.items():
            if iname in ref:
                continue
            if a.shape == val.shape and np.array_equal(a, val):
                cands.append((iname, False))
            if val.ndim == 2 and a.shape == val.T.shape and np.array_equal(a, val.T):
                cands.append((iname, True))
        if len(cands) != 1:
            errors.append(f"{name} {val.shape}: {len(cands)} ONNX initializers match by value {cands}")
            continue
        mapping[name] = cands[0]
        used.add(cands[0][0])
    for name, (iname, _) in mapping.items():
        if scope.get(iname) != name:
            errors.append(f"{name} -> {iname}: the consuming ONNX node's scope says {scope.get(iname)}")
    if len(used) != len(mapping):
        errors.append("some ONNX initializer is mapped to two parameters")
    float_inits = {n for n, a in arrs.items() if a.dtype == np.float32}
    unused = sorted(float_inits - used)
    if errors or unused:
        raise SystemExit("parameter mapping failed:\n  " + "\n  ".join(errors + [f"unused float initializers: {unused}"]))
    return mapping, arrs


def load_onnx_weights(model, mapping, arrs):
    """Overwrite every parameter with the ONNX initializer values. Returns how many of them
    differed from the recipe values (name-matched ones are not value-checked by the mapping)."""
    n_diff = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            iname, tr = mapping[name]
            a = arrs[iname].T if tr else arrs[iname]
            a = torch.from_numpy(np.ascontiguousarray(a))
            if not torch.equal(p, a):
                n_diff += 1
            p.copy_(a)
    return n_diff


def _rmsnorm_f64(self, hidden_states):
    # LlamaRMSNorm.forward, without its float32 upcast (which would cap a float64 model at
    # float32 accuracy): the same math in the input dtype.
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rope_f64(self, x, position_ids):
    # LlamaRotaryEmbedding.forward (default rope) computed in float64, inv_freq included.
    dim = self.inv_freq.shape[0] * 2
    theta = self.config.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = inv[None, :, None] * position_ids[:, None, :].to(torch.float64)
    freqs = freqs.transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def float64_model(meta, model) -> LlamaForCausalLM:
    """The same model in float64 for the finite-difference checks. HF computes RMSNorm, RoPE and
    the eager softmax in float32 even in a double model, so those are replaced by the same math
    in float64, and attention is "sdpa" (no internal cast)."""
    m = LlamaForCausalLM(make_config(meta, "sdpa")).eval()
    m.load_state_dict(model.state_dict())
    m = m.to(torch.float64)
    assert m.config.rope_scaling is None and m.model.rotary_emb.rope_type == "default"
    for mod in m.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = _rmsnorm_f64.__get__(mod)
        elif type(mod).__name__ == "LlamaRotaryEmbedding":
            mod.forward = _rope_f64.__get__(mod)
    return m


def onnx_layout(grad: torch.Tensor, transposed: bool) -> np.ndarray:
    g = grad.detach().to(torch.float32).cpu().numpy()
    return np.ascontiguousarray(g.T if transposed else g)


# ----------------------------------------------------------------------------- computations


def model_case(model, ids: torch.Tensor):
    """loss, logits; gradients left in .grad."""
    model.zero_grad(set_to_none=True)
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1], dtype=torch.int64)[None]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean")
    return loss, logits


def model_loss(model, ids):
    with torch.no_grad():
        return model_case(model, ids)[0].item()


def capture_layer0_call(model, ids):
    """Run the full model and capture layer 0's positional args, kwargs and output."""
    layer = model.model.layers[0]
    got = {}

    def pre(mod, args, kwargs):
        got["args"] = args
        got["kwargs"] = kwargs

    def post(mod, args, kwargs, output):
        got["output"] = output

    h1 = layer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = layer.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            mask = torch.ones_like(ids)
            pos = torch.arange(ids.shape[1], dtype=torch.int64)[None]
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    (x,) = got["args"]
    kwargs = {
        k: (tuple(t.detach() for t in v) if isinstance(v, tuple) else (v.detach() if torch.is_tensor(v) else v))
        for k, v in got["kwargs"].items()
    }
    out = got["output"][0] if isinstance(got["output"], tuple) else got["output"]
    return x.detach(), kwargs, out.detach()


def block0_case(model, x, kwargs, r):
    layer = model.model.layers[0]
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x, **kwargs)
    y = y[0] if isinstance(y, tuple) else y
    L = (y * r).sum()
    L.backward()
    return L, y, x.grad


def block0_value(model, x, kwargs, r):
    with torch.no_grad():
        y = model.model.layers[0](x, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        return (y * r).sum().item()


# ----------------------------------------------------------------------------- finite differences


def fd_coords(g: np.ndarray, rng) -> list[tuple[int, ...]]:
    n = g.size
    flat = [int(np.argmax(np.abs(g)))]
    flat += [int(i) for i in rng.integers(0, n, FD_RANDOM_COORDS)]
    nz = np.flatnonzero(g)
    if len(nz) < n and len(nz) > 0:  # sparse gradient (embedding rows): also probe nonzero ones
        flat += [int(i) for i in rng.choice(nz, 2, replace=False)]
    seen, out = set(), []
    for i in flat:
        if i not in seen:
            seen.add(i)
            out.append(tuple(int(c) for c in np.unravel_index(i, g.shape)))
    return out


def central_fd(f, t: torch.Tensor, idx) -> float:
    with torch.no_grad():
        old = t[idx].item()
        t[idx] = old + FD_STEP
        fp = f()
        t[idx] = old - FD_STEP
        fm = f()
        t[idx] = old
    return (fp - fm) / (2 * FD_STEP)


def rel_err(a: float, b: float, scale: float) -> float:
    # relative to the larger of |a|, |b|, floored at 1e-3 of the tensor's largest |gradient|
    # (a coordinate whose gradient is ~0 has no meaningful relative error)
    return abs(a - b) / max(abs(a), abs(b), 1e-3 * scale, 1e-30)


def fd_report(label, items, rng):
    """items: list of (key, g32 in torch layout (np), g64 in torch layout (np), tensor64, f)."""
    rows = []
    worst32 = worst64 = 0.0
    for key, g32, g64, t64, f in items:
        scale = float(np.abs(g64).max())
        full = float(np.abs(g32.astype(np.float64) - g64).max())
        coords = []
        for idx in fd_coords(g64, rng):
            fd = central_fd(f, t64, idx)
            e64 = rel_err(float(g64[idx]), fd, scale)
            e32 = rel_err(float(g32[idx]), fd, scale)
            worst32, worst64 = max(worst32, e32), max(worst64, e64)
            coords.append({"index": list(idx), "fd_f64": fd, "autograd_f64": float(g64[idx]), "golden_f32": float(g32[idx]), "rel_err_f64": e64, "rel_err_f32": e32})
        m32 = max(c["rel_err_f32"] for c in coords)
        m64 = max(c["rel_err_f64"] for c in coords)
        print(f"    {label} {key:52s} max|g|={scale:.3e}  |g32-g64|max={full:.2e}  FD rel err: f32 golden {m32:.2e}, f64 autograd {m64:.2e}  ({len(coords)} coords)")
        rows.append({"tensor": key, "max_abs_grad": scale, "f32_vs_f64_autograd_max_abs_diff": full, "max_rel_err_f32_golden_vs_fd": m32, "max_rel_err_f64_autograd_vs_fd": m64, "coords": coords})
    print(f"    {label} worst FD rel err: f32 golden {worst32:.2e}, f64 autograd {worst64:.2e}")
    if worst64 > TOL_FD_REL_F64 or worst32 > TOL_FD_REL_F32:
        raise SystemExit(f"{label}: finite-difference check failed ({worst32:.3g}, {worst64:.3g})")
    return {"step": FD_STEP, "scheme": "central, float64 model", "relative_error": "|a-b| / max(|a|, |b|, 1e-3 * max|grad of that tensor|)", "worst_rel_err_f32_golden": worst32, "worst_rel_err_f64_autograd": worst64, "tensors": rows}


# ----------------------------------------------------------------------------- output


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class Writer:
    def __init__(self, root: Path):
        self.root = root
        self.bytes = 0

    def put(self, case: str, stem: str, arr: np.ndarray, **meta) -> dict:
        arr = np.ascontiguousarray(arr, dtype="<f4")
        rel = f"{case}/{safe(stem)}.f32"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(arr.tobytes(order="C"))
        self.bytes += arr.nbytes
        return {"file": rel, "shape": list(arr.shape), "dtype": "f32", **meta}


def load_case(name: str):
    d = FIXTURE / "cases" / name
    ins = {}
    for p in sorted(d.glob("input_*.pb")):
        t = onnx.TensorProto()
        t.ParseFromString(p.read_bytes())
        ins[t.name] = numpy_helper.to_array(t)
    t = onnx.TensorProto()
    t.ParseFromString((d / "output_0.pb").read_bytes())
    assert t.name == "logits"
    return ins, numpy_helper.to_array(t)


def check_against_ort(model):
    rep = {}
    for case in ("seq7", "seq64", "greedy8_full", "batch2_leftpad"):
        ins, want = load_case(case)
        with torch.no_grad():
            got = model(
                input_ids=torch.from_numpy(ins["input_ids"]),
                attention_mask=torch.from_numpy(ins["attention_mask"]),
                position_ids=torch.from_numpy(ins["position_ids"]),
                use_cache=False,
            ).logits.numpy()
        valid = ins["attention_mask"].astype(bool)
        d = float(np.abs(got - want)[valid].max())
        rep[case] = d
        print(f"    ORT golden logits cases/{case} {list(ins['input_ids'].shape)}: max |torch - ORT| over unpadded positions = {d:.2e}")
        if d > TOL_ORT_LOGITS:
            raise SystemExit(f"logits of cases/{case} differ from the ORT golden by {d}")
    return rep


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    meta = load_fixture_meta()
    cfg = make_config(meta, "eager")
    if cfg.tie_word_embeddings:
        raise SystemExit("tie_word_embeddings is set: the mapping below assumes an untied lm_head")
    onnx_path = FIXTURE / "model.onnx"
    proto = onnx.load(str(onnx_path))
    vers = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
    print(json.dumps(vers))

    # --- model with the ONNX weights
    model = recipe_model(meta)
    mapping, arrs = map_parameters(model, proto)
    n_diff = load_onnx_weights(model, mapping, arrs)
    print(f"  mapped {len(mapping)} parameters to ONNX initializers "
          f"({sum(t for _, t in mapping.values())} transposed); {n_diff} differed from the init recipe")
    init_order = [t.name for t in proto.graph.initializer]
    by_init = {iname: (pname, tr) for pname, (iname, tr) in mapping.items()}
    params = dict(model.named_parameters())

    print("  self-check: weights vs the committed ORT goldens")
    ort_rep = check_against_ort(model)

    vocab = cfg.vocab_size
    ids_np = np.random.default_rng(IDS_SEED).integers(3, vocab, size=(1, SEQ), dtype=np.int64)
    ids = torch.from_numpy(ids_np)

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    w = Writer(OUT)
    rng = np.random.default_rng(FD_COORD_SEED)

    model64 = float64_model(meta, model)
    params64 = dict(model64.named_parameters())

    # --- case "model"
    print("== case model")
    loss, logits = model_case(model, ids)
    loss.backward()
    g32 = {n: p.grad.detach().clone() for n, p in params.items()}
    model_sdpa = LlamaForCausalLM(make_config(meta, "sdpa")).eval()
    model_sdpa.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits2 = model_case(model_sdpa, ids)[1]
    second = float((logits.detach() - logits2).abs().max())
    print(f"    loss = {loss.item():.9g}; logits vs a second (sdpa) torch forward: max abs diff {second:.2e}")
    if second > TOL_SECOND_FORWARD:
        raise SystemExit("second forward disagrees")
    loss64, logits64 = model_case(model64, ids)
    loss64.backward()
    g64 = {n: p.grad.detach().numpy() for n, p in params64.items()}
    fd_model = fd_report(
        "model",
        [(f"{by_init_name} ({pn})", g32[pn].numpy(), g64[pn], params64[pn], lambda: model_loss(model64, ids))
         for by_init_name in init_order if by_init_name in by_init for pn in [by_init[by_init_name][0]]],
        rng,
    )
    model_grads = {}
    for iname in init_order:
        if iname not in by_init:
            continue
        pn, tr = by_init[iname]
        model_grads[iname] = w.put("model", f"grad.{iname}", onnx_layout(g32[pn], tr),
                                   torch_param=pn, transposed=tr, torch_shape=list(params[pn].shape))
    case_model = {
        "description": "loss = mean over t = 0..10 of cross_entropy(logits[0, t], input_ids[0, t+1]) "
        "(natural log, mean over the 11 positions); grads = d loss / d each initializer, ONNX layout",
        "input_ids": ids_np.tolist(),
        "input_ids_recipe": f"numpy.random.default_rng({IDS_SEED}).integers(3, {vocab}, size=(1, {SEQ}), dtype=int64)",
        "attention_mask": np.ones((1, SEQ), np.int64).tolist(),
        "position_ids": [list(range(SEQ))],
        "past": "none (the ONNX graph's past_key_values.* = zeros [1, 2, 0, 16])",
        "loss": float(loss.item()),
        "loss_f64_model": float(loss64.item()),
        "tensors": {
            "loss": w.put("model", "loss", loss.detach().numpy().reshape(())),
            "logits": w.put("model", "logits", logits.detach().numpy()),
        },
        "grads": model_grads,
        "checks": {
            "logits_vs_second_torch_forward_sdpa_max_abs_diff": second,
            "logits_f32_vs_f64_model_max_abs_diff": float((logits.detach().double() - logits64.detach()).abs().max()),
            "finite_differences": fd_model,
        },
    }

    # --- case "block0"
    print("== case block0")
    x, kwargs, y_hook = capture_layer0_call(model, ids)
    emb = model.model.embed_tokens(ids).detach()
    assert torch.equal(x, emb), "layer-0 input is not the embedding output"
    r_np = np.random.default_rng(COTANGENT_SEED).standard_normal(tuple(x.shape)).astype(np.float32)
    r = torch.from_numpy(r_np)
    L, y, gx = block0_case(model, x, kwargs, r)
    hook_diff = float((y.detach() - y_hook).abs().max())
    print(f"    L = {L.item():.9g}; layer output vs the full forward's layer-0 output: max abs diff {hook_diff:.2e}")
    if hook_diff != 0.0:
        raise SystemExit("the layer-0 call differs from the one inside LlamaModel")
    layer_params = {f"model.layers.0.{n}": p for n, p in model.model.layers[0].named_parameters()}
    lg32 = {n: p.grad.detach().clone() for n, p in layer_params.items()}
    x64, kwargs64, _ = capture_layer0_call(model64, ids)
    r64 = r.double()
    L64, y64, gx64 = block0_case(model64, x64, kwargs64, r64)
    lg64 = {f"model.layers.0.{n}": p.grad.detach().numpy() for n, p in model64.model.layers[0].named_parameters()}
    x64v = x64.clone()
    f_block = lambda: block0_value(model64, x64v, kwargs64, r64)
    items = [("x (layer input)", gx.numpy(), gx64.numpy(), x64v, f_block)]
    block_inits = [i for i in init_order if i in by_init and by_init[i][0] in layer_params]
    items += [(f"{i} ({by_init[i][0]})", lg32[by_init[i][0]].numpy(), lg64[by_init[i][0]], params64[by_init[i][0]], f_block) for i in block_inits]
    fd_block = fd_report("block0", items, rng)
    block_grads = {}
    for iname in block_inits:
        pn, tr = by_init[iname]
        block_grads[iname] = w.put("block0", f"grad.{iname}", onnx_layout(lg32[pn], tr),
                                   torch_param=pn, transposed=tr, torch_shape=list(params[pn].shape))
    mask = kwargs.get("attention_mask")
    if mask is not None:  # eager: an explicit additive causal mask; check it is exactly that
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        want = torch.where(causal, 0.0, torch.finfo(torch.float32).min).expand(mask.shape)
        assert torch.equal(mask, want), "unexpected layer-0 attention mask"
    cos, sin = kwargs["position_embeddings"]
    case_block = {
        "description": "L = sum(layer0(x) * R) where layer0 = model.layers.0 (LlamaDecoderLayer: "
        "x + attn(rmsnorm(x)), then h + mlp(rmsnorm(h))), causal, RoPE for positions 0..11, no past; "
        "x = embed_tokens(input_ids) for the input_ids of case model",
        "input_ids": ids_np.tolist(),
        "position_ids": [list(range(SEQ))],
        "cotangent_recipe": f"numpy.random.default_rng({COTANGENT_SEED}).standard_normal({list(x.shape)}).astype(float32)",
        "L": float(L.item()),
        "L_f64_model": float(L64.item()),
        "layer_call": {
            "attn_implementation": "eager",
            "attention_mask": None if mask is None else {
                "shape": list(mask.shape), "dtype": str(mask.dtype),
                "meaning": "additive: 0 where key j <= query i, float32 min where j > i"},
            "rope": {"theta": cfg.rope_theta, "head_dim": cfg.head_dim, "cos_sin_shape": list(cos.shape)},
            "kwargs": sorted(kwargs),
        },
        "tensors": {
            "x": w.put("block0", "x", x.numpy()),
            "R": w.put("block0", "R", r_np),
            "output": w.put("block0", "output", y.detach().numpy()),
            "grad_x": w.put("block0", "grad_x", gx.numpy()),
        },
        "grads": block_grads,
        "checks": {
            "output_vs_full_forward_layer0_output_max_abs_diff": hook_diff,
            "output_f32_vs_f64_max_abs_diff": float((y.detach().double() - y64.detach()).abs().max()),
            "finite_differences": fd_block,
        },
    }

    index = {
        "fixture": "llama_optimum_with_past",
        "generator": "models/make_grad_goldens.py",
        "rerun": "models/.venv/bin/python models/make_grad_goldens.py",
        "format": "each tensor is a raw little-endian float32 file (C order, no header, 4*prod(shape) bytes; "
        "shape [] = one float) at grads/<file>; grads are keyed by ONNX initializer name and laid out as the "
        "initializer is stored (transposed = true: the ONNX tensor is the torch weight transposed, [in, out])",
        "model_onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "weights": "loaded from model.onnx initializers (mapping by name, else exact value match of the tensor "
        "or its transpose against fixture.json's init recipe, cross-checked with the ONNX node scopes)",
        "versions": vers,
        "model_dtype": "float32 (finite-difference checks: float64 copy)",
        "attn_implementation": "eager",
        "threads": 1,
        "parameter_map": {pn: {"onnx_initializer": i, "transposed": tr} for pn, (i, tr) in mapping.items()},
        "ort_golden_logits_max_abs_diff": ort_rep,
        "total_tensor_bytes": w.bytes,
        "cases": {"model": case_model, "block0": case_block},
    }
    (OUT / "grads.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    sys.exit(main())
