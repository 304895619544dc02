"""The [cluster] table, NATS credentials, and the gateway/worker/jobs commands."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq.asyncio

from image_server.client import RenderClient
from image_server.cluster.connection import connect_options, open_cluster
from image_server.config import ClusterConfig, build_config
from image_server.errors import ConfigError
from tests.cluster.test_cluster_faults import LOOPBACK_BINDS, role_config
from tests.natsproc import start_nats
from tests.procs import Procs


def test_the_default_is_the_embedded_single_process() -> None:
    config = build_config({"generators": {"mock": {"strategy": "mock"}}})
    assert not config.cluster.enabled and config.journal.enabled


def test_a_password_needs_a_user_and_tls_client_keys_come_in_pairs() -> None:
    with pytest.raises(ConfigError, match="password_env needs cluster.user"):
        build_config({"cluster": {"backend": "nats", "password_env": "P"}})
    with pytest.raises(ConfigError, match="tls_cert_file"):
        build_config({"cluster": {"backend": "nats", "tls_cert_file": "c.pem"}})


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ClusterConfig(backend="nats", user="u", password_env="NATS_PW_FOR_TEST", token_env="NATS_TOKEN_FOR_TEST")
    monkeypatch.setenv("NATS_PW_FOR_TEST", "s3cret")
    monkeypatch.delenv("NATS_TOKEN_FOR_TEST", raising=False)
    with pytest.raises(ConfigError, match="NATS_TOKEN_FOR_TEST is not set"):
        connect_options(config)
    monkeypatch.setenv("NATS_TOKEN_FOR_TEST", "t0ken")
    options = connect_options(config)
    assert (options["user"], options["password"], options["token"]) == ("u", "s3cret", "t0ken")


async def test_user_and_password_reach_a_server_that_requires_them(
    procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_nats(procs, "nats", tmp_path / "js", extra=["--user", "render", "--pass", "s3cret-pw"])
    monkeypatch.setenv("NATS_PW_FOR_TEST", "s3cret-pw")
    config = ClusterConfig(backend="nats", servers=[server.url], user="render", password_env="NATS_PW_FOR_TEST")
    async with open_cluster(config, name="test") as cluster:
        assert cluster.nc.is_connected
    monkeypatch.setenv("NATS_PW_FOR_TEST", "wrong")
    # The server answers "Authorization Violation" and hangs up; on a busy machine the client
    # may see the hang-up first. Either way the wrong password does not connect.
    with pytest.raises(Exception, match="[Aa]uthorization|[Cc]onnection reset|[Cc]losed"):
        async with asyncio.timeout(10), open_cluster(config.model_copy(update={"connect_timeout_s": 2}), name="t"):
            pass


async def test_worker_and_gateway_commands_need_a_cluster(procs: Procs, tmp_path: Path) -> None:
    config = tmp_path / "plain.toml"
    config.write_text('default_generator = "mock"\n[generators.mock]\nstrategy = "mock"\n')
    for role in ("worker", "gateway"):
        code, output = await procs.run("--config", str(config), role)
        assert code == 2 and "needs distributed mode" in output


@pytest.mark.slow
async def test_jobs_lists_live_workers_and_serve_runs_both_roles(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    server = await start_nats(procs, "nats", tmp_path / "js")
    both = await procs.service("both", role_config(tmp_path, "both", [server.url], delay_s=0), binds=LOOPBACK_BINDS)
    await procs.worker("w-extra", role_config(tmp_path, "w-extra", [server.url], delay_s=0))
    async with RenderClient(both.endpoints["requests"], both.endpoints["events"], context=context) as client:
        result = await client.render(request_id="via-serve", prompt="p", width=64, height=64, timeout=20)
        assert result.event.images
        status = await client.status()
    assert status.cluster is not None and len(status.cluster.workers) == 2
    code, output = await procs.run("--config", str(tmp_path / "both.toml"), "jobs")
    assert code == 0, output
    assert "w-extra" in output and "both-" in output  # serve's worker is named after service_id
    for band in ("high", "normal", "low"):
        assert band in output
