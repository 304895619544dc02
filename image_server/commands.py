"""What each CLI command does: serve, one-shot render, generator listing, demo."""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from image_server.client import RenderClient, RenderFailed
from image_server.config import ClusterConfig, ServiceConfig, SocketConfig, SocketsConfig
from image_server.errors import ImageServerError
from image_server.generators.registry import create_generator
from image_server.journal import recent_entries
from image_server.manager import GeneratorManager
from image_server.pipeline import RenderPipeline
from image_server.security import generate_keypair
from image_server.service import ImageService
from image_server.startup import preflight, startup_failure
from image_server.statelock import state_dir_in_use
from image_server.storage import OutputStore
from schemas import ImageSource, RenderRequest, Timings

console = Console()
errors = Console(stderr=True)


# How long a thread may keep the GIL while another waits (CPython's default is 5 ms). With
# image work on worker threads, a shorter turn lets the event loop back in sooner: together
# with the workers' lower priority it took heartbeat stalls from ~35 ms to ~10 ms.
GIL_SWITCH_INTERVAL_S = 0.001


async def serve(config: ServiceConfig, *, role: str = "serve", worker_id: str | None = None) -> int:
    """``serve`` (one process; with [cluster] a gateway and a worker), ``gateway`` or ``worker``:
    check, start and run until signalled; a refusal is one line and a distinct exit code."""
    if role != "serve" and not config.cluster.enabled:
        errors.print(f'[red]image-server {role}[/red] needs distributed mode: set [cluster] backend = "nats"')
        return 2
    await asyncio.to_thread(preflight, config)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the service owns this process
    try:
        if config.cluster.enabled and role != "gateway":
            from image_server.cluster.roles import run_worker

            return await run_worker(config, worker_id=worker_id, with_gateway=role == "serve")
        if config.cluster.enabled:
            from image_server.cluster.roles import gateway_service

            service = gateway_service(config, handle_signals=True)
        else:
            service = ImageService(config, handle_signals=True)
        try:
            await service.start()
        except ConnectionError:
            raise
        except Exception as exc:
            failure = startup_failure(exc)
            if failure is None:
                raise
            raise failure from None
        await service.serve_until_stopped()
        return 0
    except ConnectionError as exc:  # cluster.connection.ClusterUnavailable: NATS unreachable or refusing us
        errors.print(f"image-server {role}: {exc}", markup=False, highlight=False)
        return 1


def _reference_source(value: str) -> ImageSource:
    """A local path is read here (the CLI user may read their own files); URIs go as they are."""
    if "://" in value or value.startswith("data:"):
        return ImageSource(uri=value)
    return ImageSource(image_data=base64.b64encode(Path(value).read_bytes()).decode())


async def render_once(config: ServiceConfig, args: argparse.Namespace) -> int:
    """Render in-process (no sockets) and print each image's path."""
    try:
        references = [_reference_source(value) for value in args.reference]
        request = RenderRequest(
            request_id=f"cli-{uuid.uuid4().hex[:12]}",
            prompt=args.prompt,
            generator=args.generator,
            width=args.width,
            height=args.height,
            seed=args.seed,
            steps=args.steps,
            num_images=args.num_images,
            reference_images=references,
            output_format=args.output_format,
            project=args.project,
        )
    except (OSError, ValueError) as exc:
        errors.print(f"[red]invalid request:[/red] {exc}")
        return 2
    manager = GeneratorManager(
        config.generators, default=config.default_generator, max_in_flight=config.limits.max_in_flight
    )
    store = OutputStore(config.output_dir, png_compress_level=config.png_compress_level)
    pipeline = RenderPipeline(manager, store, config.references, default_project=config.default_project)
    try:
        async with manager:
            outcome = await pipeline.run(request, pipeline.admit(request))
    except ImageServerError as exc:
        errors.print(f"[red]{exc.code}:[/red] {exc.message}")
        return 1
    for image in outcome.event.images:
        console.print(image.path or image.uri, soft_wrap=True, highlight=False)
    return 0


async def list_generators(config: ServiceConfig, *, check: bool) -> int:
    table = Table("name", "strategy", "text", "image", "refs", "concurrency", *(["check"] if check else []))
    problems: list[str] = []
    for name, generator_config in sorted(config.generators.items()):
        row = [name, generator_config.strategy]
        try:
            generator = create_generator(name, generator_config)
            caps = generator.capabilities
            row += [_yes(caps.text_to_image), _yes(caps.image_to_image), str(caps.max_reference_images)]
        except ImageServerError as exc:
            table.add_row(*row, "-", "-", "-", str(generator_config.concurrency), f"[red]{escape(exc.message)}[/red]")
            problems.append(f"{name}: {exc.message}")
            continue
        row.append(str(generator_config.concurrency))
        if check:
            try:
                async with generator:
                    report = await generator.health()
                detail = escape(report.detail)
                row.append(f"[green]ok[/green] {detail}" if report.ok else f"[red]failed[/red] {detail}")
                if not report.ok:
                    problems.append(f"{name}: {report.detail}")
            except ImageServerError as exc:
                row.append(f"[red]failed[/red] {escape(exc.message)}")
                problems.append(f"{name}: {exc.message}")
        table.add_row(*row)
    console.print(table)
    # Table cells wrap and truncate at the terminal width (80 columns when piped): repeat each
    # problem whole, so the variable or package to fix is always readable.
    for problem in problems:
        errors.print(problem, markup=False, highlight=False, soft_wrap=True)
    return 1 if check and problems else 0


def _yes(value: bool) -> str:
    return "yes" if value else "no"


async def demo(config: ServiceConfig) -> int:
    """Start the service on loopback (ephemeral ports), render once through real sockets."""
    loopback = SocketsConfig(
        requests=SocketConfig(kind="sub", bind="tcp://127.0.0.1:0"),
        events=SocketConfig(kind="xpub", bind="tcp://127.0.0.1:0"),
    )
    config = config.model_copy(update={"sockets": loopback, "cluster": ClusterConfig()})  # always one process
    prompt = "a lighthouse on a cliff at dusk, long exposure"
    console.print(f"[bold]image-server demo[/bold]: generator [cyan]{config.default_generator}[/cyan]")
    async with ImageService(config) as service:
        console.print(f"service up: requests {service.endpoints['requests']}, events {service.endpoints['events']}")
        async with RenderClient(service.endpoints["requests"], service.endpoints["events"]) as client:
            started = time.perf_counter()
            await client.wait_ready()
            ready_ms = (time.perf_counter() - started) * 1000
            try:
                result = await client.render(
                    request_id=f"demo-{uuid.uuid4().hex[:8]}", prompt=prompt, width=768, height=512, seed=7
                )
            except RenderFailed as exc:
                errors.print(f"[red]render failed[/red]: {exc}")
                return 1
            round_trip_ms = (time.perf_counter() - started) * 1000
    image = result.event.images[0]
    console.print(f"prompt: {prompt!r}")
    console.print(f"image:  [green]{image.path}[/green] ({image.width}x{image.height} {image.format})", soft_wrap=True)
    console.print(_timings_table(result.event.timings, ready_ms, round_trip_ms))
    return 0


def _timings_table(timings: Timings, ready_ms: float, round_trip_ms: float) -> Table:
    table = Table("stage", "ms", title="where the time went")
    table.add_row("client: wait for first Heartbeat", f"{ready_ms:.1f}")
    for stage in ("queued", "normalize", "generate", "store"):
        table.add_row(f"service: {stage}", f"{getattr(timings, stage):.1f}")
    table.add_row("service: total", f"{timings.total:.1f}")
    table.add_row("client: round trip (incl. heartbeat wait)", f"{round_trip_ms:.1f}")
    return table


def jobs(config: ServiceConfig, *, limit: int) -> int:
    """Recent journal entries, newest first (reads the SQLite file read-only)."""
    table = Table("request_id", "status", "generator", "accepted", "total ms", "code")
    # Unfinished requests of a stopped service are not running: the next start resumes them.
    unfinished = "running" if state_dir_in_use(config.state_dir) else "interrupted"
    for entry in recent_entries(config.state_dir, limit=limit):
        status = unfinished if entry.finished_at is None else ("done" if entry.outcome == "ImageReady" else "failed")
        accepted = datetime.fromtimestamp(entry.accepted_at).strftime("%Y-%m-%d %H:%M:%S")
        total = f"{entry.total_ms:.0f}" if entry.total_ms is not None else ""
        table.add_row(entry.request_id, status, entry.generator, accepted, total, entry.code or "")
    console.print(table)
    return 0


async def cluster_jobs(config: ServiceConfig) -> int:
    """Distributed mode: live workers and the queue per priority band, read from NATS."""
    from image_server.cluster.roles import read_status

    try:
        status = await read_status(config)
    except ConnectionError as exc:
        errors.print(f"image-server jobs: {exc}", markup=False, highlight=False)
        return 1
    workers = Table("worker", "host", "generators", "in flight", "up s", title="workers alive")
    for worker in status.workers:
        workers.add_row(
            worker.worker_id,
            worker.host,
            ", ".join(worker.generators),
            f"{worker.in_flight}/{worker.concurrency}",
            f"{worker.uptime_s:.0f}",
        )
    console.print(workers)
    bands = Table("band", "queued", "running", title=f"requests (redelivered now: {status.redelivered})")
    for band, queued in status.queued.items():
        bands.add_row(band, str(queued), str(status.running.get(band, 0)))
    console.print(bands)
    return 0


def generate_keys(args: argparse.Namespace) -> int:
    public, secret = generate_keypair(Path(args.dir), args.name)
    console.print(f"public key: {public}\nsecret key: {secret} (mode 600; keep it on this machine)")
    console.print(
        "A service loads its .key_secret (security.secret_key); copy a client's .key (public) into the "
        "service's security.authorized_keys folder to let that client in."
    )
    return 0
