"""The prompt policy through the service's sockets: refuse, truncate, compress with a fake Ollama."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from image_server.client import RenderFailed
from image_server.generators.base import Capabilities, GeneratorConfig
from image_server.generators.mock import MockGenerator
from image_server.prompting.policy import truncate_at_word
from schemas import RenderRequest, encode_message
from tests.fakes.ollama import FakeOllama, rewrite

LIMIT = 40
LONG = "a very very red fox with a bushy tail in the snow, the snow, the red fox, in watercolor"  # 85 chars
GENERATORS = {"mock": {"strategy": "mock"}, "short": {"strategy": "mock"}}


class ShortPrompts(MockGenerator):
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_images=1, max_prompt_chars=LIMIT)


def factory(name: str, config: GeneratorConfig) -> MockGenerator:
    return (ShortPrompts if name == "short" else MockGenerator)(config, name=name)


def prompting(on_too_long: str, url: str = "http://127.0.0.1:9", **ollama: Any) -> dict[str, Any]:
    return {"on_too_long": on_too_long, "ollama": {"url": url, "timeout_s": 5, **ollama}}


def test_truncate_at_word_boundaries():
    assert truncate_at_word("red fox jumps", 7) == "red fox"
    assert truncate_at_word("red fox jumps", 9) == "red fox"
    assert truncate_at_word("red, fox jumps", 5) == "red"
    assert truncate_at_word("supercalifragilistic", 5) == "super"
    assert truncate_at_word("short", 40) == "short"


async def test_refuse_names_the_limit_and_hard_limit(service_factory, client_for, raw_peer):
    async with (
        service_factory(generators=GENERATORS, factory=factory, prompting={"hard_limit_chars": 100}) as service,
        client_for(service) as client,
    ):
        with pytest.raises(RenderFailed) as refused:
            await client.render(request_id="ref-1", generator="short", prompt=LONG)
        assert refused.value.code == "prompt_too_long" and str(LIMIT) in refused.value.event.message
        with pytest.raises(RenderFailed) as hard:
            await client.render(request_id="ref-2", prompt="x " * 60)
        assert hard.value.code == "prompt_too_long" and "at most 100" in hard.value.event.message
        peer = await raw_peer(service)
        await peer.send(encode_message(RenderRequest.model_construct(request_id="ref-3", prompt="x" * 10_001)))
        found = await peer.next_event(lambda m: getattr(m, "request_id", None) == "ref-3")
        assert found.message.code == "prompt_too_long"


async def test_truncate(service_factory, client_for):
    async with (
        service_factory(generators=GENERATORS, factory=factory, prompting=prompting("truncate")) as service,
        client_for(service) as client,
    ):
        done = await client.render(request_id="tr-1", generator="short", prompt=LONG)
    assert done.event.prompt == truncate_at_word(LONG, LIMIT) and len(done.event.prompt) <= LIMIT
    assert LONG.startswith(done.event.prompt) and LONG[len(done.event.prompt)] in " ,"
    assert done.event.applied["prompt_policy"] == "truncated"
    assert done.event.applied["prompt_original_chars"] == len(LONG)
    assert done.event.applied["prompt_final_chars"] == len(done.event.prompt)


@pytest.mark.parametrize("stream", [False, True])
async def test_compress_with_ollama(service_factory, client_for, stream):
    with FakeOllama() as ollama:
        config = prompting("compress", ollama.base_url, stream=stream, keep_alive="10m")
        async with (
            service_factory(generators=GENERATORS, factory=factory, prompting=config) as service,
            client_for(service) as client,
        ):
            done = await client.render(request_id="co-1", generator="short", prompt=LONG)
            fits = await client.render(request_id="co-2", generator="short", prompt="a fox")
        call = ollama.generate_calls[0]
    assert done.event.prompt == rewrite(LONG) and len(done.event.prompt) <= LIMIT
    assert done.event.applied["prompt_policy"] == "compressed"
    assert call["model"] == "llama3.2:1b" and call["keep_alive"] == "10m" and call["stream"] is stream
    assert call["prompt"] == LONG and f"at most {LIMIT} characters" in call["system"]
    assert "prompt_policy" not in fits.event.applied and len(ollama.generate_calls) == 1


@pytest.mark.parametrize(
    ("scenario", "setup", "note"),
    [
        ("model_missing", {"model": "not-pulled:7b"}, "model 'not-pulled:7b' not found"),
        ("slow", {"timeout_s": 0.3}, "did not answer within 0.3 s"),
        ("echo", {}, "over the limit of 40"),
        ("midstream_error", {"stream": True}, "an error was encountered"),
        ("server_error", {}, "llama runner process has terminated"),
        ("down", {}, "unreachable"),
    ],
)
async def test_compression_failures_fall_back(service_factory, client_for, scenario, setup, note):
    with FakeOllama() as ollama:
        ollama.scenario = "ok" if scenario in ("model_missing", "down") else scenario
        ollama.delay_s = 5.0 if scenario == "slow" else 0.0
        url = ollama.base_url
        if scenario == "down":
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        config = prompting("compress", url, **setup)
        async with (
            service_factory(generators=GENERATORS, factory=factory, prompting=config) as service,
            client_for(service) as client,
        ):
            done = await client.render(request_id="fb-1", generator="short", prompt=LONG)
    assert done.event.applied["prompt_policy"] == "truncated"
    assert note in done.event.applied["prompt_policy_note"]
    assert done.event.prompt == truncate_at_word(LONG, LIMIT)


async def test_compression_failure_with_refuse_or_as_is_fallback(service_factory, client_for):
    with FakeOllama() as ollama:
        ollama.scenario = "echo"
        refuse = {**prompting("compress", ollama.base_url), "fallback": "refuse"}
        async with (
            service_factory(generators=GENERATORS, factory=factory, prompting=refuse) as service,
            client_for(service) as client,
        ):
            with pytest.raises(RenderFailed) as refused:
                await client.render(request_id="fr-1", generator="short", prompt=LONG)
        assert refused.value.code == "prompt_too_long" and "compressing it failed" in refused.value.event.message
        # as_is: the provider gets the prompt unchanged and decides (this mock takes it).
        as_is = {**prompting("compress", ollama.base_url), "fallback": "as_is"}
        async with (
            service_factory(generators=GENERATORS, factory=factory, prompting=as_is) as service,
            client_for(service) as client,
        ):
            done = await client.render(request_id="fr-2", generator="short", prompt=LONG)
    assert done.event.prompt == LONG and done.event.applied["prompt_policy"] == "as_is"


def test_the_fake_ollama_speaks_the_contract():
    """The fake behaves as API_CONTRACTS.md §11 says, beyond what the compressor uses."""
    with FakeOllama() as ollama, httpx.Client(base_url=ollama.base_url) as http:
        assert http.get("/").text == "Ollama is running"
        assert [m["name"] for m in http.get("/api/tags").json()["models"]] == ["llama3.2:1b"]
        chat = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "the red red fox"}]}
        answer = http.post("/api/chat", json={**chat, "stream": False}).json()
        assert answer["message"]["content"] == "red fox" and answer["done"] is True
        lines = [json.loads(line) for line in http.post("/api/chat", json=chat).text.splitlines()]
        assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])
        missing = http.post("/api/generate", json={"model": "nope", "prompt": "x", "stream": False})
        assert missing.status_code == 404 and missing.json() == {"error": "model 'nope' not found"}
