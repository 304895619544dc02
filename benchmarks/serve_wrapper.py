"""``image-server`` with two benchmark-only additions, then ``image_server.cli.main``.

- a ``ready`` strategy: a generator that returns one pre-encoded 64x64 PNG at once, so a
  request costs only the service's own work (sockets, validation, journal, storage);
- ``BENCH_MODULES_DUMP=<path>``: on SIGUSR1, write the sorted top-level names of
  ``sys.modules`` to that file (which SDKs an idle service has imported);
- ``BENCH_PROFILE=<path>``: run under cProfile and write the stats there on exit;
- ``BENCH_TIMELINE=<path>``: stamp each request at a few points of its path and write
  the stamps there on exit (``timeline.py``, read by ``bench_timeline.py``);
- ``BENCH_DEBUG_LOGGERS=a,b``: those loggers at DEBUG whatever ``--log-level`` says (the
  diffusers generator's per-render pipeline time, without every library's debug lines).

    python benchmarks/serve_wrapper.py --config cfg.toml serve
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import ClassVar, Literal

from image_server.cli import main
from image_server.generators import (
    Capabilities,
    GeneratedImage,
    GenerationResult,
    Generator,
    GeneratorConfig,
    RenderJob,
    register_generator,
)


def _ready_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


class ReadyConfig(GeneratorConfig):
    strategy: Literal["ready"] = "ready"


class ReadyGenerator(Generator):
    """Returns the same 64x64 PNG bytes for every request, with no delay."""

    strategy: ClassVar[str] = "ready"
    config_model: ClassVar[type[GeneratorConfig]] = ReadyConfig
    PNG: ClassVar[bytes] = b""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(min_size=64, max_size=64, in_process=True)

    async def open(self) -> None:
        if not ReadyGenerator.PNG:
            ReadyGenerator.PNG = _ready_png()

    async def generate(self, job: RenderJob) -> GenerationResult:
        image = GeneratedImage(data=self.PNG, format="png", width=64, height=64)
        return GenerationResult(images=[image], prompt=job.request.prompt)


def _dump_modules(signum: int, frame: FrameType | None) -> None:
    names = sorted({name.split(".", 1)[0] for name in list(sys.modules)})
    Path(os.environ["BENCH_MODULES_DUMP"]).write_text(json.dumps(names))


if __name__ == "__main__":
    register_generator("ready", ReadyGenerator)
    for name in filter(None, os.environ.get("BENCH_DEBUG_LOGGERS", "").split(",")):
        logging.getLogger(name).setLevel(logging.DEBUG)  # the CLI's dictConfig keeps existing loggers' levels
    if os.environ.get("BENCH_TIMELINE"):
        from timeline import install

        install(os.environ["BENCH_TIMELINE"])
    if os.environ.get("BENCH_MODULES_DUMP"):
        signal.signal(signal.SIGUSR1, _dump_modules)
    if os.environ.get("BENCH_PROFILE"):
        import cProfile

        with cProfile.Profile() as profile:
            code = main(sys.argv[1:])
        profile.dump_stats(os.environ["BENCH_PROFILE"])
        sys.exit(code)
    sys.exit(main(sys.argv[1:]))
