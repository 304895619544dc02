"""The console in a real headless Chromium against a running service with mock generators."""

from __future__ import annotations

import os
from typing import Any

from tests.console.conftest import artifact
from tests.fakes.images import solid_bytes

DEADLINE_MS = 10_000


async def _send_form(page: Any, prompt: str, generator: str = "") -> str:
    await page.fill("textarea[name=prompt]", prompt)
    await page.select_option("select[name=generator]", generator)
    await page.click("button[type=submit]")
    status = page.locator("#form-status")
    await status.filter(has_text="sent ").wait_for(timeout=DEADLINE_MS)
    request_id: str = await status.get_attribute("data-request-id")
    assert request_id
    return request_id


async def test_form_render_appears_live_then_cancel_and_failure_cards(console_factory, browser):
    async with console_factory() as running:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        await page.goto(running.url + "/console")
        await page.locator("#connection.on").wait_for(timeout=DEADLINE_MS)

        # A render from the form: its card and thumbnail appear without a reload.
        request_id = await _send_form(page, "a red fox in the snow", "mock")
        card = page.locator(f'#cards article.ready[data-id="{request_id}"]')
        await card.wait_for(timeout=DEADLINE_MS)
        thumb = card.locator("img")
        await page.wait_for_function(
            "(img) => img.complete && img.naturalWidth > 0", arg=await thumb.element_handle(), timeout=DEADLINE_MS
        )
        assert "a red fox in the snow" in await card.inner_text()
        assert "mock" in await card.inner_text()
        await page.screenshot(path=artifact("1-rendered.png"), full_page=True)

        # A slow render shows in the queue with progress and a cancel button; cancelling it
        # ends it as a "cancelled" card.
        slow_id = await _send_form(page, "a very slow lighthouse", "slow")
        row = page.locator(f'#running li[data-id="{slow_id}"]')
        await row.locator("button.cancel").wait_for(timeout=DEADLINE_MS)
        await row.locator("progress").wait_for(timeout=DEADLINE_MS)
        await page.screenshot(path=artifact("2-in-flight.png"), full_page=True)
        await row.locator("button.cancel").click()
        cancelled = page.locator(f'#cards article.failed[data-id="{slow_id}"]')
        await cancelled.wait_for(timeout=DEADLINE_MS)
        assert "cancelled" in await cancelled.locator(".code").inner_text()
        await row.wait_for(state="detached", timeout=DEADLINE_MS)

        # A generator that fails: an error card with its code and message.
        broken_id = await _send_form(page, "a broken render", "broken")
        failed = page.locator(f'#cards article.failed[data-id="{broken_id}"]')
        await failed.wait_for(timeout=DEADLINE_MS)
        assert "generation_failed" in await failed.locator(".code").inner_text()
        assert await failed.locator(".message").inner_text()
        await page.screenshot(path=artifact("3-failure.png"), full_page=True)

        # Everything at once, for the README: a render in flight above the finished cards.
        overview_id = await _send_form(page, "a lighthouse at dusk, long exposure", "slow")
        row = page.locator(f'#running li[data-id="{overview_id}"]')
        await row.locator("button.cancel").wait_for(timeout=DEADLINE_MS)
        await page.screenshot(path=artifact("console.png"))
        await row.locator("button.cancel").click()
        await row.wait_for(state="detached", timeout=DEADLINE_MS)

        # No reload happened: the first card is still the same element, and nothing alerted.
        assert await card.count() == 1
        assert dialogs == []


async def test_html_in_a_prompt_shows_as_text(console_factory, browser):
    async with console_factory() as running:
        page = await browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        await page.goto(running.url + "/console")
        await page.locator("#connection.on").wait_for(timeout=DEADLINE_MS)
        hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>"
        request_id = await _send_form(page, hostile, "mock")
        card = page.locator(f'#cards article[data-id="{request_id}"]')
        await card.wait_for(timeout=DEADLINE_MS)
        assert hostile in await card.locator(".prompt").inner_text()
        assert await card.locator("script").count() == 0
        # Reloaded, the server-rendered page shows it as text too.
        await page.reload()
        card = page.locator(f'#cards article[data-id="{request_id}"]')
        assert hostile in await card.locator(".prompt").inner_text()
        assert dialogs == []


async def test_archive_loads_older_pages_as_it_scrolls(console_factory, browser, tmp_path):
    tile = solid_bytes((30, 60, 200), size=(64, 64))
    folder = tmp_path / "output" / "p" / "mock" / "20260101"
    folder.mkdir(parents=True)
    for n in range(150):
        path = folder / f"old{n:03d}_0.png"
        path.write_bytes(tile)
        os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))
    async with console_factory() as running:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(running.url + "/console")
        tiles = page.locator("#archive a.tile")
        assert await tiles.count() >= 48
        for _ in range(10):
            await page.mouse.wheel(0, 20_000)
            if await tiles.count() == 150:
                break
            await page.wait_for_timeout(100)
        await page.wait_for_function("document.querySelectorAll('#archive a.tile').length === 150", timeout=DEADLINE_MS)
        titles = await tiles.evaluate_all("(all) => all.map((a) => a.title)")
        assert titles == [f"p/mock/20260101/old{n:03d}_0.png" for n in reversed(range(150))]
        await page.screenshot(path=artifact("4-archive.png"))
