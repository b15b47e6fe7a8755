"""Offline English training text for the sentence-encoder student: docstrings and docs of installed packages.

Two sources, both already on disk (nothing is downloaded):

* every ``.py`` file under the given roots (site-packages), read with ``ast`` -- never imported, so no
  package code runs -- giving one text per documented module, class and function, formatted as
  ``models.transformer_corpus`` formats the held-out texts (``name: first paragraph``);
* prose paragraphs of ``.md``/``.rst``/``.txt`` files and ``METADATA`` long descriptions (packages'
  READMEs), with code, tables and headings dropped.

Texts keep the corpus's word limits (``MIN_WORDS``..``MAX_WORDS``). ``without(texts, exclude=...)`` drops
texts that must not be trained on (the held-out side): a candidate goes when it, or its part after
``name: ``, is excluded, so a vendored copy of a standard-library docstring (typing_extensions,
backports) cannot leak in. Reading every file of a large venv takes minutes: callers cache the result.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from models.transformer_corpus import MAX_WORDS, MIN_WORDS

DOC_SUFFIXES = (".md", ".rst", ".txt")
MAX_FILE_BYTES = 2_000_000  # generated tables (unicode data, vendored bundles) are not prose
# A prose paragraph: mostly letters and spaces, starts like a sentence, no code/table/markup markers.
_PROSE = re.compile(r"^[A-Z][^|<>{}\[\]`$\\]*[.!?:]$")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\s|\$ |#|[-=~*^+]{3,}|\||```|    )")


def summary_of(text: str) -> str:
    """The part of ``name: summary`` after the name (the whole text when there is no name)."""
    head, sep, rest = text.partition(": ")
    return rest if sep and " " not in head else text


def _words_ok(text: str) -> str | None:
    words = text.split()
    return " ".join(words[:MAX_WORDS]) if len(words) >= MIN_WORDS else None


def _first_paragraph(doc: str) -> str | None:
    return _words_ok(doc.strip().split("\n\n")[0])


def docstring_texts(source: str) -> Iterator[str]:
    """``name: first paragraph`` for each documented module, class and function in ``source``."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # py2-only files, templates, null bytes: not training text
        return
    module_doc = ast.get_docstring(tree)
    if module_doc and (text := _first_paragraph(module_doc)):
        yield text
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and (summary := _first_paragraph(doc)):
                yield f"{node.name}: {summary}"


def prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of a README-like document that read as English sentences."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").splitlines()
        if not lines or any(_CODE_LINE.match(line) for line in lines):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if _PROSE.match(paragraph) and (clean := _words_ok(paragraph)):
            yield clean


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _texts_of(path: Path) -> Iterable[str]:
    source = _read(path)
    if source is None:
        return ()
    if path.suffix == ".py":
        return docstring_texts(source)
    if path.name == "METADATA":
        return prose_paragraphs(source.partition("\n\n")[2])  # the long description after the headers
    return prose_paragraphs(source)


def package_texts(roots: Iterable[Path]) -> list[str]:
    """Unique texts from every ``.py``, doc and ``METADATA`` file under ``roots``, in sorted path order."""
    seen: set[str] = set()
    out: list[str] = []
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.suffix not in (".py", *DOC_SUFFIXES) and path.name != "METADATA":
                continue
            for text in _texts_of(path):
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    return out


def without(texts: Iterable[str], *, exclude: set[str]) -> list[str]:
    """``texts`` less those that are, or whose summary is, an ``exclude`` text or summary (see module doc)."""
    blocked = exclude | {summary_of(t) for t in exclude}
    return [t for t in texts if t not in blocked and summary_of(t) not in blocked]
