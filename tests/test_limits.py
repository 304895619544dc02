"""Per-client fairness, override allow-lists per strategy, message size limits."""

from __future__ import annotations

import asyncio

import pytest

from image_server.client import MessageTooLarge, RenderFailed
from image_server.generators.registry import get_generator_class
from image_server.sockets import is_loopback_endpoint

# Fields no request may ever change: credentials, where requests go, files, limits.
FORBIDDEN = {
    "strategy",
    "api_key_env",
    "account_id_env",
    "api_token_env",
    "organization_env",
    "project_env",
    "base_url",
    "endpoint",
    "model",
    "image_dir",
    "timeout_s",
    "request_timeout_s",
    "download_timeout_s",
    "concurrency",
    "retries",
    "fallbacks",
    "cooldown_s",
    "upload",
    "arguments",
}


@pytest.mark.parametrize("strategy", ["mock", "fal", "openai", "gemini", "cloudflare", "kie"])
def test_no_strategy_lets_requests_touch_credentials_urls_or_limits(strategy):
    config_model = get_generator_class(strategy).config_model
    assert config_model.OVERRIDABLE, f"{strategy} allows no overrides at all"
    assert config_model.OVERRIDABLE <= set(config_model.model_fields)
    assert not (config_model.OVERRIDABLE & FORBIDDEN), config_model.OVERRIDABLE & FORBIDDEN
    secret_like = {f for f in config_model.OVERRIDABLE if any(w in f for w in ("key", "token", "url", "path", "dir"))}
    assert not secret_like


@pytest.mark.parametrize("field", ["image_dir", "timeout_s", "concurrency", "strategy", "base_url"])
async def test_refused_override_names_the_field(service_factory, client_for, field):
    async with service_factory() as service, client_for(service) as client:
        with pytest.raises(RenderFailed) as info:
            await client.render(request_id=f"ovr-{field}", prompt="p", generator_config={field: "/etc"})
    assert info.value.code == "invalid_request" and field in info.value.event.message


async def test_per_client_cap(service_factory, client_for):
    generators = {"mock": {"strategy": "mock", "delay_s": 0.3, "concurrency": 10}}
    limits = {"max_in_flight_per_client": 2}
    async with service_factory(generators=generators, limits=limits) as service:
        async with client_for(service, client_id="greedy") as greedy, client_for(service, client_id="polite") as polite:
            held = [
                asyncio.create_task(greedy.render(request_id=f"g-{i}", prompt="p", width=64, height=64))
                for i in range(2)
            ]
            async with asyncio.timeout(5):
                while len(service.active) < 2:
                    await asyncio.sleep(0.01)
            with pytest.raises(RenderFailed) as third:
                await greedy.render(request_id="g-2", prompt="p")
            assert third.value.code == "overloaded" and "greedy" in third.value.event.message
            # Another client is not starved by the greedy one.
            assert (await polite.render(request_id="p-0", prompt="p", width=64, height=64)).event
            await asyncio.gather(*held)
            # Once the greedy client's requests finished, it may send again.
            assert (await greedy.render(request_id="g-3", prompt="p", width=64, height=64)).event


async def test_client_refuses_messages_over_the_limit(service_factory, client_for):
    async with service_factory() as service, client_for(service, max_message_bytes=2048) as client:
        with pytest.raises(MessageTooLarge, match="limit is 2048"):
            await client.render(request_id="big", prompt="x" * 3000)


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///run/x", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.168.1.5:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_loopback_detection(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


async def test_default_fair_share_keeps_room_and_turns_for_another_client(service_factory, client_for):
    generators = {"mock": {"strategy": "mock", "delay_s": 0.2, "concurrency": 1}}
    limits = {"max_in_flight": 1, "max_queued": 9}  # capacity 10; the default share is half of it
    async with service_factory(generators=generators, limits=limits) as service:
        async with client_for(service, client_id="flood") as flood, client_for(service, client_id="polite") as polite:
            floods = [
                asyncio.create_task(flood.render(request_id=f"f-{i}", prompt="p", width=64, height=64))
                for i in range(8)
            ]
            async with asyncio.timeout(5):
                while sum(task.done() for task in floods) < 3:  # the three over its share
                    await asyncio.sleep(0.01)
            refused = [task.exception() for task in floods if task.done()]
            assert all(isinstance(e, RenderFailed) and e.code == "overloaded" for e in refused), refused
            assert "max_client_share" in str(refused[0])
            result = await polite.render(request_id="p-1", prompt="p", width=64, height=64)
            # Served at its turn, not after the flood's queue: most of the flood still waits.
            unfinished = sum(not task.done() for task in floods)
            assert result.event.request_id == "p-1" and unfinished >= 3, unfinished
            await asyncio.gather(*floods, return_exceptions=True)
