"""Soak: 100,000 random and mutated frames at a live service, then is it still well?

Not a timed test. The service runs as its own process (``python -m image_server serve``,
mock generator, message limit 64 KiB). From here a bare PUB sends a mix of garbage frames,
random JSON, mutated RenderRequests with random request ids, oversized messages (some past
twice the limit, which libzmq drops with a disconnect) and a few valid requests. Every
``--batch`` messages a StatusRequest is sent and its answer awaited: the receive loop handles
messages in order, so this paces the sender to the service without a fixed rate, and no
high-water mark overflows. Afterwards the service must answer a StatusRequest and render a
real request; its resident memory (VmRSS, and the peak VmHWM) is read before and after.

    uv run python benchmarks/soak.py                        # 100,000 messages, a few minutes
    uv run python benchmarks/soak.py --messages 20000 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from harness import ServiceProcess, machine, running_service

from image_server.client import RenderClient
from schemas import RenderError, ServiceStatus, StatusRequest, decode_frames, encode_message

LIMIT = 64 * 1024  # limits.max_message_bytes of the soaked service; libzmq drops past twice this
GENERATORS = {"mock": {"strategy": "mock", "concurrency": 4}}
# Share of each kind of message, in percent.
MIX = {"garbage": 35, "json": 25, "mutated": 30, "oversized": 3, "valid": 5, "status": 2}
FIELDS = ["type", "request_id", "prompt", "width", "height", "seed", "steps", "num_images", "delivery"]
FIELDS += ["output_format", "reply_to", "channel", "metadata", "generator", "generator_config", "priority"]
FIELDS += ["reference_image", "timeout_s", "clear_queue", "fallbacks", "loras", "project"]
TOPICS = [b"RenderRequest", b"StatusRequest", b"CancelRequest", b"ImageReady", b"Heartbeat", b"", b"Render"]


def random_id(rng: random.Random) -> str:
    return f"soak-{rng.getrandbits(48):012x}"


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 64, 4097, 2**63, 10**30, rng.randint(-(2**40), 2**40)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e308, 1e-320, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF)])) for _ in range(8))
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def garbage(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.choice([0, 1, 7, 64, 256, 1024])) for _ in range(rng.randint(1, 4))]


def random_json(rng: random.Random) -> list[bytes]:
    data = {rng.choice(FIELDS): random_value(rng) for _ in range(rng.randrange(6))}
    if rng.random() < 0.5:
        data["request_id"] = random_id(rng)
    body = json.dumps(data).encode()
    topic = rng.choice(TOPICS)
    return rng.choice([[topic, body], [body], [topic + b" " + body]])


def valid(rng: random.Random) -> dict[str, Any]:
    return {
        "type": "RenderRequest",
        "request_id": random_id(rng),
        "prompt": "soak " + str(rng.random()),
        "width": 64,
        "height": 64,
        "delivery": rng.choice(["file", "inline", "frames"]),
        "output_format": rng.choice(["png", "jpeg", "webp"]),
        "metadata": {"n": rng.randrange(1000)},
    }


def mutated(rng: random.Random) -> list[bytes]:
    """A valid request broken one way (so nearly all are refused, with a readable request id)."""
    data = valid(rng)
    how = rng.choice(["truncate", "flip", "wrong_type", "huge", "drop", "nested", "topic", "extra", "bad_utf8"])
    if how == "wrong_type":
        data[rng.choice(FIELDS[1:])] = random_value(rng)
    elif how == "huge":
        data[rng.choice(["width", "height", "seed", "steps", "num_images", "priority"])] = rng.choice(
            [10**30, -1, 5000]
        )
    elif how == "drop":
        del data[rng.choice(["request_id", "prompt"])]
    body = json.dumps(data).encode()
    if how == "truncate":
        body = body[: rng.randrange(len(body))]
    elif how == "flip":
        at = rng.randrange(len(body))
        body = body[:at] + bytes([rng.randrange(256)]) + body[at + 1 :]
    elif how == "nested":
        depth = rng.choice([65, 300, 3000])
        body = body[:-1] + b', "metadata": {"deep": ' + b"[" * depth + b"]" * depth + b"}}"
    elif how == "bad_utf8":
        body = body.replace(b"soak ", b"soak \xff\xfe ")
    if how == "topic":
        return [rng.choice(TOPICS[3:]) + rng.randbytes(rng.randrange(3)), body]
    frames = [b"RenderRequest", body]
    if how == "extra":
        frames += garbage(rng)
    return frames


def oversized(rng: random.Random) -> tuple[list[bytes], bool]:
    """(frames, dropped by libzmq): between the limit and twice it gets a RenderError."""
    past_libzmq = rng.random() < 1 / 3
    size = rng.randrange(2 * LIMIT + 1, 3 * LIMIT) if past_libzmq else rng.randrange(LIMIT + 1, 2 * LIMIT - 1024)
    body = json.dumps({**valid(rng), "pad": "x" * size}).encode()
    return [b"RenderRequest", body], past_libzmq


def make_message(
    rng: random.Random, kinds: list[str], weights: list[int], tally: Counter[str]
) -> tuple[list[bytes], bool]:
    """(frames, whether libzmq will drop it with a disconnect)."""
    kind = rng.choices(kinds, weights)[0]
    tally[kind] += 1
    if kind == "garbage":
        return garbage(rng), False
    if kind == "json":
        return random_json(rng), False
    if kind == "mutated":
        return mutated(rng), False
    if kind == "oversized":
        frames, dropped = oversized(rng)
        tally["oversized_past_libzmq"] += dropped
        return frames, dropped
    if kind == "valid":
        return [b"RenderRequest", json.dumps(valid(rng)).encode()], False
    return encode_message(StatusRequest(request_id=random_id(rng))), False


class Prober:
    """StatusRequests with reply_to ``soak``, whose ServiceStatus answers only we subscribe to."""

    def __init__(self, context: zmq.asyncio.Context, service: ServiceProcess) -> None:
        self.pub = context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(service.requests)
        # Messages libzmq drops with a disconnect go on their own connection, so the ones
        # queued behind them on the main one are not lost while it reconnects.
        self.hostile = context.socket(zmq.PUB)
        self.hostile.setsockopt(zmq.LINGER, 0)
        self.hostile.connect(service.requests)
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"ServiceStatus/soak")
        self.sub.setsockopt(zmq.SUBSCRIBE, b"RenderError")  # tallied by code while waiting
        self.codes: Counter[str] = Counter()
        self.sub.connect(service.events)
        self.count = 0

    async def status(self, timeout_s: float = 30.0) -> ServiceStatus:
        """Send a probe until one is answered: a probe can be lost while the PUB reconnects
        (after libzmq dropped an oversized message) or before it has joined."""
        async with asyncio.timeout(timeout_s):
            while True:
                self.count += 1
                probe = f"probe-{self.count}"
                await self.pub.send_multipart(encode_message(StatusRequest(request_id=probe, reply_to="soak")))
                while await self.sub.poll(500):
                    message = decode_frames(await self.sub.recv_multipart()).message
                    if isinstance(message, RenderError):
                        self.codes[message.code] += 1
                    elif isinstance(message, ServiceStatus) and message.request_id == probe:
                        return message

    def close(self) -> None:
        self.pub.close(0)
        self.hostile.close(0)
        self.sub.close(0)


async def render_once(service: ServiceProcess, context: zmq.asyncio.Context, request_id: str) -> float:
    """One real render through RenderClient; its wall time in seconds."""
    async with RenderClient(service.requests, service.events, context=context) as client:
        started = time.perf_counter()
        result = await client.render(request_id=request_id, prompt="after the soak", width=64, height=64, timeout=30)
        assert Path(result.event.images[0].path or "").is_file()
        return time.perf_counter() - started


async def drained(prober: Prober, timeout_s: float) -> ServiceStatus:
    """The first status with nothing queued or rendering (renders the soak admitted are done)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await prober.status()
        if (status.queued == 0 and status.in_flight == 0) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.2)


def memory_kib(service: ServiceProcess) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{service.pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


async def soak(service: ServiceProcess, args: argparse.Namespace) -> dict[str, Any]:
    context = zmq.asyncio.Context()
    prober = Prober(context, service)
    try:
        await render_once(service, context, "before-the-soak")  # warm: the first render loads codecs
        await drained(prober, 30)
        before = memory_kib(service)
        rng = random.Random(args.seed)
        kinds, weights = list(MIX), list(MIX.values())
        tally: Counter[str] = Counter()
        started = time.perf_counter()
        sent = 0
        trace: list[tuple[int, float]] = []  # (messages sent, VmRSS MiB): a leak grows, a cache levels off
        while sent < args.messages and time.perf_counter() - started < args.max_seconds:
            if sent % args.sample_every < args.batch:
                trace.append((sent, round(memory_kib(service)["VmRSS"] / 1024, 1)))
            for _ in range(min(args.batch, args.messages - sent)):
                frames, dropped = make_message(rng, kinds, weights, tally)
                await (prober.hostile if dropped else prober.pub).send_multipart(frames)
                sent += 1
            await prober.status()  # paces the sender: everything before it has been handled
        soak_s = time.perf_counter() - started
        status = await drained(prober, 120)
        status_probes = prober.count
        await asyncio.sleep(args.settle_s)  # idle a moment before reading memory
        after = memory_kib(service)
        status_started = time.perf_counter()
        final_status = await prober.status(timeout_s=10)
        status_ms = (time.perf_counter() - status_started) * 1000
        render_ms = await render_once(service, context, "after-the-soak") * 1000
    finally:
        prober.close()
        context.destroy(linger=0)
    counters = status.counters
    # What the service should have handled: everything but the drops, plus the probes (the
    # final status probe excluded) and the warm-up render (-1 here if its client re-sent it).
    expected = sent - tally["oversized_past_libzmq"] + status_probes + 1
    return {
        "messages": sent,
        "kinds": dict(tally),
        "probes": status_probes,
        "not_received": expected - counters.get("received", 0),
        "soak_s": round(soak_s, 1),
        "messages_per_s": round(sent / soak_s),
        "counters": counters,
        "render_error_codes": dict(prober.codes),
        "rss_before_mib": round(before["VmRSS"] / 1024, 1),
        "rss_after_mib": round(after["VmRSS"] / 1024, 1),
        "rss_peak_mib": round(after["VmHWM"] / 1024, 1),
        "rss_trace_mib": trace,
        "status_after_ms": round(status_ms, 1),
        "counters_after": final_status.counters,
        "render_after_ms": round(render_ms, 1),
        "machine": machine(),
    }


def markdown(r: dict[str, Any]) -> str:
    c = r["counters"]
    header = (
        "| messages | s | msg/s | received | undecodable | rejected | accepted | completed | internal errors "
        "| RSS before MiB | RSS after MiB | peak MiB | StatusRequest after | render after |"
    )
    row = (
        f"| {r['messages']:,} | {r['soak_s']} | {r['messages_per_s']:,} | {c.get('received', 0):,} "
        f"| {c.get('undecodable', 0):,} | {c.get('rejected', 0):,} | {c.get('accepted', 0):,} "
        f"| {c.get('completed', 0):,} | {c.get('internal_errors', 0)} | {r['rss_before_mib']} | {r['rss_after_mib']} "
        f"| {r['rss_peak_mib']} | answered in {r['status_after_ms']} ms | ImageReady in {r['render_after_ms']} ms |"
    )
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1), row])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=200, help="messages between two paced StatusRequests")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    parser.add_argument("--settle-s", type=float, default=2.0, help="idle time before reading memory after")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sample-every", type=int, default=10_000, help="read VmRSS every this many messages")
    parser.add_argument("--log-level", default="info", help="the service's (it logs every refused message)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    limits = {"max_message_bytes": LIMIT}
    with running_service(GENERATORS, log_level=args.log_level, limits=limits) as service:
        results = asyncio.run(soak(service, args))
        log_lines = len(service.log)
    results["service_log_lines"] = log_lines
    print(json.dumps(results, indent=2))
    print()
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
