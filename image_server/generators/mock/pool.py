"""Drawing processes for the mock: draw + encode big pictures on every core.

Drawing text and encoding JPEG hold the GIL most of the time, so worker threads cannot run
them side by side (505 images/s on one thread, 452 on two, 899 in two processes, 1024x1024
JPEG). The pool starts up to ``size`` child processes (``mock.worker``) when a render first
needs one, keeps them, and gives each one job at a time; the event loop talks to them over
their stdin/stdout, so no management thread competes for the GIL. A child that dies
mid-job fails that job (``WorkerLost``) and a new one is started for the next job.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import pickle
import sys
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
# One line (argv: package names and folders), so that ps and profilers show it whole.
_BOOTSTRAP = (
    "import sys, types; names, folders = sys.argv[1::2], sys.argv[2::2]; "
    "sys.modules.update({name: types.ModuleType(name) for name in names}); "
    "[setattr(sys.modules[name], '__path__', [folder]) for name, folder in zip(names, folders)]; "
    "from image_server.generators.mock.worker import main; main()"
)
STOP_TIMEOUT_S = 5.0


class WorkerLost(Exception):
    """A drawing process ended before it answered."""


class DrawingFailed(Exception):
    """A drawing process answered with an error (the process itself is fine)."""


class PoolUnavailable(Exception):
    """No drawing process could be started."""


class _Child:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    async def exchange(self, job: bytes) -> bytes:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(job)
            await stdin.drain()
            status, size = ANSWER_HEADER.unpack(await stdout.readexactly(ANSWER_HEADER.size))
            payload = await stdout.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise WorkerLost(f"drawing process {self.pid} ended mid-job") from exc
        if status != OK:
            raise DrawingFailed(payload.decode(errors="replace"))
        return payload

    async def stop(self) -> None:
        """End of file first (the child exits after its job); killed if it does not."""
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


class DrawingPool:
    """Up to ``size`` drawing processes, started on demand; use ``aclose`` to end them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._children: set[_Child] = set()
        self._idle: list[_Child] = []
        self._starting = 0
        # Each waiter gets an idle child, or None: room to start one itself.
        self._waiters: collections.deque[asyncio.Future[_Child | None]] = collections.deque()
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The running children's process ids."""
        return sorted(child.pid for child in self._children if child.process.returncode is None)

    async def render(self, sketch: Sketch) -> bytes:
        """The sketch drawn and encoded by a child process."""
        payload = pickle.dumps(sketch, protocol=pickle.HIGHEST_PROTOCOL)
        child = await self._acquire()
        exchange = asyncio.ensure_future(child.exchange(JOB_HEADER.pack(len(payload)) + payload))
        exchange.add_done_callback(functools.partial(self._settle, child))
        # A cancelled render leaves the exchange running: the child is reused once it answered.
        return await asyncio.shield(exchange)

    async def aclose(self) -> None:
        """Stop every child (idempotent); renders waiting for one fail with PoolUnavailable."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolUnavailable("the drawing pool was closed"))
        children, self._children, self._idle = list(self._children), set(), []
        await asyncio.gather(*(child.stop() for child in children), *self._stopping)

    async def _acquire(self) -> _Child:
        if self._closed:
            raise PoolUnavailable("the drawing pool was closed")
        while self._idle:
            idle = self._idle.pop()
            if idle.process.returncode is None:
                return idle
            self._discard(idle)  # ended while idle (killed, out of memory): not this job's fault
        if len(self._children) + self._starting < self.size:
            self._starting += 1
            return await self._start()
        waiter: asyncio.Future[_Child | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            child = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is None:
                    self._starting -= 1
                self._hand_on(handed)
            raise
        return child if child is not None else await self._start()

    async def _start(self) -> _Child:
        """Start a child in the room reserved for it (``_starting`` counts it already)."""
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the working directory's modules: only the interpreter's and ours
                "-c",
                _BOOTSTRAP,
                *(part for package in _PACKAGES for part in package),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 20,
            )
        except OSError as exc:
            self._hand_on(None)
            raise PoolUnavailable(f"cannot start a drawing process: {exc}") from exc
        finally:
            self._starting -= 1
        child = _Child(process)
        self._children.add(child)
        if self._closed:
            self._discard(child)
            raise PoolUnavailable("the drawing pool was closed")
        return child

    def _settle(self, child: _Child, exchange: asyncio.Future[bytes]) -> None:
        if exchange.cancelled() or isinstance(exchange.exception(), WorkerLost):
            self._discard(child)
        elif child in self._children:
            self._hand_on(child)

    def _hand_on(self, child: _Child | None) -> None:
        """Give ``child`` (or, for None, room for a new one) to the first waiter, or keep it idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                if child is None:
                    self._starting += 1  # the room is the waiter's: nobody else may take it
                waiter.set_result(child)
                return
        if child is not None:
            self._idle.append(child)

    def _discard(self, child: _Child) -> None:
        self._children.discard(child)
        if child.process.returncode is None:
            child.process.kill()
        reaping = asyncio.get_running_loop().create_task(_reap(child))
        self._stopping.add(reaping)
        reaping.add_done_callback(self._stopping.discard)
        if not self._closed:
            self._hand_on(None)


async def _reap(child: _Child) -> None:
    await child.process.wait()
