#!/usr/bin/env python3
"""ONNX Runtime reference figures for the prepared SmolLM2-135M (goldens for patchrt).

Needs onnxruntime, numpy and tokenizers (models/.venv has them) and the prepared data files
(`bash models/smollm2-135m/prepare.sh`) and Brown split (`bash models/brown/prepare.sh`).

    PY=models/.venv/bin/python
    $PY models/smollm2-135m/reference.py ppl --seq 512 --tokens 100000     # 40.139 figure
    $PY models/smollm2-135m/reference.py ppl --seq 2048 --tokens 100000
    $PY models/smollm2-135m/reference.py greedy
    $PY models/smollm2-135m/reference.py goldens    # all of the above + speed -> goldens.json

Perplexity rule (the reference setting), exactly:
  * text: models/brown/build/eval.txt, read as UTF-8;
  * tokens: tokenizer.json (this directory) `encode(text, add_special_tokens=False)`:
    no BOS anywhere, the file is encoded as one string;
  * the first N tokens (N = --tokens, 100,000) are cut into floor(N / seq) non-overlapping
    windows of `seq` tokens (195 windows of 512 for N = 100,000; the 160 leftover tokens are
    dropped); each window is run on its own (positions 0..seq-1, all-ones mask, no past);
  * the negative log-likelihood of token t+1 given the window's tokens 0..t, from float32
    logits through a float64 log-softmax, summed over the seq-1 predicted tokens of each window;
  * perplexity = exp(sum of all windows' NLL / (windows * (seq - 1))).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EVAL_TXT = ROOT / "models" / "brown" / "build" / "eval.txt"
sys.path.insert(0, str(ROOT / "benches" / "peers"))


def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(HERE / "tokenizer.json"))


def session(name: str, threads: int, spin: bool = False):
    """Spinning is off: the figures must not depend on how busy the machine is, and idle
    spinning threads only slow a shared machine down (bench_ort keeps ORT's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(HERE / name), so, providers=["CPUExecutionProvider"])


def eval_tokens(path: Path, bos: str) -> list[int]:
    tok = tokenizer()
    ids = tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids
    if bos == "stream":
        ids = [1] + ids
    return ids


def window_nll(sess, window: np.ndarray, skip_first: bool = False) -> tuple[float, int]:
    """Sum of -log p(w[t+1] | w[..t]) over the window; returns (sum, count). skip_first drops
    the prediction of w[1] from w[0] alone (w[0] = BOS)."""
    s = window.shape[0]
    ids = window[None].astype(np.int64)
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(s, dtype=np.int64)[None],
    }
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    logits = sess.run(["logits"], feed)[0][0, :-1].astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
    tgt = window[1:]
    nll = lse - logits[np.arange(s - 1), tgt]
    if skip_first:
        nll = nll[1:]
    return float(nll.sum()), len(nll)


def perplexity(seq: int, n_tokens: int, threads: int, bos: str = "none", graph: str = "model.onnx",
               max_windows: int | None = None, text: Path = EVAL_TXT, progress: bool = True) -> dict:
    ids = np.array(eval_tokens(text, bos)[:n_tokens], np.int64)
    n_win = len(ids) // seq
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    sess = session(graph, threads)
    sums = []
    t0 = time.time()
    for w in range(n_win):
        win = ids[w * seq:(w + 1) * seq]
        if bos in ("window", "window-sink"):
            win = np.concatenate([[1], win])
        s, _ = window_nll(sess, win, skip_first=(bos == "window-sink"))
        sums.append(s)
        if progress and (sys.stderr.isatty() or (w + 1) % 25 == 0):
            msg = f"  window {w + 1}/{n_win}  ppl so far {np.exp(sum(sums) / ((w + 1) * (len(win) - 1))):.4f}"
            if sys.stderr.isatty():
                print("\r" + msg, end="", file=sys.stderr, flush=True)
            else:
                print(msg + f" ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    per = len(win) - 1 - (1 if bos == "window-sink" else 0)
    total = sum(sums)
    return {
        "text": str(text.relative_to(ROOT)) if text.is_relative_to(ROOT) else str(text),
        "graph": graph,
        "seq": seq,
        "tokens_requested": n_tokens,
        "tokens_used": n_win * seq,
        "windows": n_win,
        "predicted_tokens_per_window": per,
        "bos": bos,
        "nll_sum": total,
        "mean_nll": total / (n_win * per),
        "perplexity": float(np.exp(total / (n_win * per))),
        "window_nll_sums": sums,
        "seconds": time.time() - t0,
    }


# ----------------------------------------------------------------------------- greedy

PLAIN_PROMPT = "The Brown Corpus was compiled at Brown University in"
CHAT_PROMPT = "What is the capital of France?"


def chat_prompt_ids(gen: dict, user: str) -> tuple[str, list[int]]:
    from jinja2 import Template

    text = Template(gen["chat_template"]).render(
        messages=[{"role": "user", "content": user}], add_generation_prompt=True
    )
    return text, tokenizer().encode(text, add_special_tokens=False).ids


def greedy_with_past(prompt: list[int], n: int, threads: int, eos: int | None = None) -> list[int]:
    from ort_bench import WithPast

    m = WithPast(session("model_with_past.onnx", threads))
    ids = np.array([prompt], np.int64)
    logits, past = m.run(ids, m.empty_past(), 0)
    out = []
    for k in range(n):
        t = int(logits[0, -1].argmax())
        out.append(t)
        if eos is not None and t == eos:
            break
        logits, past = m.run(np.array([[t]], np.int64), past, len(prompt) + k)
    return out


def greedy_no_past(prompt: list[int], n: int, threads: int) -> list[int]:
    sess = session("model.onnx", threads)
    toks = list(prompt)
    out = []
    for _ in range(n):
        ids = np.array([toks], np.int64)
        lg = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                   "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]})[0]
        t = int(lg[0, -1].argmax())
        out.append(t)
        toks.append(t)
    return out


def greedy_cases(threads: int, n: int = 24) -> list[dict]:
    gen = json.loads((HERE / "generation.json").read_text())
    tok = tokenizer()
    cases = []
    plain_ids = tok.encode(PLAIN_PROMPT, add_special_tokens=False).ids
    chat_text, chat_ids = chat_prompt_ids(gen, CHAT_PROMPT)
    for name, text, ids, how in (
        ("plain", PLAIN_PROMPT, plain_ids, "tokenizer.json encode(prompt, add_special_tokens=False)"),
        ("chat", chat_text, chat_ids,
         "chat_template rendered with messages=[{role: user, content: CHAT_PROMPT}], "
         "add_generation_prompt=True, then encode(add_special_tokens=False)"),
    ):
        wp = greedy_with_past(ids, n, threads)
        npast = greedy_no_past(ids, n, threads)
        cases.append({
            "name": name,
            "prompt": PLAIN_PROMPT if name == "plain" else CHAT_PROMPT,
            "prompt_text": text,
            "prompt_encoding": how,
            "prompt_ids": ids,
            "generated_ids": wp,
            "generated_text": tok.decode(wp, skip_special_tokens=False),
            "no_past_graph_agrees": wp == npast,
            "no_past_generated_ids": npast,
            "rule": f"greedy (argmax of the last position's logits), {n} tokens, not stopped at EOS; "
                    "with-past graph: the prompt in one call with an empty past, then one token per call "
                    "feeding present.* back as past_key_values.*; positions continue from the prompt length",
        })
        print(f"  {name}: {wp} agree={wp == npast} {tok.decode(wp)!r}", flush=True)
    return cases


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--bos", choices=["none", "stream", "window", "window-sink"], default="none",
                   help="none: no BOS; stream: one BOS before the text; window: BOS before each window, "
                   "predicting all seq tokens; window-sink: BOS before each window, predicting the "
                   "seq-1 in-window next tokens only")
    p.add_argument("--graph", default="model.onnx")
    p.add_argument("--windows", type=int, default=None, help="only the first N windows")
    p.add_argument("--text", type=Path, default=EVAL_TXT)
    p.add_argument("--json-out", type=Path, help="also save the result (with per-window NLL sums) here")
    sub.add_parser("greedy")
    g = sub.add_parser("goldens")
    g.add_argument("--skip-2048", action="store_true")
    g.add_argument("--bench-repeats", type=int, default=7)
    g.add_argument("--ppl512", type=Path, help="reuse `ppl --seq 512 --json-out` output (reference setting)")
    g.add_argument("--ppl2048", type=Path, help="reuse `ppl --seq 2048 --json-out` output")
    args = ap.parse_args(argv)

    if args.cmd == "ppl":
        r = perplexity(args.seq, args.tokens, args.threads, args.bos, args.graph, args.windows, args.text)
        if args.json_out:
            args.json_out.write_text(json.dumps(r, indent=1) + "\n")
        r.pop("window_nll_sums")
        print(json.dumps(r, indent=1))
        return 0
    if args.cmd == "greedy":
        greedy_cases(args.threads)
        return 0

    import onnxruntime as ort
    import tokenizers
    from ort_bench import bench_ort

    out_path = HERE / "goldens.json"
    old = json.loads(out_path.read_text()) if out_path.exists() else {}
    print("perplexity, seq 512 (reference setting)", flush=True)
    p512 = json.loads(args.ppl512.read_text()) if args.ppl512 else perplexity(512, 100_000, args.threads)
    assert (p512["seq"], p512["tokens_requested"], p512["bos"], p512["graph"]) == (512, 100_000, "none", "model.onnx")
    print(f"  {p512['perplexity']:.4f} ({p512['windows']} windows, {p512['seconds']:.0f} s)", flush=True)
    if args.skip_2048 and "perplexity_2048" in old:
        p2048 = old["perplexity_2048"]
    elif args.ppl2048:
        p2048 = json.loads(args.ppl2048.read_text())
        assert (p2048["seq"], p2048["tokens_requested"], p2048["bos"]) == (2048, 100_000, "none")
        p2048.pop("window_nll_sums", None)
    else:
        print("perplexity, seq 2048", flush=True)
        p2048 = perplexity(2048, 100_000, args.threads)
        print(f"  {p2048['perplexity']:.4f} ({p2048['windows']} windows, {p2048['seconds']:.0f} s)", flush=True)
        p2048.pop("window_nll_sums")
    print("first 3 windows of 512 on the with-past graph (empty past)", flush=True)
    wp3 = perplexity(512, 100_000, args.threads, graph="model_with_past.onnx", max_windows=3, progress=False)
    print("greedy", flush=True)
    greedy = greedy_cases(args.threads)
    print("speed (ORT, with-past graph)", flush=True)
    speed = bench_ort(HERE / "model_with_past.onnx", args.threads, args.bench_repeats, 32)
    for k, v in speed.items():
        print(f"  {k}: {v['median']:.1f} tok/s (min {v['min']:.1f}, max {v['max']:.1f})", flush=True)

    first3 = p512["window_nll_sums"][:3]
    p512_out = {k: v for k, v in p512.items() if k != "window_nll_sums"}
    goldens = {
        "description": "ONNX Runtime (CPUExecutionProvider, float32) figures on the prepared SmolLM2-135M "
                       "(weights dequantized from Q4_1/Q8_0). Written by models/smollm2-135m/reference.py goldens.",
        "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__, "tokenizers": tokenizers.__version__},
        "threads": args.threads,
        "perplexity_rule": __doc__.split("Perplexity rule (the reference setting), exactly:\n")[1].strip(),
        "perplexity_512": p512_out,
        "issue_reference_512": 40.139,
        "relative_diff_vs_issue": p512["perplexity"] / 40.139 - 1,
        "perplexity_2048": p2048,
        "issue_reference_2048": 35.03,
        "first_windows_512": {
            "windows": 3,
            "seq": 512,
            "predicted_tokens_per_window": 511,
            "token_ids_from": "the first 3*512 tokens of the reference token stream (rule above)",
            "nll_sums_no_past_graph": first3,
            "nll_sums_with_past_graph": wp3["window_nll_sums"],
            "max_abs_diff_between_graphs": max(abs(a - b) for a, b in zip(first3, wp3["window_nll_sums"])),
            "perplexity_of_these_3": float(np.exp(sum(first3) / (3 * 511))),
        },
        "greedy": greedy,
        "speed": {
            "graph": "model_with_past.onnx",
            "command": f"models/.venv/bin/python benches/peers/ort_bench.py models/smollm2-135m/model_with_past.onnx "
                       f"--threads {args.threads} --repeats {args.bench_repeats}",
            "definition": "see benches/peers/ort_bench.py: prefillN = N / time of one N-token call with an empty "
                          "past; decode128 = 32 / time of 32 single-token calls after a 128-token prefill",
            "tokens_per_s": speed,
            "note": "the machine is shared and noisy; compare ratios measured in one run, not these absolutes",
        },
    }
    out_path.write_text(json.dumps(goldens, indent=1) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
