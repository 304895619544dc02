"""A new request starts rendering while the journal writes it down, but nothing leaves the
service before its row exists: no event, no file, no provider job.

The journal is held still with a real SQLite write lock taken by another connection, the way
a slow disk or a long transaction would: its writer waits (busy_timeout) until it is released.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from image_server.generators.base import Capabilities, GenerationResult, GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator
from image_server.journal import JOURNAL_FILE
from schemas import ImageReady, RenderAccepted, RenderError, RenderProgress
from tests.test_cancel_priority import EventLog, until


class Recorder:
    """Generators that note when a render starts and when its generator returned."""

    def __init__(self, *, in_process: bool = True) -> None:
        self.in_process = in_process
        self.started: list[str] = []
        self.generated: list[str] = []

    def factory(self, name: str, config: GeneratorConfig) -> MockGenerator:
        return _Recording(config, name=name, recorder=self)


class _Recording(MockGenerator):
    def __init__(self, config: GeneratorConfig, *, name: str, recorder: Recorder) -> None:
        super().__init__(config, name=name)
        self.recorder = recorder

    @property
    def capabilities(self) -> Capabilities:
        return super().capabilities.model_copy(update={"in_process": self.recorder.in_process})

    async def generate(self, job: RenderJob) -> GenerationResult:
        self.recorder.started.append(job.request.request_id)
        result = await super().generate(job)
        self.recorder.generated.append(job.request.request_id)
        return result


@asynccontextmanager
async def journal_locked(state_dir: Path) -> AsyncIterator[None]:
    """Another connection holds the journal's write lock until the block ends."""
    blocker = await asyncio.to_thread(
        sqlite3.connect, state_dir / JOURNAL_FILE, isolation_level=None, check_same_thread=False
    )
    try:
        await asyncio.to_thread(blocker.execute, "BEGIN IMMEDIATE")
        yield
        await asyncio.to_thread(blocker.execute, "COMMIT")
    finally:
        await asyncio.to_thread(blocker.close)


async def journal_ready(service: Any) -> None:
    """The journal knows its ids (built in the background at start): overlap is possible."""
    journal = service.tracker.outbox.journal
    await until(lambda: journal.known.loaded)


def outputs(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


async def test_a_new_request_renders_while_it_is_journaled_but_publishes_and_stores_after(
    service_factory, raw_peer, tmp_path
):
    recorder = Recorder()
    async with service_factory(factory=recorder.factory) as service:
        await journal_ready(service)
        async with EventLog(await raw_peer(service)) as log:
            async with journal_locked(tmp_path / "state"):
                await log.render("early-1", delivery="file")
                await until(lambda: recorder.generated == ["early-1"])  # drawn, row not written
                await log.flush()  # whatever the service published by now has arrived
                assert log.of("early-1") == []  # no RenderAccepted, no progress, no result
                assert outputs(tmp_path / "output") == []  # the file waits for the row too
            ready = await log.terminal("early-1")
            await log.flush()
    assert isinstance(ready, ImageReady) and Path(ready.images[0].path or "").is_file()
    kinds = [type(event) for event in log.of("early-1")]
    assert kinds[0] is RenderAccepted and kinds[-1] is ImageReady  # acceptance still comes first
    stages = [event.stage for event in log.of("early-1", RenderProgress)]
    assert stages[0] == "started" and stages[-1] == "storing"  # held progress went out in order
    assert log.terminal_counts() == {"early-1": 1}


async def test_a_provider_job_waits_for_the_journal(service_factory, raw_peer, tmp_path):
    recorder = Recorder(in_process=False)
    async with service_factory(factory=recorder.factory) as service:
        await journal_ready(service)
        async with EventLog(await raw_peer(service)) as log:
            async with journal_locked(tmp_path / "state"):
                await log.render("remote-1", delivery="frames")
                await log.flush()
                await log.flush()  # two round trips: the request had every chance to start
                assert recorder.started == []  # a job elsewhere is spending: not before the row
                assert log.of("remote-1") == []
            ready = await log.terminal("remote-1")
    assert isinstance(ready, ImageReady) and recorder.started == ["remote-1"]


async def test_a_request_the_journal_refuses_is_not_answered_with_its_render(service_factory, raw_peer, tmp_path):
    """Over the journal's quota: the render that started alongside is stopped at once (a
    30 s render, answered within the 5 s wait), no file is left, and the client hears why
    it was not accepted."""
    recorder = Recorder()
    padding = "x" * (1024 * 1024)  # more than the whole quota below
    slow = {"mock": {"strategy": "mock", "delay_s": 30.0}}
    async with service_factory(
        factory=recorder.factory, generators=slow, journal={"max_bytes": 1024 * 1024}
    ) as service:
        await journal_ready(service)
        async with EventLog(await raw_peer(service)) as log:
            await log.render("too-big", delivery="file", metadata={"pad": padding})
            refused = await log.terminal("too-big")
            await log.flush()
    assert isinstance(refused, RenderError) and refused.code == "overloaded"
    assert recorder.generated == []  # the 30 s render never finished: it was stopped
    assert log.of("too-big", (RenderAccepted, RenderProgress, ImageReady)) == []
    assert outputs(tmp_path / "output") == []


@pytest.mark.parametrize("delivery", ["file", "frames"])
async def test_a_cancel_during_journaling_ends_the_request_once(service_factory, raw_peer, tmp_path, delivery):
    from schemas import CancelRequest

    recorder = Recorder()
    async with service_factory(factory=recorder.factory) as service:
        await journal_ready(service)
        async with EventLog(await raw_peer(service)) as log:
            async with journal_locked(tmp_path / "state"):
                await log.render("cut-1", delivery=delivery)
                await until(lambda: recorder.started == ["cut-1"])
                await log.send(CancelRequest(request_id="cut-1"))
                await log.flush()
                assert log.of("cut-1") == []
            ended = await log.terminal("cut-1")
            await log.flush()
    if delivery == "file":  # the render waits for the row before storing: it is cut there
        assert isinstance(ended, RenderError) and ended.code == "cancelled"
    else:  # frames may be finished already, waiting only to be published: either ends it
        assert isinstance(ended, ImageReady) or ended.code == "cancelled"
    assert log.terminal_counts() == {"cut-1": 1}
    assert outputs(tmp_path / "output") == []  # frames write no file; a cut file render neither
