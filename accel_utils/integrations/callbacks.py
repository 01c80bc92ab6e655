"""``transformers.Trainer`` callbacks (this module imports transformers; the package does not).

:class:`HangWatchCallback` runs a :class:`~accel_utils.HangWatch` over ``trainer.train()``::

    trainer = Trainer(..., callbacks=[HangWatchCallback(stall=60)])

Its phases follow the Trainer's own events: ``forward-backward`` from each optimizer step's
first micro-batch, ``optimizer`` from ``on_pre_optimizer_step``, ``after-step`` (logging,
saving, evaluation and the next batches' loading) from ``on_step_end``, ``eval`` for every
prediction step of an evaluation.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from transformers import TrainerCallback

from accel_utils.hang_watch import HangWatch, OnStall


class HangWatchCallback(TrainerCallback):
    """Watch ``trainer.train()`` for stalls (arguments as :class:`~accel_utils.HangWatch`'s).

    The watched group is the Trainer's (its ``TrainingArguments``' Accelerate state).
    """

    def __init__(self, *, stall: float | timedelta = 60.0, liveness: float | timedelta = 30.0,
                 warmup: float | timedelta | None = None,
                 on_stall: str | OnStall = "report") -> None:
        HangWatch(stall=stall, liveness=liveness, warmup=warmup, on_stall=on_stall)  # checks
        self._options: dict[str, Any] = {"stall": stall, "liveness": liveness,
                                         "warmup": warmup, "on_stall": on_stall}
        self.watch: HangWatch | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.watch = HangWatch(args, **self._options).__enter__()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.__exit__(None, None, None)
            self.watch = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.step("forward-backward")

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._phase("forward-backward")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._phase("optimizer")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._phase("after-step")

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._phase("eval")

    def _phase(self, name: str) -> None:
        if self.watch is not None:
            self.watch.phase(name)
