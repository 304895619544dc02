"""One terminal event per request id against forgery, and requests scoped to their sender.

A hostile peer on the requests socket knows (or guesses) another client's request ids and
reply_to. It must not be able to end, cancel, clear or supersede that client's requests,
nor make the service publish a second terminal event for them. With CURVE, identity is the
authenticated key, so even a copied reply_to gets nowhere.
"""

from __future__ import annotations

import asyncio

from image_server.client import RenderClient
from schemas import (
    CancelRequest,
    ImageReady,
    RenderAccepted,
    RenderError,
    RenderRequest,
    RequestConflict,
)
from tests.test_cancel_priority import EventLog, Script, saturated, until
from tests.test_security import curve_overrides, keys  # noqa: F401  (fixture)


async def test_a_forged_invalid_message_naming_a_request_in_flight_gets_no_terminal_event(service_factory, raw_peer):
    script = Script()
    async with service_factory(factory=script.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("victim-1", "hold", reply_to="victim")
            await log.wait_for(lambda m: isinstance(m, RenderAccepted) and m.request_id == "victim-1")
            # Fails validation, names the victim's id and reply_to: formerly a RenderError for it.
            await log.peer.send(
                [b"RenderRequest", b'{"request_id": "victim-1", "reply_to": "victim", "prompt": "", "width": -1}']
            )
            # A valid request with the same id from someone else: refused, not merged.
            await log.render("victim-1", "mine now", reply_to="forger")
            await log.wait_for(lambda m: isinstance(m, RequestConflict) and m.request_id == "victim-1")
            script.release.set()
            ready = await log.terminal("victim-1")
            await log.flush()
    assert isinstance(ready, ImageReady) and ready.prompt == "hold"
    assert log.terminal_counts()["victim-1"] == 1, log.of("victim-1")
    assert len(log.of("victim-1", RequestConflict)) == 2
    assert service.counters["conflicts"] == 2


async def test_a_forged_message_naming_a_finished_request_gets_no_second_terminal_event(service_factory, raw_peer):
    async with service_factory() as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("done-1", reply_to="victim")
            assert isinstance(await log.terminal("done-1"), ImageReady)
            await log.peer.send([b"RenderRequest", b'{"request_id": "done-1", "reply_to": "victim", "prompt": ""}'])
            await log.render("done-1", reply_to="forger")  # valid, but another client's id
            await log.wait_for(lambda _: len(log.of("done-1", RequestConflict)) == 2)
            await log.render("done-1", reply_to="victim")  # its own client's repeat: the stored event
            await log.wait_for(lambda _: log.terminal_counts()["done-1"] == 2)
            await log.flush()
    first, again = log.of("done-1", ImageReady)
    assert first.model_dump(exclude={"seq"}) == again.model_dump(exclude={"seq"})
    assert log.of("done-1", RenderError) == []


async def test_cancel_clear_queue_and_channel_act_only_on_the_senders_own_requests(service_factory, raw_peer):
    script = Script()
    async with service_factory(factory=script.factory, **saturated()) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("a-run", "hold", reply_to="alice", channel="screen")
            await until(lambda: script.started == ["a-run"])
            for index in range(3):
                await log.render(f"a-q{index}", reply_to="alice", channel=f"slot{index}")
            await log.wait_for(lambda _: len(log.of("a-q2", RenderAccepted)) == 1)
            # Bob cancels, clears the queue and takes "screen": none of it touches Alice's requests.
            await log.send(CancelRequest(request_id="a-q0", reply_to="bob"))
            await log.send(
                RenderRequest(request_id="b-1", prompt="p", reply_to="bob", clear_queue=True, channel="screen")
            )
            await log.wait_for(lambda m: isinstance(m, RenderAccepted) and m.request_id == "b-1")
            # Alice's own cancel works.
            await log.send(CancelRequest(request_id="a-q1", reply_to="alice"))
            cancelled = await log.terminal("a-q1")
            script.release.set()
            ends = {rid: await log.terminal(rid) for rid in ("a-run", "a-q0", "a-q2", "b-1")}
            await log.flush()
    assert isinstance(cancelled, RenderError) and cancelled.code == "cancelled"
    assert all(isinstance(event, ImageReady) for event in ends.values()), ends
    assert set(log.terminal_counts().values()) == {1}
    assert service.counters["foreign_cancels"] == 1


async def test_with_curve_a_copied_reply_to_does_not_make_another_key_the_owner(
    service_factory,
    context,
    keys,  # noqa: F811
):
    from image_server.security import generate_keypair, load_keypair

    other_public, other_secret = generate_keypair(keys["authorized"].parent / "clients", "other")
    (keys["authorized"] / "other.key").write_bytes(other_public.read_bytes())
    other = load_keypair(other_secret)
    generators = {"mock": {"strategy": "mock", "delay_s": 1.0}}

    def client(pair):
        return RenderClient(
            service.endpoints["requests"],
            service.endpoints["events"],
            context=context,
            client_id="shared-name",  # both claim the same reply_to
            curve_keys=pair,
            curve_server_key=keys["server_public"],
        )

    async with service_factory(generators=generators, **curve_overrides(keys)) as service:
        async with client(keys["allowed"]) as owner, client(other) as intruder:
            await owner.wait_ready(5)
            await intruder.wait_ready(5)
            render = asyncio.create_task(owner.render(request_id="curve-1", prompt="p", width=64, height=64))
            await until(lambda: "curve-1" in service.active)
            assert service.active["curve-1"].ticket.owner.startswith("curve:")  # the ZAP user id
            await intruder.cancel("curve-1")
            async with asyncio.timeout(5):
                while service.counters["foreign_cancels"] == 0:
                    await asyncio.sleep(0.01)
            result = await render
            assert result.event.request_id == "curve-1"
            held = service.active.get("curve-1")
            assert held is None
    assert service.counters["foreign_cancels"] == 1
