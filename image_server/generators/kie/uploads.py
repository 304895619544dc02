"""Reference images as the public URLs Seedream edit needs: http(s) references passed through,
the rest uploaded through Kie's file upload API (base64 JSON or multipart stream; section 5)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Sequence

import httpx

from image_server.errors import GenerationFailed, ReferenceImageError
from image_server.generators.base import ReferenceImage
from image_server.generators.http import gather_or_cancel, translate_transport_errors
from image_server.generators.kie.config import MAX_REFERENCE_BYTES, MAX_REFERENCES, KieConfig
from image_server.generators.kie.errors import read_envelope
from schemas import RenderRequest

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def check_references(references: Sequence[ReferenceImage]) -> None:
    """Kie's limits, before anything is uploaded: at most 10 images of at most 10 MB each."""
    if len(references) > MAX_REFERENCES:
        raise ReferenceImageError(f"Kie takes at most {MAX_REFERENCES} reference images, got {len(references)}")
    for index, reference in enumerate(references):
        if len(reference.data) > MAX_REFERENCE_BYTES:
            raise ReferenceImageError(
                f"reference image {index} is {len(reference.data)} bytes; Kie takes at most "
                f"{MAX_REFERENCE_BYTES} bytes (10 MB) per image"
            )


def given_urls(request: RenderRequest, config: KieConfig) -> list[str | None]:
    """Per reference, the http(s) URL the request gave if it may be passed through, else None.

    ``normalize_request_references`` keeps the order of ``request.all_references()``.
    """
    if not config.pass_through_urls:
        return [None] * len(request.all_references())
    uris = [source.uri for source in request.all_references()]
    return [uri if uri is not None and uri.startswith(("https://", "http://")) else None for uri in uris]


def _base64_body(reference: ReferenceImage, upload_path: str, file_name: str) -> bytes:
    """The base64 upload's JSON (blocking: base64 of up to 10 MB)."""
    data_uri = f"data:{reference.mime};base64,{base64.b64encode(reference.data).decode('ascii')}"
    return json.dumps({"base64Data": data_uri, "uploadPath": upload_path, "fileName": file_name}).encode()


async def upload_reference(
    client: httpx.AsyncClient, config: KieConfig, reference: ReferenceImage, *, key: str, generator: str
) -> str:
    """Upload one image; return its ``downloadUrl``. A unique file name each time: Kie overwrites
    a file of the same name, which would swap references between concurrent requests."""
    file_name = f"{uuid.uuid4().hex}.{EXTENSIONS.get(reference.format, reference.format)}"
    headers = {"authorization": f"Bearer {key}"}
    with translate_transport_errors(generator, key):
        if config.upload == "stream":
            response = await client.post(
                f"{config.upload_base_url}/api/file-stream-upload",
                files={"file": (file_name, reference.data, reference.mime)},
                data={"uploadPath": config.upload_path, "fileName": file_name},
                headers=headers,
            )
        else:
            body = await asyncio.to_thread(_base64_body, reference, config.upload_path, file_name)
            response = await client.post(
                f"{config.upload_base_url}/api/file-base64-upload",
                content=body,
                headers={**headers, "content-type": "application/json"},
            )
    data = read_envelope(response, generator=generator, key=key)
    url = data.get("downloadUrl") if isinstance(data, dict) else None
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise GenerationFailed(f"{generator}: Kie's file upload answered without a downloadUrl", generator=generator)
    return url


async def reference_urls(
    client: httpx.AsyncClient,
    config: KieConfig,
    request: RenderRequest,
    references: Sequence[ReferenceImage],
    *,
    key: str,
    generator: str,
) -> tuple[list[str], int]:
    """(a URL per reference, how many were uploaded); uploads run concurrently."""
    check_references(references)
    urls = given_urls(request, config)
    if len(urls) != len(references):  # references not from this request's sources: upload all
        urls = [None] * len(references)
    missing = [index for index, url in enumerate(urls) if url is None]
    uploaded = await gather_or_cancel(
        upload_reference(client, config, references[index], key=key, generator=generator) for index in missing
    )
    by_index = dict(zip(missing, uploaded, strict=True))
    return [url if url is not None else by_index[index] for index, url in enumerate(urls)], len(missing)
