#!/usr/bin/env python3
"""Turn the English HTML of The Debian Administrator's Handbook into plain prose.

Python 3 standard library only. Run through `prepare.sh`; the rules are documented in
models/debian-handbook/README.md. In short:

* input: html/en-US/ of Debian package debian-handbook 11.20220922 (publican/DocBook XHTML);
* documents: the pages in reading order, following <link rel="next"> from index.html; index.html
  itself (title page, legal notice, table of contents) is not a document; one page is one
  document;
* inside a page only the text of the book is kept: navigation, tables of contents, index terms,
  program listings and screen captures (<pre>), examples, figures, tables and URL-only blocks
  are dropped (SKIP below);
* every block element (div, p, li, dt, dd, h1-h6, ...) ends a paragraph; inside a paragraph all
  whitespace runs (Unicode, NBSP included) become one space; paragraphs without a letter are
  dropped;
* paragraphs are joined with "\n", documents with "\n\n"; the file ends with one "\n";
  the text is NFC-normalized UTF-8.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

# Elements whose whole subtree is dropped: (tag, class or id token) or (tag, None) for all.
SKIP = [
    ("head", None), ("script", None), ("style", None),
    ("pre", None),              # program listings and screen captures
    ("table", None),            # tables and callout lists
    ("img", None),
    ("ul", "docnav"),           # Prev / Up / Home / Next
    ("p", "#title"),            # banner logos
    ("div", "#banner"),         # "Download the ebook"
    ("div", "toc"), ("dl", "toc"),
    ("div", "example"),         # titled listings ("Example 6.1. ...")
    ("div", "informalexample"),
    ("div", "figure"), ("div", "informalfigure"), ("div", "mediaobject"),
    ("div", "url"),             # a bare URL below a sidebar
    ("a", "indexterm"),
]
# Elements that end a paragraph (everything else is inline).
BLOCK = {"div", "p", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
         "blockquote", "br", "hr", "body", "section"}
VOID = {"img", "br", "hr", "meta", "link", "col", "input", "area", "base", "wbr"}
LETTER = re.compile(r"[^\W\d_]")


def skipped(tag: str, attrs: dict[str, str | None]) -> bool:
    classes = set((attrs.get("class") or "").split())
    ident = attrs.get("id") or ""
    for t, sel in SKIP:
        if t != tag:
            continue
        if sel is None or (sel.startswith("#") and ident == sel[1:]) or sel in classes:
            return True
    return False


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paras: list[str] = []
        self.buf: list[str] = []
        self.skip_depth = 0  # >0 while inside a skipped subtree
        self.stack: list[str] = []  # open tags inside the skipped subtree

    def flush(self) -> None:
        text = unicodedata.normalize("NFC", " ".join("".join(self.buf).split()))
        self.buf = []
        if LETTER.search(text):
            self.paras.append(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.skip_depth:
            if tag not in VOID:
                self.stack.append(tag)
            return
        if skipped(tag, a):
            if tag not in VOID:
                self.skip_depth = 1
                self.stack = [tag]
            return
        if tag in BLOCK:
            self.flush()

    def handle_startendtag(self, tag, attrs):
        if not self.skip_depth and tag in BLOCK:
            self.flush()

    def handle_endtag(self, tag):
        if self.skip_depth:
            # XHTML is well formed: pop to the matching open tag.
            while self.stack:
                if self.stack.pop() == tag:
                    break
            if not self.stack:
                self.skip_depth = 0
            return
        if tag in BLOCK:
            self.flush()

    def handle_data(self, data):
        if not self.skip_depth:
            self.buf.append(data)

    def close(self):
        super().close()
        self.flush()


def reading_order(html_dir: Path) -> list[str]:
    pages, page = [], "index.html"
    while True:
        text = (html_dir / page).read_text(encoding="utf-8")
        m = re.search(r'<link rel="next" href="([^"#]+)"', text)
        if not m:
            break
        page = m.group(1)
        if page in pages or page == "index.html":
            raise SystemExit(f"next-link loop at {page}")
        pages.append(page)
    return pages


def page_text(path: Path) -> str:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return "\n".join(p.paras)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("html", type=Path, help=".../usr/share/doc/debian-handbook/html/en-US")
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--check", type=Path, help="sha256 file (`sha256sum` format) eval.txt must match")
    ap.add_argument("--write-check", action="store_true", help="(re)write the --check file instead")
    args = ap.parse_args(argv)

    pages = reading_order(args.html)
    if len(pages) != 126:
        raise SystemExit(f"expected 126 pages after index.html in {args.html}, found {len(pages)}")
    docs = [(name, page_text(args.html / name)) for name in pages]
    docs = [(n, t) for n, t in docs if t]
    data = ("\n\n".join(t for _, t in docs) + "\n").encode("utf-8")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "eval.txt"
    tmp = path.with_suffix(".txt.partial")
    tmp.write_bytes(data)
    tmp.replace(path)
    text = data.decode("utf-8")
    info = {"file": path.name, "source": "debian-handbook 11.20220922, html/en-US",
            "documents": len(docs), "first": [n for n, _ in docs[:3]], "last": docs[-1][0],
            "paragraphs": sum(t.count("\n") + 1 for _, t in docs), "words": len(text.split()),
            "bytes": len(data), "sha256": sha256(data)}
    (args.out / "eval.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{path.name}: {info['documents']} documents, {info['words']} words, {info['bytes']} bytes, "
          f"sha256 {info['sha256'][:16]}")
    if args.check and args.write_check:
        args.check.write_text(f"{info['sha256']}  {path.name}\n")
        print(f"wrote {args.check}")
    elif args.check:
        h, name = args.check.read_text().split()
        if name != path.name or h != info["sha256"]:
            raise SystemExit(f"{path}: sha256 differs from {args.check} (different package or extract.py?)")
        print(f"verified against {args.check.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
