"""Property tests (hypothesis) on everything a stranger controls.

Frames and JSON: whatever arrives, the receive path neither raises nor leaks a request; each
message either validates (and is answered: accepted then ended, or a ServiceStatus), ends in
a RenderError, or is counted as undecodable. Most examples go straight to the service's
message handler, the rest through real sockets. Reference URIs: random paths never read a
file outside the allowed root, random URLs never reach a refused address.

Hypothesis drives a sync inner function, so each test owns one event loop (asyncio.Runner)
that runs the service between examples; examples are kept small so the suite stays fast.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image

from image_server.client import RenderClient
from image_server.config import ReferencesConfig
from image_server.errors import ReferenceImageError
from image_server.generators.base import GeneratedImage, GenerationResult, GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator
from image_server.manager import GeneratorManager
from image_server.references import normalize_reference
from image_server.service import ImageService
from schemas import (
    CancelRequest,
    ImageReady,
    ImageSource,
    RenderError,
    RenderRequest,
    RequestConflict,
    ServiceStatus,
    StatusRequest,
    WireError,
    decode_frames,
    encode_message,
)
from tests.conftest import RawPeer, make_config
from tests.fakes.images import solid_bytes

FUZZ = settings(
    # FUZZ_EXAMPLES=5000 for a deeper search; the default keeps the suite fast.
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "250")),
    deadline=None,  # a render or a journal write may take a while on a loaded machine
    database=None,  # no .hypothesis folder in the shared tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMIT = 8192  # max_message_bytes of the fuzzed service; libzmq drops (and disconnects) past 2x
DEADLINE_S = 10.0
MESSAGE_TYPES = ["RenderRequest", "StatusRequest", "CancelRequest", "ImageReady", "RenderError", "Heartbeat"]
REQUEST_FIELDS = sorted(RenderRequest.model_fields)


def tiny_png(color: tuple[int, int, int], side: int = 8) -> bytes:
    return solid_bytes(color, (side, side))


# -- strategies: frames and JSON ---------------------------------------------------------------

request_ids = st.sampled_from(["r-1", "r-2", "job.3", "a:b"]) | st.from_regex(r"[A-Za-z0-9._:-]{1,24}", fullmatch=True)
names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,10}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
huge_numbers = st.sampled_from([10**30, -(10**30), 2**63, 2**64, -1, 0, 1e308, -1e308, 1e-320, 4097, 65])


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A RenderRequest the service takes: tiny sizes, every delivery and format."""
    data: dict[str, Any] = {
        "type": "RenderRequest",
        "request_id": draw(request_ids),
        "prompt": draw(st.text(min_size=1, max_size=40)),
    }
    optional = {
        "width": st.sampled_from([64, 72, 96]),
        "height": st.sampled_from([64, 80]),
        "seed": st.integers(0, 2**63 - 1),
        "num_images": st.integers(1, 2),
        "delivery": st.sampled_from(["file", "inline", "frames", "url"]),
        "output_format": st.sampled_from(["png", "jpeg", "webp"]),
        "reply_to": names,
        "channel": names,
        "project": names,
        "priority": st.integers(-100, 100),
        "generator": st.just("mock"),
        "metadata": st.dictionaries(st.text(max_size=6), json_values, max_size=3),
        "generator_config": st.sampled_from([{}, {"style": "debug"}, {"delay_s": 0.5}]),
        "reference_image": st.sampled_from(
            [
                {"image_data": base64.b64encode(tiny_png((1, 2, 3))).decode()},
                {"uri": "file:///etc/passwd"},
                {"uri": "data:image/png;base64,AAAA"},
            ]
        ),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=5)):
        data[key] = draw(optional[key])
    return data


def deep(depth: int) -> bytes:
    """Nested JSON arrays, spelled out (json.dumps itself would hit the recursion limit)."""
    return b"[" * depth + b"]" * depth


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    """A valid message (RenderRequest, StatusRequest or CancelRequest), then broken one way."""
    kind = draw(st.sampled_from(["render", "render", "status", "cancel"]))
    if kind == "render":
        data = draw(valid_requests())
    elif kind == "status":
        data = {"type": "StatusRequest", "request_id": draw(request_ids), "reply_to": draw(names)}
    else:
        data = {"type": "CancelRequest", "request_id": draw(request_ids)}
    topic = data["type"]
    how = draw(
        st.sampled_from(
            ["none", "wrong_type", "huge", "unicode", "nested", "topic", "extra", "single", "truncate", "flip"]
            + ["oversize", "duplicate", "drop"]
        )
    )
    if how == "wrong_type":
        data[draw(st.sampled_from(REQUEST_FIELDS))] = draw(json_values)
    elif how == "huge":
        data[draw(st.sampled_from(["width", "height", "seed", "steps", "num_images", "priority", "timeout_s"]))] = draw(
            huge_numbers
        )
    elif how == "unicode":
        data[draw(st.sampled_from(["prompt", "request_id", "reply_to", "generator", "channel"]))] = draw(
            st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
        )
    elif how == "nested":
        data["metadata"] = {"junk": "DEEP"}
    elif how == "drop":
        data.pop(draw(st.sampled_from(sorted(data))))
    body = json.dumps(data).encode()
    if how == "nested":
        body = body.replace(b'"DEEP"', deep(draw(st.sampled_from([5, 62, 63, 200, 254, 300, 900, 3000]))))
    if how == "duplicate":  # the last key wins in json.loads; the regex sniffer sees the first
        body = body[:-1] + b', "request_id": ' + json.dumps(draw(json_values)).encode() + b"}"
    elif how == "truncate":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif how == "flip":
        position = draw(st.integers(0, len(body) - 1))
        body = body[:position] + bytes([draw(st.integers(0, 255))]) + body[position + 1 :]
    elif how == "oversize":
        body = body[:-1] + b', "pad": "' + b"x" * draw(st.sampled_from([LIMIT, LIMIT + 1, 3 * LIMIT])) + b'"}'
    if how == "topic":
        topic_bytes = draw(
            st.sampled_from([b"RenderRequest/", b"Render", b"StatusRequest", b"ImageReady", b"", b"\xff\xfe", b"a b"])
            | st.binary(max_size=20)
        )
        return [topic_bytes, body]
    if how == "single":
        return [draw(st.sampled_from([b"", topic.encode() + b" ", b"  "])) + body]
    frames = [topic.encode(), body]
    if how == "extra":
        frames += draw(st.lists(st.binary(max_size=32), min_size=1, max_size=3))
    return frames


@st.composite
def json_objects(draw: st.DrawFn) -> list[bytes]:
    """A random JSON object, with or without a valid-looking request_id and a message type."""
    obj = draw(st.dictionaries(st.sampled_from(REQUEST_FIELDS) | st.text(max_size=8), json_values, max_size=6))
    if draw(st.booleans()):
        obj["request_id"] = draw(request_ids)
    message_type = draw(st.none() | st.sampled_from(MESSAGE_TYPES))
    if message_type is not None and draw(st.booleans()):
        obj["type"] = message_type
    body = json.dumps(obj).encode()
    topic = (message_type or draw(st.sampled_from(MESSAGE_TYPES))).encode()
    return draw(st.sampled_from([[topic, body], [body], [topic + b" " + body]]))


random_frames = st.lists(st.binary(max_size=64), max_size=5)
any_message = st.one_of(random_frames, mutated(), json_objects())


# -- the service under fuzz ---------------------------------------------------------------------


def tiny_mock(name: str, config: GeneratorConfig) -> MockGenerator:
    """The mock generator, answering every job at once with 8x8 images (the receive path is under test)."""

    def handler(job: RenderJob) -> GenerationResult:
        image = Image.new("RGB", (8, 8), (len(job.request.prompt) % 256, 40, 90))
        return GenerationResult(
            images=[GeneratedImage(image=image, width=8, height=8, seed=1)] * job.request.num_images
        )

    return MockGenerator(config, name=name, handler=handler)


class Harness:
    """A live service on 127.0.0.1 and a raw peer; ``feed`` checks one message's fate."""

    def __init__(self, context: zmq.asyncio.Context, service: ImageService, peer: RawPeer) -> None:
        self.context = context
        self.service = service
        self.peer = peer
        self.fates: Counter[str] = Counter()
        self.events: list[Any] = []  # everything the service published since the peer joined
        self._arrived = asyncio.Event()
        self._probes = itertools.count()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, tmp_path: Path) -> Harness:
        config = make_config(tmp_path, limits={"max_message_bytes": LIMIT})
        manager = GeneratorManager(config.generators, default=config.default_generator, factory=tiny_mock)
        context = zmq.asyncio.Context()
        service = ImageService(config, context=context, manager=manager)
        await service.start()
        peer = RawPeer(context, service)
        await peer.ready()
        return cls(context, service, peer)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self.peer.close()
        await self.service.shutdown()
        self.context.destroy(linger=0)

    async def _read(self) -> None:
        while True:
            self.events.append(decode_frames(await self.peer.sub.recv_multipart()).message)
            self._arrived.set()

    async def published(self, predicate: Callable[[Any], bool], since: int) -> Any:
        """The first event published after index ``since`` that matches (waiting for it)."""
        scanned = since
        while True:
            for event in self.events[scanned:]:
                if predicate(event):
                    return event
            scanned = len(self.events)
            self._arrived.clear()
            await self._arrived.wait()

    async def feed(self, frames: list[bytes], *, over_socket: bool) -> None:
        service = self.service
        before = service.counters.copy()
        mark = len(self.events)
        async with asyncio.timeout(DEADLINE_S):
            if over_socket:
                # The receive loop handles messages in order: once the probe is answered, so was this.
                probe = f"probe-{next(self._probes)}"
                await self.peer.send(frames)
                await self.peer.send(encode_message(StatusRequest(request_id=probe)))
                await self.published(lambda m: isinstance(m, ServiceStatus) and m.request_id == probe, mark)
            else:
                await service._on_frames(frames)
            delta = service.counters.copy()
            delta.subtract(before)
            assert delta["received"] == (2 if over_socket else 1), delta
            assert delta["internal_errors"] == 0
            if delta["undecodable"]:
                assert delta["rejected"] == 0
                self.fates["undecodable"] += 1
            elif delta["rejected"]:
                assert delta["rejected"] == 1
                # A refusal naming an id another request holds gets a RequestConflict, never
                # a second terminal event for that id.
                error = await self.published(lambda m: isinstance(m, RenderError | RequestConflict), mark)
                assert not isinstance(error, RenderError) or error.code != "internal", error
                self.fates["rejected"] += 1
            else:
                await self._validated(frames, mark)
        # A request's entry goes before its terminal event is sent: nothing may linger.
        assert not service.active, service.active

    async def _validated(self, frames: list[bytes], mark: int) -> None:
        """Neither counted nor refused: the message must decode, and get its answer."""
        try:
            message = decode_frames(frames).message
        except WireError as exc:
            raise AssertionError(f"undecodable message {frames!r} was neither counted nor refused: {exc}") from exc
        if isinstance(message, RenderRequest):
            rid = message.request_id
            # Ids repeat across examples: a repeat from another reply_to conflicts with the first.
            end = await self.published(
                lambda m: isinstance(m, ImageReady | RenderError | RequestConflict) and m.request_id == rid, mark
            )
            assert not (isinstance(end, RenderError) and end.code == "internal"), end
            self.fates[f"rendered:{type(end).__name__}"] += 1
        elif isinstance(message, StatusRequest):
            await self.published(lambda m: isinstance(m, ServiceStatus) and m.request_id == message.request_id, mark)
            self.fates["status"] += 1
        else:
            assert isinstance(message, CancelRequest), message  # not in flight: nothing to answer
            self.fates["cancel"] += 1

    async def still_serves(self) -> None:
        async with RenderClient(
            self.service.endpoints["requests"], self.service.endpoints["events"], context=self.context
        ) as client:
            await client.wait_ready(5)
            status = await client.status(timeout=5)
            assert status.counters["received"] >= 1 and status.counters.get("internal_errors", 0) == 0
            result = await client.render(request_id="after-fuzz", prompt="still here", width=64, height=64, timeout=10)
            assert result.event.images and Path(result.event.images[0].path or "").is_file()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[tuple[asyncio.Runner, Harness]]:
    with asyncio.Runner() as runner:
        harness = runner.run(Harness.start(tmp_path))
        try:
            yield runner, harness
        finally:
            runner.run(harness.close())


def fits_a_socket(frames: list[bytes]) -> bool:
    # libzmq refuses an empty message and drops (with a disconnect) one over MAXMSGSIZE.
    return bool(frames) and sum(map(len, frames)) < 2 * LIMIT - 64


def test_hostile_messages_never_escape_the_receive_path(harness):
    runner, h = harness

    @FUZZ
    @given(frames=any_message, through_socket=st.integers(0, 3))
    # Each fate at least once, whatever hypothesis draws: the final assertion cannot be vacuous.
    @example(
        frames=[b"RenderRequest", b'{"request_id": "ok-1", "prompt": "p", "width": 64, "height": 64}'], through_socket=0
    )
    @example(frames=[b'StatusRequest {"request_id": "st-1"}'], through_socket=1)
    @example(frames=[b"CancelRequest", b'{"request_id": "nobody"}'], through_socket=1)
    @example(frames=[b"\x00\xff"], through_socket=1)
    @example(
        frames=[b"RenderRequest", b'{"request_id": "x", "prompt": "p", "metadata": ' + b"[" * 5000], through_socket=0
    )
    @example(
        frames=[b'{"type": "RenderRequest", "request_id": "d", "prompt": "p", "metadata": {"k": ' + deep(300) + b"}}"],
        through_socket=1,
    )
    def check(frames: list[bytes], through_socket: int) -> None:
        # One message in four goes through real sockets (the rest straight to the handler).
        runner.run(h.feed(frames, over_socket=through_socket == 0 and fits_a_socket(frames)))

    check()
    runner.run(h.still_serves())
    # Every fate was met (the explicit examples make sure of it).
    assert {"undecodable", "rejected", "status", "cancel", "rendered:ImageReady"} <= set(h.fates), h.fates
    assert h.service.counters["internal_errors"] == 0


def test_random_json_objects_never_escape_the_receive_path(harness):
    runner, h = harness

    @FUZZ
    @given(frames=json_objects(), through_socket=st.integers(0, 3))
    def check(frames: list[bytes], through_socket: int) -> None:
        runner.run(h.feed(frames, over_socket=through_socket == 0 and fits_a_socket(frames)))

    check()
    runner.run(h.still_serves())
    assert {"undecodable", "rejected"} <= set(h.fates), h.fates


async def test_messages_far_over_the_limit_never_reach_the_service(service_factory, raw_peer):
    """libzmq drops (with a disconnect) what is over twice the limit, before buffering it; what is
    between the limit and twice it gets a RenderError."""
    async with service_factory(limits={"max_message_bytes": 4096}) as service:
        peer = await raw_peer(service)
        huge = {"type": "RenderRequest", "request_id": "huge", "prompt": "p", "pad": "x" * 9000}
        await peer.send([b"RenderRequest", json.dumps(huge).encode()])
        await peer.ready()  # probes until one is answered: the PUB reconnects after the disconnect
        assert service.counters["rejected"] == 0  # the huge one was never handled
        big = {**huge, "request_id": "big", "pad": "x" * 5000}
        await peer.send([b"RenderRequest", json.dumps(big).encode()])
        error = await peer.next_event(lambda m: isinstance(m, RenderError) and m.request_id == "big")
        assert "exceeds the limit of 4096" in error.message.message


# -- file:// references: never a byte from outside the root --------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Any]:
    """An allowed root holding decoys, secrets (valid PNGs, so a leak would decode) around it,
    and symlinks from inside the root to outside, back into it, and in loops."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "root-evil").mkdir()  # shares the root's prefix
    inside = {root / "decoy.png": (0, 200, 0), root / "sub" / "img.png": (0, 0, 200)}
    outside = {
        tmp_path / "secret.png": (200, 0, 0),
        tmp_path / "outside" / "secret.png": (201, 0, 0),
        tmp_path / "root-evil" / "secret.png": (202, 0, 0),
    }
    for path, color in {**inside, **outside}.items():
        path.write_bytes(tiny_png(color))
    (root / "link_out").symlink_to(tmp_path / "secret.png")
    (root / "rel_out").symlink_to(Path("..") / "secret.png")
    (root / "dirlink").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "sub" / "up").symlink_to(Path(".."), target_is_directory=True)
    (root / "sub" / "upup").symlink_to(Path("..") / "..", target_is_directory=True)
    (root / "sub" / "img_link").symlink_to(Path("..") / "decoy.png")
    anchors = {
        "ROOT": str(root),
        "ROOT_SUB": str(root / "sub"),
        "TMP": str(tmp_path),
        "OUTSIDE": str(tmp_path / "outside"),
        "EVIL": str(tmp_path / "root-evil"),
        "SLASH": "",
        "RELATIVE": None,
    }
    return {
        "root": root,
        "anchors": anchors,
        "inside": {path.read_bytes() for path in inside},
        "outside": {path.read_bytes() for path in outside},
    }


PATH_PARTS = st.sampled_from(
    [".."]
    + [".", "", "%2e%2e", "%2E%2e", ".%2e", "%2e", "%2f", "..%2f..", "%2e%2e%2f", "%252e%252e", "%c0%ae%c0%ae"]
    + ["..\\..", "%5c", "%00", "\x00", "%ff", "[", "]", "~", "//", " ", "\n"]
    + ["sub", "decoy.png", "img.png", "secret.png", "link_out", "rel_out", "dirlink", "up", "upup", "img_link"]
    + ["root", "root-evil", "outside"]
) | st.text(st.characters(codec="utf-8"), max_size=6)
URI_FORMS = ["file://", "file:", "file://localhost", "FILE://", "quoted", "all-quoted", "twice-quoted", "query"]


def file_uri(anchor: str | None, parts: list[str], form: str) -> str:
    path = "/".join(parts) if anchor is None else anchor + "/" + "/".join(parts)
    if form == "quoted":
        return "file://" + quote(path, safe="/")
    if form == "all-quoted":
        return "file://" + quote(path, safe="")
    if form == "twice-quoted":
        return "file://" + quote(quote(path, safe="/"), safe="/")
    if form == "query":
        return "file://" + path + "?x=1#frag"
    return form + path


def test_file_references_never_leave_the_root(tree):
    config = ReferencesConfig(allowed_roots=[tree["root"]])
    served: list[str] = []

    @FUZZ
    @given(
        anchor=st.sampled_from(sorted(tree["anchors"])),
        parts=st.lists(PATH_PARTS, min_size=1, max_size=6),
        form=st.sampled_from(URI_FORMS),
    )
    @example(anchor="ROOT", parts=["decoy.png"], form="file://")  # the oracle is not vacuous
    @example(anchor="ROOT", parts=["sub", "img.png"], form="quoted")
    @example(anchor="ROOT", parts=["..", "secret.png"], form="file://")
    @example(anchor="ROOT", parts=["dirlink", "secret.png"], form="file://")
    @example(anchor="EVIL", parts=["secret.png"], form="file:")
    @example(anchor="RELATIVE", parts=["[", "x"], form="file://")
    def check(anchor: str, parts: list[str], form: str) -> None:
        uri = file_uri(tree["anchors"][anchor], parts, form)
        try:
            reference = asyncio.run(normalize_reference(ImageSource(uri=uri), config))
        except ReferenceImageError:
            return
        assert reference.data in tree["inside"], f"{uri!r} read a file from outside the root"
        served.append(uri)

    check()
    assert served  # the explicit examples inside the root were read


# -- http(s):// references: never a request to a refused address ---------------------------------

REDIRECTOR = "93.184.216.34"  # a public address, only ever "reached" through httpx.MockTransport
PRIVATE_V4 = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "198.18.0.0/15",
]
PRIVATE_V6 = ["::1/128", "::/128", "fc00::/7", "fe80::/10", "ff00::/8", "fec0::/10"]


def spellings(address: int) -> list[str]:
    """What inet_aton (and so getaddrinfo) reads as ``address``: decimal, hex, octal, short forms."""
    a, b, c, d = address.to_bytes(4, "big")
    return [
        f"{a}.{b}.{c}.{d}",
        str(address),
        hex(address),
        f"0X{address:08X}",
        f"0{address:o}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        ".".join(hex(part) for part in (a, b, c, d)),
        ".".join(f"0{part:o}" for part in (a, b, c, d)),
        f"{a:#x}.{b}.0{c:o}.{d}",
    ]


v4_hosts = st.builds(
    lambda address, index: spellings(int(address))[index],
    st.one_of(*(st.ip_addresses(network=net) for net in PRIVATE_V4)),
    st.integers(0, 9),
)
v4_mapped = st.one_of(*(st.ip_addresses(network=net) for net in PRIVATE_V4)).flatmap(
    lambda v4: (
        st.sampled_from([f"[::ffff:{v4}]", f"[::ffff:{int(v4) >> 16:x}:{int(v4) & 0xFFFF:x}]", f"[::{v4}]"])
        | st.just(f"[2002:{int(v4) >> 16:x}:{int(v4) & 0xFFFF:x}::1]")
    )
)
v6_hosts = st.one_of(*(st.ip_addresses(v=6, network=net) for net in PRIVATE_V6)).map(lambda a: f"[{a}]")
# Only names /etc/hosts answers: a name that goes to DNS can take seconds where DNS is slow
# or absent, and reaches outside the machine. Numeric spellings never leave getaddrinfo.
named_hosts = st.sampled_from(
    ["localhost", "LOCALHOST", "LocalHost", "0", "[0:0:0:0:0:0:0:1]", "[fe80::1%25eth0]", "[64:ff9b::7f00:1]"]
)
refused_urls = st.builds(
    "{}://{}{}{}{}".format,
    st.sampled_from(["http", "https", "HTTP"]),
    st.sampled_from(["", "user@", "user:pass@", f"{REDIRECTOR}@", "a%40b@"]),
    st.one_of(v4_hosts, v4_mapped, v6_hosts, named_hosts),
    st.sampled_from(["", ":80", ":8080", ":443", ":65535"]),
    st.sampled_from(["/", "/a.png", "/latest/meta-data/", "/x?y=1", "/%2e%2e/"]),
)


def test_http_references_never_reach_a_refused_address():
    config = ReferencesConfig(allow_private_addresses=False, http_timeout_s=2.0)
    seen: list[httpx.Request] = []
    hop: dict[str, str] = {}

    def transport(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == REDIRECTOR and "to" in hop:
            return httpx.Response(302, headers={"Location": hop["to"]})
        return httpx.Response(404)

    async def fetch(uri: str) -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(transport)) as client:
            await normalize_reference(ImageSource(uri=uri), config, client=client)

    @FUZZ
    @given(url=refused_urls, redirect=st.sampled_from(["none", "absolute", "scheme-relative"]))
    @example(url="http://127.1/", redirect="none")
    @example(url="http://169.254.169.254/latest/meta-data/", redirect="absolute")
    def check(url: str, redirect: str) -> None:
        seen.clear()
        hop.clear()
        start = url
        if redirect != "none":
            start = f"http://{REDIRECTOR}/hop"
            hop["to"] = url if redirect == "absolute" else "//" + url.split("://", 1)[1]
        with pytest.raises(ReferenceImageError):
            asyncio.run(fetch(start))
        reached = [str(request.url) for request in seen if request.url.host != REDIRECTOR]
        assert not reached, f"{url!r} reached {reached}"
        assert len(seen) == (0 if redirect == "none" else 1)

    check()
