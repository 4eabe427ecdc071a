"""One model thread that runs the draft steps of many sessions as ONE forward pass (continuous batching).

Each session drafts on its own thread and calls `ForwardBatcher.next_logits(seq, tokens, n_out)`, which blocks.
The model thread takes every request waiting when it frees up (no timer, no window: an idle batcher answers a
lone request at once), at most one per sequence, runs them through `next_logits_batch`, and wakes each caller
with its own rows. Threads inside `drafting()` are also waited for between two of their steps, so sessions
drafting together stay in one pass (see `drafting`). A failed batch is retried one row at a time, so one
caller's bad input fails that caller only. `close()` fails every waiting caller with `BatcherClosed` instead of
leaving it blocked.

Rows equal each sequence's `next_logits` alone up to float rounding, except under dynamic int8 (`quantize_int8`,
the draft's default dtype), whose activation scale is per forward call: there a row depends on which rows share
its pass (SmolLM2, 4 rows: logits off by up to 10, the argmax changed in 2 of 40 steps). Greedy outputs cannot change (the target decides them); a sampled request's draft, and so
its output for one seed, can depend on the load.

`BatchedModel` wraps a `LoadedModel` so that `new_sequence()` returns a `BatchedSequence`, the sequence API
(`next_logits`, `rollback`, `tokens`, `len`) routed through the batcher: a `DraftSession` built on it batches
with every other session on the same batcher without knowing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .batched_forward import next_logits_batch


class BatcherClosed(RuntimeError):
    """The batcher was closed before (or while) the request waited: no model work will answer it."""


@dataclass
class _Request:
    seq: Any  # the sequence whose cache this request extends (None for a plain call)
    tokens: list[int] = field(default_factory=list)
    n_out: int = 1
    call: Callable[[], Any] | None = None  # other work on a sequence (rollback), run on the model thread
    thread: int = field(default_factory=threading.get_ident)  # the caller's
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class ForwardBatcher:
    """Owns one model thread; `next_logits` from any other thread joins the next forward pass.

    `passes` and `rows` count the forwards run and the requests they answered (rows / passes = batch size).
    """

    def __init__(self, name: str = "forward-batcher") -> None:
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._closed = False
        self._drafting: dict[int, int] = {}  # thread ident -> depth of `drafting()` blocks it is in
        self.passes = 0
        self.rows = 0
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def next_logits(self, seq: Any, tokens: Sequence[int], n_out: int = 1) -> torch.Tensor:
        """`seq.next_logits(tokens, n_out)`, computed on the model thread together with other callers'."""
        return self._submit(_Request(seq, [int(t) for t in tokens], n_out))

    def call(self, seq: Any, fn: Callable[[], Any]) -> Any:
        """Run `fn` (work on `seq` that is not a forward, e.g. a rollback) on the model thread, between passes."""
        return self._submit(_Request(seq, call=fn))

    @contextmanager
    def drafting(self) -> Iterator[None]:
        """Declare that the calling thread will ask again soon (it is drafting several tokens).

        While such a thread is between two requests (sampling its last row), the model thread waits for it
        before the next pass, however many others are queued: without that, the first caller back always
        runs alone and the rest follow together, and sessions that draft in step split into two halves that
        never rejoin. The wait ends when the thread asks again or leaves the block; there is no timer.
        """
        me = threading.get_ident()
        with self._cond:
            self._drafting[me] = self._drafting.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                if depth := self._drafting[me] - 1:
                    self._drafting[me] = depth
                else:
                    del self._drafting[me]
                self._cond.notify()

    @property
    def waiting(self) -> int:
        """Requests queued for the next pass."""
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests; callers still waiting get `BatcherClosed`. The pass under way finishes."""
        with self._cond:
            self._closed = True
            waiting, self._queue = self._queue, []
            self._cond.notify_all()
        for req in waiting:
            req.finish(error=BatcherClosed("the forward batcher was closed"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _submit(self, req: _Request) -> Any:
        if threading.current_thread() is self._thread:
            raise RuntimeError("the model thread cannot wait on its own batcher")
        with self._cond:
            if self._closed:
                raise BatcherClosed("the forward batcher is closed")
            self._queue.append(req)
            self._cond.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _take(self) -> list[_Request] | None:
        """Every waiting request, at most one per sequence (a second one waits for the next pass)."""
        with self._cond:
            while not self._closed and not (self._queue and self._everyone_asked()):
                self._cond.wait()
            if self._closed:
                return None
            batch, later, seen = [], [], set()
            for req in self._queue:
                key = id(req.seq) if req.seq is not None else id(req)
                (later if key in seen else batch).append(req)
                seen.add(key)
            self._queue = later
            return batch

    def _everyone_asked(self) -> bool:
        """Whether every drafting thread has its next request queued (see `drafting`)."""
        asking = {req.thread for req in self._queue}
        return all(thread in asking for thread in self._drafting)

    def _serve(self) -> None:
        batch: list[_Request] | None = []
        try:
            while (batch := self._take()) is not None:
                self._run(batch)
        finally:  # whatever ended the thread, nobody may be left waiting on it
            for req in batch or []:
                if not req.done.is_set():
                    req.finish(error=BatcherClosed("the model thread stopped"))
            self.close()

    def _run(self, batch: list[_Request]) -> None:
        for req in batch:
            if req.call is not None:
                _settle(req, req.call)
        forwards = [r for r in batch if r.call is None]
        if not forwards:
            return
        self.passes += 1
        self.rows += len(forwards)
        try:
            rows = next_logits_batch([r.seq for r in forwards], [r.tokens for r in forwards],
                                     [r.n_out for r in forwards])
        except Exception:  # noqa: BLE001 - a bad row fails the batch: answer each alone, errors to their owners
            for req in forwards:
                _settle(req, lambda r=req: r.seq.next_logits(r.tokens, r.n_out))
            return
        for req, logits in zip(forwards, rows, strict=True):
            req.finish(logits)


def _settle(req: _Request, fn: Callable[[], Any]) -> None:
    try:
        req.finish(fn())
    except Exception as exc:  # noqa: BLE001 - the caller's error, raised again on its own thread
        req.finish(error=exc)


class BatchedSequence:
    """A sequence whose model work runs on a `ForwardBatcher`'s thread (the caller blocks meanwhile)."""

    def __init__(self, seq: Any, batcher: ForwardBatcher) -> None:
        self._seq = seq
        self._batcher = batcher

    @property
    def tokens(self) -> list[int]:
        return self._seq.tokens

    def __len__(self) -> int:
        return len(self._seq)

    def next_logits(self, tokens: Sequence[int], n_out: int = 1) -> torch.Tensor:
        return self._batcher.next_logits(self._seq, tokens, n_out)

    def rollback(self, length: int) -> None:
        self._batcher.call(self._seq, lambda: self._seq.rollback(length))


class BatchedModel:
    """A `LoadedModel` whose `new_sequence()` is a `BatchedSequence` on `batcher`; everything else is the
    model's own (name, vocab_size, encode, decode, ...)."""

    def __init__(self, model: Any, batcher: ForwardBatcher) -> None:
        self._model = model
        self.batcher = batcher

    def new_sequence(self) -> BatchedSequence:
        return BatchedSequence(self._model.new_sequence(), self.batcher)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __repr__(self) -> str:
        return f"BatchedModel({self._model!r})"


__all__ = ["BatchedModel", "BatchedSequence", "BatcherClosed", "ForwardBatcher"]
