"""The journal's ids known on the loop: never a false "surely new", few false "maybe known",
rebuilt from the database at start and as it fills up, while ids keep arriving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from image_server import known_ids
from image_server.journal import Journal
from image_server.known_ids import IdFilter, KnownIds
from tests.test_cancel_priority import until


def test_a_filter_has_no_false_negatives_and_few_false_positives():
    bloom = IdFilter(10_000)
    added = [f"frame-{index:06d}" for index in range(10_000)]
    for request_id in added:
        bloom.add(request_id)
    assert all(request_id in bloom for request_id in added)
    strangers = [f"other-{index}" for index in range(20_000)]
    false_positives = sum(request_id in bloom for request_id in strangers)
    assert false_positives / len(strangers) < 0.03  # sized for 1 %
    assert not bloom.full


def test_ids_added_during_a_rebuild_survive_it():
    known = KnownIds()
    known.add("before")
    target = known.start_rebuild()
    known.add("during")  # arrives while the database is being read
    known.fill(target, ["from-db-1", "from-db-2"])  # the database does not have "during" yet
    assert known.loaded and known.rebuilds == 1
    for request_id in ("during", "from-db-1", "from-db-2"):
        assert known.may_know(request_id)
    assert not known.may_know("never-seen")


def test_until_the_first_build_every_id_may_be_known():
    known = KnownIds()
    assert known.may_know("anything") and known.needs_rebuild
    known.fill(known.start_rebuild(), [])
    assert not known.may_know("anything") and not known.needs_rebuild


async def test_the_journal_knows_its_ids_across_restarts_and_rebuilds(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(known_ids, "MIN_CAPACITY", 64)  # fill up quickly: several rebuilds
    ids = [f"r-{index}" for index in range(600)]
    async with Journal(tmp_path) as journal:
        await until(lambda: journal.known.loaded)
        assert journal.surely_new("r-0")
        for start in range(0, len(ids), 50):  # bursts: ids keep coming while rebuilds run
            batch = ids[start : start + 50]
            await asyncio.gather(*(journal.admit(rid, "mock", b"{}") for rid in batch))
            assert not any(journal.surely_new(rid) for rid in ids[: start + 50])
        await journal.finish("refused-at-the-door", "RenderError", "invalid_request", "{}")
        assert not journal.surely_new("refused-at-the-door")
        await until(lambda: journal._rebuilding is None)
        assert journal.known.rebuilds >= 3
    async with Journal(tmp_path) as reopened:
        assert not reopened.surely_new("r-1")  # not loaded yet: "maybe", never "new"
        await until(lambda: reopened.known.loaded)
        assert not any(reopened.surely_new(rid) for rid in [*ids, "refused-at-the-door"])
        strangers = [f"s-{index}" for index in range(1000)]
        assert sum(reopened.surely_new(rid) for rid in strangers) > 950


@pytest.mark.parametrize("capacity", [1, 64, 100_000])
def test_filter_sizes_follow_capacity(capacity: int):
    bloom = IdFilter(capacity)
    assert bloom.hashes >= 1 and bloom.bits >= 64
    assert bloom.bits >= capacity * 9  # about 9.6 bits per id at 1 %
