"""Drawing processes for the mock: draw + encode big pictures on every core.

Drawing text and encoding JPEG hold the GIL most of the time, so worker threads cannot run
them side by side (505 images/s on one thread, 452 on two, 899 in two processes, 1024x1024
JPEG). The pool starts up to ``size`` child processes (``mock.worker``) when a render first
needs one and keeps them; the event loop talks to them over their stdin/stdout, so no
management thread competes for the GIL. Each child holds at most ``DEPTH`` jobs: the one it
draws and the next, already in its pipe, so in a burst it never sleeps waiting for the
loop to feed it (and writing to a busy child costs no wake-up). A child that dies fails
the jobs it held (``WorkerLost``) and a new one is started for the next job.
"""

from __future__ import annotations

import asyncio
import collections
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

from image_server.generators.mock.render import Sketch
from image_server.generators.mock.worker import ANSWER_HEADER, JOB_HEADER, OK

# Importing image_server would load the whole service (0.8 s and about 37 MB per child);
# the children need only the drawing modules, so their parent packages are created empty.
_HERE = Path(__file__).resolve().parent
_PACKAGES = (
    ("image_server", str(_HERE.parents[1])),
    ("image_server.generators", str(_HERE.parent)),
    ("image_server.generators.mock", str(_HERE)),
)
# One line (argv: the niceness, then package names and folders), so that ps and profilers
# show it whole.
_BOOTSTRAP = (
    "import sys, types; names, folders = sys.argv[2::2], sys.argv[3::2]; "
    "sys.modules.update({name: types.ModuleType(name) for name in names}); "
    "[setattr(sys.modules[name], '__path__', [folder]) for name, folder in zip(names, folders)]; "
    "from image_server.generators.mock.worker import main; main(int(sys.argv[1]))"
)
DEPTH = 2  # jobs a child holds: the one it draws and the next
STOP_TIMEOUT_S = 5.0


class WorkerLost(Exception):
    """A drawing process ended before it answered."""


class DrawingFailed(Exception):
    """A drawing process answered with an error (the process itself is fine)."""


class PoolUnavailable(Exception):
    """No drawing process could be started."""


class _Child:
    """One drawing process and the jobs it holds, answered in the order they were sent."""

    def __init__(self, process: asyncio.subprocess.Process, changed: Callable[[_Child], None]) -> None:
        self.process = process
        self.pending: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.lost = False
        self._changed = changed
        self.reader = asyncio.get_running_loop().create_task(self._read_answers())

    @property
    def pid(self) -> int:
        return self.process.pid

    def submit(self, job: bytes) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        assert self.process.stdin is not None
        # No drain: a job is a few hundred bytes and a child holds DEPTH of them.
        self.process.stdin.write(job)
        return future

    async def _read_answers(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while True:
                status, size = ANSWER_HEADER.unpack(await stdout.readexactly(ANSWER_HEADER.size))
                payload = await stdout.readexactly(size)
                future = self.pending.popleft()
                if not future.done():  # done: its render was cancelled
                    if status == OK:
                        future.set_result(payload)
                    else:
                        future.set_exception(DrawingFailed(payload.decode(errors="replace")))
                self._changed(self)
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            self.lost = True
            while self.pending:
                future = self.pending.popleft()
                if not future.done():
                    future.set_exception(WorkerLost(f"drawing process {self.pid} ended mid-job"))
            self._changed(self)

    async def stop(self) -> None:
        """End of file first (the child exits after the jobs it holds); killed if it does not."""
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        await self.reader


class DrawingPool:
    """Up to ``size`` drawing processes, started on demand; use ``aclose`` to end them.

    They run ``niceness`` steps below normal priority, as the service's worker threads do,
    so that the event loop gets a core at once when it wakes."""

    def __init__(self, size: int, *, niceness: int = 0) -> None:
        self.size = size
        self.niceness = niceness
        self._children: list[_Child] = []
        self._starting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The running children's process ids."""
        return sorted(child.pid for child in self._children if not child.lost and child.process.returncode is None)

    async def render(self, sketch: Sketch) -> bytes:
        """The sketch drawn and encoded by a child process."""
        payload = pickle.dumps(sketch, protocol=pickle.HIGHEST_PROTOCOL)
        child = await self._choose()
        # Cancelling this render cancels the future; the child's answer is then read and dropped.
        return await child.submit(JOB_HEADER.pack(len(payload)) + payload)

    async def aclose(self) -> None:
        """Stop every child (idempotent); renders waiting for one fail with PoolUnavailable."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolUnavailable("the drawing pool was closed"))
        children, self._children = self._children, []
        await asyncio.gather(*(child.stop() for child in children), *self._stopping)

    async def _choose(self) -> _Child:
        """An idle child; else a new one while there is room; else the least busy one with
        room for a job; else wait until one has."""
        while True:
            if self._closed:
                raise PoolUnavailable("the drawing pool was closed")
            live = [child for child in self._children if not child.lost]
            idle = [child for child in live if not child.pending]
            if idle:
                return idle[0]
            if len(self._children) + self._starting < self.size:
                return await self._start()
            open_ = [child for child in live if len(child.pending) < DEPTH]
            if open_:
                return min(open_, key=lambda child: len(child.pending))
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake()  # the room it was woken for goes to the next one
                raise

    async def _start(self) -> _Child:
        self._starting += 1
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the working directory's modules: only the interpreter's and ours
                "-c",
                _BOOTSTRAP,
                str(self.niceness),
                *(part for package in _PACKAGES for part in package),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 20,
            )
        except OSError as exc:
            raise PoolUnavailable(f"cannot start a drawing process: {exc}") from exc
        finally:
            self._starting -= 1
        child = _Child(process, self._changed)
        self._children.append(child)
        if self._closed:
            self._retire(child)
            raise PoolUnavailable("the drawing pool was closed")
        self._wake()  # a waiter may queue its job behind this one's
        return child

    def _changed(self, child: _Child) -> None:
        """A child answered (room for a job) or was lost (room for a new child)."""
        if child.lost and child in self._children:
            self._retire(child)
        if not self._closed:
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _retire(self, child: _Child) -> None:
        self._children.remove(child)
        if child.process.returncode is None:
            child.process.kill()
        stopping = asyncio.get_running_loop().create_task(child.stop())
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
