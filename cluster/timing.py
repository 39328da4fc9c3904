"""Where a job's wall time went: the phases the closing summary prints and ``timings.json`` keeps.

The driver marks each phase's interval by the wall clock (``time.time()``: the marks of Ray
workers on the same machine, or on nodes with synchronised clocks, fall on the same axis):

- start-up: from the process's start (imports, config, text, cache keys) to a running Ray;
- model loads: from the producers' creation until the last has its model (process start,
  imports and the load itself), and the evaluation task's load;
- caching: from the producers' readiness to the last committed shard;
- training: Ray Train's worker group and engines starting, the steps, their shutdown;
- evaluation: the spliced evaluation task, its model load excepted;
- report: rank 0 writing the dictionary (held-out figures, features, report page) and the
  driver's summary.

With ``cluster.train_while_caching`` caching and training overlap, and the phases add up to more
than the wall time.

The faults the job survived (a producer or its node lost, a trainer worker group restarted, the
evaluation task started again) are counted beside the phases, each with what it cost.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

import psutil

PHASES = ("start-up", "model loads", "caching", "training", "evaluation", "report")


def process_started() -> float:
    """This process's start, in ``time.time()`` seconds."""
    return psutil.Process().create_time()


@dataclass(frozen=True)
class Fault:
    """A fault the job survived, as the closing summary shows it."""

    phase: str
    """The phase it struck (one of ``PHASES``)."""
    what: str
    """One line: what was lost and what the job did about it."""
    cost_s: float
    """Seconds of work it cost: work lost and redone, and time spent waiting to recover."""


@dataclass
class JobTimes:
    """Seconds per phase, from intervals marked as the job runs."""

    started: float = field(default_factory=process_started)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    notes: dict[str, str] = field(default_factory=dict)
    """A few words per phase on what it held (shown beside its figure)."""
    overlapping: bool = False
    faults: list[Fault] = field(default_factory=list)

    def add(self, phase: str, seconds: float) -> None:
        if phase not in self.seconds:
            raise ValueError(f"phase {phase!r}: expected one of {list(PHASES)}")
        self.seconds[phase] += max(0.0, seconds)

    def wall(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.started

    def lines(self, now: float | None = None) -> list[str]:
        """The closing summary's lines: one per phase, then the wall time."""
        wall = self.wall(now)
        out = []
        for phase in PHASES:
            seconds = self.seconds[phase]
            note = f"  ({self.notes[phase]})" if phase in self.notes else ""
            out.append(f"  {phase:<13}{seconds:6.1f} s {100 * seconds / wall:3.0f}%{note}")
        overlap = "; caching and training overlap" if self.overlapping else ""
        return [f"wall time        {wall:.0f} s, from the process's start{overlap}:", *out, *self._fault_lines()]

    def _fault_lines(self) -> list[str]:
        if not self.faults:
            return []
        cost = sum(f.cost_s for f in self.faults)
        return [f"faults survived  {len(self.faults)}, costing {cost:.1f} s:",
                *(f"  {f.phase:<13}{f.cost_s:6.1f} s  {f.what}" for f in self.faults)]

    def to_json(self, now: float | None = None) -> bytes:
        return json.dumps({**{p: round(s, 3) for p, s in self.seconds.items()}, "total": round(self.wall(now), 3),
                           "notes": self.notes, "overlapping": self.overlapping,
                           "faults": [dataclasses.asdict(f) for f in self.faults]}, indent=2).encode()
