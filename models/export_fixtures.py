#!/usr/bin/env python3
"""Export tiny random-weight Hugging Face decoder LMs to ONNX with real exporters and
record ONNX Runtime goldens in the standard ONNX test-data layout.

Run through `bash models/make_fixtures.sh` (it builds the virtual environment). Everything is
seeded: rerunning produces the same weights, token ids and goldens.

Layout written under models/fixtures/<name>/:
    model.onnx [+ model.onnx.data]      the exported graph (weights external only for llama_dynamo_op18)
    fixture.json                        exporter, versions, opset, HF config, graph I/O, cases
    cases/<case>/input_<i>.pb           onnx.TensorProto, i = graph input order
    cases/<case>/output_<i>.pb          onnx.TensorProto, i = graph output order (ORT CPU EP)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from onnx import numpy_helper
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

warnings.filterwarnings("ignore")

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"

# Weights: HF's own random init (normal, std = initializer_range) under torch.manual_seed(SEED).
# initializer_range is raised from HF's 0.02 to 0.125 so that attention scores are O(1) (with
# 0.02 the softmax is nearly uniform and RoPE / masking bugs would hide). HF initialises every
# bias to 0 and every norm weight to 1; we then add 0.1 * N(0, 1) to each 1-D parameter (biases,
# RMSNorm / LayerNorm weights and biases) so that bias and norm-scale handling is exercised.
SEED = 0
INIT_RANGE = 0.125
ONE_D_NOISE = 0.1
PAD_TOKEN_ID = 0

COMMON_TOKENS = dict(pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2)

# The size every LLaMA-like fixture shares: 2 layers, 4 query heads over 2 KV heads.
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=192,
    vocab_size=512,
    max_position_embeddings=256,
    initializer_range=INIT_RANGE,
    **COMMON_TOKENS,
)


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        **TINY,
        tie_word_embeddings=False,
    )


def gpt2_config() -> GPT2Config:
    return GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=512,
        n_positions=256,
        initializer_range=INIT_RANGE,
        **COMMON_TOKENS,
    )


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(
        **TINY,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )


# The families users run, each with what sets it apart from LLaMA. A sliding window of 4 keys
# is far below the 64-token case, so a window that is ignored changes the goldens.
SLIDING_WINDOW = 4


def qwen3_config() -> Qwen3Config:
    """q and k RMSNorms per head, explicit head_dim."""
    return Qwen3Config(
        **TINY,
        head_dim=16,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )


def mistral_config() -> MistralConfig:
    """Sliding-window attention on every layer."""
    return MistralConfig(
        **TINY,
        tie_word_embeddings=False,
        sliding_window=SLIDING_WINDOW,
    )


def gemma2_config() -> Gemma2Config:
    """GELU-tanh gated MLP, sqrt(hidden) embedding scale, four (1 + w) norms per block, tied
    embedding, attention and final logit softcapping, sliding-window and global layers."""
    return Gemma2Config(
        **TINY,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )


def gemma3_config() -> Gemma3TextConfig:
    """Gemma 2's block plus q/k norms, no softcapping, a local rotary base on sliding layers."""
    return Gemma3TextConfig(
        **TINY,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        rope_local_base_freq=10000.0,
        rope_theta=1000000.0,
    )


def phi3_config() -> Phi3Config:
    """Fused qkv and gate_up projections."""
    return Phi3Config(
        **TINY,
        original_max_position_embeddings=256,
        tie_word_embeddings=False,
    )


# arch -> (config, model class, attention implementation). Gemma 2 runs eager attention:
# transformers' SDPA path drops the attention softcapping that the family is defined with.
ARCHS = {
    "llama": (llama_config, LlamaForCausalLM, "sdpa"),
    "gpt2": (gpt2_config, GPT2LMHeadModel, "sdpa"),
    "qwen2": (qwen2_config, Qwen2ForCausalLM, "sdpa"),
    "qwen3": (qwen3_config, Qwen3ForCausalLM, "sdpa"),
    "mistral": (mistral_config, MistralForCausalLM, "sdpa"),
    "gemma2": (gemma2_config, Gemma2ForCausalLM, "eager"),
    "gemma3": (gemma3_config, Gemma3ForCausalLM, "sdpa"),
    "phi3": (phi3_config, Phi3ForCausalLM, "sdpa"),
}


def build_model(arch: str):
    make_cfg, cls, attn = ARCHS[arch]
    cfg = make_cfg()
    cfg._attn_implementation = attn
    torch.manual_seed(SEED)
    model = cls(cfg).eval().to(torch.float32)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(ONE_D_NOISE * torch.randn(p.shape, generator=gen))
    return model


class LogitsWrapper(torch.nn.Module):
    """input_ids, attention_mask, position_ids -> logits (no KV cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            return_dict=True,
        )
        return out.logits


def example_inputs(batch=2, seq=8):
    ids = torch.randint(3, 512, (batch, seq), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    pos = torch.arange(seq, dtype=torch.int64).unsqueeze(0).expand(batch, seq).contiguous()
    return ids, mask, pos


INPUT_NAMES = ["input_ids", "attention_mask", "position_ids"]


class TorchScriptMaskPatch:
    """transformers >= 4.53 builds attention masks with torch.vmap, which TorchScript tracing
    cannot trace (IndexError: unordered_map::at). Swap in Optimum's broadcasting (vmap-free)
    mask builders for the duration of the export, exactly as Optimum's own ModelPatcher does."""

    def __enter__(self):
        self.orig = {}
        if TRANSFORMERS_MAJOR >= 5:
            return  # optimum-onnx 0.1 does not import under transformers 5: trace as is.
        from optimum.exporters.onnx.model_patcher import (
            eager_mask_without_vmap,
            sdpa_mask_without_vmap,
        )
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        self.reg = ALL_MASK_ATTENTION_FUNCTIONS
        self.orig = {k: self.reg[k] for k in ("sdpa", "eager")}
        self.reg.register("sdpa", sdpa_mask_without_vmap)
        self.reg.register("eager", eager_mask_without_vmap)

    def __exit__(self, *exc):
        if not self.orig:
            return
        for k, v in self.orig.items():
            self.reg.register(k, v)


def export_torchscript(model, path: Path, opset: int):
    wrapper = LogitsWrapper(model).eval()
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES + ["logits"]}
    with torch.no_grad(), TorchScriptMaskPatch():
        torch.onnx.export(
            wrapper,
            example_inputs(),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=INPUT_NAMES,
            output_names=["logits"],
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def export_dynamo(model, path: Path, opset: int, external: bool):
    wrapper = LogitsWrapper(model).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=1, max=256)
    shapes = {n: {0: batch, 1: seq} for n in INPUT_NAMES}
    with torch.no_grad():
        prog = torch.onnx.export(
            wrapper,
            example_inputs(),
            dynamo=True,
            opset_version=opset,
            input_names=INPUT_NAMES,
            output_names=["logits"],
            dynamic_shapes=shapes,
            optimize=True,
            verify=False,
            report=False,
        )
    proto = prog.model_proto
    # Drop the per-node Python stack traces: they embed absolute paths of this checkout (so the
    # bytes would depend on where the script runs) and are ~40% of the file. The other metadata
    # (namespace, name_scopes, class_hierarchy, fx_node) is kept: it names the HF module a node
    # came from (e.g. lm_head vs q_proj), which the initializer names (val_NN) no longer do.
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            stale.unlink()
    if external:
        onnx.save(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
            convert_attribute=False,
        )
    else:
        onnx.save(proto, str(path))


def export_optimum(model, out_dir: Path, opset: int):
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        onnx_dir = Path(tmp) / "onnx"
        model.save_pretrained(hf_dir, safe_serialization=True)
        main_export(
            str(hf_dir),
            output=str(onnx_dir),
            task="text-generation-with-past",
            opset=opset,
            device="cpu",
            no_post_process=True,
            library_name="transformers",
            do_validation=True,
        )
        produced = sorted(p.name for p in onnx_dir.iterdir())
        print(f"    optimum produced: {produced}")
        # optimum < 2 writes decoder_model.onnx + decoder_with_past_model.onnx; optimum-onnx 0.1
        # with no_post_process writes the with-past graph alone as model.onnx.
        for cand in ("decoder_with_past_model.onnx", "model.onnx"):
            if (onnx_dir / cand).exists():
                shutil.copy(onnx_dir / cand, out_dir / "model.onnx")
                break
        else:
            raise RuntimeError(f"no with-past model among {produced}")
        if (onnx_dir / "decoder_model.onnx").exists():
            shutil.copy(onnx_dir / "decoder_model.onnx", out_dir / "prefill.onnx")
        extra = [p for p in produced if p.endswith(".onnx_data") or p.endswith(".onnx.data")]
        if extra:
            raise RuntimeError(f"unexpected external data from optimum: {extra}")
        return produced


OPTIMUM = "optimum.exporters.onnx.main_export(task='text-generation-with-past', no_post_process=True) [TorchScript inside]"

FIXTURE_SPECS = [
    # name, arch, exporter, opset, external data
    ("llama_dynamo_op18", "llama", "torch.onnx.export(dynamo=True)", 18, True),
    ("llama_torchscript_op17", "llama", "torch.onnx.export(dynamo=False) [TorchScript]", 17, False),
    ("llama_optimum_with_past", "llama", OPTIMUM, 18, False),
    ("gpt2", "gpt2", "torch.onnx.export(dynamo=False) [TorchScript]", 17, False),
    ("qwen2", "qwen2", "torch.onnx.export(dynamo=True)", 18, False),
    ("qwen3_dynamo", "qwen3", "torch.onnx.export(dynamo=True)", 18, True),
    ("mistral_dynamo", "mistral", "torch.onnx.export(dynamo=True)", 18, False),
    ("gemma2_dynamo", "gemma2", "torch.onnx.export(dynamo=True)", 18, False),
    ("gemma3_dynamo", "gemma3", "torch.onnx.export(dynamo=True)", 18, False),
    ("phi3_dynamo", "phi3", "torch.onnx.export(dynamo=True)", 18, False),
    ("phi3_torchscript", "phi3", "torch.onnx.export(dynamo=False) [TorchScript]", 17, False),
    ("qwen3_optimum_with_past", "qwen3", OPTIMUM, 18, False),
    ("mistral_optimum_with_past", "mistral", OPTIMUM, 18, False),
    ("gemma2_optimum_with_past", "gemma2", OPTIMUM, 18, False),
    ("gemma3_optimum_with_past", "gemma3", OPTIMUM, 18, False),
    ("phi3_optimum_with_past", "phi3", OPTIMUM, 18, False),
    ("gpt2_optimum_with_past", "gpt2", OPTIMUM, 18, False),
    # The same models exported by transformers 5 (models/.venv-tf5, see make_fixtures.sh).
    ("llama_tf5_dynamo", "llama", "torch.onnx.export(dynamo=True)", 18, False),
    ("llama_tf5_torchscript", "llama", "torch.onnx.export(dynamo=False) [TorchScript]", 17, False),
    ("qwen3_tf5_dynamo", "qwen3", "torch.onnx.export(dynamo=True)", 18, False),
    ("gemma3_tf5_dynamo", "gemma3", "torch.onnx.export(dynamo=True)", 18, False),
]

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def spec_transformers_major(name: str) -> int:
    """The transformers major version a fixture is exported with."""
    return 5 if "_tf5_" in name else 4


# ----------------------------------------------------------------------------- helpers


def dims_of(vi):
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def graph_io(model: onnx.ModelProto):
    def one(vi):
        return {
            "name": vi.name,
            "elem_type": onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type),
            "dims": dims_of(vi),
        }

    inits = {i.name for i in model.graph.initializer}
    return (
        [one(v) for v in model.graph.input if v.name not in inits],
        [one(v) for v in model.graph.output],
    )


def op_summary(model: onnx.ModelProto):
    hist = collections.Counter()
    attrs = collections.defaultdict(set)

    def walk(graph):
        for n in graph.node:
            key = f"{n.domain or 'ai.onnx'}::{n.op_type}"
            hist[key] += 1
            for a in n.attribute:
                attrs[key].add(a.name)
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(model.graph)
    return {
        "node_count": sum(hist.values()),
        "top_level_node_count": len(model.graph.node),
        "initializer_count": len(model.graph.initializer),
        "functions": [f"{f.domain}::{f.name}" for f in model.functions],
        "ops": {k: {"count": hist[k], "attributes": sorted(attrs[k])} for k in sorted(hist)},
    }


def save_tensor(arr: np.ndarray, name: str, path: Path):
    t = numpy_helper.from_array(np.ascontiguousarray(arr), name=name)
    path.write_bytes(t.SerializeToString())


def write_case(case_dir: Path, in_names, feed, out_names, outs):
    case_dir.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(in_names):
        save_tensor(feed[n], n, case_dir / f"input_{i}.pb")
    for i, (n, v) in enumerate(zip(out_names, outs)):
        save_tensor(v, n, case_dir / f"output_{i}.pb")


def token_ids(case_seed: int, batch: int, seq: int) -> np.ndarray:
    # ids in [3, 512): avoid pad/bos/eos so the only pad tokens are the deliberate ones.
    rng = np.random.default_rng(1000 + case_seed)
    return rng.integers(3, 512, size=(batch, seq), dtype=np.int64)


def hf_position_ids(mask: np.ndarray) -> np.ndarray:
    """What transformers' GenerationMixin.prepare_inputs_for_generation passes (4.57):
    position_ids = mask.cumsum(-1) - 1; position_ids.masked_fill_(mask == 0, 1)."""
    pos = mask.astype(np.int64).cumsum(-1) - 1
    pos[mask == 0] = 1
    return pos


def base_cases():
    cases = {}
    for k, s in enumerate((1, 7, 64)):
        ids = token_ids(k, 1, s)
        mask = np.ones((1, s), np.int64)
        cases[f"seq{s}"] = (ids, mask, hf_position_ids(mask))
    ids = token_ids(10, 2, 16)
    mask = np.ones((2, 16), np.int64)
    ids[1, :5] = PAD_TOKEN_ID
    mask[1, :5] = 0
    cases["batch2_leftpad"] = (ids, mask, hf_position_ids(mask))
    return cases


# ----------------------------------------------------------------------------- main


def torch_logits(model, ids, mask, pos):
    with torch.no_grad():
        return (
            model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos),
                use_cache=False,
            )
            .logits.float()
            .numpy()
        )


def diff_report(ort_logits, ref, mask):
    d = np.abs(ort_logits - ref)
    rep = {"max_abs_diff_all_positions": float(d.max()), "max_abs_logit": float(np.abs(ref).max())}
    valid = mask.astype(bool)[:, -ort_logits.shape[1]:]
    rep["max_abs_diff_unpadded_positions"] = float(d[valid].max())
    return rep


def make_feed(in_names, cfg_past, ids, mask, pos, past=None):
    feed = {}
    b = ids.shape[0]
    for n in in_names:
        if n == "input_ids":
            feed[n] = ids
        elif n == "attention_mask":
            feed[n] = mask
        elif n == "position_ids":
            feed[n] = pos
        elif n.startswith("past_key_values."):
            if past is None:
                kvh, hd = cfg_past
                feed[n] = np.zeros((b, kvh, 0, hd), np.float32)
            else:
                feed[n] = past[n]
        else:
            raise RuntimeError(f"unexpected graph input {n}")
    return feed


def versions():
    import onnxscript

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": onnxscript.__version__,
        "numpy": np.__version__,
    }
    if TRANSFORMERS_MAJOR == 4:
        from importlib.metadata import version

        v["optimum"] = version("optimum")
        v["optimum-onnx"] = version("optimum-onnx")
    return v


def run_fixture(name, arch, exporter, opset, external, vers):
    print(f"== {name}: {arch} via {exporter}, opset {opset}")
    out_dir = FIXTURES / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model = build_model(arch)
    path = out_dir / "model.onnx"
    optimum_files = None
    if exporter.startswith("optimum"):
        optimum_files = export_optimum(model, out_dir, opset)
    elif "dynamo=True" in exporter:
        export_dynamo(model, path, opset, external)
    else:
        export_torchscript(model, path, opset)

    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    opsets = {(o.domain or "ai.onnx"): o.version for o in proto.opset_import}
    assert 13 <= opsets["ai.onnx"] <= 21, opsets
    if external:
        n_ext = sum(
            1 for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        )
        assert n_ext > 0, "expected external initializers"
    inputs, outputs = graph_io(proto)
    in_names = [i["name"] for i in inputs]
    out_names = [o["name"] for o in outputs]
    assert out_names[0] == "logits", out_names

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == in_names
    assert [o.name for o in sess.get_outputs()] == out_names

    cfg = model.config
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg_past = (n_kv, head_dim)

    cases_meta = {}
    for cname, (ids, mask, pos) in base_cases().items():
        feed = make_feed(in_names, cfg_past, ids, mask, pos)
        outs = sess.run(out_names, feed)
        write_case(out_dir / "cases" / cname, in_names, feed, out_names, outs)
        ref = torch_logits(model, ids, mask, pos)
        cases_meta[cname] = {
            "inputs": {n: list(feed[n].shape) for n in in_names},
            "outputs": {n: list(o.shape) for n, o in zip(out_names, outs)},
            "ort_vs_torch_logits": diff_report(outs[0], ref, mask),
        }
        print(f"    {cname}: {cases_meta[cname]['ort_vs_torch_logits']}")

    extra_meta = {}
    if any(n.startswith("past_key_values.") for n in in_names):
        extra_meta = greedy_cases(model, sess, in_names, out_names, cfg_past, out_dir, cases_meta)

    total_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    meta = {
        "name": name,
        "architecture": arch,
        "hf_model_class": type(model).__name__,
        "exporter": exporter,
        "optimum_output_files": optimum_files,
        "opset_import": opsets,
        "ir_version": proto.ir_version,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "external_data": "model.onnx.data" if external else None,
        "versions": vers,
        "weights": {
            "seed": SEED,
            "init": f"HF default init (normal std=initializer_range={INIT_RANGE}) under torch.manual_seed({SEED}); "
            f"then every 1-D parameter (biases, norm weights/biases) += {ONE_D_NOISE} * randn "
            f"(torch.Generator seed {SEED + 1}, parameters in sorted-name order)",
            "dtype": "float32",
            "attn_implementation": ARCHS[arch][2],
        },
        "hf_config": json.loads(cfg.to_json_string(use_diff=False)),
        "graph_inputs": inputs,
        "graph_outputs": outputs,
        "ops": op_summary(proto),
        "ort": {"provider": "CPUExecutionProvider", "intra_op_num_threads": 1, "graph_optimization_level": "default (ORT_ENABLE_ALL)"},
        "case_inputs": {
            "token_ids": "numpy default_rng(1000 + k).integers(3, 512); k = 0,1,2 for seq1/seq7/seq64, 10 for batch2_leftpad",
            "attention_mask": "all ones, except batch2_leftpad row 1 whose first 5 tokens are pad (id 0, mask 0)",
            "position_ids": "as transformers' generate passes them: cumsum(mask)-1, then 1 where mask == 0 "
            "(so batch2_leftpad row 1 is [1,1,1,1,1,0,1,...,10]); plain 0..S-1 for full rows",
            "past_key_values": "with-past models: empty past, shape [batch, kv_heads, 0, head_dim]",
        },
        "cases": cases_meta,
        **extra_meta,
        "bytes_excluding_fixture_json": total_bytes,
    }
    (out_dir / "fixture.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"    {meta['ops']['node_count']} nodes, {total_bytes} bytes")


def greedy_cases(model, sess, in_names, out_names, cfg_past, out_dir, cases_meta):
    prompt = token_ids(20, 1, 7)
    tokens = prompt.copy()
    steps_dir = out_dir / "cases" / "greedy8"
    past = None
    step_logits = []
    gen = []
    for step in range(9):
        if step == 0:
            ids = prompt
        else:
            ids = tokens[:, -1:]
        total = tokens.shape[1]
        mask = np.ones((1, total), np.int64)
        pos = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
        feed = make_feed(in_names, cfg_past, ids, mask, pos, past)
        outs = sess.run(out_names, feed)
        write_case(steps_dir / f"step_{step}", in_names, feed, out_names, outs)
        step_logits.append(outs[0])
        past = {
            n.replace("present.", "past_key_values."): v
            for n, v in zip(out_names, outs)
            if n.startswith("present.")
        }
        nxt = int(outs[0][0, -1].argmax())
        gen.append(nxt)
        if step < 8:
            tokens = np.concatenate([tokens, np.array([[nxt]], np.int64)], axis=1)
        cases_meta[f"greedy8/step_{step}"] = {
            "inputs": {n: list(feed[n].shape) for n in in_names},
            "outputs": {n: list(o.shape) for n, o in zip(out_names, outs)},
            "argmax_next_token": nxt,
        }
    assert tokens.shape == (1, 15)
    # full sequence, empty past
    mask = np.ones((1, 15), np.int64)
    pos = np.arange(15, dtype=np.int64)[None]
    feed = make_feed(in_names, cfg_past, tokens, mask, pos)
    full = sess.run(out_names, feed)
    write_case(out_dir / "cases" / "greedy8_full", in_names, feed, out_names, full)
    ref = torch_logits(model, tokens, mask, pos)
    cases_meta["greedy8_full"] = {
        "inputs": {n: list(feed[n].shape) for n in in_names},
        "outputs": {n: list(o.shape) for n, o in zip(out_names, full)},
        "ort_vs_torch_logits": diff_report(full[0], ref, mask),
    }
    # consistency: cached decode vs. full sequence, and each step vs. torch
    cached = np.concatenate(step_logits, axis=1)  # [1, 7 + 8, V]
    cache_vs_full = float(np.abs(cached - full[0]).max())
    present_vs_full = max(
        float(np.abs(past[n.replace("present.", "past_key_values.")] - v).max())
        for n, v in zip(out_names, full)
        if n.startswith("present.")
    )
    for step in range(9):
        sl = slice(0, 7) if step == 0 else slice(6 + step, 7 + step)
        cases_meta[f"greedy8/step_{step}"]["ort_vs_torch_logits"] = {
            "max_abs_diff_all_positions": float(np.abs(step_logits[step] - ref[:, sl]).max()),
            "reference": f"torch logits of the 15-token greedy8_full sequence at positions {sl.start}..{sl.stop - 1}",
        }
    torch_greedy = [int(ref[0, 6 + k].argmax()) for k in range(9)]
    print(f"    greedy tokens (ORT): {gen}, torch argmax on full seq: {torch_greedy}")
    print(f"    cached-vs-full max abs diff: logits {cache_vs_full:.3g}, present {present_vs_full:.3g}")
    return {
        "greedy8": {
            "prompt": prompt[0].tolist(),
            "generated_tokens": gen[:8],
            "next_token_after_step_8": gen[8],
            "torch_argmax_tokens_on_full_sequence": torch_greedy,
            "full_sequence": tokens[0].tolist(),
            "description": (
                "step_0: the 7-token prompt (positions 0..6) with an empty past (length 0); "
                "step_k (k=1..8): input_ids = [[generated_tokens[k-1]]], position_ids = [[6+k]], "
                "attention_mask = ones(1, 7+k), past_key_values.* = present.* outputs of step_{k-1} "
                "(past length 6+k). generated_tokens[k] = argmax of step_k logits[0, -1]. "
                "step_8's argmax (next_token_after_step_8) is recorded but never fed. "
                "greedy8_full: input_ids = prompt + generated_tokens[0..7] (15 tokens, positions 0..14), "
                "empty past. Consistency: greedy8_full logits[:, 0:7] == step_0 logits; "
                "greedy8_full logits[:, 6+k] == step_k logits[:, 0] for k = 1..8; "
                "greedy8_full present.* == step_8 present.* (past length 15)."
            ),
            "ort_cached_vs_full_logits_max_abs_diff": cache_vs_full,
            "ort_step8_present_vs_full_present_max_abs_diff": present_vs_full,
        }
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="fixture names to (re)build")
    args = ap.parse_args()
    torch.set_num_threads(1)
    vers = versions()
    print(json.dumps(vers))
    known = {spec[0] for spec in FIXTURE_SPECS}
    unknown = sorted(set(args.only or []) - known)
    if unknown:
        sys.exit(f"unknown fixtures {unknown}; known: {sorted(known)}")
    for spec in FIXTURE_SPECS:
        if args.only and spec[0] not in args.only:
            continue
        if spec_transformers_major(spec[0]) != TRANSFORMERS_MAJOR:
            print(f"-- {spec[0]}: made with transformers {spec_transformers_major(spec[0])}, this is {transformers.__version__}; skipped")
            continue
        run_fixture(*spec, vers)


if __name__ == "__main__":
    sys.exit(main())
