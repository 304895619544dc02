"""The console's routes on an aiohttp application, all under ``/console``.

Reads are plain GETs. Writes (render, cancel) need the ``X-Console`` header, which a page on
another site cannot send without a CORS preflight this server never grants, so a web page
elsewhere cannot make the service render (and spend money) through the operator's browser.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path

from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from image_server.console.console import CLOSE, RELOAD, Console
from image_server.console.files import NotServed, read_image
from image_server.console.gallery import Entry
from image_server.console.page import PREFIX, archive_html, page_html

COOKIE = "image_server_console"
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
KEEPALIVE_S = 15.0
PAGE_SIZE = 48

CONSOLE_KEY = web.AppKey("console", Console)


def add_console_routes(
    app: web.Application, console: Console, *, token: str | None, generator_names: list[str]
) -> None:
    """Mount the console on ``app``; with a ``token`` every console route needs it."""
    app[CONSOLE_KEY] = console
    static = Path(__file__).with_name("static")

    async def index(request: web.Request) -> web.StreamResponse:
        if token and request.query.get("token"):  # a link with the token: keep it in a cookie
            response = web.HTTPSeeOther(PREFIX)
            response.set_cookie(COOKIE, request.query["token"], httponly=True, samesite="Strict", path=PREFIX)
            raise response
        html = page_html(
            cards=list(console.state.cards),
            running=list(console.state.running.values()),
            generators=console.state.generators,
            archive=console.gallery.page(limit=PAGE_SIZE),
            names=generator_names,
        )
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        queue = console.subscribe()
        try:
            await response.write(b": connected\n\n")
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    message = ": keepalive\n\n"
                await response.write(message.encode())
                if message is RELOAD or message is CLOSE:
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            console.unsubscribe(queue)
        return response

    async def archive(request: web.Request) -> web.Response:
        before = _cursor(request.query.get("before", ""))
        return web.Response(
            text=archive_html(console.gallery.page(before=before, limit=PAGE_SIZE)), content_type="text/html"
        )

    async def image(request: web.Request) -> web.Response:
        try:
            data, content_type = await asyncio.to_thread(read_image, console.gallery.root, request.match_info["path"])
        except NotServed:
            raise web.HTTPNotFound() from None
        return web.Response(body=data, content_type=content_type, headers={"Cache-Control": "private, max-age=3600"})

    async def thumb(request: web.Request) -> web.Response:
        try:
            data = await console.thumbnails.get(request.match_info["path"])
        except (NotServed, OSError, ValueError):
            raise web.HTTPNotFound() from None
        return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def render(request: web.Request) -> web.Response:
        try:
            form = await _read_form(request)
            request_id = await console.submit(
                prompt=str(form.get("prompt", "")),
                generator=str(form.get("generator") or "") or None,
                width=_int(form.get("width")),
                height=_int(form.get("height")),
                image=upload if isinstance(upload := form.get("image"), bytes) else None,
            )
        except (ValueError, ValidationError) as exc:
            return _json({"error": _summary(exc)}, status=400)
        return _json({"request_id": request_id}, status=202)

    async def cancel(request: web.Request) -> web.Response:
        if await console.cancel(request.match_info["request_id"]):
            return _json({"cancelling": request.match_info["request_id"]}, status=202)
        return _json({"error": "only requests sent from this console can be cancelled here"}, status=403)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(PREFIX):
            response: web.StreamResponse = await handler(request)
            return response
        if token and not _authorised(request, token):
            return web.Response(status=401, text="this console needs its token (?token=... once, or a Bearer header)\n")
        if request.method == "POST" and request.headers.get("X-Console") != "1":
            return web.Response(status=403, text="console writes need the X-Console header\n")
        response = await handler(request)
        return response

    app.middlewares.append(guard)
    app.router.add_get(PREFIX, index)
    app.router.add_get(PREFIX + "/", index)
    app.router.add_get(PREFIX + "/events", events)
    app.router.add_get(PREFIX + "/archive", archive)
    app.router.add_get(PREFIX + "/image/{path:.+}", image)
    app.router.add_get(PREFIX + "/thumb/{path:.+}", thumb)
    app.router.add_post(PREFIX + "/render", render)
    app.router.add_post(PREFIX + "/cancel/{request_id}", cancel)
    app.router.add_static(PREFIX + "/static", static, follow_symlinks=False)


def _authorised(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    offered = header[7:] if header.startswith("Bearer ") else request.cookies.get(COOKIE) or request.query.get("token")
    return bool(offered) and hmac.compare_digest(str(offered).encode(), token.encode())


async def _read_form(request: web.Request) -> dict[str, str | bytes]:
    """The multipart form, with the image capped as it streams in (aiohttp's own cap is 1 MB)."""
    if not request.content_type.startswith("multipart/"):
        raise ValueError("send the form as multipart/form-data")
    form: dict[str, str | bytes] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name is None:
            continue
        data = bytearray()
        while chunk := await part.read_chunk():
            data += chunk
            if len(data) > MAX_UPLOAD_BYTES:
                raise ValueError(f"the upload is larger than {MAX_UPLOAD_BYTES} bytes")
        if part.filename is not None:
            if data:
                form[part.name] = bytes(data)
        else:
            form[part.name] = data.decode("utf-8", errors="replace")
    return form


def _int(value: object) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def _cursor(text: str) -> Entry | None:
    mtime, sep, path = text.partition(":")
    try:
        return Entry(float(mtime), path) if sep else None
    except ValueError:
        return None


def _summary(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
    return str(exc)


def _json(body: object, *, status: int) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")
