"""Retries with backoff and Retry-After, fallback chains, capability skips and cool-downs:
unit tests of ``image_server.resilience`` with an injected clock, sleep and rng, then the
same behaviour through a running service with scripted failing generators."""

from __future__ import annotations

import base64
import io
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from image_server.client import RenderFailed
from image_server.errors import (
    ContentPolicy,
    GenerationFailed,
    GenerationTimeout,
    ImageServerError,
    RateLimited,
    Unsupported,
)
from image_server.generators.base import Capabilities, GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator
from image_server.resilience import (
    MAX_BACKOFF_S,
    CooldownTracker,
    backoff_delay,
    counts_against_generator,
    run_chain,
)
from schemas import ImageReady, ImageSource, RenderAccepted, RenderError
from tests.test_cancel_priority import EventLog, until

# -- units: backoff, cool-down tracker, the chain ----------------------------------------


class FixedJitter(random.Random):
    """An rng whose jitter factor is chosen by the test."""

    def __init__(self, factor: float) -> None:
        super().__init__(0)
        self.factor = factor

    def uniform(self, a: float, b: float) -> float:
        assert (a, b) == (0.5, 1.5)
        return self.factor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(**fields: Any) -> GeneratorConfig:
    return GeneratorConfig(strategy="mock", **fields)


def test_backoff_doubles_with_jitter_and_a_cap():
    assert backoff_delay(1, 0.5, None, FixedJitter(1.0)) == 0.5
    assert backoff_delay(2, 0.5, None, FixedJitter(1.0)) == 1.0
    assert backoff_delay(4, 0.5, None, FixedJitter(1.5)) == pytest.approx(6.0)
    assert backoff_delay(3, 0.5, None, FixedJitter(0.5)) == 1.0
    assert backoff_delay(30, 0.5, None, FixedJitter(1.0)) == MAX_BACKOFF_S
    rng = random.Random(7)
    delays = [backoff_delay(2, 1.0, None, rng) for _ in range(200)]
    assert all(1.0 <= d <= 3.0 for d in delays) and len(set(delays)) > 100  # jittered, not fixed


def test_backoff_never_shorter_than_retry_after():
    assert backoff_delay(1, 0.5, 7.0, FixedJitter(1.5)) == 7.0
    assert backoff_delay(5, 1.0, 2.0, FixedJitter(1.0)) == 16.0  # the longer of the two
    assert backoff_delay(1, 0.0, None, FixedJitter(1.0)) == 0.0


def test_cooldown_tracker_opens_after_consecutive_failures_and_closes_after_the_period():
    clock = FakeClock()
    tracker = CooldownTracker(clock=clock)
    cfg = config(cooldown_after=3, cooldown_s=30.0)
    tracker.record_failure("g", cfg)
    tracker.record_failure("g", cfg)
    tracker.record_success("g")  # a success in between: the count starts again
    tracker.record_failure("g", cfg)
    tracker.record_failure("g", cfg)
    assert tracker.cooling_until("g") is None
    tracker.record_failure("g", cfg)
    assert tracker.cooling_until("g") == 1030.0 and tracker.cooling_until("other") is None
    clock.now = 1029.9
    assert tracker.cooling_until("g") == 1030.0
    clock.now = 1030.0
    assert tracker.cooling_until("g") is None  # over: the next attempt decides
    tracker.record_failure("g", cfg)  # one more failure is not yet a new cool-down
    assert tracker.cooling_until("g") is None


def test_cooldown_disabled_with_zero_period():
    tracker = CooldownTracker(clock=FakeClock())
    for _ in range(10):
        tracker.record_failure("g", config(cooldown_after=1, cooldown_s=0.0))
    assert tracker.cooling_until("g") is None


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (GenerationFailed("503", status=503, retryable=True), True),
        (RateLimited("429", status=429), True),
        (GenerationTimeout("slow"), True),
        (GenerationFailed("auth", status=401, retryable=False), True),
        (GenerationFailed("bad request", status=400, retryable=False), False),
        (ContentPolicy("nope", status=400), False),
        (Unsupported("no i2i"), False),
    ],
)
def test_which_failures_count_against_a_generator(error, counts):
    assert counts_against_generator(error) is counts


@dataclass
class Scripted:
    """``attempt(name, number)`` for run_chain: raises the next planned error of ``name``."""

    plan: dict[str, list[ImageServerError]]
    calls: list[tuple[str, int]] = field(default_factory=list)
    slept: list[float] = field(default_factory=list)

    async def attempt(self, name: str, number: int) -> str:
        self.calls.append((name, number))
        if self.plan.get(name):
            raise self.plan[name].pop(0)
        return f"image from {name}"

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)


async def chain(
    script: Scripted, names: list[str], configs: dict[str, GeneratorConfig], tracker: CooldownTracker | None = None
) -> Any:
    return await run_chain(
        names,
        script.attempt,
        config_for=configs.__getitem__,
        cooldowns=tracker or CooldownTracker(clock=FakeClock()),
        rng=FixedJitter(1.0),
        sleep=script.sleep,
    )


async def test_run_chain_retries_with_backoff_and_retry_after():
    script = Scripted({"a": [GenerationFailed("503", retryable=True), RateLimited("429", retry_after=9.0)]})
    result = await chain(script, ["a"], {"a": config(retries=2, retry_backoff_s=0.25)})
    assert (result.generator, result.value, result.attempts) == ("a", "image from a", 3)
    assert script.calls == [("a", 1), ("a", 2), ("a", 3)]
    assert script.slept == [0.25, 9.0]  # backoff for the first retry, Retry-After for the second


async def test_run_chain_gives_up_after_retries_and_falls_back():
    broken = [GenerationFailed("503", retryable=True) for _ in range(3)]
    script = Scripted({"a": broken})
    configs = {"a": config(retries=1, retry_backoff_s=0.1), "b": config(retries=0)}
    result = await chain(script, ["a", "b"], configs)
    assert (result.generator, result.attempts) == ("b", 3)
    assert script.calls == [("a", 1), ("a", 2), ("b", 3)] and script.slept == [0.1]


async def test_run_chain_does_not_retry_non_retryable_errors():
    script = Scripted({"a": [GenerationFailed("bad request", status=400, retryable=False)]})
    result = await chain(script, ["a", "b"], {"a": config(retries=5), "b": config()})
    assert result.generator == "b" and script.calls == [("a", 1), ("b", 2)] and script.slept == []

    refused = Scripted({"a": [ContentPolicy("refused")]})
    with pytest.raises(ContentPolicy) as error:
        await chain(refused, ["a", "b"], {"a": config(retries=5), "b": config()})
    # A content refusal is an answer about the prompt: not retried, not shopped around.
    assert refused.calls == [("a", 1)] and error.value.attempts == 1


async def test_run_chain_raises_the_last_error_with_all_attempts_counted():
    script = Scripted(
        {
            "a": [GenerationFailed("a down", retryable=True) for _ in range(2)],
            "b": [GenerationFailed("b down", status=502, retryable=True)],
        }
    )
    with pytest.raises(GenerationFailed, match="b down") as error:
        await chain(script, ["a", "b"], {"a": config(retries=1), "b": config(retries=0)})
    assert error.value.attempts == 3 and error.value.retryable


async def test_run_chain_skips_a_cooling_generator_until_its_period_ends():
    clock = FakeClock()
    tracker = CooldownTracker(clock=clock)
    configs = {"a": config(retries=0, cooldown_after=2, cooldown_s=10.0), "b": config()}
    script = Scripted({"a": [GenerationFailed("down", retryable=True) for _ in range(2)]})
    for _ in range(2):
        assert (await chain(script, ["a", "b"], configs, tracker)).generator == "b"
    assert tracker.cooling_until("a") == clock.now + 10.0
    script.calls.clear()
    assert (await chain(script, ["a", "b"], configs, tracker)).attempts == 1
    assert script.calls == [("b", 1)]  # a was skipped without an attempt
    clock.now += 10.0
    result = await chain(script, ["a", "b"], configs, tracker)
    assert (result.generator, script.calls[-1]) == ("a", ("a", 1))
    # The last generator of a chain is tried even while cooling: better a slim chance than none.
    tracker.record_failure("a", config(cooldown_after=1, cooldown_s=10.0))
    assert (await chain(script, ["a"], configs, tracker)).generator == "a"


# -- through the service ------------------------------------------------------------------


@dataclass
class Call:
    generator: str
    request_id: str
    attempt: int
    at: float


class Failing:
    """MockGenerator handlers per generator name: each raises its planned errors in turn
    (or always, while ``broken``), then draws normally. Calls are recorded with times."""

    def __init__(self, plan: dict[str, list[ImageServerError]] | None = None, broken: set[str] | None = None) -> None:
        self.plan = plan or {}
        self.broken = broken or set()
        self.calls: list[Call] = []

    def factory(self, name: str, config: GeneratorConfig) -> MockGenerator:
        def handler(job: RenderJob) -> None:
            self.calls.append(Call(name, job.request.request_id, job.attempt, time.monotonic()))
            if self.plan.get(name):
                raise self.plan[name].pop(0)
            if name in self.broken:
                raise GenerationFailed(f"{name} is down", status=503, retryable=True, generator=name)

        generator_class = TextOnly if name.startswith("textonly") else MockGenerator
        return generator_class(config, name=name, handler=handler)

    def of(self, request_id: str) -> list[tuple[str, int]]:
        return [(c.generator, c.attempt) for c in self.calls if c.request_id == request_id]


class TextOnly(MockGenerator):
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(text_to_image=True, image_to_image=False, max_images=8)


def png_data_uri(color: tuple[int, int, int], size: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def mocks(**tables: dict[str, Any]) -> dict[str, Any]:
    """``generators`` config: a plain ``mock`` plus the named mock-strategy tables."""
    return {"mock": {"strategy": "mock"}, **{name: {"strategy": "mock", **t} for name, t in tables.items()}}


async def test_rate_limited_attempts_are_retried_after_retry_after(service_factory, raw_peer):
    retry_after = 0.3
    failing = Failing({"mock": [RateLimited("slow down", retry_after=retry_after) for _ in range(2)]})
    generators = {"mock": {"strategy": "mock", "retries": 2, "retry_backoff_s": 0.01}}
    async with service_factory(generators=generators, factory=failing.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("rl-1")
            ready = await log.terminal("rl-1")
    assert isinstance(ready, ImageReady) and ready.generator == "mock" and ready.attempts == 3
    assert failing.of("rl-1") == [("mock", 1), ("mock", 2), ("mock", 3)]
    times = [call.at for call in failing.calls]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    # The backoff alone would be ~10 ms: each gap proves the provider's Retry-After was honoured.
    assert all(gap >= retry_after - 1e-3 for gap in gaps), gaps


async def test_retryable_failure_is_retried_and_exhausted_retries_report_attempts(service_factory, client_for):
    failing = Failing({"mock": [GenerationFailed("flaky 502", status=502, retryable=True)]}, broken={"down"})
    generators = mocks(down={"retries": 2, "retry_backoff_s": 0.0})
    generators["mock"].update(retries=2, retry_backoff_s=0.0)
    async with service_factory(generators=generators, factory=failing.factory) as service:
        async with client_for(service) as client:
            ok = await client.render(request_id="retry-ok", prompt="p", width=64, height=64)
            with pytest.raises(RenderFailed) as failed:
                await client.render(request_id="retry-out", prompt="p", generator="down", width=64, height=64)
    assert ok.event.attempts == 2 and failing.of("retry-ok") == [("mock", 1), ("mock", 2)]
    error = failed.value.event
    assert error.code == "generation_failed" and error.attempts == 3 and error.retryable
    assert failing.of("retry-out") == [("down", 1), ("down", 2), ("down", 3)]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ContentPolicy("not allowed", status=400), "content_policy"),
        (GenerationFailed("bad parameter", status=400, retryable=False), "generation_failed"),
    ],
)
async def test_non_retryable_failures_are_not_retried(service_factory, raw_peer, error, code):
    failing = Failing({"mock": [error]})
    generators = {"mock": {"strategy": "mock", "retries": 3, "retry_backoff_s": 0.0}}
    async with service_factory(generators=generators, factory=failing.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("nr-1")
            end = await log.terminal("nr-1")
    assert isinstance(end, RenderError) and end.code == code and end.attempts == 1 and not end.retryable
    assert failing.of("nr-1") == [("mock", 1)]


async def test_configured_fallbacks_and_per_request_fallbacks(service_factory, raw_peer):
    failing = Failing(broken={"primary"})
    generators = mocks(primary={"retries": 0, "fallbacks": ["secondary"]}, secondary={"retries": 0})
    async with service_factory(generators=generators, factory=failing.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("fb-config", generator="primary")
            by_config = await log.terminal("fb-config")
            await log.render("fb-request", generator="primary", fallbacks=["mock"])
            by_request = await log.terminal("fb-request")
    assert isinstance(by_config, ImageReady) and by_config.generator == "secondary" and by_config.attempts == 2
    assert failing.of("fb-config") == [("primary", 1), ("secondary", 2)]
    # The request's own fallbacks replace the configured ones; naming mock gets mock's image.
    assert isinstance(by_request, ImageReady) and by_request.generator == "mock" and by_request.attempts == 2
    assert failing.of("fb-request") == [("primary", 1), ("mock", 2)]
    assert "/mock/" in (by_request.images[0].path or "")


async def test_chain_skips_generators_lacking_a_capability(service_factory, raw_peer):
    failing = Failing(broken={"primary"})
    generators = mocks(primary={"retries": 0}, textonly={"retries": 0})
    reference = ImageSource(image_data=png_data_uri((10, 200, 10)))
    async with service_factory(generators=generators, factory=failing.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("cap-1", generator="primary", fallbacks=["textonly", "mock"], reference_image=reference)
            skipped = await log.terminal("cap-1")
            # A text-only first choice is skipped at admission: the chain starts at its fallback.
            await log.render("cap-2", generator="textonly", fallbacks=["mock"], reference_image=reference)
            started_later = await log.terminal("cap-2")
            await log.render("cap-3", generator="textonly", fallbacks=["mock"])
            text_only = await log.terminal("cap-3")
    assert isinstance(skipped, ImageReady) and skipped.generator == "mock" and skipped.attempts == 2
    assert failing.of("cap-1") == [("primary", 1), ("mock", 2)]
    assert log.of("cap-2", RenderAccepted)[0].generator == "mock"
    assert isinstance(started_later, ImageReady) and started_later.generator == "mock"
    assert started_later.attempts == 1 and failing.of("cap-2") == [("mock", 1)]
    assert isinstance(text_only, ImageReady) and text_only.generator == "textonly"


async def test_when_every_generator_fails_the_error_is_reported_never_an_image(service_factory, raw_peer):
    failing = Failing(broken={"primary", "secondary"})
    generators = mocks(primary={"retries": 1, "retry_backoff_s": 0.0}, secondary={"retries": 0})
    async with service_factory(generators=generators, factory=failing.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("all-fail", generator="primary", fallbacks=["secondary"])
            end = await log.terminal("all-fail")
            await log.flush()
        output = service.config.output_dir
    assert isinstance(end, RenderError) and end.code == "generation_failed" and end.attempts == 3
    assert failing.of("all-fail") == [("primary", 1), ("primary", 2), ("secondary", 3)]
    assert log.of("all-fail", ImageReady) == []
    assert not output.exists() or not any(path.is_file() for path in output.rglob("*"))


async def test_cool_down_entry_reported_in_status_and_exit(service_factory, raw_peer, client_for):
    cooldown_s = 0.6  # short, yet far longer than the few renders that must fall inside it
    failing = Failing(broken={"flaky"})
    generators = mocks(flaky={"retries": 0, "cooldown_after": 2, "cooldown_s": cooldown_s, "fallbacks": ["mock"]})
    async with service_factory(generators=generators, factory=failing.factory) as service:
        async with EventLog(await raw_peer(service)) as log, client_for(service) as client:

            async def render(rid: str) -> ImageReady:
                await log.render(rid, generator="flaky")
                event = await log.terminal(rid)
                assert isinstance(event, ImageReady), event
                return event

            assert (await render("cd-1")).attempts == 2
            before = time.time()
            assert (await render("cd-2")).attempts == 2  # the second failure in a row
            status = await client.status()
            cooling = {g.name: g.cooling_down_until for g in status.generators}
            assert cooling["mock"] is None and cooling["flaky"] is not None
            assert before < cooling["flaky"] <= time.time() + cooldown_s

            skipped = await render("cd-3")
            assert (skipped.generator, skipped.attempts) == ("mock", 1)
            assert failing.of("cd-3") == [("mock", 1)]  # flaky was not even tried

            failing.broken.clear()  # the provider recovers
            flaky_status: Callable[[], float | None] = lambda: next(  # noqa: E731
                g.cooling_down_until for g in service.status().generators if g.name == "flaky"
            )
            await until(lambda: flaky_status() is None, timeout=5)
            back = await render("cd-4")
    assert (back.generator, back.attempts) == ("flaky", 1)
    assert failing.of("cd-4") == [("flaky", 1)]
