"""`Deferred`: the host halves of measurements, run on one worker thread while training goes on, and
their rows handed back in the order the measurements made them.

A measurement (a probe checkpoint of `loop.Prober`, a step of `monitor.Monitor`) splits into a device
half (forward, statistics, collectives; `probes.lenses.*_start`), which its caller runs, and a host
half (eigendecompositions on the CPU, row building), a function this class runs later. Each queued
entry is (step, rows of one kind, each tagged with its `kind`); `settle` waits for all of them and
`take` also hands them over. Order never depends on timing: the worker is a single thread working in
FIFO order, and rows already made wait their turn behind earlier host halves.

When training runs on the CPU too, a worker would only take cores from it (the demo's four runs took
149 s against 129 s on 2 cores), so without `offload` the host half runs at once, in the caller's
thread, and its rows are pending all the same: what the caller writes, and where, is the same on
every device.

`close` is final on every device: a closed Deferred refuses new work with one clear error, also
where nothing ever reached the worker, so that a CPU test meets what a GPU run would (a benchmark
probing after close died on an H200 only, inside concurrent.futures; issue 13).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

Rows = list[dict]


class Deferred:
    """Pending rows of `owner` ("Prober", "Monitor"): [(step, Future of kind-tagged rows)].

    offload  run host halves on the worker thread (started by the first one); else at once, here.
    done     [(step, rows)] already made, queued first (a resumed run's rows from its checkpoint).
    hint     the end of the error after `close` (what the user should do instead)."""

    def __init__(self, offload: bool, owner: str, hint: str, done: list[tuple[int, Rows]] = ()):
        self.offload, self.owner, self.hint = offload, owner, hint
        self.worker: ThreadPoolExecutor | None = None
        self.closed = False
        self.pending: list[tuple[int, Future]] = [(step, _finished(rows)) for step, rows in done]

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"this {self.owner} is closed (its worker is shut down): {self.hint}")

    def add(self, step: int, kind: str, rows: Callable[[], Rows] | Rows) -> None:
        """Queue the rows of `kind` made at `step`: a host half (a function: on the worker when
        offloading, else run now) or rows already made (they keep their place in the order)."""
        self.check_open()

        def tagged() -> Rows:
            return [{"kind": kind, **r} for r in (rows() if callable(rows) else rows)]

        if self.offload and callable(rows):
            if self.worker is None:
                self.worker = ThreadPoolExecutor(1, thread_name_prefix=f"rankprobe-{self.owner.lower()}")
            self.pending.append((step, self.worker.submit(tagged)))
        else:
            self.pending.append((step, _finished(tagged())))

    def settle(self) -> list[tuple[int, Rows]]:
        """Wait for every pending entry: [(step, rows)] in the order queued; they stay pending."""
        return [(step, job.result()) for step, job in self.pending]

    def take(self, count: int | None = None) -> list[tuple[int, Rows]]:
        """Wait for the first `count` entries (all by default) and hand them over: [(step, rows)],
        no longer pending (the caller now writes them)."""
        count = len(self.pending) if count is None else count
        done = [(step, job.result()) for step, job in self.pending[:count]]
        del self.pending[:count]
        return done

    def close(self) -> None:
        """Stop the worker (waiting for a host half it is running, cancelling queued ones); final."""
        self.closed = True
        if self.worker is not None:
            self.worker.shutdown(cancel_futures=True)


def _finished(result) -> Future:
    job: Future = Future()
    job.set_result(result)
    return job
