"""HTML for the console, rendered on the server: the page, and the fragments pushed to it.

Every value from a request or an event passes through ``escape`` here and nowhere else is
markup built, so a prompt like ``<script>`` shows as text. The page's script only inserts
these fragments; it never builds markup from data.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from html import escape
from typing import Any
from urllib.parse import quote

from image_server.console.gallery import Entry
from image_server.console.state import Card, Running

PREFIX = "/console"


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _url(kind: str, relative: str) -> str:
    return f"{PREFIX}/{kind}/{quote(relative)}"


def card_html(card: Card) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(card.finished_at))
    if not card.ok:
        return (
            f'<article class="card failed" data-id="{_e(card.request_id)}">'
            f'<div class="code">{_e(card.code)}</div><p class="message">{_e(card.message)}</p>'
            f'<p class="prompt">{_e(card.prompt)}</p>'
            f"<footer>{_e(card.request_id)} · {_e(card.generator)} · {when}</footer></article>"
        )
    image = (
        f'<a href="{_url("image", card.image)}" target="_blank"><img loading="lazy" alt="" '
        f'src="{_url("thumb", card.image)}"></a>'
        if card.image
        else '<div class="noimage">delivered without a file</div>'
    )
    timings = " · ".join(f"{key} {value:.0f} ms" for key, value in card.timings.items() if key in ("generate", "total"))
    return (
        f'<article class="card ready" data-id="{_e(card.request_id)}">{image}'
        f'<p class="prompt">{_e(card.prompt)}</p>'
        f"<dl><dt>generator</dt><dd>{_e(card.generator)}</dd><dt>size</dt><dd>{_e(card.width)}×{_e(card.height)}</dd>"
        f"<dt>seed</dt><dd>{_e(card.seed)}</dd><dt>time</dt><dd>{_e(timings)}</dd></dl>"
        f"<footer>{_e(card.request_id)} · {when}</footer></article>"
    )


def running_html(running: Running) -> str:
    percent = None if running.progress is None else round(running.progress * 100)
    bar = f'<progress max="100" value="{percent}"></progress>' if percent is not None else "<progress></progress>"
    position = f" · #{running.queue_position} in queue" if running.stage == "queued" and running.queue_position else ""
    cancel = f'<button class="cancel" data-id="{_e(running.request_id)}">Cancel</button>' if running.mine else ""
    return (
        f'<li class="running" data-id="{_e(running.request_id)}"><span class="rid">{_e(running.request_id)}</span>'
        f'<span class="gen">{_e(running.generator)}</span><span class="stage">{_e(running.stage)}{_e(position)}</span>'
        f'{bar}<span class="prompt">{_e(running.prompt)}</span>{cancel}</li>'
    )


def generators_html(rows: Iterable[dict[str, Any]]) -> str:
    body = []
    now = time.time()
    for row in rows:
        until = row.get("cooling_down_until")
        health = f"cooling down {until - now:.0f} s" if until and until > now else "ready"
        rate = row.get("error_rate")
        body.append(
            f"<tr><td>{_e(row.get('name'))}</td><td>{_e(row.get('strategy'))}</td><td>{_e(health)}</td>"
            f"<td>{_e(row.get('in_flight'))} / {_e(row.get('concurrency'))}</td>"
            f"<td>{'–' if rate is None else _e(f'{rate:.0%}')}</td></tr>"
        )
    return (
        '<table id="generators"><thead><tr><th>generator</th><th>strategy</th><th>health</th>'
        f"<th>in use</th><th>recent errors</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def archive_html(entries: list[Entry]) -> str:
    tiles = []
    for entry in entries:
        info = entry.describe()
        tiles.append(
            f'<a class="tile" href="{_url("image", entry.path)}" target="_blank" title="{_e(entry.path)}">'
            f'<img loading="lazy" alt="" src="{_url("thumb", entry.path)}">'
            f"<span>{_e(info['request_id'])} · {_e(info['generator'])}</span></a>"
        )
    cursor = f"{entries[-1].mtime!r}:{entries[-1].path}" if entries else ""
    return f'<div class="page" data-next="{_e(cursor)}">{"".join(tiles)}</div>'


def page_html(
    *,
    cards: list[Card],
    running: list[Running],
    generators: list[dict[str, Any]],
    archive: list[Entry],
    names: list[str],
) -> str:
    options = "".join(f'<option value="{_e(name)}">{_e(name)}</option>' for name in names)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>image_server console</title><link rel="stylesheet" href="{PREFIX}/static/console.css"></head>
<body>
<header><h1>image_server</h1><span id="connection" class="off">connecting…</span></header>
<main>
<section id="try"><h2>Try it</h2>
<form id="render-form"><textarea name="prompt" required maxlength="10000" placeholder="a prompt"></textarea>
<label>generator <select name="generator"><option value="">(default)</option>{options}</select></label>
<label>width <input name="width" type="number" min="64" max="4096" step="8" placeholder="auto"></label>
<label>height <input name="height" type="number" min="64" max="4096" step="8" placeholder="auto"></label>
<label>reference <input name="image" type="file" accept="image/png,image/jpeg,image/webp"></label>
<button type="submit">Render</button><output id="form-status"></output></form></section>
<section id="queue"><h2>Queue and in flight</h2><ul id="running">{"".join(map(running_html, running))}</ul></section>
<section><h2>Generators</h2><div id="generators-box">{generators_html(generators)}</div></section>
<section><h2>Live</h2><div id="cards" class="grid">{"".join(map(card_html, cards))}</div></section>
<section><h2>Archive</h2><div id="archive" class="grid">{archive_html(archive)}</div><div id="more"></div></section>
</main>
<script src="{PREFIX}/static/console.js"></script>
</body></html>
"""
