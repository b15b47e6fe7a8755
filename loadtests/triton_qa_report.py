"""The pass-rate table of loadtests/triton_qa.py: one row per QA file, failure reasons grouped."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

_SAYS_WHY = re.compile(r"^(FAILED|[\w.]*(Error|Exception)\b)|\berror\b", re.IGNORECASE)


def reason(detail: str, *, width: int = 160) -> str:
    """The line of a traceback or client output that says what went wrong, shortened: the last line naming a
    failure or an error (a client's closing warnings come after it), else the last line."""
    lines = [line.strip() for line in detail.strip().splitlines() if line.strip()]
    telling = [line for line in lines if _SAYS_WHY.search(line)]
    text = (telling or lines or ["(no detail)"])[-1]
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class Row:
    path: str
    outcomes: dict[str, dict] = field(default_factory=dict)
    note: str = ""  # why the file has no outcomes (not found, not runnable, timed out)

    @classmethod
    def from_outcomes(cls, path: str, outcomes: dict[str, dict]) -> Row:
        return cls(path, outcomes)

    def count(self, *kinds: str) -> int:
        return sum(1 for o in self.outcomes.values() if o["outcome"] in kinds)

    @property
    def cases(self) -> int:
        return len(self.outcomes)

    def as_dict(self) -> dict:
        return {"file": self.path, "cases": self.cases, "passed": self.count("passed"),
                "failed": self.count("failed", "error"), "skipped": self.count("skipped"), "note": self.note,
                "outcomes": self.outcomes}


def render(rows: list[Row], *, header: bool, total: bool = False) -> str:
    lines = []
    if header:
        lines += ["| file | cases | passed | failed | skipped | pass rate of run cases |", "|---|---|---|---|---|---|"]
    for row in rows:
        ran = row.cases - row.count("skipped")
        rate = f"{100 * row.count('passed') / ran:.0f}%" if ran else (row.note or "-")
        lines.append(f"| {row.path} | {row.cases} | {row.count('passed')} | {row.count('failed', 'error')} | "
                     f"{row.count('skipped')} | {rate} |")
    if total:
        passed = sum(r.count("passed") for r in rows)
        ran = sum(r.cases - r.count("skipped") for r in rows)
        cases = sum(r.cases for r in rows)
        failed = sum(r.count("failed", "error") for r in rows)
        skipped = sum(r.count("skipped") for r in rows)
        rate = f"{100 * passed / ran:.0f}%" if ran else "-"
        lines.append(f"| **all** | {cases} | {passed} | {failed} | {skipped} | {rate} |")
    return "\n".join(lines)


def _short(case: str) -> str:
    """A unittest id ("module.Class.test_x") as its method; an example ("script.py -d") as it is."""
    return case if case.endswith(".py") or " " in case else case.rsplit(".", 1)[-1]


def grouped_reasons(rows: list[Row]) -> str:
    """Failures and skips grouped by reason, each with the cases it covers."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in rows:
        if row.note:
            groups[("file", row.note)].append(row.path)
        for case, outcome in row.outcomes.items():
            if outcome["outcome"] in ("failed", "error", "skipped"):
                kind = "skipped" if outcome["outcome"] == "skipped" else "failed"
                groups[(kind, reason(outcome["detail"]))].append(_short(case))
    out = []
    for (kind, text), cases in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        out.append(f"- {kind} ({len(cases)}): {text}\n    {', '.join(cases)}")
    return "\n".join(out)
