"""Journal: admission states, terminal records with blobs, resume list, pruning, group
commit on the writer thread, cancellation, WAL mode and the read-only reader."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from image_server.checkpoint import RESTART_WAL_BYTES
from image_server.journal import JOURNAL_FILE, Journal, Recording, connect, recent_entries
from schemas import RenderRequest
from tests.waiting import until


def request_json(request_id: str, **fields: object) -> str:
    return RenderRequest(request_id=request_id, prompt="p", **fields).model_dump_json()


async def test_admit_new_then_in_flight_then_finished_with_blobs(tmp_path: Path):
    async with Journal(tmp_path) as journal:
        first = await journal.admit("j-1", "mock", request_json("j-1", seed=7))
        assert first.state is Recording.NEW and first.blobs == []
        assert first.entry.generator == "mock" and first.entry.finished_at is None
        assert json.loads(first.entry.request_json)["seed"] == 7

        again = await journal.admit("j-1", "other", request_json("j-1", seed=8))
        assert again.state is Recording.IN_FLIGHT
        # The first recording wins: a repeat never rewrites what was accepted.
        assert again.entry.generator == "mock" and again.entry.accepted_at == first.entry.accepted_at
        assert json.loads(again.entry.request_json)["seed"] == 7

        await journal.finish("j-1", "ImageReady", None, '{"type": "ImageReady"}', [b"\x89PNG one", b"two"], 12.5)
        done = await journal.admit("j-1", "mock", request_json("j-1"))
    assert done.state is Recording.FINISHED
    assert done.blobs == [b"\x89PNG one", b"two"]
    assert done.entry.outcome == "ImageReady" and done.entry.terminal == '{"type": "ImageReady"}'
    assert done.entry.total_ms == 12.5 and done.entry.finished_at is not None
    assert done.entry.finished_at >= done.entry.accepted_at


async def test_unfinished_lists_only_open_entries_oldest_first_and_survives_reopening(tmp_path: Path):
    async with Journal(tmp_path) as journal:
        for rid in ("u-1", "u-2", "u-3", "u-4"):
            await journal.admit(rid, "mock", request_json(rid))
        await journal.finish("u-2", "RenderError", "cancelled", '{"type": "RenderError"}')
    async with Journal(tmp_path) as reopened:
        unfinished = await reopened.unfinished()
        finished = await reopened.admit("u-2", "mock", request_json("u-2"))
    assert [entry.request_id for entry in unfinished] == ["u-1", "u-3", "u-4"]
    assert finished.state is Recording.FINISHED and finished.entry.code == "cancelled"


def frame_rows(state_dir: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(state_dir / JOURNAL_FILE)
    try:
        return conn.execute("SELECT request_id, idx FROM request_frames ORDER BY request_id, idx").fetchall()
    finally:
        conn.close()


async def test_a_finish_drops_the_request_frames_also_after_a_restart(tmp_path: Path):
    async with Journal(tmp_path) as journal:
        await journal.admit("f-1", "mock", request_json("f-1"), [b"frame 0", b"frame 1"])
        await journal.admit("f-2", "mock", request_json("f-2"), [b"frame 0"])
        await journal.admit("plain", "mock", request_json("plain"))
        await journal.finish("f-1", "ImageReady", None, "{}")
        await journal.finish("plain", "ImageReady", None, "{}")
    assert frame_rows(tmp_path) == [("f-2", 0)]  # only the unfinished request's, to resume it
    async with Journal(tmp_path) as reopened:  # f-2 was admitted by the previous process
        await reopened.finish("f-2", "RenderError", "cancelled", "{}")
    assert frame_rows(tmp_path) == []


async def test_prune_drops_frames_a_finished_request_left_behind(tmp_path: Path):
    async with Journal(tmp_path) as journal:
        await journal.admit("left", "mock", request_json("left"))
        await journal.finish("left", "ImageReady", None, "{}")
        # As a finish whose transaction did not commit after its frames were forgotten leaves them.
        conn = sqlite3.connect(tmp_path / JOURNAL_FILE)
        conn.execute("INSERT INTO request_frames (request_id, idx, data) VALUES ('left', 0, x'00')")
        conn.commit()
        conn.close()
        await journal.admit("open", "mock", request_json("open"), [b"still needed"])
        await journal.prune()
    assert frame_rows(tmp_path) == [("open", 0)]


async def test_prune_removes_finished_entries_and_blobs_past_retention_only(tmp_path: Path):
    async with Journal(tmp_path, retention_s=100) as journal:
        for rid in ("old-1", "old-2", "open-1"):
            await journal.admit(rid, "mock", request_json(rid))
        for rid in ("old-1", "old-2"):
            await journal.finish(rid, "ImageReady", None, "{}", [b"blob-" + rid.encode()])
        now = time.time()
        assert await journal.prune(now=now + 50) == 0  # finished, but younger than the retention
        assert await journal.prune(now=now + 200) == 2
        assert await journal.prune(now=now + 200) == 0
        unfinished = await journal.unfinished()
        gone = await journal.admit("old-1", "mock", request_json("old-1"))
    # An unfinished entry is never pruned, however old: it is still owed a terminal event.
    assert [entry.request_id for entry in unfinished] == ["open-1"]
    assert gone.state is Recording.NEW  # pruned: a repeat is a new request again
    reader = connect(tmp_path / JOURNAL_FILE, readonly=True)
    try:
        assert reader.execute("SELECT count(*) FROM blobs").fetchone()[0] == 0
    finally:
        reader.close()


async def test_concurrent_admits_share_commits(tmp_path: Path):
    """Operations queued while the writer is busy go into one transaction (group commit).

    Another connection holds the write lock, so the writer is stuck in BEGIN while a burst
    of admits queues up behind it; once the lock goes, the burst commits in one batch."""
    count = 100
    async with Journal(tmp_path) as journal:
        await journal.admit("warm-up", "mock", request_json("warm-up"))
        await until(lambda: journal.known.loaded)  # the known-ids build at open has its own (empty) commit
        commits_before = journal.commits
        blocker = connect(journal.path)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            tasks = [asyncio.create_task(journal.admit(f"g-{i}", "mock", request_json(f"g-{i}"))) for i in range(count)]
            await asyncio.sleep(0)  # let every task put its operation on the writer's queue
            assert not any(task.done() for task in tasks)  # the writer is waiting for the lock
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        async with asyncio.timeout(10):
            results = await asyncio.gather(*tasks)
        commits = journal.commits - commits_before
        unfinished = await journal.unfinished()
    assert all(result.state is Recording.NEW for result in results)
    assert len(unfinished) == count + 1
    # The first op may have been taken alone before the burst; the rest share one commit.
    assert 1 <= commits <= 2, commits


async def test_many_concurrent_admits_commit_fewer_times_than_operations(tmp_path: Path):
    count = 300
    async with Journal(tmp_path) as journal:
        before = journal.commits
        async with asyncio.timeout(10):
            await asyncio.gather(*(journal.admit(f"c-{i}", "mock", request_json(f"c-{i}")) for i in range(count)))
        commits = journal.commits - before
    assert 1 <= commits < count, commits


async def test_a_cancelled_caller_does_not_break_the_writer(tmp_path: Path):
    async with Journal(tmp_path) as journal:
        blocker = connect(journal.path)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            first = asyncio.create_task(journal.admit("x-1", "mock", request_json("x-1")))
            cancelled = asyncio.create_task(journal.admit("x-2", "mock", request_json("x-2")))
            third = asyncio.create_task(journal.admit("x-3", "mock", request_json("x-3")))
            await asyncio.sleep(0)  # all three queued behind the lock
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        async with asyncio.timeout(10):
            assert (await first).state is Recording.NEW
            assert (await third).state is Recording.NEW
            later = await journal.admit("x-4", "mock", request_json("x-4"))
            listed = [entry.request_id for entry in await journal.unfinished()]
    assert later.state is Recording.NEW
    assert "x-1" in listed and "x-3" in listed and "x-4" in listed
    # x-2 was either skipped (cancelled before it ran) or recorded (already running): never half-done.
    assert listed in (["x-1", "x-3", "x-4"], ["x-1", "x-2", "x-3", "x-4"])


async def test_a_failing_operation_is_rolled_back_alone(tmp_path: Path):
    async with Journal(tmp_path) as journal:
        await journal.admit("ok-1", "mock", request_json("ok-1"))
        with pytest.raises(sqlite3.IntegrityError):
            # A NULL generator violates the schema: that op fails, the journal goes on.
            await journal.admit("bad-1", None, request_json("bad-1"))  # type: ignore[arg-type]
        after = await journal.admit("ok-2", "mock", request_json("ok-2"))
        listed = [entry.request_id for entry in await journal.unfinished()]
    assert after.state is Recording.NEW and listed == ["ok-1", "ok-2"]


async def test_wal_mode_and_read_only_reader_while_the_writer_is_open(tmp_path: Path):
    async with Journal(tmp_path) as journal:
        for index in range(3):
            await journal.admit(f"r-{index}", f"gen-{index}", request_json(f"r-{index}"))
        await journal.finish("r-1", "ImageReady", None, "{}", total_ms=5.0)
        assert (tmp_path / (JOURNAL_FILE + "-wal")).exists()
        entries = await asyncio.to_thread(recent_entries, tmp_path, limit=2)
        reader = await asyncio.to_thread(connect, journal.path, readonly=True)
        try:
            assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader.execute("DELETE FROM requests")
        finally:
            reader.close()
        # The writer carries on after (and despite) the reader.
        assert (await journal.admit("r-3", "mock", request_json("r-3"))).state is Recording.NEW
    assert [entry.request_id for entry in entries] == ["r-2", "r-1"]  # newest first, limited
    assert entries[1].outcome == "ImageReady" and entries[1].total_ms == 5.0
    assert [entry.request_id for entry in recent_entries(tmp_path)] == ["r-3", "r-2", "r-1", "r-0"]
    assert recent_entries(tmp_path / "nowhere") == []


async def test_closed_journal_refuses_work(tmp_path: Path):
    journal = Journal(tmp_path)
    with pytest.raises(RuntimeError, match="not open"):
        await journal.admit("n-1", "mock", request_json("n-1"))
    async with journal:
        await journal.admit("n-1", "mock", request_json("n-1"))
    with pytest.raises(RuntimeError, match="not open"):
        await journal.unfinished()


async def test_a_journal_that_cannot_record_refuses_instead_of_stranding(service_factory, client_for):
    from image_server.client import RenderFailed

    async with service_factory() as service, client_for(service) as client:
        journal = service.journal
        assert journal is not None
        # Break the real database underneath the running service (another process could).
        other = sqlite3.connect(journal.path)
        other.execute("DROP TABLE requests")
        other.close()
        try:
            await client.render(request_id="no-journal", prompt="p", timeout=5)
        except RenderFailed as exc:
            assert exc.code == "internal" and exc.event.retryable and "journal" in exc.event.message
        else:
            raise AssertionError("a request that was never journaled must not succeed")
        assert "no-journal" not in service.active


async def test_a_big_request_body_is_stored_whole(tmp_path):
    from image_server.journal import BLOB_CHUNK_BYTES

    body = b'{"request_id": "big", "prompt": "p", "metadata": {"pad": "' + b"x" * (3 * BLOB_CHUNK_BYTES + 17) + b'"}}'
    async with Journal(tmp_path) as journal:
        await journal.admit("big", "mock", body)
        (entry,) = await journal.unfinished()
    assert bytes(entry.request_json) == body


async def test_recent_entries_with_a_relative_state_dir(tmp_path, monkeypatch):
    # The shipped config says state_dir = "state": `image-server jobs` must work with it.
    monkeypatch.chdir(tmp_path)
    async with Journal(Path("state")) as journal:
        await journal.admit("rel-1", "mock", b'{"request_id": "rel-1", "prompt": "p"}')
    assert [entry.request_id for entry in recent_entries(Path("state"))] == ["rel-1"]


async def test_wal_is_checkpointed_off_the_writer_and_stays_bounded(tmp_path: Path):
    """Commits never checkpoint (that was a request's p99); the checkpointer's thread does,
    and a writer that never pauses (1,500 requests with 4 KB bodies back to back, about
    50 MB of WAL frames without checkpoints) still leaves a WAL of bounded size."""
    body = request_json("x", metadata={"pad": "x" * 4096})
    async with Journal(tmp_path) as journal:
        for index in range(1500):
            await journal.admit(f"w-{index}", "mock", body)
            await journal.finish(f"w-{index}", "ImageReady", None, "{}", total_ms=1.0)
        async with asyncio.timeout(10):
            while journal.checkpointer.checkpoints == 0:
                await asyncio.sleep(0.01)
        wal = (tmp_path / (JOURNAL_FILE + "-wal")).stat().st_size
        reader = await asyncio.to_thread(connect, journal.path, readonly=True)
        try:
            assert reader.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1500
        finally:
            reader.close()
    assert wal < RESTART_WAL_BYTES + 8 * 1024 * 1024, wal


async def test_wal_starts_over_when_the_writer_pauses(tmp_path: Path):
    """Requests one after another (a pause between commits) let the checkpointer copy every
    frame, so the WAL is reused from its start, well below the size that forces a restart."""
    body = request_json("x", metadata={"pad": "x" * 4096})
    async with Journal(tmp_path) as journal:
        for index in range(600):
            await journal.admit(f"s-{index}", "mock", body)
            await journal.finish(f"s-{index}", "ImageReady", None, "{}", total_ms=1.0)
            if index % 50 == 49:
                # The pause: long enough for the checkpointer's next pass, however busy the
                # machine (a fixed sleep let a loaded machine's WAL grow past the bound).
                passes = journal.checkpointer.checkpoints
                await until(lambda passes=passes: journal.checkpointer.checkpoints != passes)
        wal = (tmp_path / (JOURNAL_FILE + "-wal")).stat().st_size
    assert journal.checkpointer.checkpoints > 0
    assert wal < 8 * 1024 * 1024, wal  # about 20 MB of frames were written
