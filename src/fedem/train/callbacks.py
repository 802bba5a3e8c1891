"""Trainer callbacks fedem adds to the HF loop.

`Deadline` exists for the donor (`fedem client run`): a lease on an adapter ends at a fixed time, and
a version pushed after that is refused (410). Training must therefore stop early enough that the
final evaluation, the save and the upload still fit — so it stops *before the next step would
overrun*, not after, and leaves a safety margin for the work that follows training.
"""

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Deadline(TrainerCallback):
    """Stop training when `deadline - margin_s` would be passed by one more optimiser step.

    The cost of a step is the wall time between consecutive step ends (so evaluation, logging and
    checkpointing that happened in between are counted), and the estimate is the longest of the
    last `window` steps: a deadline is a hard limit, so overestimating is the safe error. When it
    stops it also asks for a checkpoint (`should_save`), so the stopped run can be resumed.

    After training, `stopped_early` says whether it had to stop, and `stopped_at_step` where.
    """

    def __init__(
        self,
        deadline: datetime,
        margin_s: float = 300.0,
        window: int = 20,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if deadline.tzinfo is None:
            raise ValueError("the deadline must be timezone-aware (e.g. UTC)")
        self.deadline = deadline
        self.margin_s = margin_s
        self.clock = clock
        self.steps: deque[float] = deque(maxlen=window)
        self.last: float | None = None
        self.stopped_early = False
        self.stopped_at_step: int | None = None

    @property
    def seconds_left(self) -> float:
        """Seconds until `deadline - margin_s` (negative once it has passed)."""
        return (self.deadline - self.clock()).total_seconds() - self.margin_s

    @property
    def step_estimate_s(self) -> float:
        """The longest recent step in seconds (0 before the first step ended)."""
        return max(self.steps, default=0.0)

    def _stop(self, state: TrainerState, control: TrainerControl) -> None:
        if not self.stopped_early:
            log.warning(
                "stopping at step %d of %d: the next step (~%.1f s) would run into the last %.0f s "
                "before the deadline %s",
                state.global_step,
                state.max_steps,
                self.step_estimate_s,
                self.margin_s,
                self.deadline.isoformat(timespec="seconds"),
            )
        self.stopped_early = True
        self.stopped_at_step = state.global_step
        control.should_training_stop = True
        control.should_save = True

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.last = time.monotonic()
        if self.seconds_left <= 0:
            # not even one step fits; the Trainer still runs the step it is about to start, so the
            # caller should check `seconds_left` before training (the donor does)
            self._stop(state, control)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = time.monotonic()
        if self.last is not None:
            self.steps.append(now - self.last)
        self.last = now
        if state.global_step >= state.max_steps:
            return  # finishing anyway: not an early stop
        if self.seconds_left < self.step_estimate_s:
            self._stop(state, control)
