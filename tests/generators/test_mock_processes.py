"""The mock's drawing processes: real child processes, no mocks of our own code.

Same bytes as drawing in a thread, both processes busy in a burst, a child killed mid-job
fails that job retryably and is replaced, nothing left running after the generator closes
or after the service is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path

import pytest
import zmq.asyncio

from image_server.client import RenderClient
from image_server.errors import GenerationFailed
from image_server.generators.base import RenderJob
from image_server.generators.mock import MockConfig, MockGenerator
from image_server.offload import WORKER_NICENESS
from image_server.storage import OutputStore
from schemas import RenderRequest
from tests.procs import Procs, write_config
from tests.waiting import until


def job(rid: str, *, side: int = 256, fmt: str = "jpeg", **fields: object) -> RenderJob:
    fields.setdefault("prompt", f"a lighthouse at dusk ({rid})")
    request = RenderRequest(request_id=rid, width=side, height=side, output_format=fmt, seed=7, **fields)  # type: ignore[arg-type]
    return RenderJob(request, references=[], attempt=1)


def generator(processes: int, **config: object) -> MockGenerator:
    # process_min_pixels=0: small pictures go to the processes too, to keep the tests quick.
    return MockGenerator(MockConfig(strategy="mock", processes=processes, process_min_pixels=0, **config), name="m")


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting to be reaped has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


@pytest.mark.parametrize(("fmt", "style"), [("jpeg", "simple"), ("webp", "detailed"), ("jpeg", "debug")])
async def test_a_process_draws_the_same_bytes_as_a_thread(fmt: str, style: str) -> None:
    async with generator(0) as in_thread, generator(2) as in_processes:
        request = job("same", fmt=fmt, style=style, num_images=3)
        threaded = await in_thread.generate(request)
        processed = await in_processes.generate(request)
        assert in_thread.drawing_pids == [] and len(in_processes.drawing_pids) >= 1
    assert [image.format for image in processed.images] == [fmt] * 3
    assert [image.data for image in processed.images] == [image.data for image in threaded.images]
    assert [image.seed for image in processed.images] == [7, 8, 9]
    assert processed.applied == threaded.applied
    assert len({image.data for image in processed.images}) == 3  # three pictures, not one thrice


async def test_the_store_keeps_the_mock_bytes_as_they_are(tmp_path: Path) -> None:
    async with generator(1) as mock:
        request = job("kept", side=1024)
        result = await mock.generate(request)
    data = result.images[0].data
    assert data is not None and result.images[0].format == "jpeg"
    stored = OutputStore(tmp_path).store(request.request, "m", result.images, project="default", parameters={})
    written = Path(stored[0].output.path or "").read_bytes()
    assert written == data and stored[0].output.sha256 == hashlib.sha256(data).hexdigest()
    assert (stored[0].output.width, stored[0].output.height) == (1024, 1024)


async def test_png_and_small_pictures_stay_in_a_thread() -> None:
    mock = MockGenerator(MockConfig(strategy="mock", processes=2), name="m")  # default: 512x512 and up
    async with mock:
        png = await mock.generate(job("png", side=1024, fmt="png"))
        small = await mock.generate(job("small", side=64))
        assert mock.drawing_pids == []
    assert png.images[0].image is not None and png.images[0].data is None  # the store encodes PNG
    assert small.images[0].format == "jpeg" and small.images[0].data is not None


async def test_a_burst_keeps_every_process_busy() -> None:
    async with generator(2) as mock:
        results = await asyncio.gather(*(mock.generate(job(f"b{i}", side=512)) for i in range(16)))
        pids = mock.drawing_pids
        assert len(pids) == 2
        # Each child wrote answers on its stdout: it drew, not only started.
        written = {pid: int(Path(f"/proc/{pid}/io").read_text().split("wchar: ")[1].split()[0]) for pid in pids}
        # Below normal priority, as the service's worker threads: the event loop comes first.
        assert all(nice(pid) == WORKER_NICENESS + nice(os.getpid()) for pid in pids)
    smallest = min(len(result.images[0].data or b"") for result in results)
    assert all(count >= smallest for count in written.values()), written
    assert len({result.images[0].data for result in results}) == 16


async def test_a_child_killed_mid_job_fails_it_retryably_and_is_replaced() -> None:
    async with generator(1) as mock:
        await mock.generate(job("warm"))
        (first,) = mock.drawing_pids
        # A 4096x4096 WebP takes a child far longer than this test needs to kill it.
        slow = asyncio.create_task(mock.generate(job("slow", side=4096, fmt="webp")))
        await asyncio.sleep(0)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(GenerationFailed) as failed:
            await slow
        assert failed.value.retryable and "ended mid-job" in str(failed.value)
        again = await mock.generate(job("again"))
        assert again.images[0].data is not None
        (second,) = mock.drawing_pids
        assert second != first and running(second) and not running(first)
        # One that dies between jobs costs no job: the next one goes to a new process.
        os.kill(second, signal.SIGKILL)
        await until(lambda: mock.drawing_pids == [])
        assert (await mock.generate(job("after-idle-death"))).images[0].data is not None
        (third,) = mock.drawing_pids
        assert third not in (first, second)


async def test_a_cancelled_render_leaves_the_process_to_the_next_one() -> None:
    async with generator(0) as in_thread, generator(1) as mock:
        expected = (await in_thread.generate(job("next"))).images[0].data
        await mock.generate(job("warm"))
        (pid,) = mock.drawing_pids
        slow = asyncio.create_task(mock.generate(job("slow", side=4096, fmt="webp")))
        await asyncio.sleep(0)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        # Queued behind the cancelled job in the same process: its own answer, not that one's.
        after = await mock.generate(job("next"))
        assert after.images[0].data == expected and mock.drawing_pids == [pid]


async def test_closing_the_generator_ends_its_processes() -> None:
    mock = generator(2)
    async with mock:
        await asyncio.gather(*(mock.generate(job(f"c{i}")) for i in range(4)))
        pids = mock.drawing_pids
        assert pids and all(running(pid) for pid in pids)
        assert set(pids) <= children_of(os.getpid())
        # The children load the drawing modules, not the service (pydantic and the rest).
        assert not any("pydantic_core" in Path(f"/proc/{pid}/maps").read_text() for pid in pids)
    assert mock.drawing_pids == []
    assert not any(running(pid) for pid in pids)
    # Closed is closed: a late render draws in a thread instead of starting processes again.
    late = await mock.generate(job("late"))
    assert late.images[0].data is not None and mock.drawing_pids == []


async def test_no_drawing_process_outlives_a_sigkilled_service(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    config = write_config(
        tmp_path / "config.toml",
        state_dir=tmp_path / "state",
        output_dir=tmp_path / "output",
        sockets={
            "requests": {"kind": "sub", "bind": "tcp://127.0.0.1:0"},
            "events": {"kind": "xpub", "bind": "tcp://127.0.0.1:0"},
        },
        mock={"processes": 2, "concurrency": 4},
    )
    service = await procs.service("service", config)
    async with RenderClient(service.endpoints["requests"], service.endpoints["events"], context=context) as client:
        await client.wait_ready()
        requests = [
            RenderRequest(request_id=f"k{i}", prompt="a fox", width=1024, height=1024, output_format="jpeg")
            for i in range(6)
        ]
        results = await asyncio.gather(*(client.render(request, timeout=30) for request in requests))
    assert all(Path(result.event.images[0].path or "").is_file() for result in results)
    assert service.process is not None
    drawing = children_of(service.process.pid)
    assert len(drawing) == 2
    service.send_signal(signal.SIGKILL)
    await service.wait()
    await until(lambda: not any(running(pid) for pid in drawing))
