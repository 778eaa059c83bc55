#!/usr/bin/env python3
"""Peer benchmark: ONNX Runtime on the with-past ONNX graph, next to `patchrt bench`.

    python benches/peers/ort_bench.py models/smollm2-135m/model_with_past.onnx --threads 2
    python benches/peers/ort_bench.py models/smollm2-135m/model_with_past.onnx --threads 2 \
        --patchrt model.patch [--patchrt-bin target/release/patchrt]

Needs `onnxruntime` and `numpy` (models/.venv has both). Measures, with `--threads` intra-op
threads (inter-op 1, sequential execution, ORT_ENABLE_ALL, CPUExecutionProvider):

* prefill128 / prefill512: one call on a prompt of 128 / 512 tokens with an empty past
  (past length 0); tokens/s = prompt length / wall time of the call;
* decode128: after a 128-token prefill, `--decode-steps` single-token calls (default 32), each
  feeding the previous call's `present.*` back as `past_key_values.*` (past length 128, 129,
  ...); tokens/s = steps / total wall time of the steps.

Each figure is repeated `--repeats` times (after one warm-up) and reported as median, min, max
and spread = (max - min) / median. Token ids are fixed pseudo-random ids (numpy seed 0) in
[100, vocab). With `--patchrt BUNDLE`, `patchrt bench BUNDLE --threads N` runs as a subprocess
right after, in the same run, and the table gains patchrt's medians and the ratio
patchrt / ORT (higher is better for patchrt). Its output is parsed leniently (a line starting
with prefill128 / prefill512 / decode128, the first number after the label is taken as the
tokens/s median); if that fails its output is printed as is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROWS = ("prefill128", "prefill512", "decode128")


def make_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class WithPast:
    """Optimum layout: input_ids, attention_mask, position_ids, past_key_values.N.key/value ->
    logits, present.N.key/value."""

    def __init__(self, sess):
        self.sess = sess
        self.in_names = [i.name for i in sess.get_inputs()]
        self.out_names = [o.name for o in sess.get_outputs()]
        self.past_names = [n for n in self.in_names if n.startswith("past_key_values.")]
        if not self.past_names:
            raise SystemExit("this graph has no past_key_values.* inputs: pass the with-past ONNX")
        shp = next(i for i in sess.get_inputs() if i.name == self.past_names[0]).shape
        self.kv_heads, self.head_dim = int(shp[1]), int(shp[3])
        logits = next(o for o in sess.get_outputs() if o.name == "logits")
        self.vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else 49152

    def empty_past(self, batch=1):
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {n: z for n in self.past_names}

    def run(self, ids: np.ndarray, past: dict, past_len: int):
        s = ids.shape[1]
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((ids.shape[0], past_len + s), np.int64),
            "position_ids": np.arange(past_len, past_len + s, dtype=np.int64)[None].repeat(ids.shape[0], 0),
            **past,
        }
        # GPT-2's export has no position_ids input.
        feed = {k: v for k, v in feed.items() if k in self.in_names}
        outs = self.sess.run(self.out_names, feed)
        logits = outs[self.out_names.index("logits")]
        present = {
            n.replace("present.", "past_key_values."): v
            for n, v in zip(self.out_names, outs)
            if n.startswith("present.")
        }
        return logits, present


def stats(xs: list[float]) -> dict:
    med = statistics.median(xs)
    return {"median": med, "min": min(xs), "max": max(xs), "spread": (max(xs) - min(xs)) / med, "n": len(xs)}


def bench_ort(path: Path, threads: int, repeats: int, decode_steps: int,
              prefill: tuple[int, ...] = (128, 512), decode_context: int = 128) -> dict:
    """`prefillN` for every N of `prefill` and `decodeC` (C = `decode_context`), as stats."""
    m = WithPast(make_session(path, threads))
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, m.vocab, size=(1, max(*prefill, decode_context)), dtype=np.int64)
    res = {}
    for n in prefill:
        ids = prompt[:, :n]
        m.run(ids, m.empty_past(), 0)  # warm-up
        tps = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m.run(ids, m.empty_past(), 0)
            tps.append(n / (time.perf_counter() - t0))
        res[f"prefill{n}"] = stats(tps)
    logits, past0 = m.run(prompt[:, :decode_context], m.empty_past(), 0)
    first = np.array([[int(logits[0, -1].argmax())]], np.int64)

    def decode():
        past, tok = past0, first
        t0 = time.perf_counter()
        for k in range(decode_steps):
            lg, past = m.run(tok, past, decode_context + k)
            tok = np.array([[int(lg[0, -1].argmax())]], np.int64)
        return decode_steps / (time.perf_counter() - t0)

    decode()  # warm-up
    res[f"decode{decode_context}"] = stats([decode() for _ in range(repeats)])
    return res


def run_patchrt(bin_path: str, bundle: Path, threads: int, extra: list[str]) -> tuple[dict, str]:
    cmd = [bin_path, "bench", str(bundle), "--threads", str(threads), *extra]
    print(f"$ {' '.join(cmd)}", flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + (("\n" + p.stderr) if p.stderr.strip() else "")
    if p.returncode != 0:
        print(out)
        raise SystemExit(f"patchrt bench exited with {p.returncode}")
    found = {}
    num = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
    for line in p.stdout.splitlines():
        s = line.strip().lstrip("|").strip()
        for row in ROWS:
            if s.startswith(row) and row not in found:
                m = num.search(s[len(row):])
                if m:
                    found[row] = float(m.group())
    return found, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ONNX Runtime peer benchmark (with-past graph)")
    ap.add_argument("model", type=Path, help="with-past ONNX (e.g. models/smollm2-135m/model_with_past.onnx)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--patchrt", type=Path, metavar="BUNDLE", help="also run `patchrt bench BUNDLE`")
    ap.add_argument("--patchrt-bin", default=None, help="default: target/release/patchrt, else patchrt on PATH")
    ap.add_argument("--patchrt-arg", action="append", default=[], help="extra argument for patchrt bench")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    print(f"ONNX Runtime {ort.__version__}, {args.model}, threads {args.threads}, "
          f"repeats {args.repeats} (+1 warm-up), decode steps {args.decode_steps}, "
          f"cpu count {os.cpu_count()}", flush=True)
    ort_res = bench_ort(args.model, args.threads, args.repeats, args.decode_steps)

    prt, prt_out = {}, None
    if args.patchrt:
        bin_path = args.patchrt_bin
        if bin_path is None:
            root = Path(__file__).resolve().parents[2]
            cand = root / "target" / "release" / "patchrt"
            bin_path = str(cand) if cand.exists() else (shutil.which("patchrt") or "patchrt")
        prt, prt_out = run_patchrt(bin_path, args.patchrt, args.threads, args.patchrt_arg)

    hdr = f"{'bench':<11} {'ORT tok/s':>10} {'min':>9} {'max':>9} {'spread':>7}"
    if args.patchrt:
        hdr += f" {'patchrt tok/s':>14} {'patchrt/ORT':>12}"
    print(hdr)
    for row in ROWS:
        s = ort_res[row]
        line = f"{row:<11} {s['median']:>10.1f} {s['min']:>9.1f} {s['max']:>9.1f} {100 * s['spread']:>6.1f}%"
        if args.patchrt:
            if row in prt:
                line += f" {prt[row]:>14.1f} {prt[row] / s['median']:>11.2f}x"
            else:
                line += f" {'?':>14} {'?':>12}"
        print(line)
    if args.patchrt and (len(prt) < len(ROWS)):
        print("\ncould not parse every row of patchrt's output; here it is:")
        print(prt_out)
    elif prt_out is not None:
        print("\npatchrt bench output:")
        print(prt_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
