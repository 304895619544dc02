"""/healthz, /readyz and /metrics over real HTTP, after real traffic through real sockets.

The metrics text is parsed with prometheus-client's own parser and the values checked
against the traffic each test sent.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from image_server.client import RenderFailed
from image_server.service import ImageService
from tests.fakes.images import serve_images

HTTP = {"enabled": True, "host": "127.0.0.1", "port": 0}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as {(name, labels): value}."""
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return parsed


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


async def get(service: ImageService, path: str) -> httpx.Response:
    assert service.http is not None
    async with httpx.AsyncClient(base_url=service.http.url, timeout=10) as http:
        return await http.get(path)


async def test_http_is_off_unless_configured(service_factory):
    async with service_factory() as service:
        assert service.http is None and "http" not in service.endpoints


async def test_health_and_readiness_of_a_serving_service(service_factory):
    async with service_factory(http=HTTP) as service:
        assert service.endpoints["http"].startswith("http://127.0.0.1:")
        health = await get(service, "/healthz")
        ready = await get(service, "/readyz")
    assert health.status_code == 200 and health.json()["checks"]["event_loop"]["ok"]
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"sockets", "journal", "output_dir", "default_generator"}


async def test_metrics_count_known_traffic(service_factory, client_for, raw_peer):
    generators = {
        "mock": {"strategy": "mock"},
        # Always fails (retryable): one retry, then the chain falls back to mock.
        "flaky": {"strategy": "mock", "fail_rate": 1.0, "retries": 1, "retry_backoff_s": 0.0, "fallbacks": ["mock"]},
    }
    async with service_factory(http=HTTP, generators=generators) as service, client_for(service) as client:
        for i in range(3):
            await client.render(request_id=f"ok-{i}", prompt="a fox", width=64, height=64)
        fell_back = await client.render(request_id="fb-1", prompt="a fox", generator="flaky", width=64, height=64)
        with pytest.raises(RenderFailed) as refused:
            await client.render(request_id="unknown-1", prompt="x", generator="nope", timeout=5)
        peer = await raw_peer(service)
        await peer.send([b"RenderRequest", b'{"request_id": "bad-1", "prompt": ""}'])
        await peer.next_event(lambda e: getattr(e, "request_id", None) == "bad-1")
        await peer.send([b"garbage that names no request"])
        async with asyncio.timeout(5):
            while service.counters["undecodable"] < 1:
                await asyncio.sleep(0.01)
        response = await get(service, "/metrics")
    assert fell_back.event.generator == "mock" and refused.value.code == "unknown_generator"
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    parsed = samples(response.text)
    assert value(parsed, "image_server_requests_total", generator="mock", outcome="ok") == 4
    assert value(parsed, "image_server_fallbacks_total", requested="flaky", used="mock") == 1
    assert value(parsed, "image_server_retries_total", generator="mock") == 2  # flaky twice, then mock once
    for stage in ("queued", "normalize", "generate", "store", "total"):
        assert value(parsed, "image_server_stage_seconds_count", generator="mock", stage=stage) == 4
    assert value(parsed, "image_server_stage_seconds_sum", generator="mock", stage="total") > 0
    assert value(parsed, "image_server_messages_refused_total", reason="unknown_generator") == 1
    assert value(parsed, "image_server_messages_refused_total", reason="invalid_request") == 1
    assert value(parsed, "image_server_messages_refused_total", reason="undecodable") == 1
    assert value(parsed, "image_server_events_published_total", type="ImageReady") == 4
    assert value(parsed, "image_server_events_published_total", type="RenderAccepted") >= 4
    # Four renders and the two refusals (unknown-1, bad-1): a refusal is its id's terminal event too.
    assert value(parsed, "image_server_journal_rows") == 6
    assert value(parsed, "image_server_journal_unfinished") == 0
    assert value(parsed, "image_server_journal_bytes") > 0
    assert value(parsed, "image_server_queue_depth", generator="mock") == 0
    assert value(parsed, "image_server_in_flight", generator="flaky") == 0
    assert ("image_server_event_loop_lag_seconds", frozenset()) in parsed


async def test_two_services_in_one_process_keep_their_own_counts(service_factory, client_for, tmp_path):
    async with service_factory(http=HTTP) as first, client_for(first) as client:
        await client.render(request_id="one", prompt="a fox", width=64, height=64)
        second = ImageService(
            first.config.model_copy(update={"state_dir": tmp_path / "state2"}), context=client.context
        )
        async with second:
            first_text, second_text = (await get(first, "/metrics")).text, (await get(second, "/metrics")).text
    assert value(samples(first_text), "image_server_requests_total", generator="mock", outcome="ok") == 1
    assert value(samples(second_text), "image_server_requests_total", generator="mock", outcome="ok") == 0


async def test_queue_depth_and_in_flight_while_busy(service_factory, client_for):
    generators = {"mock": {"strategy": "mock", "delay_s": 1.5, "concurrency": 1}}
    async with service_factory(http=HTTP, generators=generators) as service, client_for(service) as client:
        renders = [
            asyncio.create_task(client.render(request_id=f"busy-{i}", prompt="x", width=64, height=64))
            for i in range(3)
        ]
        async with asyncio.timeout(5):
            while service.manager.scheduler.in_flight < 1 or service.queued < 2:
                await asyncio.sleep(0.01)
        parsed = samples((await get(service, "/metrics")).text)
        for task in renders:
            task.cancel()
        await asyncio.gather(*renders, return_exceptions=True)
    assert value(parsed, "image_server_in_flight", generator="mock") == 1
    assert value(parsed, "image_server_queue_depth", generator="mock") == 2
    assert value(parsed, "image_server_journal_unfinished") == 3


async def test_an_output_dir_gone_bad_mid_run_is_a_retryable_storage_error_and_not_ready(service_factory, client_for):
    async with service_factory(http=HTTP) as service, client_for(service) as client:
        await client.render(request_id="before", prompt="x", width=64, height=64)
        output: Path = service.config.output_dir
        # Chmod does not stop root: put a file where the folder was.
        shutil.rmtree(output)
        output.write_text("not a folder")
        with pytest.raises(RenderFailed) as failed:
            await client.render(request_id="during", prompt="x", width=64, height=64)
        not_ready = await get(service, "/readyz")
        output.unlink()
        after = await client.render(request_id="after", prompt="x", width=64, height=64)
        ready = await get(service, "/readyz")
    event = failed.value.event
    assert event.code == "storage" and event.retryable
    assert event.message.startswith(f"output dir {output} not writable: ")
    assert not_ready.status_code == 503
    check = not_ready.json()["checks"]["output_dir"]
    assert not check["ok"] and str(output) in check["detail"]
    assert ready.status_code == 200 and after.event.images[0].path


async def test_readiness_fails_while_the_default_generator_cools_down(service_factory, client_for):
    generators = {"mock": {"strategy": "mock", "fail_rate": 1.0, "retries": 0, "cooldown_after": 1, "cooldown_s": 60}}
    async with service_factory(http=HTTP, generators=generators) as service, client_for(service) as client:
        with pytest.raises(RenderFailed):
            await client.render(request_id="fails", prompt="x", width=64, height=64)
        ready = await get(service, "/readyz")
        parsed = samples((await get(service, "/metrics")).text)
    assert ready.status_code == 503
    assert "cooling down" in ready.json()["checks"]["default_generator"]["detail"]
    assert value(parsed, "image_server_generator_cooling_down", generator="mock") == 1
    assert value(parsed, "image_server_requests_total", generator="mock", outcome="generation_failed") == 1


async def test_http_responses_the_service_receives_are_counted_by_host_and_status(service_factory, client_for):
    with serve_images() as images:
        references = {"allow_private_addresses": True, "http_timeout_s": 5.0}
        async with service_factory(http=HTTP, references=references) as service, client_for(service) as client:
            await client.render(
                request_id="ref-ok", prompt="x", width=64, height=64, reference_image={"uri": images.url("/image.png")}
            )
            with pytest.raises(RenderFailed) as missing:
                await client.render(
                    request_id="ref-404",
                    prompt="x",
                    width=64,
                    height=64,
                    reference_image={"uri": images.url("/missing")},
                )
            parsed = samples((await get(service, "/metrics")).text)
    assert missing.value.code == "reference_image"
    assert value(parsed, "image_server_http_responses_total", host="127.0.0.1", status="200") == 1
    assert value(parsed, "image_server_http_responses_total", host="127.0.0.1", status="404") == 1


async def test_heartbeat_and_status_carry_the_version(service_factory, raw_peer):
    from image_server.version import VERSION
    from schemas import Heartbeat, ServiceStatus, StatusRequest, encode_message

    async with service_factory() as service:
        peer = await raw_peer(service)
        beat = await peer.next_event(lambda e: isinstance(e, Heartbeat))
        await peer.send(encode_message(StatusRequest(request_id="v-1")))
        status = await peer.next_event(lambda e: isinstance(e, ServiceStatus) and e.request_id == "v-1")
    assert VERSION.startswith("0.") and beat.message.version == VERSION and status.message.version == VERSION
