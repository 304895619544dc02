"""Console figures in headless Chromium against a service process with the console on.

1. ImageReady on the socket -> its thumbnail visible in the page (decoded and shown), over
   sequential renders: the page records ``Date.now()`` when each new card's thumbnail has
   loaded; a subscriber in this process records the wall time ImageReady arrived.
2. Page load with 10,000 images in the output dir: navigation timing (response end,
   DOMContentLoaded, load) and the time until every archive thumbnail on the first screen is
   shown, for the first load (those thumbnails made on demand) and later loads (cached).

    uv run python benchmarks/bench_console.py [--renders 50] [--images 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import free_port, percentile, running_service
from PIL import Image

from image_server.client import RenderClient

WATCH_THUMBNAILS = """
window.__shown = {};
new MutationObserver((records) => {
  for (const record of records) for (const node of record.addedNodes) {
    const img = node.querySelector && node.querySelector("img");
    if (!img) continue;
    const id = node.dataset.id;
    const done = () => { window.__shown[id] = Date.now(); };
    if (img.complete && img.naturalWidth) done(); else img.addEventListener("load", done, { once: true });
  }
}).observe(document.getElementById("cards"), { childList: true });
"""


FIRST_SCREEN_SHOWN = """
Array.from(document.querySelectorAll("#archive img"))
  .filter((img) => img.getBoundingClientRect().top < innerHeight)
  .every((img) => img.complete && img.naturalWidth > 0)
"""


def populate(folder: Path, count: int) -> None:
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (40, 90, 160)).save(out, "PNG")
    data = out.getvalue()
    base = time.time() - count
    for n in range(count):
        day = folder / "bench" / "mock" / f"2026{(n // 1000) % 12 + 1:02d}01"
        day.mkdir(parents=True, exist_ok=True)
        path = day / f"old-{n:05d}_0.png"
        path.write_bytes(data)
        os.utime(path, (base + n, base + n))


async def measure(url: str, requests: str, events: str, renders: int, loads: int) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    arrived: dict[str, float] = {}

    def on_event(event: Any) -> None:
        if event.type == "ImageReady":
            arrived[event.request_id] = time.time() * 1000

    chromium = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "chromium"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        navigation = []
        for _ in range(loads):
            await page.goto(url + "/console", wait_until="load")
            timing = await page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
            entry = json.loads(timing)
            row = {k: entry[k] for k in ("responseEnd", "domContentLoadedEventEnd", "loadEventEnd")}
            # Lazy thumbnails do not hold the load event: also time until every thumbnail in
            # the first screen has been made (cold: on demand) and shown.
            await page.wait_for_function(FIRST_SCREEN_SHOWN)
            row["firstScreenThumbnails"] = await page.evaluate("performance.now()")
            navigation.append(row)
        await page.locator("#connection.on").wait_for()
        await page.evaluate(WATCH_THUMBNAILS)
        async with RenderClient(requests, events, on_event=on_event, monitor=True) as client:
            await client.wait_ready()
            for n in range(renders):
                request_id = f"bench-{n:03d}-{time.time_ns()}"
                await client.render(request_id=request_id, prompt=f"render {n}", width=512, height=512)
                await page.wait_for_function(f"window.__shown[{json.dumps(request_id)}] !== undefined")
        shown = await page.evaluate("window.__shown")
        await browser.close()
    latency = [shown[rid] - arrived[rid] for rid in arrived if rid in shown]
    return {
        "thumbnail_visible_ms": {
            "p50": statistics.median(latency),
            "p90": percentile(latency, 90),
            "max": max(latency),
            "n": len(latency),
        },
        "page_load_ms": {"first": navigation[0], "later_median": _median_dicts(navigation[1:])},
    }


def _median_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--renders", type=int, default=50)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        output = Path(tmp) / "output"
        populate(output, args.images)
        port = free_port()
        generators = {"mock": {"strategy": "mock", "style": "simple", "concurrency": 8}}
        with running_service(
            generators, output_dir=str(output), http={"enabled": True, "port": port}, console={"enabled": True}
        ) as service:
            result = asyncio.run(
                measure(f"http://127.0.0.1:{port}", service.requests, service.events, args.renders, args.loads)
            )
    result["images_on_disk"] = args.images
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
