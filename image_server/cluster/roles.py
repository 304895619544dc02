"""Run the distributed roles from the CLI: a worker (optionally with a gateway in the same
process, for ``serve``), and a one-shot status read for ``image-server jobs``."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from image_server.cluster.connection import open_cluster
from image_server.cluster.gateway import Gateway, cluster_status
from image_server.cluster.worker import Worker
from image_server.config import ServiceConfig
from image_server.service import ImageService
from schemas import ClusterStatus


def gateway_service(config: ServiceConfig, **options: Any) -> ImageService:
    """An ImageService whose requests go to JetStream: distributed mode's gateway."""
    return ImageService(config, frontend=Gateway, **options)


async def run_worker(config: ServiceConfig, *, worker_id: str | None, with_gateway: bool) -> int:
    """Until SIGINT/SIGTERM: both stop intake, drain up to the deadline, hand back the rest."""
    worker = Worker(config, worker_id=worker_id)
    gateway = gateway_service(config) if with_gateway else None

    def stop() -> None:
        worker.stop()
        if gateway is not None:
            gateway.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    if gateway is None:
        await worker.run()
    else:
        await asyncio.gather(worker.run(), gateway.run())
    return 0


async def read_status(config: ServiceConfig) -> ClusterStatus:
    async with open_cluster(config.cluster, name="image-server jobs") as cluster:
        return await cluster_status(cluster)
