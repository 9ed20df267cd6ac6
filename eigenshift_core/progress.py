"""How a long step tells its caller where it is, and learns that it should stop.

The core never knows who listens: the CLI shows bars, a worker writes the job record. A step reports
after every batch, in units a person understands (prompts, samples, texts, windows), and checks for a
stop request at the same moments, so a cancel takes effect within one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ProgressCallback = Callable[[str, int, int, str], None]  # (stage, done, total, unit)


class Cancelled(Exception):
    """Raised between batches when the caller asked to stop."""


@dataclass(frozen=True)
class StepHooks:
    """on_progress(stage, done, total, unit) after every batch; should_stop() polled at the same points;
    bars: draw tqdm progress bars on stderr (the CLI)."""

    on_progress: ProgressCallback | None = None
    should_stop: Callable[[], bool] | None = None
    bars: bool = False

    def check(self, where: str) -> None:
        """Raise `Cancelled` when the caller asked to stop."""
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"cancelled during {where}")

    def report(self, stage: str, done: int, total: int, unit: str) -> None:
        """Report progress, then stop here if asked to."""
        if self.on_progress is not None:
            self.on_progress(stage, done, total, unit)
        self.check(stage)

    def batches(self, stage: str, unit: str, *, offset: int = 0, total: int | None = None) -> Callable[[int, int], None]:
        """A per-batch callback (done, total) for a loop that covers part of a stage: `offset` units done
        before it, `total` of the whole stage (default: the loop's own)."""

        def callback(done: int, loop_total: int) -> None:
            self.report(stage, offset + done, total if total is not None else loop_total, unit)

        return callback


NO_HOOKS = StepHooks()
