"""Skipped samples, summarised: on a real dataset a bad file is common and one warning per file is a flood.

A :class:`SkipLog` (one per loader worker) logs the first few skips of each reason with the file they came from, then
only counts them: one summary line every ``summary_every`` skips, and a table at the end of each pass (reason, count,
first files). The counts also travel with the batches (``Batch.skipped``), which the ``DataQuality`` callback turns into
``data/<split>_skipped_<reason>`` metrics and a table in the run folder and MLflow.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SkipLog:
    """Counts skips per reason; logs the first ``examples`` of each reason by file, a summary every
    ``summary_every`` skips, and :meth:`end_of_pass` a table."""

    def __init__(self, name: str = "train", examples: int = 3, summary_every: int = 1000) -> None:
        if int(examples) < 0 or int(summary_every) < 1:
            raise ValueError(f"skip log: examples={examples} (>= 0), summary_every={summary_every} (>= 1)")
        self.name, self.examples_per_reason, self.summary_every = name, int(examples), int(summary_every)
        self.total: Counter[str] = Counter()  # every pass of this worker
        self.this_pass: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def example(self, reason: str, where: str) -> None:
        """A skipped sample's file: logged while its reason has fewer than ``examples`` logged, kept for the tables."""
        seen = self.examples.setdefault(reason, [])
        if len(seen) < self.examples_per_reason:
            seen.append(where)
            more = f" (later '{reason}' skips are counted, not logged)" if len(seen) == self.examples_per_reason else ""
            log.warning("%s: skipping %s: %s%s", self.name, where, reason, more)

    def count(self, reasons: Mapping[str, int]) -> None:
        """Add skips (by reason) to this pass; every ``summary_every`` skips in all, one summary line."""
        before = sum(self.total.values())
        self.total.update(reasons)
        self.this_pass.update(reasons)
        after = sum(self.total.values())
        if after // self.summary_every > before // self.summary_every:
            log.warning("%s: %d samples skipped so far: %s", self.name, after, _by_count(self.total))

    def end_of_pass(self, label: str) -> str:
        """The pass's table (logged when anything was skipped), then a fresh pass count; '' when nothing was."""
        if not self.this_pass:
            return ""
        text = table(self.this_pass, self.examples, f"{self.name}, {label}")
        log.warning("%s", text)
        self.this_pass = Counter()
        return text


def table(counts: Mapping[str, int], examples: Mapping[str, list[str]] | None = None, title: str = "") -> str:
    """Skips by reason as a markdown table, most frequent first, with the first files of each reason."""
    rows = [
        f"skipped samples{': ' + title if title else ''} ({sum(counts.values())} in all)",
        "",
        "| reason | samples | first files |",
        "|---|---|---|",
    ]
    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        files = ", ".join((examples or {}).get(reason, []))
        rows.append(f"| {reason} | {n} | {files} |")
    return "\n".join(rows)


def _by_count(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
