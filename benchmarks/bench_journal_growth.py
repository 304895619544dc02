"""Figure 12: how much the state directory grows for 20 failing 4 MB requests.

Each request carries 4 MB of random bytes as base64 ``image_data`` (about 5.3 MB of JSON),
which is not an image, plus 64 KB of ``metadata``; each ends with
``RenderError(reference_image)``. The figure is the size of every file under
``state_dir`` (the SQLite journal and its WAL) after the 20 answers, minus its size before.

    uv run python benchmarks/bench_journal_growth.py [--runs 3] [--requests 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

from harness import machine, median_of, running_service

from image_server.client import RenderClient, RenderFailed
from schemas import ImageSource, RenderRequest

GENERATORS = {"mock": {"strategy": "mock", "style": "simple"}}
IMAGE_BYTES = 4 * 1024 * 1024


def tree_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


async def _drive(requests: str, events: str, state_dir: Path, count: int) -> dict[str, Any]:
    before = tree_bytes(state_dir)
    codes: dict[str, int] = {}
    async with RenderClient(requests, events) as client:
        await client.wait_ready()
        for index in range(count):
            garbage = base64.b64encode(os.urandom(IMAGE_BYTES)).decode()
            request = RenderRequest(
                request_id=f"growth-{index}",
                prompt="p",
                reference_image=ImageSource(image_data=garbage),
                metadata={"notes": "m" * 65536},
            )
            try:
                await client.render(request, timeout=60)
                codes["ok"] = codes.get("ok", 0) + 1
            except RenderFailed as exc:
                codes[exc.code] = codes.get(exc.code, 0) + 1
    return {"growth_mb": round((tree_bytes(state_dir) - before) / 1e6, 2), "codes": codes}


def measure(count: int) -> dict[str, Any]:
    with running_service(GENERATORS, log_level="warning") as service:
        result = asyncio.run(_drive(service.requests, service.events, service.folder / "state", count))
    return {**result, "machine": machine()}


def run(runs: int = 3, count: int = 20) -> dict[str, Any]:
    samples = [measure(count) for _ in range(runs)]
    return {
        "figure": f"state_dir growth for {count} failing 4 MB requests",
        "median": {"growth_mb": median_of(samples, "growth_mb")},
        "runs": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.requests), indent=2))


if __name__ == "__main__":
    main()
