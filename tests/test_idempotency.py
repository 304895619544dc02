"""request_id as the idempotency key: repeats before, during and after completion, and
across a restart on the same state directory (finished entries answered from the journal,
unfinished ones resumed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from image_server.errors import ContentPolicy
from image_server.generators.base import GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator
from image_server.journal import JOURNAL_FILE, Journal, recent_entries
from schemas import ImageReady, RenderAccepted, RenderError, RenderRequest
from tests.test_cancel_priority import EventLog, Script, until


def same_content(first: Any, second: Any) -> bool:
    """Equal events apart from ``seq`` (every publication gets the next one)."""
    return bool(first.model_dump(exclude={"seq"}) == second.model_dump(exclude={"seq"}))


async def test_repeats_before_acceptance_render_once(service_factory, raw_peer):
    script = Script()
    async with service_factory(factory=script.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            request = RenderRequest(request_id="burst-1", prompt="p", width=64, height=64)
            for _ in range(5):  # back to back: most arrive before the first is even journaled
                await log.send(request)
            assert isinstance(await log.terminal("burst-1"), ImageReady)
            await log.flush()
    assert script.started == ["burst-1"]
    assert log.terminal_counts() == {"burst-1": 1}
    assert 1 <= len(log.of("burst-1", RenderAccepted)) <= 5


async def test_repeat_in_flight_only_gets_render_accepted_again(service_factory, raw_peer):
    script = Script()
    async with service_factory(factory=script.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("busy-1", "hold")
            await until(lambda: script.started == ["busy-1"])
            await log.render("busy-1", "hold")
            await log.render("busy-1", "a different prompt is still the same request")
            await log.wait_for(lambda _: len(log.of("busy-1", RenderAccepted)) == 3)
            assert log.of("busy-1", (ImageReady, RenderError)) == []
            script.release.set()
            ready = await log.terminal("busy-1")
            await log.flush()
    assert isinstance(ready, ImageReady) and ready.prompt == "hold"
    assert script.started == ["busy-1"]
    accepted = log.of("busy-1", RenderAccepted)
    assert len({event.seq for event in accepted}) == 3 and {event.generator for event in accepted} == {"mock"}
    assert log.terminal_counts() == {"busy-1": 1}


async def test_repeat_after_completion_republishes_the_stored_event_with_its_frames(service_factory, raw_peer):
    script = Script()
    async with service_factory(factory=script.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("done-1", delivery="frames", num_images=2, metadata={"scene": 3})
            first = await log.terminal("done-1")
            first_blobs = log.blobs[log.events.index(first)]
            await log.render("done-1", delivery="frames", num_images=2, metadata={"scene": 3})
            await log.wait_for(lambda _: log.terminal_counts()["done-1"] == 2)
            second = log.of("done-1", ImageReady)[1]
            second_blobs = log.blobs[log.events.index(second)]
            await log.flush()
    assert isinstance(first, ImageReady) and [image.frame for image in first.images] == [0, 1]
    assert same_content(first, second) and second.seq > first.seq
    assert len(first_blobs) == 2 and second_blobs == first_blobs
    assert script.started == ["done-1"]  # answered from the journal, not rendered again
    assert service.counters["repeated"] == 1 and service.counters["completed"] == 1
    # A repeat is answered without a new RenderAccepted: the request was accepted once.
    assert len(log.of("done-1", RenderAccepted)) == 1


async def test_repeat_of_a_failed_request_gets_the_same_error(service_factory, raw_peer):
    calls: list[str] = []

    def refuse(job: RenderJob) -> None:
        calls.append(job.request.request_id)
        raise ContentPolicy("refused by the provider's policy", generator="mock")

    def factory(name: str, config: GeneratorConfig) -> MockGenerator:
        return MockGenerator(config, name=name, handler=refuse)

    async with service_factory(factory=factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("bad-1")
            first = await log.terminal("bad-1")
            await log.render("bad-1")
            await log.wait_for(lambda _: log.terminal_counts()["bad-1"] == 2)
    second = log.of("bad-1", RenderError)[1]
    assert isinstance(first, RenderError) and first.code == "content_policy" and same_content(first, second)
    assert calls == ["bad-1"]


async def test_restart_answers_finished_requests_from_the_journal(service_factory, raw_peer):
    async with service_factory() as first_service:
        async with EventLog(await raw_peer(first_service)) as log:
            await log.render("kept-1", delivery="frames", seed=11)
            await log.render("kept-2", delivery="file")
            before = {rid: await log.terminal(rid) for rid in ("kept-1", "kept-2")}
            frames_before = log.blobs[log.events.index(before["kept-1"])]

    script = Script()
    async with service_factory(factory=script.factory) as second_service:
        async with EventLog(await raw_peer(second_service)) as log:
            for rid in ("kept-1", "kept-2"):
                await log.render(rid, delivery="frames" if rid == "kept-1" else "file", seed=11)
            after = {rid: await log.terminal(rid) for rid in ("kept-1", "kept-2")}
            frames_after = log.blobs[log.events.index(after["kept-1"])]
            await log.flush()
    assert script.started == []  # nothing was rendered again
    for rid in ("kept-1", "kept-2"):
        assert isinstance(after[rid], ImageReady) and same_content(before[rid], after[rid])
    assert frames_after == frames_before and len(frames_after) == 1
    assert Path(after["kept-2"].images[0].path or "").is_file()
    assert second_service.counters["repeated"] == 2 and second_service.counters["accepted"] == 0


async def test_unfinished_journal_entries_are_resumed_on_start(service_factory, raw_peer, tmp_path):
    state_dir = tmp_path / "state"
    async with Journal(state_dir) as journal:
        for rid, prompt in (("resume-1", "hold"), ("resume-2", "p")):
            request = RenderRequest(request_id=rid, prompt=prompt, width=64, height=64, metadata={"was": rid})
            await journal.admit(rid, "mock", request.model_dump_json())
        gone = RenderRequest(request_id="resume-gone", prompt="p", generator="removed")
        await journal.admit("resume-gone", "removed", gone.model_dump_json())

    script = Script()
    async with service_factory(factory=script.factory) as service:
        # The resumed renders started before any subscriber could join: resume-1 holds in
        # the generator until this peer is listening, so its ImageReady can be seen.
        async with EventLog(await raw_peer(service)) as log:
            await until(lambda: "resume-1" in script.started)
            await log.render("resume-1", "hold")  # a client re-sending meanwhile: acceptance only
            accepted = await log.wait_for(lambda m: isinstance(m, RenderAccepted) and m.request_id == "resume-1")
            script.release.set()
            ready = await log.terminal("resume-1")
            await log.render("resume-2")  # finished before we joined: the stored event
            second = await log.terminal("resume-2")
            await log.render("resume-gone", generator="mock")
            gone_event = await log.terminal("resume-gone")
            await log.flush()
    assert accepted.generator == "mock"
    assert isinstance(ready, ImageReady) and ready.metadata == {"was": "resume-1"}
    assert isinstance(second, ImageReady) and second.metadata == {"was": "resume-2"}
    # A resumed request whose generator left the config ends with an error, not in limbo.
    assert isinstance(gone_event, RenderError) and gone_event.code == "unknown_generator"
    assert sorted(script.started) == ["resume-1", "resume-2"]
    assert service.counters["resumed"] == 2
    # resume-2 may also have finished after the peer joined: then its original and the
    # journal's answer both arrive, with the same content.
    assert log.terminal_counts()["resume-1"] == 1 and log.terminal_counts()["resume-gone"] == 1
    assert all(same_content(second, event) for event in log.of("resume-2", (ImageReady, RenderError)))
    entries = {entry.request_id: entry for entry in recent_entries(state_dir)}
    assert {rid: entries[rid].outcome for rid in entries} == {
        "resume-1": "ImageReady",
        "resume-2": "ImageReady",
        "resume-gone": "RenderError",
    }


async def test_without_the_journal_a_repeat_renders_again(service_factory, raw_peer, tmp_path):
    script = Script()
    async with service_factory(factory=script.factory, journal={"enabled": False}) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("nj-1")
            await log.terminal("nj-1")
            await log.render("nj-1")
            await log.wait_for(lambda _: log.terminal_counts()["nj-1"] == 2)
    assert script.started == ["nj-1", "nj-1"] and service.journal is None
    assert not (tmp_path / "state" / JOURNAL_FILE).exists()


async def test_resumed_requests_on_one_channel_keep_only_the_newest(service_factory, tmp_path):
    """Two unfinished entries for one display slot: on start the older is superseded (with
    a recorded terminal event, so it is not resumed forever) and the newer is rendered."""
    state_dir = tmp_path / "state"
    async with Journal(state_dir) as journal:
        for rid in ("slot-old", "slot-new"):
            request = RenderRequest(request_id=rid, prompt="p", width=64, height=64, channel="wall")
            await journal.admit(rid, "mock", request.model_dump_json())
    script = Script()
    async with service_factory(factory=script.factory) as service:
        await until(lambda: not service.active)
    assert script.started == ["slot-new"]
    entries = {entry.request_id: entry for entry in recent_entries(state_dir)}
    assert (entries["slot-old"].outcome, entries["slot-old"].code) == ("RenderError", "superseded")
    assert entries["slot-new"].outcome == "ImageReady"
    async with Journal(state_dir) as journal:
        assert await journal.unfinished() == []


async def test_a_resumed_result_waits_until_its_client_subscribes_again(service_factory, context, tmp_path):
    """A raw client that subscribes only after the restart (and never re-sends) still hears it."""
    import asyncio

    import zmq

    from schemas import decode_frames

    async with Journal(tmp_path / "state") as journal:
        request = RenderRequest(request_id="late-1", prompt="p", width=64, height=64, reply_to="late")
        await journal.admit("late-1", "mock", request.model_dump_json())
    async with service_factory(journal={"resume_grace_s": 30}) as service:
        await asyncio.sleep(0.3)  # the render (a few ms) is long done: its result is held back
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"ImageReady/late")
        sub.connect(service.endpoints["events"])
        try:
            async with asyncio.timeout(5):
                ready = decode_frames(await sub.recv_multipart()).message
        finally:
            sub.close(0)
    assert isinstance(ready, ImageReady) and ready.request_id == "late-1"
    assert service.counters["resumed"] == 1
