"""What the result cache keeps for one render: the encoded images and what ImageReady said."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import ImageReady, OutputFormat


@dataclass(frozen=True)
class CachedImage:
    data: bytes  # the delivered bytes, exactly as the first request got them
    width: int
    height: int
    format: OutputFormat
    seed: int | None
    sha256: str | None


@dataclass(frozen=True)
class CachedResult:
    source_request_id: str
    generator: str
    images: list[CachedImage]
    prompt: str | None = None
    applied: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    created_at: float = 0.0  # wall clock, for the age bound

    @property
    def size(self) -> int:
        return sum(len(image.data) for image in self.images)

    def meta(self) -> dict[str, Any]:
        """Everything but the image bytes, as JSON-ready data."""
        return {
            "source_request_id": self.source_request_id,
            "generator": self.generator,
            "prompt": self.prompt,
            "applied": self.applied,
            "ignored": self.ignored,
            "created_at": self.created_at,
            "images": [
                {"width": i.width, "height": i.height, "format": i.format, "seed": i.seed, "sha256": i.sha256}
                for i in self.images
            ],
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any], blobs: list[bytes]) -> CachedResult:
        images = [CachedImage(data=blob, **info) for info, blob in zip(meta["images"], blobs, strict=True)]
        return cls(
            source_request_id=meta["source_request_id"],
            generator=meta["generator"],
            images=images,
            prompt=meta.get("prompt"),
            applied=dict(meta.get("applied") or {}),
            ignored=list(meta.get("ignored") or []),
            created_at=float(meta.get("created_at") or 0.0),
        )


def capture(event: ImageReady, blobs: list[bytes], created_at: float) -> CachedResult | None:
    """The cacheable form of a finished render (blocking: reads delivered files).

    None when an image travelled only as a provider URL (delivery ``url``): there are no
    bytes of ours to hand out again."""
    images: list[CachedImage] = []
    for image in event.images:
        if image.frame is not None:
            data = blobs[image.frame]
        elif image.data is not None:
            data = base64.b64decode(image.data)
        elif image.path is not None:
            data = Path(image.path).read_bytes()
        else:
            return None
        images.append(CachedImage(data, image.width, image.height, image.format, image.seed, image.sha256))
    return CachedResult(
        source_request_id=event.request_id,
        generator=event.generator,
        images=images,
        prompt=event.prompt,
        applied=dict(event.applied),
        ignored=list(event.ignored),
        created_at=created_at,
    )
