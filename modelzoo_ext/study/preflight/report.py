"""The preflight's answer: one row per check (check, status, detail), one table, one verdict.

    report = PreflightReport("params_sparse_lora_llama3p1_8b.yaml (cs3)")
    report.add(Check("mask provenance", PASS, "converted from the masks' source"))
    print(report.table()); report.refuse_if_failed()      # PreflightRefused (exit 2) naming each failure

Checks of a sweep carry the configuration (group) they are about as their `scope`; the table
shows each scope once, above its checks. A check passes, fails, or is skipped with the reason it could not run here (a skipped check is
never counted as passed: the table says which and why). Anything that fails refuses the whole
preflight: nothing is submitted or started.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from modelzoo_ext.errors import UserError

PASS, FAIL, SKIP = "pass", "FAIL", "skip"
Status = Literal["pass", "FAIL", "skip"]
DETAIL_WIDTH = 100


@dataclass(frozen=True)
class Check:
    """One check's outcome: what was checked, pass / FAIL / skip, and the numbers or reason."""

    name: str
    status: Status
    detail: str
    scope: str = ""  # which configuration of a sweep (its group), "" for a whole-sweep or single check

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def within(self, scope: str) -> Check:
        """This check, said of the configuration `scope`."""
        return Check(self.name, self.status, self.detail, scope)

    @property
    def title(self) -> str:
        return f"{self.scope}: {self.name}" if self.scope else self.name


class PreflightRefused(UserError):
    """A preflight with failed checks: each failure named (exit status 2, nothing submitted)."""


@dataclass
class PreflightReport:
    """The checks of one configuration or one sweep, in the order they ran."""

    title: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the checks were grouped, timings

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def extend(self, checks: list[Check]) -> None:
        self.checks.extend(checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.failed]

    @property
    def ok(self) -> bool:
        return not self.failures

    def counts(self) -> dict[str, int]:
        out = {PASS: 0, FAIL: 0, SKIP: 0}
        for check in self.checks:
            out[check.status] += 1
        return out

    def table(self) -> str:
        """The checks as a text table; long details wrap under their own column."""
        width = max([len("check"), *(len(c.name) for c in self.checks)])
        lines = [f"preflight: {self.title}", f"{'check':<{width}}  status  detail"]
        indent = " " * (width + 10)
        scope = ""
        for check in self.checks:
            if check.scope != scope:
                scope = check.scope
                lines.append(f"[{scope or self.title}]")
            wrapped = textwrap.wrap(check.detail, DETAIL_WIDTH) or [""]
            lines.append(f"{check.name:<{width}}  {check.status:<6}  {wrapped[0]}")
            lines += [indent + more for more in wrapped[1:]]
        counts = self.counts()
        verdict = "refused" if counts[FAIL] else "passed"
        lines.append(f"{verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
        lines += self.notes
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "ok": self.ok, "counts": self.counts(), "notes": self.notes,
                "checks": [asdict(c) for c in self.checks]}  # fmt: skip

    def refuse_if_failed(self) -> None:
        """`PreflightRefused` (exit 2) naming every failed check, when any failed."""
        if self.ok:
            return
        reasons = "; ".join(f"{c.title}: {c.detail}" for c in self.failures)
        raise PreflightRefused(
            f"preflight refused {self.title} ({len(self.failures)} failed checks): {reasons}",
            fix="fix what each failed check names and run again (nothing was submitted or started)",
        )


def dumps(report: PreflightReport) -> str:
    return json.dumps(report.to_json(), indent=2, sort_keys=True)
