"""The "experimance" compatibility profile against a controller written as that one is.

The controller binds a PUSH socket for requests and a PULL socket for results, sends each
RenderRequest as one frame of plain JSON with project fields of its own, and reads one frame
of plain JSON back. It keeps running while the service is killed and started again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from image_server.config import load_config
from tests.procs import Procs, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


class Controller:
    """PUSH bound for requests, PULL bound for results; plain JSON, one frame each way."""

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self.push = context.socket(zmq.PUSH)
        self.pull = context.socket(zmq.PULL)
        for socket in (self.push, self.pull):
            socket.setsockopt(zmq.LINGER, 0)
            socket.bind("tcp://127.0.0.1:0")
        self.requests_endpoint = self.push.getsockopt_string(zmq.LAST_ENDPOINT)
        self.results_endpoint = self.pull.getsockopt_string(zmq.LAST_ENDPOINT)

    async def send(self, message: dict[str, Any]) -> None:
        await self.push.send(json.dumps(message).encode())  # waits while no service is connected

    async def receive(self, timeout: float = 20.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            frames = await self.pull.recv_multipart()
        assert len(frames) == 1, frames
        result = json.loads(frames[0])
        assert isinstance(result, dict)
        return result

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)


@pytest.fixture
async def controller(context: zmq.asyncio.Context) -> AsyncIterator[Controller]:
    running = Controller(context)
    yield running
    running.close()


def service_config(tmp_path: Path, controller: Controller) -> Path:
    path = write_config(
        tmp_path / "config.toml",
        service_id="compat-svc",
        state_dir=tmp_path / "state",
        output_dir=tmp_path / "output",
        sockets={
            # The profile's defaults are tcp://localhost:5564 and :5565; the test uses free ports.
            "requests": {"kind": "pull", "connect": [controller.requests_endpoint]},
            "events": {"kind": "push", "connect": [controller.results_endpoint]},
        },
        mock={"delay_s": 0.5},
    )
    path.write_text(path.read_text() + '[compat]\nprofile = "experimance"\n')
    return path


def request(request_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "RenderRequest",
        "request_id": request_id,
        "prompt": "a river delta at dawn",
        "width": 256,
        "height": 256,
        "era": "wilderness",
        "biome": "coastal",
        **fields,
    }


def assert_ready(result: dict[str, Any], request_id: str, era: str = "wilderness") -> None:
    assert result["type"] == "ImageReady" and result["request_id"] == request_id, result
    assert result["prompt"] == "a river delta at dawn"
    assert result["era"] == era and result["biome"] == "coastal"  # the controller's own fields, echoed
    assert result["uri"].startswith("file:///")
    assert Path(result["uri"][len("file://") :]).is_file()


def test_the_profile_alone_sets_the_controllers_sockets(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[compat]\nprofile = "experimance"\n')
    config = load_config(path, environ={})
    sockets = config.sockets
    assert (sockets.requests.kind, sockets.requests.connect) == ("pull", ["tcp://localhost:5564"])
    assert (sockets.events.kind, sockets.events.connect) == ("push", ["tcp://localhost:5565"])
    assert config.compat.single_frame_events and config.compat.echo_unknown_fields
    plain = tmp_path / "plain.toml"
    plain.write_text("")
    assert not load_config(plain, environ={}).compat.echo_unknown_fields
    # The shipped config.toml lists the default sockets: the profile still replaces them...
    shipped = load_config(REPO / "config.toml", environ={"IMAGE_SERVER_COMPAT__PROFILE": "experimance"})
    assert shipped.sockets.requests.connect == ["tcp://localhost:5564"]
    # ...while a socket the user changed stays as set.
    path.write_text(
        '[compat]\nprofile = "experimance"\n[sockets.events]\nkind = "push"\nconnect = ["tcp://ctl:7000"]\n'
    )
    assert load_config(path, environ={}).sockets.events.connect == ["tcp://ctl:7000"]


async def test_a_controller_gets_plain_json_results_across_service_restarts(
    procs: Procs, tmp_path: Path, controller: Controller
) -> None:
    config = service_config(tmp_path, controller)
    first = await procs.service("first", config)

    await controller.send(request("exp-1"))
    assert_ready(await controller.receive(), "exp-1")  # the first message back: no heartbeat, no progress

    await controller.send(request("exp-bad", width=5))
    failed = await controller.receive()
    assert failed["type"] == "RenderError" and failed["request_id"] == "exp-bad"
    assert failed["code"] == "invalid_request" and "width" in failed["message"]

    # Killed while rendering: the next start resumes it and the result still carries its fields.
    await controller.send(request("exp-killed", era="anthropocene"))
    await first.wait_for(r"→ exp-killed accepted")
    await first.kill()

    # Sent while no service runs: PUSH holds it until one connects.
    pending = asyncio.create_task(controller.send(request("exp-while-down")))
    second = await procs.service("second", config)
    await pending
    results = {}
    for _ in range(2):
        result = await controller.receive()
        results[result["request_id"]] = result
    assert_ready(results["exp-killed"], "exp-killed", era="anthropocene")
    assert_ready(results["exp-while-down"], "exp-while-down")
    assert second.matching(r"↻ exp-killed resumed")
