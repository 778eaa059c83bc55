"""Cross-check of our SparseGPT against a reference implementation: llm-compressor's
(`llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify.sparsify_weight`, the vLLM project's
SparseGPT), run on the same weights and calibration Gram matrices at full 2:4.

    cargo run --release --example sparsegpt_layers -- MODEL.onnx CALIB_CACHE DIR [FILTER...]
    python benches/peers/sparsegpt_crosscheck.py DIR

Needs torch, transformers and loguru, and the llmcompressor wheel (its source file is loaded
directly, so the package's own heavy dependencies are not needed):
    pip install torch transformers loguru && pip download --no-deps llmcompressor==0.14.0.1

Per layer it prints: the share of the 2:4 keep-mask both agree on, the relative output error
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of each, and the largest difference between the two updated weights
relative to the largest weight.
"""

import glob
import importlib.util
import os
import sys
import zipfile

import numpy as np
import torch


def load_reference():
    wheels = glob.glob(os.path.join(os.environ.get("LLMCOMPRESSOR_WHEEL_DIR", "."), "llmcompressor-*.whl"))
    if not wheels:
        sys.exit("llmcompressor wheel not found: pip download --no-deps llmcompressor==0.14.0.1 "
                 "(or set LLMCOMPRESSOR_WHEEL_DIR)")
    member = "llmcompressor/modifiers/pruning/sparsegpt/sgpt_sparsify.py"
    path = os.path.join(os.path.dirname(os.path.abspath(wheels[0])), "sgpt_sparsify.py")
    with zipfile.ZipFile(sorted(wheels)[-1]) as z:
        with open(path, "wb") as f:
            f.write(z.read(member))
    spec = importlib.util.spec_from_file_location("sgpt_sparsify", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, os.path.basename(sorted(wheels)[-1])


def rel_error(w, w_new, h):
    d = (w - w_new).astype(np.float64)  # [K, N]
    return float(np.einsum("kn,kj,jn->", d, h, d) / np.einsum("kn,kj,jn->", w, h, w))


def main():
    root = sys.argv[1]
    ref, wheel = load_reference()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    print(f"reference: {wheel} sparsify_weight(sparsity=0.5, prune_n=2, prune_m=4, "
          "block_size=128, dampening_frac=0.01), float32")
    print("| layer | K x N | mask agreement | rel. error ours | rel. error reference | "
          "max abs diff of weights / max abs weight |")
    print("|---|---|---|---|---|---|")
    for d in sorted(glob.glob(os.path.join(root, "*"))):
        w = np.load(os.path.join(d, "w.npy")).astype(np.float64)  # [K, N], y = x W
        h = np.load(os.path.join(d, "h.npy"))
        ours = np.load(os.path.join(d, "ours.npy")).astype(np.float64)
        keep = np.load(os.path.join(d, "ours_keep.npy")).astype(bool)
        k, n = w.shape
        lin = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.astype(np.float32)))
        hess = torch.from_numpy(h.astype(np.float32)).clone()
        _, w_ref = ref.sparsify_weight(lin, {lin: hess}, 0.5, 2, 4, 128, 0.01, False)
        w_ref = w_ref.detach().numpy().T.astype(np.float64)  # back to [K, N]
        keep_ref = w_ref != 0
        agree = float((keep == keep_ref).mean())
        diff = float(np.abs(ours - w_ref).max() / np.abs(w).max())
        name = os.path.basename(d)
        print(f"| {name} | {k} x {n} | {agree:.4%} | {rel_error(w, ours, h):.5e} | "
              f"{rel_error(w, w_ref, h):.5e} | {diff:.2e} |")


if __name__ == "__main__":
    main()
