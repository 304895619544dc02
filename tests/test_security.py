"""CURVE: allowed clients are served; unknown keys, random keys and plain clients get nothing."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
import zmq

from image_server.client import RenderClient
from image_server.errors import ConfigError
from image_server.security import KeyPair, generate_keypair, load_keypair, load_public_key, prepare_ipc_endpoint
from schemas import RenderRequest, encode_message


@pytest.fixture
def keys(tmp_path):
    """A server key pair, one authorized client and one unknown client."""
    server_public, server_secret = generate_keypair(tmp_path / "server", "server")
    authorized = tmp_path / "authorized"
    allowed_public, allowed_secret = generate_keypair(tmp_path / "clients", "allowed")
    generate_keypair(tmp_path / "clients", "stranger")
    authorized.mkdir()
    (authorized / "allowed.key").write_bytes(allowed_public.read_bytes())
    return {
        "server_secret": server_secret,
        "server_public": load_public_key(server_public),
        "authorized": authorized,
        "allowed": load_keypair(allowed_secret),
        "stranger": load_keypair(tmp_path / "clients" / "stranger.key_secret"),
    }


def curve_overrides(keys) -> dict:
    return {
        "security": {
            "curve": True,
            "secret_key": str(keys["server_secret"]),
            "authorized_keys": str(keys["authorized"]),
        }
    }


def test_generated_secret_key_is_private(keys, tmp_path):
    mode = stat.S_IMODE(os.stat(keys["server_secret"]).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "server").st_mode) == 0o700


def test_world_readable_secret_key_is_refused(keys):
    os.chmod(keys["server_secret"], 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_keypair(keys["server_secret"])


async def test_authorized_client_is_served(service_factory, context, keys):
    async with service_factory(**curve_overrides(keys)) as service:
        async with RenderClient(
            service.endpoints["requests"],
            service.endpoints["events"],
            context=context,
            curve_keys=keys["allowed"],
            curve_server_key=keys["server_public"],
        ) as client:
            result = await client.render(request_id="curve-ok", prompt="p", width=64, height=64, timeout=10)
    assert result.event.request_id == "curve-ok"


async def refused(service, context, client_keys: KeyPair | None, server_key: bytes | None) -> None:
    """A client with these keys sees no Heartbeat and gets no request through."""
    client = RenderClient(
        service.endpoints["requests"],
        service.endpoints["events"],
        context=context,
        curve_keys=client_keys,
        curve_server_key=server_key,
    )
    async with client:
        with pytest.raises(TimeoutError):
            await client.wait_ready(timeout=0.8)
        sender = client._sender
        assert sender is not None
        await sender.send_multipart(encode_message(RenderRequest(request_id="sneaky", prompt="p")))
    # The authorized path works meanwhile, and nothing from the refused client was received.
    assert service.counters["received"] == 0


async def test_unknown_random_and_plain_clients_get_nothing(service_factory, context, keys):
    random_public, random_secret = zmq.curve_keypair()
    async with service_factory(**curve_overrides(keys)) as service:
        await refused(service, context, keys["stranger"], keys["server_public"])
        await refused(service, context, KeyPair(random_public, random_secret), keys["server_public"])
        await refused(service, context, None, None)
        # A plain SUB sees no events either.
        plain = context.socket(zmq.SUB)
        plain.setsockopt(zmq.SUBSCRIBE, b"")
        plain.connect(service.endpoints["events"])
        try:
            assert await plain.poll(800) == 0
        finally:
            plain.close(0)
        await asyncio.sleep(0)
        assert service.counters["received"] == 0


def test_ipc_endpoint_directory(tmp_path):
    private = tmp_path / "run" / "image-server"
    prepare_ipc_endpoint(f"ipc://{private}/requests.sock")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(ConfigError, match="0700"):
        prepare_ipc_endpoint(f"ipc://{shared}/requests.sock")


async def test_service_binds_ipc_in_a_private_directory(service_factory, tmp_path):
    folder = tmp_path / "ipc"
    sockets = {
        "requests": {"kind": "sub", "bind": f"ipc://{folder}/requests"},
        "events": {"kind": "xpub", "bind": f"ipc://{folder}/events"},
    }
    async with service_factory(sockets=sockets) as service:
        assert service.endpoints["requests"].startswith("ipc://")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
