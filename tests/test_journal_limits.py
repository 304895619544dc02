"""What the journal keeps and how much: private files, no reference bytes past a request's
end, bodies of failed requests for a short while only, checks before journaling, a quota."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from image_server.client import RenderFailed
from image_server.journal import JOURNAL_FILE, Journal, connect
from schemas import ImageSource
from tests.fakes.images import solid_bytes


def state_bytes(state_dir: Path) -> int:
    return sum(path.stat().st_size for path in state_dir.rglob("*") if path.is_file())


async def test_journal_is_private_to_the_service_user(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    async with Journal(state) as journal:
        await journal.admit("r-1", "mock", b"{}")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


async def test_failing_big_embedded_images_are_refused_before_journaling(service_factory, client_for, tmp_path):
    garbage = base64.b64encode(os.urandom(4 * 1024 * 1024)).decode()
    async with service_factory() as service, client_for(service) as client:
        before = state_bytes(tmp_path / "state")
        for index in range(5):
            with pytest.raises(RenderFailed) as failed:
                await client.render(
                    request_id=f"junk-{index}", prompt="p", reference_image=ImageSource(image_data=garbage)
                )
            assert failed.value.code == "reference_image" and "reference image 0" in failed.value.event.message
        grown = state_bytes(tmp_path / "state") - before
    assert grown < 1_000_000, grown  # formerly about 5.3 MB a request
    conn = connect(tmp_path / "state" / JOURNAL_FILE, readonly=True)
    rows = conn.execute("SELECT length(request_json), code FROM requests WHERE request_id LIKE 'junk-%'").fetchall()
    assert [tuple(row) for row in rows] == [(0, "reference_image")] * 5  # one terminal row each, no body


async def test_bodies_and_reference_frames_go_when_requests_end(service_factory, client_for, tmp_path):
    picture = solid_bytes((10, 200, 30), (64, 64), "png")
    async with service_factory(journal={"failed_body_retention_s": 3600}) as service, client_for(service) as client:
        await client.render(
            request_id="ok-1",
            prompt="p",
            strength=0.5,
            reference_image=ImageSource(frame=0),
            images=[picture],
            metadata={"k": "v"},
        )
        with pytest.raises(RenderFailed):
            await client.render(request_id="bad-1", prompt="p", generator_config={"style": "nope"})
        with pytest.raises(RenderFailed):
            await client.render(request_id="bad-2", prompt="p", timeout_s=0.001, width=64, height=64)
        journal = service.journal
        assert journal is not None
        rows = {r["request_id"]: r for r in connect(journal.path, readonly=True).execute("SELECT * FROM requests")}
        assert rows["ok-1"]["request_json"] == b""  # ImageReady echoes metadata: stored once
        assert b'"k":"v"' in bytes(rows["ok-1"]["terminal"])
        frames = connect(journal.path, readonly=True).execute("SELECT count(*) FROM request_frames").fetchone()[0]
        assert frames == 0
        failed = rows["bad-2"]
        assert failed["code"] == "timeout" and len(failed["request_json"]) > 0  # kept for a look, for a while
        await journal.prune(now=failed["finished_at"] + 3601)
        kept = (
            connect(journal.path, readonly=True)
            .execute("SELECT request_json, terminal FROM requests WHERE request_id = 'bad-2'")
            .fetchone()
        )
        assert kept["request_json"] == b"" and kept["terminal"]  # the body went; its terminal event stays


async def test_past_its_quota_the_journal_refuses_new_requests_naming_the_quota(service_factory, client_for):
    quota = 1024 * 1024
    async with service_factory(journal={"max_bytes": quota}) as service, client_for(service) as client:
        big = {"notes": "n" * 200_000}
        refused = None
        for index in range(12):
            try:
                await client.render(request_id=f"q-{index}", prompt="p", width=64, height=64, metadata=big)
            except RenderFailed as exc:
                refused = exc
                break
        assert refused is not None and refused.code == "overloaded"
        assert "quota" in refused.event.message and str(quota) in refused.event.message
        status = await client.status()
        assert status.journal_max_bytes == quota and status.journal_bytes is not None
        assert status.journal_bytes > quota // 2
