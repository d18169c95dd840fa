"""Read the next tensors while others are processed: a bounded prefetch feeding a pool of workers.

    for result in pipeline(checkpoint.read, entries, work, workers=2, budget=budget):
        ...   # results in the order of `entries`

One reader thread reads tensors in file order (`os.preadv` releases the GIL, so the disk works
while the workers compute); `workers` threads run `work(entry, raw)` on different tensors (the
numpy, hashing and reading calls all release the GIL, so two workers use two cores). Memory is
bounded: the reader waits while the tensors read but not yet processed hold `budget` bytes
(one tensor is always allowed, so a tensor larger than the budget still passes alone).

An error anywhere (reading or working) stops the reader and is raised in the caller's thread
when the results reach it; nothing is left running.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from modelzoo_ext.hf_checkpoint import TensorEntry

Result = TypeVar("Result")
_DONE = object()


class ByteBudget:
    """Bytes held by tensors in flight; `acquire` blocks while another tensor would exceed it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.stopped = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> bool:
        """Wait for room for `nbytes`; False when the pipeline was stopped meanwhile."""
        with self._cond:
            while not self.stopped and self.held and self.held + nbytes > self.limit:
                self._cond.wait()
            self.held += nbytes
            return not self.stopped

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


def pipeline(
    read: Callable[[TensorEntry], np.ndarray],
    entries: Iterable[TensorEntry],
    work: Callable[[TensorEntry, np.ndarray], Result],
    *,
    workers: int = 2,
    budget: int,
) -> Iterator[Result]:
    """`work(entry, read(entry))` for every entry, reading ahead within `budget` bytes; results in order."""
    budget_ = ByteBudget(budget)
    futures: queue.Queue[Any] = queue.Queue()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="masks-work")

    def submit(entry: TensorEntry, raw: np.ndarray) -> Future:
        future = pool.submit(work, entry, raw)
        future.add_done_callback(lambda _: budget_.release(entry.nbytes))
        return future

    def reader() -> None:
        try:
            for entry in entries:
                if not budget_.acquire(entry.nbytes):
                    return
                futures.put(submit(entry, read(entry)))
        except BaseException as exc:  # handed to the caller's thread, raised there
            failed: Future = Future()
            failed.set_exception(exc)
            futures.put(failed)
        finally:
            futures.put(_DONE)

    thread = threading.Thread(target=reader, name="masks-read", daemon=True)
    thread.start()
    try:
        while (future := futures.get()) is not _DONE:
            yield future.result()
    finally:
        budget_.stop()
        thread.join()
        pool.shutdown(wait=True, cancel_futures=True)
