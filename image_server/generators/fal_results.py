"""Read a fal output (providers/API_CONTRACTS.md section 1.6) into ``GeneratedImage``s.

Flagged images are refused, URLs are passed through (delivery ``url``) or downloaded concurrently.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

from image_server.errors import ContentPolicy, GenerationFailed
from image_server.generators.base import GeneratedImage
from image_server.generators.http import download, image_format_of

FORMATS_BY_MIME = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/webp": "webp"}


@dataclass(frozen=True)
class FalImage:
    url: str
    width: int | None = None
    height: int | None = None
    format: str | None = None  # from the output's content_type, if it names one we know


@dataclass(frozen=True)
class FalOutput:
    images: list[FalImage]
    seed: int | None = None
    prompt: str | None = None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def parse_output(output: Any, *, generator: str, request_id: str | None = None) -> FalOutput:
    """Validate the output's shape; raise ``ContentPolicy`` if the safety checker flagged any image.

    fal does not fail a flagged request: it returns a blanked (black) image and sets
    ``has_nsfw_concepts``. A black image is not a success, so the whole request fails with
    ``content_policy`` rather than returning some images and a hole.
    """

    def malformed(reason: str) -> GenerationFailed:
        return GenerationFailed(
            f"{generator}: fal returned a malformed result: {reason}", generator=generator, request_id=request_id
        )

    if not isinstance(output, dict):
        raise malformed(f"expected a JSON object, got {type(output).__name__}")
    raw_images = output.get("images")
    if not isinstance(raw_images, list) or not raw_images:
        raise malformed("no images")
    flags = output.get("has_nsfw_concepts")
    if isinstance(flags, list) and any(flag is True for flag in flags):
        flagged = sum(1 for flag in flags if flag is True)
        raise ContentPolicy(
            f"{generator}: fal's safety checker flagged {flagged} of {len(raw_images)} images",
            error_type="has_nsfw_concepts",
            generator=generator,
            request_id=request_id,
        )
    images = []
    for raw in raw_images:
        url = raw.get("url") if isinstance(raw, dict) else None
        if not isinstance(url, str) or not url:
            raise malformed("an image has no url")
        content_type = raw.get("content_type")
        images.append(
            FalImage(
                url=url,
                width=_positive_int(raw.get("width")),
                height=_positive_int(raw.get("height")),
                format=FORMATS_BY_MIME.get(content_type.lower()) if isinstance(content_type, str) else None,
            )
        )
    seed = output.get("seed")
    prompt = output.get("prompt")
    return FalOutput(
        images=images,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        prompt=prompt if isinstance(prompt, str) else None,
    )


async def fetch_images(
    http: httpx.AsyncClient,
    output: FalOutput,
    *,
    pass_urls: bool,
    requested_format: str,
    generator: str,
) -> list[GeneratedImage]:
    """URLs untouched when ``pass_urls`` (delivery ``url``), else the downloaded bytes."""
    if pass_urls:
        return [
            GeneratedImage(
                url=image.url,
                width=image.width,
                height=image.height,
                format=image.format or requested_format,
                seed=output.seed,
            )
            for image in output.images
        ]
    blobs = await _download_all(http, [image.url for image in output.images], generator=generator)
    results = []
    for image, data in zip(output.images, blobs, strict=True):
        fmt = image_format_of(data)
        if fmt is None:
            raise GenerationFailed(f"{generator}: a result image is not PNG, JPEG or WebP", generator=generator)
        results.append(GeneratedImage(data=data, format=fmt, width=image.width, height=image.height, seed=output.seed))
    return results


async def _download_all(http: httpx.AsyncClient, urls: list[str], *, generator: str) -> list[bytes]:
    """Download concurrently; the first failure cancels the rest (gather alone would leave them running)."""
    if len(urls) == 1:
        return [await download(http, urls[0], generator=generator)]
    tasks = [asyncio.ensure_future(download(http, url, generator=generator)) for url in urls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
