"""The console's HTTP side without a browser: tokens, write protection, files, archive pages."""

from __future__ import annotations

import asyncio
import html as html_module
import io
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

from image_server.config import build_config
from image_server.errors import ConfigError

DEADLINE = 10.0


def _write_image(root: Path, relative: str, fmt: str = "PNG", mtime: float | None = None) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 40, 40)).save(out, fmt)
    path.write_bytes(out.getvalue())
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


async def _until(predicate, what: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_token_is_required_when_configured(console_factory):
    async with console_factory(token="s3cret-token") as running, httpx.AsyncClient(base_url=running.url) as http:
        assert (await http.get("/console")).status_code == 401
        assert (await http.get("/console/archive")).status_code == 401
        assert (await http.get("/console", params={"token": "wrong"})).status_code == 401
        assert (await http.get("/console", headers={"Authorization": "Bearer s3cret-token"})).status_code == 200
        # A link with the token once: the cookie carries it from then on (HttpOnly, SameSite=Strict).
        first = await http.get("/console", params={"token": "s3cret-token"})
        assert first.status_code == 303
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert (await http.get("/console")).status_code == 200
        # Health and other listeners' routes are not the console's business.
        assert (await http.get("/elsewhere")).status_code == 404


async def test_writes_need_the_console_header(console_factory):
    async with console_factory() as running, httpx.AsyncClient(base_url=running.url) as http:
        refused = await http.post("/console/render", files={"prompt": (None, "a cross-site render")})
        assert refused.status_code == 403
        assert not running.console.state.sent


def _half_black_half_white(size: tuple[int, int] = (256, 192)) -> bytes:
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste((255, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _brightness(image: Image.Image, box: tuple[int, int, int, int]) -> float:
    value = image.convert("L").crop(box).resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    assert isinstance(value, int | float)
    return float(value)


async def test_form_render_with_reference_upload(console_factory):
    async with console_factory() as running, httpx.AsyncClient(base_url=running.url) as http:
        answer = await http.post(
            "/console/render",
            headers={"X-Console": "1"},
            files={
                "prompt": (None, "a field"),
                "generator": (None, "mock"),
                "width": (None, "256"),
                "height": (None, "192"),
                "image": ("ref.png", _half_black_half_white(), "image/png"),
            },
        )
        assert answer.status_code == 202, answer.text
        request_id = answer.json()["request_id"]
        cards = running.console.state.cards
        await _until(lambda: any(c.request_id == request_id for c in cards), "the card")
        card = next(c for c in cards if c.request_id == request_id)
        assert card.ok and (card.width, card.height) == (256, 192)
        assert card.image is not None
        image = await http.get(f"/console/image/{card.image}")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        # The mock blends the first reference in (half and half): the uploaded black|white split
        # shows in the result, whose own background is one solid colour.
        with Image.open(io.BytesIO(image.content)) as result:
            left, right = _brightness(result, (0, 0, 40, 192)), _brightness(result, (216, 0, 256, 192))
        assert right - left > 100


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt": (None, "")}, "prompt"),
        ({"prompt": (None, "x"), "width": (None, "wide")}, "whole number"),
        ({"prompt": (None, "x"), "width": (None, "10")}, "width"),
        ({"prompt": (None, "x"), "generator": (None, "no such/name")}, "generator"),
    ],
)
async def test_bad_form_input_is_refused_with_a_reason(console_factory, fields, words):
    async with console_factory() as running, httpx.AsyncClient(base_url=running.url) as http:
        answer = await http.post("/console/render", headers={"X-Console": "1"}, files=fields)
        assert answer.status_code == 400
        assert words in answer.json()["error"]


async def test_unknown_generator_from_the_form_ends_as_an_error_card(console_factory):
    async with console_factory() as running, httpx.AsyncClient(base_url=running.url) as http:
        answer = await http.post(
            "/console/render", headers={"X-Console": "1"}, files={"prompt": (None, "x"), "generator": (None, "nope")}
        )
        request_id = answer.json()["request_id"]
        cards = running.console.state.cards
        await _until(lambda: any(c.request_id == request_id for c in cards), "the card")
        assert next(c for c in cards if c.request_id == request_id).code == "unknown_generator"


async def test_only_files_under_the_output_dir_are_served(console_factory, tmp_path):
    async with console_factory() as running, httpx.AsyncClient(base_url=running.url) as http:
        output = running.service.config.output_dir
        _write_image(output, "p/mock/20260101/a_0.png")
        _write_image(output, "p/mock/20260101/b_0.jpg", "JPEG")
        _write_image(output, "p/mock/20260101/c_0.webp", "WEBP")
        secret = _write_image(tmp_path / "outside", "secret.png")
        os.symlink(secret, output / "p/mock/20260101/link_0.png")
        os.symlink(secret.parent, output / "p/linkdir")
        os.mkfifo(output / "p/mock/20260101/fifo_0.png")
        (output / "p/mock/20260101/text_0.png").write_text("not an image")

        for name, kind in (("a_0.png", "image/png"), ("b_0.jpg", "image/jpeg"), ("c_0.webp", "image/webp")):
            answer = await http.get(f"/console/image/p/mock/20260101/{name}")
            assert answer.status_code == 200 and answer.headers["content-type"] == kind
        refused = [
            "/console/image/p/mock/20260101/link_0.png",
            "/console/image/p/linkdir/secret.png",
            "/console/image/p/mock/20260101/fifo_0.png",
            "/console/image/p/mock/20260101/text_0.png",
            "/console/image/p/mock/20260101/missing_0.png",
            "/console/image/%2e%2e/outside/secret.png",
            "/console/image/p/..%2f..%2foutside/secret.png",
            "/console/image/%2Fetc%2Fpasswd",
            "/console/thumb/p/mock/20260101/link_0.png",
            "/console/thumb/%2e%2e/outside/secret.png",
        ]
        for path in refused:
            async with asyncio.timeout(DEADLINE):  # a FIFO must never be opened (it would block)
                answer = await http.get(path)
            assert answer.status_code == 404, path
            assert b"not an image" not in answer.content


async def test_thumbnails_are_small_jpegs_made_once(console_factory):
    async with console_factory() as running, httpx.AsyncClient(base_url=running.url) as http:
        _write_image(running.service.config.output_dir, "p/mock/20260101/a_0.png")
        first = await http.get("/console/thumb/p/mock/20260101/a_0.png")
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(first.content)) as thumb:
            assert max(thumb.size) <= 320 and thumb.format == "JPEG"
        cached = list((running.service.config.state_dir / "console-thumbs").rglob("*.jpg"))
        assert len(cached) == 1
        before = cached[0].stat().st_mtime_ns
        again = await http.get("/console/thumb/p/mock/20260101/a_0.png")
        assert again.content == first.content and cached[0].stat().st_mtime_ns == before


async def test_archive_pages_cover_every_image_newest_first(console_factory, tmp_path):
    output = tmp_path / "output"
    for n in range(130):
        _write_image(output, f"p/mock/20260101/r{n:03d}_0.png", mtime=1_700_000_000 + n)
    async with console_factory() as running, httpx.AsyncClient(base_url=running.url) as http:
        page = (await http.get("/console")).text
        seen: list[str] = []
        html = page[page.index('<div id="archive"') :]
        while True:
            names = [part.split("_0.png")[0][-4:] for part in html.split('title="p/mock/20260101/')[1:]]
            seen += names
            cursor = html.split('data-next="', 1)[1].split('"', 1)[0]
            if not cursor:
                break
            html = (await http.get("/console/archive", params={"before": html_module.unescape(cursor)})).text
        assert seen == [f"r{n:03d}" for n in reversed(range(130))]


async def test_cancel_is_scoped_to_the_consoles_own_requests(console_factory, client_for):
    async with console_factory() as running, httpx.AsyncClient(base_url=running.url) as http:
        async with client_for(running.service) as other:
            task = asyncio.create_task(other.render(request_id="someone-elses", prompt="x", generator="slow"))
            await _until(lambda: "someone-elses" in running.console.state.running, "the queue row")
            answer = await http.post("/console/cancel/someone-elses", headers={"X-Console": "1"})
            assert answer.status_code == 403
            await other.cancel("someone-elses")  # its own client may
            with pytest.raises(Exception, match="cancelled"):
                await asyncio.wait_for(task, DEADLINE)


async def test_beyond_loopback_the_console_needs_a_token(console_factory):
    beyond = {"enabled": True, "host": "0.0.0.0", "port": 0}
    with pytest.raises(ConfigError, match="TEST_CONSOLE_TOKEN"):
        async with console_factory(http=beyond):
            pass
    async with console_factory(http=beyond, token="wide-open-no-more") as running:
        port = running.url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/console")).status_code == 401
            assert (await http.get("/console/image/p/x_0.png")).status_code == 401
            assert (await http.post("/console/render", headers={"X-Console": "1"})).status_code == 401
            authorised = await http.get("/console", headers={"Authorization": "Bearer wide-open-no-more"})
            assert authorised.status_code == 200
            assert (await http.get("/healthz")).status_code == 200  # health stays open for supervisors


def test_the_console_needs_the_http_listener():
    with pytest.raises(ConfigError, match="http.enabled"):
        build_config({"console": {"enabled": True}})
