#!/usr/bin/env python3
"""Every with-past family fixture, compiled by `patchc` and run by `patchrt bench`, side by side
with ONNX Runtime on the same graph in the same run:

    models/.venv/bin/python benches/families.py [--threads 2] [--repeats 7]

For each fixture in models/fixtures/*_with_past (tiny random-weight models, hidden size 64, 2
layers: the figures measure per-step overhead — dispatch, cache handling, small kernels — not
memory bandwidth) it stages the model with a 512-word tokenizer, compiles it (default options,
dense), reads from the compile report what fusion left unfused in the decode path, then times
ONNX Runtime (`ort_bench.bench_ort`: the with-past graph, ORT_ENABLE_ALL, the given intra-op
threads) and `patchrt bench` (same thread count) on a 64-token prefill and 32 decode steps
after 64 tokens, each median of `--repeats` after a warm-up, ORT first then patchrt per
fixture. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))

from ort_bench import bench_ort  # noqa: E402

CONTEXT = 64


def word_tokenizer(n: int) -> str:
    vocab = ", ".join(f'"w{i}": {i}' for i in range(n))
    return (
        '{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], '
        '"normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, '
        '"decoder": null, "model": {"type": "WordLevel", "vocab": {' + vocab + '}, "unk_token": "w0"}}'
    )


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
    return p.stdout + p.stderr


def patchrt_rows(out: str) -> dict[str, float]:
    rows = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) >= 2 and parts[0] in (f"prefill{CONTEXT}", f"decode{CONTEXT}"):
            try:
                rows[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release")
    args = ap.parse_args()
    patchc, patchrt = args.bin / "patchc", args.bin / "patchrt"
    for b in (patchc, patchrt):
        if not b.exists():
            sys.exit(f"{b} is missing: run `cargo build --release` first")
    fixtures = sorted(p for p in (ROOT / "models" / "fixtures").glob("*_with_past") if p.is_dir())
    print(f"{len(fixtures)} fixtures, {args.threads} threads, {args.repeats} repeats, "
          f"cpu count {os.cpu_count()}", flush=True)
    table = []
    for fx in fixtures:
        meta = json.loads((fx / "fixture.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for f in fx.iterdir():
                if f.is_file():
                    (tmp / f.name).write_bytes(f.read_bytes())
            (tmp / "tokenizer.json").write_text(word_tokenizer(512))
            (tmp / "generation.json").write_text('{"eos_token_id": 511, "max_context": 256}')
            bundle = tmp / "m.patch"
            run([str(patchc), "compile", str(tmp / "model.onnx"), "-o", str(bundle)])
            info = run([str(patchrt), "inspect", str(bundle)])
            report = next(
                json.loads(line.split(": ", 1)[1])
                for line in info.splitlines()
                if line.startswith("compile report: ")
            )
            unfused = report["fusion"]["unfused_decode_ops"]
            ort = bench_ort(tmp / "model.onnx", args.threads, args.repeats, 32,
                            prefill=(CONTEXT,), decode_context=CONTEXT)
            out = run([str(patchrt), "bench", str(bundle), "--threads", str(args.threads),
                       "--repeats", str(args.repeats), "--prefill", str(CONTEXT),
                       "--decode-context", str(CONTEXT), "--decode-steps", "32"])
            prt = patchrt_rows(out)
        row = {
            "fixture": fx.name,
            "family": meta["hf_model_class"],
            "exporter": meta["exporter"].split(" [")[0],
            "unfused": ", ".join(f"{u['op']} ×{u['count']}" for u in unfused) or "none",
        }
        for key in (f"prefill{CONTEXT}", f"decode{CONTEXT}"):
            row[key] = (ort[key]["median"], prt.get(key))
        table.append(row)
        print(f"  {fx.name}: {row}", flush=True)
    print()
    print(f"| fixture | class | unfused in decode | prefill{CONTEXT} ORT | patchrt | ratio "
          f"| decode{CONTEXT} ORT | patchrt | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        cells = [r["fixture"], r["family"], r["unfused"]]
        for key in (f"prefill{CONTEXT}", f"decode{CONTEXT}"):
            o, p = r[key]
            cells += [f"{o:.0f}", f"{p:.0f}" if p else "?", f"{p / o:.2f}×" if p else "?"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
