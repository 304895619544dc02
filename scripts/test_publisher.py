"""Send RenderRequests to a running image_server and report latency percentiles.

    uv run python scripts/test_publisher.py "a lighthouse at dusk" --count 20 --concurrency 5
    uv run python scripts/test_publisher.py "make it snow" --reference photo.jpg --generator falai_flux_i2i

Exits 1 when any request ends in a RenderError or times out, 2 when no service answers
within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from image_server.client import RenderClient, RenderFailed
from image_server.security import load_keypair, load_public_key
from schemas import ImageSource, RenderRequest

console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--requests", default="tcp://127.0.0.1:5555", help="the service's requests endpoint")
    parser.add_argument("--events", default="tcp://127.0.0.1:5556", help="the service's events endpoint")
    parser.add_argument("--push", action="store_true", help="send with PUSH (a service whose requests socket is PULL)")
    parser.add_argument("--generator")
    parser.add_argument("--reference", action="append", default=[], help="reference image: a file path or a URI")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--delivery", choices=["file", "inline", "frames", "url"], default="file")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the service, then for each request"
    )
    parser.add_argument("--server-key", help="CURVE: the service's public key file (server.key)")
    parser.add_argument("--client-key", help="CURVE: this client's secret key file (client.key_secret)")
    return parser.parse_args(argv)


def reference_sources(values: list[str]) -> tuple[list[ImageSource], list[bytes]]:
    """URIs go as they are; local files travel as raw extra frames (no base64)."""
    sources: list[ImageSource] = []
    images: list[bytes] = []
    for value in values:
        if "://" in value or value.startswith("data:"):
            sources.append(ImageSource(uri=value))
        else:
            sources.append(ImageSource(frame=len(images)))
            images.append(Path(value).read_bytes())
    return sources, images


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> int:
    references, images = reference_sources(args.reference)
    latencies: list[float] = []
    failures: list[str] = []
    semaphore = asyncio.Semaphore(args.concurrency)
    kind = "push" if args.push else "pub"
    server_key = load_public_key(Path(args.server_key)) if args.server_key else None
    client_keys = load_keypair(Path(args.client_key)) if args.client_key else None
    async with RenderClient(
        args.requests, args.events, requests_kind=kind, curve_keys=client_keys, curve_server_key=server_key
    ) as client:  # type: ignore[arg-type]
        with console.status("waiting for the service's heartbeat..."):
            try:
                await client.wait_ready(timeout=args.timeout)
            except TimeoutError as exc:
                console.print(f"[red]no service[/red]: {exc} (is it running? see --requests / --events)")
                return 2
        with Progress(
            TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task("render", total=args.count)

            async def one(index: int) -> None:
                request = RenderRequest(
                    request_id=f"pub-{uuid.uuid4().hex[:10]}-{index}",
                    prompt=args.prompt,
                    generator=args.generator,
                    width=args.width,
                    height=args.height,
                    reference_images=references,
                    delivery=args.delivery,
                )
                async with semaphore:
                    started = time.perf_counter()
                    try:
                        result = await client.render(request, timeout=args.timeout, images=images)
                        latencies.append((time.perf_counter() - started) * 1000)
                        console.log(f"{request.request_id}: {result.event.uri}")
                    except RenderFailed as exc:
                        failures.append(f"{request.request_id}: {exc.code}: {exc.event.message}")
                    except TimeoutError as exc:
                        failures.append(f"{request.request_id}: {exc}")
                progress.advance(task)

            await asyncio.gather(*(one(i) for i in range(args.count)))
    if latencies:
        console.print(
            f"{len(latencies)} ok: p50 {statistics.median(latencies):.1f} ms, p90 {percentile(latencies, 0.9):.1f} ms, "
            f"p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms"
        )
    for failure in failures:
        console.print(f"[red]failed[/red] {failure}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
