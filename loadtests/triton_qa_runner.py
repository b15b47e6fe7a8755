"""Run one of Triton's unittest QA files unchanged and write each case's outcome as JSON.

    python -m loadtests.triton_qa_runner --file qa/L0_http/http_test.py --out results.json [--deselect ID=REASON]

Runs in the file's folder (the QA files append "../common" to sys.path and write test_results.txt there), with
unittest's own loader and runner: Triton's TestResultCollector reads unittest's result object, so pytest's
unittest shim cannot run these files as written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import unittest
from pathlib import Path


class RecordingResult(unittest.TextTestResult):
    """unittest's verbose result that also keeps one outcome per test method (a failed subTest fails it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, dict] = {}

    def _record(self, test: unittest.TestCase, outcome: str, detail: str = "") -> None:
        previous = self.outcomes.get(test.id())
        if previous and previous["outcome"] in ("failed", "error"):
            return  # a method that failed a subTest stays failed
        self.outcomes[test.id()] = {"outcome": outcome, "detail": detail}

    def addSuccess(self, test) -> None:
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test, err) -> None:
        super().addFailure(test, err)
        self._record(test, "failed", self._exc_info_to_string(err, test))

    def addError(self, test, err) -> None:
        super().addError(test, err)
        self._record(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason) -> None:
        super().addSkip(test, reason)
        self._record(test, "skipped", reason)

    def addSubTest(self, test, subtest, err) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "failed" if issubclass(err[0], test.failureException) else "error"
            self._record(test, kind, f"{subtest.id()}: {self._exc_info_to_string(err, test)}")


def _flatten(suite: unittest.TestSuite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _flatten(item)
        else:
            yield item


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, required=True, help="the QA test file")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the outcomes")
    parser.add_argument("--only-class", action="append", default=[], help="run only this TestCase class")
    parser.add_argument("--deselect", action="append", default=[], metavar="METHOD=REASON",
                        help="test method not to run, and why (reported as skipped)")
    args = parser.parse_args(argv)
    deselected = dict(item.split("=", 1) for item in args.deselect)
    test_file = args.file.resolve()
    out = args.out.resolve()
    os.chdir(test_file.parent)
    sys.path.insert(0, str(test_file.parent))
    module = importlib.import_module(test_file.stem)
    tests = [t for t in _flatten(unittest.defaultTestLoader.loadTestsFromModule(module))
             if not args.only_class or type(t).__name__ in args.only_class]
    chosen = unittest.TestSuite(t for t in tests if t.id().rsplit(".", 1)[-1] not in deselected)
    runner = unittest.TextTestRunner(verbosity=2, resultclass=RecordingResult, stream=sys.stderr)
    result = runner.run(chosen)
    outcomes = result.outcomes
    for test in tests:
        method = test.id().rsplit(".", 1)[-1]
        if method in deselected:
            outcomes[test.id()] = {"outcome": "skipped", "detail": f"not run: {deselected[method]}"}
    out.write_text(json.dumps(outcomes, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
