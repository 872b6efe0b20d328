"""A Lightning `Callback` that runs RankProbe's Monitor inside `Trainer.fit()` (docs/api.md).

    trainer = L.Trainer(callbacks=[RankProbeCallback(every=100, module="model")])

`module` names the attribute of the LightningModule that holds the network (or is a function of the
LightningModule returning it); by default the LightningModule itself. Every `every`-th optimizer step
is measured from its own training forward passes: the hooks open at the batch's start when
`trainer.global_step` is due and close at the end of the batch that steps the optimizer. The flat
scalars (`rankprobe/k_pr/L03`, …) go to the Trainer's loggers, each at the step its rows were measured
at: with the Monitor's `background` (the default on CUDA) a measurement's rows arrive at the next one,
and the last ones at the end of training (`Monitor.flush`). With `out` the rows also go to
out/metrics.jsonl and the Monitor's sinks (main process only).

Lightning does not count tokens: give `tokens_per_step` (the tokens of one optimizer step over all
ranks, accumulation included) and each row's `tokens` is `global_step × tokens_per_step`, the tokens
its weights were trained on; without it `tokens` is null (docs/metrics.md, "Monitor folders").
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

from ..errors import UserError
from ..monitor import Monitor, scalars_by_step


class RankProbeCallback(L.Callback):
    """every, taps, attention, weights, out, sinks, …: as `Monitor`. `rows`: every row measured so far."""

    def __init__(self, every: int = 100, module: str | Callable | None = None, tokens_per_step: int | None = None,
                 **monitor_kwargs):
        if tokens_per_step is not None and (isinstance(tokens_per_step, bool) or not isinstance(tokens_per_step, int)
                                            or tokens_per_step <= 0):
            raise UserError(f"RankProbeCallback: tokens_per_step must be a positive int, got {tokens_per_step!r}")
        self.every, self.module, self.kwargs = every, module, monitor_kwargs
        self.tokens_per_step = tokens_per_step
        self.monitor: Monitor | None = None
        self.rows: list[dict] = []
        self._open_step: int | None = None

    def _network(self, pl_module):
        if self.module is None:
            return pl_module
        return self.module(pl_module) if callable(self.module) else getattr(pl_module, self.module)

    def on_train_start(self, trainer, pl_module):
        if self.monitor is None or self.monitor.closed:  # closed by the previous fit()'s on_train_end
            self.monitor = Monitor(self._network(pl_module), every=self.every, **self.kwargs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._open_step is None and self.monitor.start(trainer.global_step):
            self._open_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # under gradient accumulation the step closes on the batch that moved global_step on
        if self._open_step is None or trainer.global_step == self._open_step:
            return
        step, self._open_step = self._open_step, None
        self._log(trainer, self.monitor.finish(None if self.tokens_per_step is None else step * self.tokens_per_step))

    def _log(self, trainer, rows: list[dict]) -> None:
        """Keep `rows` and log their scalars at each row's own step (never the step they arrived at)."""
        self.rows += rows
        for step, values in scalars_by_step(rows).items():
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    def on_train_end(self, trainer, pl_module):
        if self.monitor is not None:
            self._log(trainer, self.monitor.flush())  # the last measurement's rows, under `background`
            self.monitor.close()
