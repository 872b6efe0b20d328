"""A transformers `TrainerCallback` that runs RankProbe's Monitor inside `Trainer.train()` (docs/api.md).

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[RankProbeCallback(every=100, out="rankprobe")])

By default every `every`-th optimizer step is measured from its own training forward passes (every
micro-batch of a gradient-accumulation step counts): the hooks open in `on_step_begin` and close in
`on_step_end`, so the rows describe the weights after `global_step` steps, as RankProbe's probes do.
With `probe_tokens` the callback instead probes that fixed batch after every `every`-th step (and at
step 0). Rows go to out/metrics.jsonl and the given sinks on the main process (sink "wandb" logs
into the run the Trainer's `report_to="wandb"` opened, when there is one). With the Monitor's
`background` (the default on CUDA) a measurement's rows arrive at the next one and the last ones in
`on_train_end` (`Monitor.flush`); each row carries the step it was measured at. Batches a padding collator pads are
measured on their tokens alone, from the `attention_mask` the Trainer passes (docs/api.md).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..monitor import Monitor


class RankProbeCallback(TrainerCallback):
    """Key spectra, attention entropy / max logit and weight spectra during `Trainer.train()`.

    every, taps, attention, weights, out, sinks, arm, seed, batch_size: as `Monitor`; monitor_kwargs
    (patterns, heads, …) for a model outside the supported families. probe_tokens (N, T): the
    fixed-batch mode instead of the training forward. `rows`: every row measured so far."""

    def __init__(self, every: int = 100, probe_tokens: torch.Tensor | None = None, **monitor_kwargs):
        self.every, self.probe_tokens, self.kwargs = every, probe_tokens, monitor_kwargs
        self.monitor: Monitor | None = None
        self.rows: list[dict] = []
        self._open_tokens: int | None = None  # tokens seen when the measured step began

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.monitor is None or self.monitor.closed:  # closed by the previous train()'s on_train_end
            self.monitor = Monitor(model, every=self.every, **self.kwargs)
        if self.probe_tokens is not None and state.global_step == 0:
            self._probe(args, state, model)

    def _tokens(self, args, state) -> int | None:
        """The Trainer's token count when it keeps one (0 included), else None."""
        counting = getattr(args, "include_num_input_tokens_seen", False) not in (False, None, "no")
        return int(state.num_input_tokens_seen) if counting else None

    def _probe(self, args, state, model) -> None:
        device = next(self.monitor.adapter.model.parameters()).device
        self._keep(self.monitor.probe(self.probe_tokens.to(device), state.global_step, self._tokens(args, state)))

    def _keep(self, rows: list[dict]) -> None:
        self.rows += rows

    def on_step_begin(self, args, state, control, **kwargs):
        if self.probe_tokens is None:
            self.monitor.start(state.global_step)
            # the count before this step's batches (the Trainer adds each after on_step_begin): the
            # rows describe the weights after global_step steps, trained on this many tokens
            self._open_tokens = self._tokens(args, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.probe_tokens is None:
            self._keep(self.monitor.finish(self._open_tokens))
        elif self.monitor.due(state.global_step):
            self._probe(args, state, model)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self._keep(self.monitor.flush())  # the last measurement's rows, under `background`
            self.monitor.close()
