"""Lost events are detectable from seq: unit rules, a real PUB that drops, a monitor client."""

from __future__ import annotations

import asyncio

import zmq

from image_server.client import RenderClient
from image_server.sequence import SeqTracker
from schemas import StatusRequest, decode_frames, encode_message


def test_gaps_and_restarts():
    tracker = SeqTracker()
    assert [tracker.observe("a", seq) for seq in (5, 6, 9, 10)] == [0, 0, 2, 0]
    assert tracker.observe("b", 1) == 0  # services are tracked apart
    assert tracker.observe("a", 1) == 0 and tracker.restarts == 1  # a restart counts from 1 again
    assert tracker.missed == 2


async def test_events_dropped_at_the_high_water_mark_show_as_gaps(service_factory, raw_peer, context):
    sockets = {
        "requests": {"kind": "sub", "bind": "tcp://127.0.0.1:0"},
        "events": {"kind": "xpub", "bind": "tcp://127.0.0.1:0", "high_water_mark": 10},
    }
    async with service_factory(sockets=sockets) as service:
        peer = await raw_peer(service)
        slow = context.socket(zmq.SUB)
        slow.setsockopt(zmq.RCVHWM, 10)
        slow.setsockopt(zmq.SUBSCRIBE, b"ServiceStatus")
        slow.connect(service.endpoints["events"])
        try:
            async with asyncio.timeout(10):
                # PUB/SUB's slow joiner: ask again until the new subscription hears an answer.
                while True:
                    await peer.send(encode_message(StatusRequest(request_id="join")))
                    if await slow.poll(100):
                        await slow.recv_multipart()  # joined
                        break
            # Make the service publish far more than the two buffers hold, reading nothing; in
            # batches it takes in (its own receive queue would drop a flood too).
            baseline = service.counters["received"]
            async with asyncio.timeout(20):
                for batch in range(30):
                    for index in range(100):
                        await peer.send(encode_message(StatusRequest(request_id=f"s{batch}-{index}")))
                    while service.counters["received"] < baseline + 100 * (batch + 1):
                        await asyncio.sleep(0.005)
            tracker = SeqTracker()
            received = 0
            while await slow.poll(200):
                event = decode_frames(await slow.recv_multipart()).message
                tracker.observe(event.service_id, event.seq)
                received += 1
        finally:
            slow.close(0)
    assert received < 3000 and tracker.missed > 0


async def test_a_monitor_sees_every_event_and_counts_no_gap_when_none_is_lost(service_factory, client_for, context):
    async with service_factory() as service:
        async with (
            RenderClient(
                service.endpoints["requests"], service.endpoints["events"], context=context, monitor=True
            ) as monitor,
            client_for(service) as client,
        ):
            await monitor.wait_ready(5)
            seen: list[str] = []
            monitor.on_event = lambda event: seen.append(event.type)
            await client.render(request_id="watched", prompt="p", width=64, height=64)
            async with asyncio.timeout(5):
                while "ImageReady" not in seen:
                    await asyncio.sleep(0.01)
    assert "RenderAccepted" in seen  # another client's events reach the monitor
    assert monitor.sequence.missed == 0
