"""Keeping heavy work off the event loop's thread: worker threads and big received frames."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar, cast

import zmq

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Messages bigger than this are decoded on a worker thread: parsing megabytes of inline
# base64 JSON would otherwise stall the loop (and every heartbeat) for tens of ms.
DECODE_IN_THREAD_BYTES = 256 * 1024

# Image work (decoding references, drawing, encoding) runs on the default executor's threads
# at this lower priority, so on a small machine the event loop's thread still gets a core
# at once when it wakes: six 4096x4096 decodes on two cores otherwise delayed heartbeats by
# 30-40 ms (benchmarks/README.md, figure 5). Throughput is unchanged when the loop is idle.
WORKER_NICENESS = 10


# Steps that hold the GIL nearly throughout (copying a big message out of libzmq, parsing
# it, decoding base64) run on one thread of their own at normal priority instead. At nice
# 10, such a thread was preempted by other processes *while holding the GIL*, and the loop
# waited for it: on a busy machine a 0.4 ms base64 chunk took 6-11 ms (figure 5).
_GIL_BOUND_NAME = "gil-bound"
_GIL_BOUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_GIL_BOUND_NAME)

# Each step of the copy holds the GIL: at 256 KB, ~0.16 ms at most (page faults of the fresh
# buffer included) against ~0.46 ms at 1 MB, for the same 16-17 ms per 40 MB in all.
COPY_CHUNK_BYTES = 256 * 1024


def _at_worker_niceness() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not permitted
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


# Outputs are stored (hashed, written, fsync'd) on threads of their own: a store mostly
# waits for the disk, holding neither a core nor the GIL, and in a burst the six shared
# executor threads queued 200 stores for 45-231 ms (benchmarks/README.md, issue 14). More
# writes in flight also let their fsyncs overlap (on a journaled file system, share commits).
STORE_THREADS = 16
_STORE = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="store", initializer=_at_worker_niceness)


async def run_store(work: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``asyncio.to_thread`` on the store's threads."""
    return await _run_on(_STORE, functools.partial(work, *args, **kwargs))


async def run_gil_bound(work: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``asyncio.to_thread`` for work that holds the GIL (in short steps): off the loop, but
    on a thread at the loop's own priority."""
    return await _run_on(_GIL_BOUND, functools.partial(work, *args, **kwargs))


async def _run_on(executor: ThreadPoolExecutor, call: Callable[[], _T]) -> _T:
    return await asyncio.get_running_loop().run_in_executor(executor, call)


def in_gil_bound_thread(work: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """From a worker thread: run ``work`` on the GIL-bound thread and wait for it (at once
    when called there: waiting for itself would never end)."""
    if threading.current_thread().name.startswith(_GIL_BOUND_NAME):
        return work(*args, **kwargs)
    return _GIL_BOUND.submit(work, *args, **kwargs).result()


def as_bytes_in_chunks(frames: Sequence[zmq.Frame]) -> list[bytes | bytearray]:
    """Copy received frames out of libzmq ``COPY_CHUNK_BYTES`` at a time: one 40 MB copy
    holds the GIL for ~17 ms, and the event loop's thread would wait for all of it."""
    copies: list[bytes | bytearray] = []
    for frame in frames:
        view = memoryview(frame.buffer)
        if len(view) <= COPY_CHUNK_BYTES:
            copies.append(view.tobytes())
            continue
        copy = uninitialized_bytearray(len(view))
        for start in range(0, len(view), COPY_CHUNK_BYTES):
            copy[start : start + COPY_CHUNK_BYTES] = view[start : start + COPY_CHUNK_BYTES]
        copies.append(copy)
    return copies


def uninitialized_bytearray(size: int) -> bytearray:
    """A bytearray of ``size`` bytes that the caller will overwrite, without zeroing it first.

    ``bytearray(size)`` zero-fills in one call that holds the GIL: for 40 MB, with the page
    faults of fresh memory, 16-30 ms in which the event loop's thread waits (measured,
    benchmarks/README.md figure 5). Growing one by ``+=`` instead can copy all it has so far
    when glibc moves it out of the heap (10-25 ms once big blocks have been freed).
    CPython's ``PyByteArray_FromStringAndSize(NULL, size)`` allocates and leaves the bytes
    as they are; the pages are then faulted in by the copies, a chunk at a time.
    """
    return _MAKE_BYTEARRAY(None, size) if _MAKE_BYTEARRAY is not None else bytearray(size)


def _bytearray_maker() -> Callable[[None, int], bytearray] | None:
    # Looked up at import (service start): importing ctypes on the first big message cost
    # that message's thread ~5 ms of compiling with the GIL held.
    try:
        make = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except AttributeError:  # not CPython
        return None
    make.restype = ctypes.py_object
    make.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    return cast("Callable[[None, int], bytearray]", make)


_MAKE_BYTEARRAY = _bytearray_maker()


async def prestart_worker_threads() -> None:
    """Start the default executor's threads and the store's now, at ``WORKER_NICENESS``.
    Started on demand, each new thread made the loop wait 8-19 ms for the GIL in the middle
    of a burst."""
    workers = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default size
    await _start_every_thread(None, workers, _at_worker_niceness)
    await _start_every_thread(_STORE, STORE_THREADS)  # its initializer sets the niceness
    await _run_on(_GIL_BOUND, threading.get_native_id)  # started from here, so at nice 0


async def _start_every_thread(
    executor: ThreadPoolExecutor | None, count: int, first: Callable[[], None] = lambda: None
) -> None:
    """Make ``executor`` start all ``count`` threads: each runs ``first`` and then waits
    until all exist, so none is reused for another of these calls."""
    barrier = threading.Barrier(count, timeout=5)

    def wait() -> None:
        first()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()

    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(executor, wait) for _ in range(count)))
