"""The text classifier's answers on the Unicode forms users' texts arrive in, through a real server.

    python -m loadtests.answer_audit_text --zoo /tmp/zoo [--code-root OTHER_CHECKOUT] [--limit 539]

The transformer-classifier's held-out docstrings (models/transformer.py's split, never trained on) are sent to
/v1/models/transformer-classifier/predict as they are and rewritten as users' keyboards, PDFs and editors give
them: full-width Latin (a CJK input method), ligatures (text copied out of a PDF), non-breaking and zero-width
spaces, combining accents, form feeds and vertical tabs between words (PDF page breaks), an emoji, a CJK prefix.
Prints top-1 accuracy per form, and how often the answer equals the plain text's; with --code-root, the same
texts also go to a server run from another checkout (e.g. the commit before a fix), side by side.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from loadtests.answer_audit import serve_side_by_side

MODEL = "transformer-classifier"
CHUNK = 32


def full_width(text: str) -> str:
    """ASCII letters, digits and punctuation as their full-width forms (U+FF01-FF5E), as a CJK IME types them."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def every_other_space(text: str, sep: str) -> str:
    words = text.split(" ")
    return "".join(w + (sep if i % 2 else " ") for i, w in enumerate(words[:-1])) + words[-1]


FORMS: dict[str, Callable[[str], str]] = {
    "plain": lambda t: t,
    "full-width Latin (CJK IME)": full_width,
    "ligatures fi/fl (copied from a PDF)": lambda t: t.replace("fi", "\ufb01").replace("fl", "\ufb02"),
    "non-breaking spaces": lambda t: t.replace(" ", "\u00a0"),
    "zero-width space after each space": lambda t: t.replace(" ", " \u200b"),
    "combining acute on each vowel": lambda t: "".join(c + "\u0301" if c in "aeiou" else c for c in t),
    "form feed between words (page break)": lambda t: every_other_space(t, "\x0c"),
    "vertical tab between words": lambda t: every_other_space(t, "\x0b"),
    "emoji appended": lambda t: t + " \U0001f642",
    "CJK prefix": lambda t: "\u8bf7\u95ee\uff1a" + t,
}


def held_out() -> tuple[list[str], list[str]]:
    """(texts, label names) of the classifier's held-out fold, as models/transformer.py splits the corpus."""
    from models import transformer
    from models import transformer_corpus as tc

    corpus = tc.load_corpus()
    _, test = tc.grouped_split(corpus, by="owners", folds=transformer.FOLDS, seed=0)
    return [corpus.texts[i] for i in test], [corpus.class_names[int(corpus.labels[i])] for i in test]


def labels(client: httpx.Client, texts: list[str]) -> list[str]:
    got: list[str] = []
    for start in range(0, len(texts), CHUNK):
        resp = client.post(f"/v1/models/{MODEL}/predict", json={"texts": texts[start:start + CHUNK]})
        if resp.status_code != 200:
            got += [f"HTTP {resp.status_code}: {resp.json().get('error', '')[:80]}"] * len(texts[start:start + CHUNK])
        else:
            got += [r["predictions"][0]["label"] for r in resp.json()["results"]]
    return got


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("/tmp/zoo"))
    parser.add_argument("--code-root", type=Path, help="another checkout to compare against (its server)")
    parser.add_argument("--limit", type=int, default=539, help="held-out texts (539 in the default profile)")
    args = parser.parse_args(argv)
    texts, truth = held_out()
    texts, truth = texts[:args.limit], truth[:args.limit]
    with ExitStack() as stack:
        clients = serve_side_by_side(stack, zoo=args.zoo, model=MODEL, code_root=args.code_root)
        print(f"load average {os.getloadavg()}; {len(texts)} held-out texts")
        print(f"{'form':38s} " + " ".join(f"{n + ' acc':>10s} {'same':>6s}" for n in clients))
        plain = {name: labels(client, texts) for name, client in clients.items()}
        for form, rewrite in FORMS.items():
            varied = [rewrite(t) for t in texts]
            row = []
            for name, client in clients.items():
                got = plain[name] if form == "plain" else labels(client, varied)
                row.append(f"{np.mean([g == t for g, t in zip(got, truth)]):10.3f} "
                           f"{np.mean([g == p for g, p in zip(got, plain[name])]):6.3f}")
            print(f"{form:38s} " + " ".join(row), flush=True)
        print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
