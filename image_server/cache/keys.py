"""Cache keys: the sha256 of everything that determines a render's output.

That is the generators the request may run on, each one's effective config (with the
request's overrides), every parameter that reaches a provider, the seed, and the sha256 of
every reference image. A request whose output is not determined by these gets no key:
one without a seed (unless it accepts any earlier seed), one whose references are
``file://`` or ``http(s)://`` URIs (their bytes are only known after fetching), and one
delivered as provider URLs (nothing of ours to hand out again).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from schemas import ImageSource, RenderRequest

KEY_VERSION = 1
# Fields that shape the images. Not request_id, delivery, priority, reply_to, channel,
# project, metadata or timeouts: they change how an answer travels, not what it shows.
_OUTPUT_FIELDS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "strength",
    "num_images",
    "style",
    "output_format",
)


def cache_key(
    request: RenderRequest,
    configs: Mapping[str, Mapping[str, Any]],
    frames: Sequence[bytes | bytearray],
) -> str | None:
    """The key for ``request`` run on ``configs`` (generator name -> effective config, in
    chain order), or None when its output is not fully determined (see the module doc).
    Hashes reference bytes: call from a thread when they are big."""
    if request.delivery == "url":
        return None
    if request.seed is None and not request.cache_any_seed:
        return None
    sources = [*request.all_references(), *([request.depth_map] if request.depth_map else [])]
    references: list[str] = []
    for source in sources:
        digest = _reference_digest(source, frames)
        if digest is None:
            return None
        references.append(digest)
    material = {
        "v": KEY_VERSION,
        "generators": [[name, dict(config)] for name, config in configs.items()],
        "parameters": {name: getattr(request, name) for name in _OUTPUT_FIELDS},
        "loras": [[lora.name, lora.strength] for lora in request.loras],
        "seed": request.seed,
        "depth_map": request.depth_map is not None,
        "references": references,
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _reference_digest(source: ImageSource, frames: Sequence[bytes | bytearray]) -> str | None:
    if source.frame is not None:
        return hashlib.sha256(frames[source.frame]).hexdigest() if source.frame < len(frames) else None
    text = source.image_data
    if text is None:
        uri = source.uri or ""
        if not uri.startswith("data:"):
            return None
        text = uri
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return hashlib.sha256(base64.b64decode(text, validate=False)).hexdigest()
    except (binascii.Error, ValueError):
        return None
