"""Connect to NATS from ``[cluster]`` and make sure every stream, bucket and consumer exists.

Gateways and workers both call ``ensure_layout``: creating what exists with the same
configuration is a no-op in JetStream, so whichever process starts first sets it up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, ServerError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from image_server.cluster import names
from image_server.config import ClusterConfig
from image_server.errors import ConfigError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The request stream is only a queue; this bounds a runaway producer, not normal use.
MAX_QUEUED_REQUESTS = 1_000_000


def connect_options(config: ClusterConfig) -> dict[str, Any]:
    """nats-py ``connect`` keyword arguments; secrets are read from the environment here."""
    options: dict[str, Any] = {
        "servers": list(config.servers),
        "connect_timeout": config.connect_timeout_s,
        "max_reconnect_attempts": -1,  # a NATS node restarting must not end a gateway or worker
        "reconnect_time_wait": 0.5,
    }
    if config.user:
        options["user"] = config.user
    if config.password_env:
        options["password"] = _secret(config.password_env)
    if config.token_env:
        options["token"] = _secret(config.token_env)
    if config.nkey_seed_file:
        options["nkeys_seed"] = str(config.nkey_seed_file)
    if config.creds_file:
        options["user_credentials"] = str(config.creds_file)
    if config.tls_ca_file or config.tls_cert_file:
        context = ssl.create_default_context(cafile=str(config.tls_ca_file) if config.tls_ca_file else None)
        if config.tls_cert_file and config.tls_key_file:
            context.load_cert_chain(str(config.tls_cert_file), str(config.tls_key_file))
        options["tls"] = context
    return options


def _secret(variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"cluster: environment variable {variable} is not set (it holds a NATS credential)")
    return value


class ClusterUnavailable(ConnectionError):
    """NATS could not be reached (or refused us) within ``cluster.connect_timeout_s``."""


async def connect(config: ClusterConfig, *, name: str) -> NATS:
    """Connected, or ``ClusterUnavailable`` naming the last error (a wrong password, a
    refused port) once connect_timeout_s has passed. After that, reconnects never stop."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)
        logger.warning("nats: %s", exc)

    async def on_disconnected() -> None:
        logger.warning("nats: disconnected; reconnecting")

    async def on_reconnected() -> None:
        logger.info("nats: reconnected")

    nc = NATS()
    try:
        async with asyncio.timeout(config.connect_timeout_s):
            await nc.connect(
                name=name,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                **connect_options(config),
            )
    except (TimeoutError, nats.errors.NoServersError) as exc:
        await nc.close()
        reason = errors[-1] if errors else exc
        servers = ", ".join(config.servers)
        raise ClusterUnavailable(f"could not connect to NATS at {servers}: {reason or type(reason).__name__}") from None
    return nc


async def ensure_layout(js: JetStreamContext, config: ClusterConfig) -> None:
    replicas = config.replicas
    await _ensure_stream(
        js,
        StreamConfig(
            name=names.REQUESTS_STREAM,
            subjects=[names.REQUEST_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=config.duplicate_window_s,
            max_msgs=MAX_QUEUED_REQUESTS,
        ),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=names.EVENTS_STREAM,
            subjects=[names.EVENT_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=config.events_ttl_s,
            duplicate_window=min(config.duplicate_window_s, config.events_ttl_s),
        ),
    )
    await js.create_key_value(bucket=names.RESULTS_BUCKET, ttl=config.results_ttl_s, replicas=replicas)
    await js.create_key_value(bucket=names.CONTROL_BUCKET, ttl=config.results_ttl_s, replicas=replicas)
    await js.create_key_value(bucket=names.CHANNELS_BUCKET, ttl=config.results_ttl_s, replicas=replicas)
    await js.create_key_value(bucket=names.WORKERS_BUCKET, ttl=3 * config.worker_heartbeat_s, replicas=replicas)
    await js.create_object_store(names.OUTPUTS_BUCKET, ttl=config.results_ttl_s, replicas=replicas)
    for band in names.BANDS:
        await js.add_consumer(
            names.REQUESTS_STREAM,
            ConsumerConfig(
                durable_name=names.consumer_name(band),
                filter_subject=names.request_subject(band),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=config.ack_wait_s,
                # One delivery more than allowed: that last one only records RenderError(internal).
                max_deliver=config.max_deliver + 1,
                max_ack_pending=-1,
                num_replicas=replicas,
            ),
        )


async def _ensure_layout_when_ready(js: JetStreamContext, config: ClusterConfig) -> None:
    """``ensure_layout``, waiting up to connect_timeout_s for a cluster that is still forming
    (no metadata leader yet, or too few peers to place replicas)."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + config.connect_timeout_s
    while True:
        try:
            await ensure_layout(js, config)
            return
        except Exception as exc:
            forming = isinstance(exc, TRANSIENT) or (isinstance(exc, APIError) and _forming(exc))
            if not forming or loop.time() > give_up_at:
                raise
            logger.info("JetStream not ready (%s); waiting", exc)
            await asyncio.sleep(0.25)


def _forming(exc: APIError) -> bool:
    # 10005: no suitable peers for placement; 10008: JetStream cluster not available yet;
    # 10059: stream not found, when another process's add of the same stream is still being
    # placed (our add was refused as a clash, and the update then finds no stream yet).
    return exc.code in (500, 503) or exc.err_code in (10005, 10008, 10059)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        # It exists with other settings (a changed ttl or replica count): bring it in line.
        logger.info("updating stream %s to the configured settings", config.name)
        await js.update_stream(config)


# Errors a NATS cluster gives while a node restarts or a stream elects a new leader.
TRANSIENT: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,  # nats.errors.TimeoutError is one
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    NoStreamResponseError,
    ServiceUnavailableError,
    ServerError,
)


@dataclass
class Cluster:
    """An open connection and the handles every role uses."""

    config: ClusterConfig
    nc: NATS
    js: JetStreamContext
    results: KeyValue
    control: KeyValue
    channels: KeyValue
    workers: KeyValue
    outputs: ObjectStore

    async def retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """``operation()``, tried again through transient errors for up to 3 x connect_timeout_s
        (a failover takes a few seconds; every operation here is safe to repeat)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + 3 * self.config.connect_timeout_s
        delay = 0.05
        while True:
            try:
                return await operation()
            except TRANSIENT as exc:
                if loop.time() + delay > give_up_at:
                    raise
                logger.info("%s: %r; trying again", what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


@asynccontextmanager
async def open_cluster(config: ClusterConfig, *, name: str) -> AsyncIterator[Cluster]:
    nc = await connect(config, name=name)
    try:
        # Short API timeouts: an operation caught by a failover is tried again (Cluster.retry).
        js = nc.jetstream(timeout=config.connect_timeout_s / 2)
        await _ensure_layout_when_ready(js, config)
        cluster = Cluster(
            config,
            nc,
            js,
            results=await js.key_value(names.RESULTS_BUCKET),
            control=await js.key_value(names.CONTROL_BUCKET),
            channels=await js.key_value(names.CHANNELS_BUCKET),
            workers=await js.key_value(names.WORKERS_BUCKET),
            outputs=await js.object_store(names.OUTPUTS_BUCKET),
        )
        yield cluster
    finally:
        await nc.close()
