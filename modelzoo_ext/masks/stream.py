"""Read the next tensors while others are processed: a bounded prefetch feeding a pool of workers.

    for result in pipeline(checkpoint.read, entries, work, workers=2, budget=budget):
        ...   # results in the order of `entries`

One reader thread reads tensors in file order (`os.preadv` releases the GIL, so the disk works
while the workers compute); `workers` threads run `work(entry, raw)` on different tensors (the
numpy, hashing and reading calls all release the GIL, so two workers use two cores). Memory is
bounded: the reader waits while the tensors read but not yet processed hold `budget` bytes
(one tensor is always allowed, so a tensor larger than the budget still passes alone).

Buffers are recycled: the read buffers through the pool, a worker's temporaries through
`local_buffer`. A fresh 100 MB numpy array costs ~25,000 page faults (kernel time that was
~30% of the whole run); a recycled one costs none. `work` must not keep `raw` (or a view of
it) beyond its return: the buffer is read into again.

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

from modelzoo_ext.safetensors_file import TensorEntry

Result = TypeVar("Result")
_DONE = object()


class BufferPool:
    """Read buffers in flight, at most `limit` bytes of them; returned buffers are reused.

    `acquire` blocks while another buffer would exceed the limit (one is always allowed).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.stopped = False
        self._free: list[np.ndarray] = []
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> np.ndarray | None:
        """A uint8 buffer of `nbytes`, or None when the pipeline was stopped meanwhile."""
        with self._cond:
            while not self.stopped and self.held and self.held + nbytes > self.limit:
                self._cond.wait()
            if self.stopped:
                return None
            self._free.sort(key=len)  # smallest first: reuse the tightest fit, drop the smallest
            fits = [i for i, b in enumerate(self._free) if b.size >= nbytes]
            if fits:
                buffer = self._free.pop(fits[0])
            else:
                while self._free and self.held + sum(b.size for b in self._free) + nbytes > self.limit:
                    self._free.pop(0)  # make room for a new one
                buffer = np.empty(nbytes, dtype=np.uint8)
            self.held += buffer.size
            return buffer

    def release(self, buffer: np.ndarray) -> None:
        with self._cond:
            self.held -= buffer.size
            self._free.append(buffer)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


_local = threading.local()


def local_buffer(tag: str, size: int, dtype) -> np.ndarray:
    """A flat array of `size` elements owned by this thread under `tag`, reused across calls.

    The contents are left over from the last use; the array is valid until this thread asks for
    the same tag again.
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(tag)
    if buffer is None or buffer.dtype != np.dtype(dtype) or buffer.size < size:
        buffer = buffers[tag] = np.empty(size, dtype=dtype)
    return buffer[:size]


def pipeline(
    read: Callable[[TensorEntry, np.ndarray], np.ndarray],
    entries: Iterable[TensorEntry],
    work: Callable[[TensorEntry, np.ndarray], Result],
    *,
    workers: int = 2,
    budget: int,
) -> Iterator[Result]:
    """`work(entry, read(entry, buffer))` for every entry, reading ahead within `budget` bytes.

    Results come in the order of `entries`.
    """
    buffers = BufferPool(budget)
    futures: queue.Queue[Any] = queue.Queue()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="masks-work")

    def submit(entry: TensorEntry, buffer: np.ndarray) -> Future:
        future = pool.submit(work, entry, read(entry, buffer[: entry.nbytes]))
        future.add_done_callback(lambda _: buffers.release(buffer))
        return future

    def reader() -> None:
        try:
            for entry in entries:
                buffer = buffers.acquire(entry.nbytes)
                if buffer is None:
                    return
                futures.put(submit(entry, buffer))
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
        buffers.stop()
        thread.join()
        pool.shutdown(wait=True, cancel_futures=True)
