#!/usr/bin/env python3
"""Side-by-side decode and prefill: llama.cpp, ONNX Runtime and patchrt, interleaved.

Driven by `benches/peers/compare.sh`, which builds or finds the tools and the models; this
script only measures and prints. Every round runs, in one fixed order, each llama.cpp format
(llama-bench, one repetition), ONNX Runtime on the fp32 graph, and each patchrt bundle
(`patchrt bench --repeats 1`, its warm-up excluded); the table gives the median over the rounds,
so every side sees the same machine state within a round.

Definitions (the same on every side):
  * decode: `--decode-steps` single-token steps after a `--decode-context`-token prompt,
    tokens/s = steps / time of the steps (llama-bench `-p 0 -n STEPS -d CONTEXT`);
  * prefill: one `--prefill`-token prompt on an empty cache, tokens/s = length / time;
  * bound: read bandwidth / bytes of weights read per decoded token. The bandwidth is the
    median of the probes `patchrt bench` takes between its runs in this same session (16 MiB
    windows of a 256 MiB array, summed by every thread); the bytes are the GGUF's tensors for
    llama.cpp (with a tied embedding, the whole table is read by the LM head) and the bundle's
    packed weights for patchrt (its own report).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Side:
    """One measured configuration: its label, the command that measures it, the bytes of
    weights one decoded token reads, and the samples gathered over the rounds."""

    label: str
    kind: str  # "llama.cpp", "patchrt" or "onnxruntime"
    path: Path
    weight_bytes: float | None = None
    decode: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    bandwidth: list[float] = field(default_factory=list)
    failure: str | None = None  # why this side stopped being measured (a crash, a timeout)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def gguf_tensor_bytes(path: Path) -> float:
    """Sum of the tensor sizes of a GGUF file (the `gguf` package of the models venv)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return float(path.stat().st_size)
    reader = GGUFReader(str(path))
    return float(sum(int(t.n_bytes) for t in reader.tensors))


class SideFailed(RuntimeError):
    """One side's tool failed; the other sides go on and the table says why."""

    def __init__(self, short: str, detail: str):
        super().__init__(detail)
        self.short = short


def run(cmd: list[str], timeout: float) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SideFailed(f"timed out after {timeout:.0f} s", f"`{' '.join(cmd)}` timed out")
    if p.returncode != 0:
        how = (f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
               else f"exit {p.returncode}")
        raise SideFailed(
            how, f"`{' '.join(cmd)}` {how}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
        )
    return p.stdout + p.stderr


def llama_round(side: Side, bench: Path, a) -> None:
    common = [str(bench), "-m", str(side.path), "-t", str(a.threads), "-r", "1", "-o", "jsonl"]
    out = run(common + ["-p", "0", "-n", str(a.decode_steps), "-d", str(a.decode_context)], 600)
    side.decode.append(_llama_ts(out))
    out = run(common + ["-p", str(a.prefill), "-n", "0"], 600)
    side.prefill.append(_llama_ts(out))


def _llama_ts(out: str) -> float:
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            return float(row["avg_ts"])
    raise RuntimeError(f"no jsonl row in llama-bench output:\n{out[-2000:]}")


PATCHRT_ROW = re.compile(r"^\|\s*(prefill\d+|decode\d+)\s*\|\s*([0-9.]+)\s*\|", re.M)
PATCHRT_BOUND = re.compile(
    r"× ([0-9.]+) MB of weights per token .*?read bandwidth in this run ([0-9.]+) GB/s", re.S
)


def patchrt_round(side: Side, patchrt: Path, a) -> None:
    out = run(
        [
            str(patchrt), "bench", str(side.path), "--threads", str(a.threads), "--no-verify",
            "--repeats", "1", "--prefill", str(a.prefill),
            "--decode-context", str(a.decode_context), "--decode-steps", str(a.decode_steps),
        ],
        900,
    )
    rows = dict(PATCHRT_ROW.findall(out))
    side.prefill.append(float(rows[f"prefill{a.prefill}"]))
    side.decode.append(float(rows[f"decode{a.decode_context}"]))
    m = PATCHRT_BOUND.search(out)
    if m:
        side.weight_bytes = float(m.group(1)) * 1e6
        side.bandwidth.append(float(m.group(2)))


def ort_round(side: Side, a) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from ort_bench import bench_ort  # noqa: E402 (the sibling script)

    r = bench_ort(side.path, a.threads, 1, a.decode_steps, prefill=(a.prefill,),
                  decode_context=a.decode_context)
    side.decode.append(r[f"decode{a.decode_context}"]["median"])
    side.prefill.append(r[f"prefill{a.prefill}"]["median"])


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode-context", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--llama-bench", type=Path, help="the llama-bench binary")
    ap.add_argument("--patchrt", type=Path, required=True, help="the patchrt binary")
    ap.add_argument("--gguf", action="append", default=[], metavar="FORMAT=PATH",
                    help="a llama.cpp model (F32, BF16, F16, Q8_0, ...)")
    ap.add_argument("--bundle", action="append", default=[], metavar="LABEL=PATH",
                    help="a patchrt bundle; LABEL `dense f32` / `hybrid 40% bf16` ...; the "
                         "dtype word names the llama.cpp format it is compared with")
    ap.add_argument("--onnx", type=Path, help="the fp32 with-past ONNX graph for ONNX Runtime")
    ap.add_argument("--json", type=Path, help="also write every sample here")
    a = ap.parse_args(argv)

    sides: list[Side] = []
    for spec in a.gguf:
        fmt_name, path = spec.split("=", 1)
        sides.append(Side(fmt_name, "llama.cpp", Path(path), gguf_tensor_bytes(Path(path))))
    if a.onnx:
        sides.append(Side("F32 graph", "onnxruntime", a.onnx))
    for spec in a.bundle:
        label, path = spec.split("=", 1)
        sides.append(Side(label, "patchrt", Path(path)))
    if not sides:
        ap.error("nothing to measure")

    t0 = time.time()
    for r in range(a.rounds):
        for s in sides:
            if s.failure:
                continue
            try:
                if s.kind == "llama.cpp":
                    llama_round(s, a.llama_bench, a)
                elif s.kind == "patchrt":
                    patchrt_round(s, a.patchrt, a)
                else:
                    ort_round(s, a)
            except SideFailed as e:
                s.failure = e.short
                print(f"{s.kind} {s.label}: {e}\n(this side is left out of later rounds)",
                      file=sys.stderr, flush=True)
        print(f"round {r + 1}/{a.rounds} done ({time.time() - t0:.0f} s)", file=sys.stderr,
              flush=True)

    bw = median([b for s in sides for b in s.bandwidth])
    llama = {s.label.upper(): s for s in sides if s.kind == "llama.cpp"}

    def bound(s: Side) -> float | None:
        return bw * 1e9 / s.weight_bytes if bw and s.weight_bytes else None

    print(f"threads {a.threads}, {a.rounds} interleaved rounds; decode: {a.decode_steps} steps "
          f"after {a.decode_context} tokens; prefill: {a.prefill} tokens; read bandwidth in "
          f"this run {fmt(bw)} GB/s (median of the probes)")
    print()
    print("| side | model | decode tok/s | spread | share of bound | prefill tok/s | spread "
          "| decode / llama.cpp | prefill / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in sides:
        if s.failure and not s.decode:
            print(f"| {s.kind} | {s.label} | failed: {s.failure} | - | - | - | - | - | - |")
            continue
        d, p = median(s.decode), median(s.prefill)
        spread = lambda xs: f"±{50 * (max(xs) - min(xs)) / statistics.median(xs):.0f}%" if xs else "-"
        b = bound(s)
        share = f"{100 * d / b:.0f}% of {b:.0f}" if b and d else "-"
        peer = None
        if s.kind == "patchrt":
            words = s.label.upper().replace("%", "").split()
            peer = next((llama[w] for w in words if w in llama), None)
        ratio = lambda mine, theirs: (f"{mine / theirs:.2f}× (vs {peer.label})"
                                      if mine and theirs else "-")
        print(f"| {s.kind} | {s.label} | {fmt(d)} | {spread(s.decode)} | {share} | {fmt(p)} "
              f"| {spread(s.prefill)} | {ratio(d, median(peer.decode)) if peer else '-'} "
              f"| {ratio(p, median(peer.prefill)) if peer else '-'} |")
    if a.json:
        a.json.write_text(json.dumps({
            "threads": a.threads, "rounds": a.rounds, "bandwidth_gb_s": bw,
            "sides": [s.__dict__ | {"path": str(s.path)} for s in sides],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
