"""The transport floor: a zmq.asyncio process that answers each message with N small events.

Same socket kinds as the service (SUB in, XPUB out) and about the same event size, but no
validation, journal, threads or storage, so ``bench_overhead`` can tell the cost of ZeroMQ
and process wake-ups on this machine from the service's own work.

    python benchmarks/echo_server.py REQUESTS_ENDPOINT EVENTS_ENDPOINT REPLIES
"""

from __future__ import annotations

import asyncio
import sys

import zmq
import zmq.asyncio

EVENT = b'{"type":"RenderProgress","request_id":"echo","stage":"started","service_id":"echo","seq":1}' * 3


async def serve(requests_endpoint: str, events_endpoint: str, replies: int) -> None:
    context = zmq.asyncio.Context()
    inbound = context.socket(zmq.SUB)
    inbound.setsockopt(zmq.SUBSCRIBE, b"")
    inbound.bind(requests_endpoint)
    outbound = context.socket(zmq.XPUB)
    outbound.bind(events_endpoint)

    async def greet() -> None:
        # Answer each subscription with a frame so the client knows its SUB is connected.
        while True:
            await outbound.recv()
            await outbound.send_multipart([b"Heartbeat", b"{}"])

    greeter = asyncio.create_task(greet())
    try:
        while True:
            frames = await inbound.recv_multipart()
            if frames[0] == b"stop":
                return
            for _ in range(replies):
                await outbound.send_multipart([b"Echo", EVENT])
    finally:
        greeter.cancel()
        context.destroy(linger=0)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], int(sys.argv[3])))
