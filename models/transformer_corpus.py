"""A labelled text corpus built offline: Python standard library documentation by reference chapter.

Why this corpus: the classifier must train without any download, and no installed package ships a
labelled text data set (scikit-learn's 20 newsgroups downloads). The running interpreter's standard
library is always there, and its docstrings are real English prose whose topic is fixed by the
chapter of the Python Library Reference the module is documented in ("Text Processing Services",
"Data Compression and Archiving", ...). Each example is one documented entry: ``Name.method: first
paragraph of the docstring`` (at most 64 words). The module name itself is left out of the text, so a
held-out split by module measures whether the classifier generalises to modules it never saw.

The corpus depends on the Python version (docstrings change between releases); the card records it.
"""

from __future__ import annotations

import importlib
import inspect
import platform
import warnings
from dataclasses import dataclass
from types import ModuleType

import numpy as np

# Chapter of the Python 3 Library Reference -> modules documented there. Two pairs of neighbouring
# chapters are merged (persistence + compression, development tools + debugging/profiling) because
# each alone has too few entries to learn from.
CHAPTERS: dict[str, tuple[str, ...]] = {
    "text_processing": ("string", "re", "difflib", "textwrap", "unicodedata", "stringprep"),
    "data_types": ("datetime", "calendar", "collections", "heapq", "bisect", "array", "weakref", "types",
                   "copy", "pprint", "reprlib", "enum", "graphlib"),
    "numeric_math": ("numbers", "math", "cmath", "decimal", "fractions", "random", "statistics"),
    "files_directories": ("pathlib", "os.path", "fileinput", "stat", "filecmp", "tempfile", "glob",
                          "fnmatch", "linecache", "shutil"),
    "persistence_compression": ("pickle", "copyreg", "shelve", "marshal", "dbm", "sqlite3", "zlib", "gzip",
                                "bz2", "lzma", "zipfile", "tarfile"),
    "concurrency": ("threading", "multiprocessing", "multiprocessing.pool", "multiprocessing.managers",
                    "concurrent.futures", "subprocess", "sched", "queue", "contextvars"),
    "networking": ("asyncio", "asyncio.streams", "asyncio.events", "socket", "ssl", "select", "selectors",
                   "signal", "mmap"),
    "internet_data": ("email.message", "email.parser", "email.utils", "email.headerregistry", "email.policy",
                      "json", "mailbox", "mimetypes", "base64", "binascii", "quopri"),
    "markup": ("html", "html.parser", "xml.etree.ElementTree", "xml.dom.minidom", "xml.dom.pulldom",
               "xml.sax", "xml.sax.handler", "xml.sax.saxutils"),
    "internet_protocols": ("webbrowser", "wsgiref.simple_server", "urllib.request", "urllib.parse",
                           "http.client", "http.server", "http.cookies", "http.cookiejar", "ftplib", "poplib",
                           "imaplib", "smtplib", "uuid", "socketserver", "xmlrpc.client", "xmlrpc.server",
                           "ipaddress"),
    "development_tools": ("typing", "pydoc", "doctest", "unittest", "unittest.mock", "bdb", "faulthandler",
                          "pdb", "cProfile", "pstats", "timeit", "trace", "tracemalloc"),
    "language_services": ("ast", "symtable", "token", "keyword", "tokenize", "pyclbr", "py_compile",
                          "compileall", "dis", "pickletools"),
}
MIN_WORDS = 4
# NOTE: 99% of first paragraphs are shorter; the few long ones cost most of the embedding time.
MAX_WORDS = 64


@dataclass
class TextCorpus:
    """Texts with integer labels, the label names and a grouping key per text (for grouped splits)."""

    texts: list[str]
    labels: np.ndarray
    class_names: list[str]
    owners: np.ndarray  # "module:Class" or "module:function": entries of one API object stay together
    modules: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> TextCorpus:
        return TextCorpus([self.texts[i] for i in index], self.labels[index], self.class_names,
                          self.owners[index], self.modules[index], self.source)


def _first_paragraph(doc: object) -> str | None:
    if not isinstance(doc, str):
        return None  # some C types keep non-string __doc__ attributes
    words = inspect.cleandoc(doc).split("\n\n")[0].split()
    return " ".join(words[:MAX_WORDS]) if len(words) >= MIN_WORDS else None


def _class_entries(cls: type) -> list[tuple[str, object]]:
    entries: list[tuple[str, object]] = [(cls.__name__, cls.__doc__)]
    for attr, member in vars(cls).items():
        if attr.startswith("_") and attr != "__init__":
            continue
        func = getattr(member, "__func__", member)  # unwrap classmethod/staticmethod
        if inspect.isfunction(func) or inspect.isbuiltin(func) or inspect.ismethoddescriptor(func):
            entries.append((f"{cls.__name__}.{attr}", getattr(func, "__doc__", None)))
    return entries


def module_entries(module: ModuleType) -> list[tuple[str, str, str]]:
    """``(owner, name, docstring)`` for the module and its public classes, methods and functions.

    Only objects defined in the module itself count (re-exports would label one text twice), and
    ``__doc__`` is read directly rather than through ``inspect.getdoc``, which would copy a base
    class's docstring onto every override.
    """
    entries: list[tuple[str, str, object]] = [(module.__name__, "", module.__doc__)]
    for attr, obj in vars(module).items():
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            entries += [(attr, name, doc) for name, doc in _class_entries(obj)]
        elif callable(obj):
            entries.append((attr, attr, obj.__doc__))
    return [(owner, name, str(doc)) for owner, name, doc in entries if isinstance(doc, str)]


def load_corpus() -> TextCorpus:
    """Every documented entry of the modules in CHAPTERS, deduplicated (first occurrence wins)."""
    class_names = list(CHAPTERS)
    texts: list[str] = []
    labels: list[int] = []
    owners: list[str] = []
    modules: list[str] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. typing.io's DeprecationWarning on attribute access
        for label, chapter in enumerate(class_names):
            for module_name in CHAPTERS[chapter]:
                module = importlib.import_module(module_name)
                for owner, name, doc in module_entries(module):
                    summary = _first_paragraph(doc)
                    text = f"{name}: {summary}" if name and summary else summary
                    if text is None or text in seen:
                        continue
                    seen.add(text)
                    texts.append(text)
                    labels.append(label)
                    owners.append(f"{module_name}:{owner}")
                    modules.append(module_name)
    source = (f"Python {platform.python_version()} standard library docstrings, {len(texts)} entries from "
              f"{sum(len(m) for m in CHAPTERS.values())} modules, labelled by Library Reference chapter")
    return TextCorpus(texts, np.array(labels, dtype=np.int64), class_names, np.array(owners),
                      np.array(modules), source)


def grouped_split(corpus: TextCorpus, *, by: str, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with every group (``owners`` or ``modules``) wholly on one side.

    StratifiedGroupKFold keeps the class mix of both sides close to the corpus's; the first of
    ``folds`` folds is the test set (1/folds of the data).
    """
    # NOTE: scikit-learn is heavy to import (~1 s) and only this step needs it
    from sklearn.model_selection import StratifiedGroupKFold

    if by not in ("owners", "modules"):
        raise ValueError(f"grouped_split(by={by!r}): expected 'owners' or 'modules'")
    groups = getattr(corpus, by)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(corpus)), corpus.labels, groups))
    return train, test


def sample_per_class(corpus: TextCorpus, *, per_class: int, seed: int) -> TextCorpus:
    """At most ``per_class`` random texts of each class (a small corpus for quick builds)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(corpus.labels == c))[:per_class]
            for c in range(len(corpus.class_names))]
    return corpus.subset(np.sort(np.concatenate(keep)))
