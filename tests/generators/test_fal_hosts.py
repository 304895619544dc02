"""fal part 2: configured hosts and proxy, retries owned by our retry loop, queue progress and
logs, LoRAs. Everything runs against the fake fal (tests/fakes/fal.py) through config alone."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from image_server.errors import GenerationFailed, GeneratorUnavailable, RateLimited, Unsupported
from image_server.generators.fal import FalConfig, FalGenerator
from image_server.manager import GeneratorManager
from image_server.resilience import CooldownTracker, run_chain
from schemas import LoraSpec
from tests.fakes.fal import FakeError, FakeFal, serve_fal
from tests.fakes.server import TLS_CERT
from tests.generators.test_fal import LIGHTNING, LIGHTNING_I2I, SCHNELL, make_generator, make_job, png_reference, render
from tests.test_secrets import dead_url

FLUX_LORA = "fal-ai/flux-lora"


@pytest.fixture
def fake():
    with serve_fal() as fake:
        yield fake


def port_of(url: str) -> str:
    return url.rsplit(":", 1)[1]


# -- hosts -----------------------------------------------------------------------------------------


async def test_storage_goes_to_the_configured_rest_and_cdn_hosts(fake):
    """Queue on one origin, storage token and CDN upload on another: each call goes where configured."""
    other = fake.run_url  # a second origin of the same fake; it serves storage routes too
    job, _ = make_job(references=[png_reference()], reference_image={"uri": "data:,x"})
    await render(make_generator(fake, LIGHTNING_I2I, upload="storage", rest_url=other, cdn_url=other), job)

    def hosts(method: str, path: str) -> set[str]:
        return {r.headers["Host"] for r in fake.requests(method, path)}

    assert hosts("POST", "/storage/auth/token") == hosts("POST", "/files/upload") == {f"127.0.0.1:{port_of(other)}"}
    assert hosts("POST", "/fal-ai") == {f"127.0.0.1:{port_of(fake.base_url)}"}
    (upload,) = fake.requests("POST", "/files/upload")
    assert upload.headers["Authorization"] == "Bearer fake-cdn-token"  # the CDN never sees the fal key


async def test_run_mode_posts_once_to_the_run_host(fake):
    job, events = make_job(seed=3)
    result = await render(make_generator(fake, SCHNELL, mode="run", queue_url=dead_url()), job)
    (post,) = fake.requests("POST")
    assert post.path == f"/{SCHNELL}" and post.headers["Host"] == f"127.0.0.1:{port_of(fake.run_url)}"
    assert not fake.requests("GET", "/fal-ai")  # no queue polls
    assert result.applied["seed"] == 3 and events[-1] == (1.0, "completed", None)


async def test_every_call_goes_through_the_configured_proxy(fake):
    """fal's hosts are names that do not resolve; only the proxy (the fake, answering absolute-form
    requests as a forward proxy relays them) can serve them."""
    nowhere = "http://fal.invalid"
    fields = {"queue_url": nowhere, "rest_url": nowhere, "cdn_url": nowhere, "proxy": fake.base_url}
    job, _ = make_job(references=[png_reference()], reference_image={"uri": "data:,x"})
    result = await render(make_generator(fake, LIGHTNING_I2I, upload="storage", **fields), job)
    assert result.images[0].data is not None
    paths = [r.path for r in fake.requests()]
    assert f"{nowhere}/storage/auth/token?storage_type=fal-cdn-v3" in paths
    assert f"{nowhere}/files/upload" in paths and f"{nowhere}/{LIGHTNING_I2I}" in paths
    assert any(path.startswith(f"{fake.base_url}/files/") for path in paths)  # the result download too


async def test_https_fake_is_trusted_through_the_generators_ca_bundle_only():
    """The CA bundle is this generator's: the same fake without it fails certificate verification,
    so nothing process-wide (SSL_CERT_FILE, the system store) was changed."""
    with serve_fal(tls=True) as fake:
        assert fake.base_url.startswith("https://127.0.0.1:")
        job, _ = make_job(references=[png_reference()], reference_image={"uri": "data:,x"})
        generator = make_generator(fake, LIGHTNING_I2I, upload="storage", ca_bundle=str(TLS_CERT))
        assert (await render(generator, job)).images[0].data is not None
        with pytest.raises(GenerationFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await render(make_generator(fake), make_job()[0])
        assert not (await make_generator(fake).health()).ok


@pytest.mark.parametrize("bundle", ["missing.pem", "not-a-certificate.pem"])
async def test_an_unreadable_ca_bundle_makes_the_generator_unavailable(fake, tmp_path, bundle):
    (tmp_path / "not-a-certificate.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    generator = make_generator(fake, ca_bundle=str(tmp_path / bundle))
    with pytest.raises(GeneratorUnavailable, match="cannot read ca_bundle"):
        await generator.open()
    assert not (await generator.health()).ok  # a report, not an exception
    assert not fake.requests()


async def test_health_check_uses_the_configured_rest_host(fake):
    report = await make_generator(fake, rest_url=dead_url()).health()
    assert not report.ok and "127.0.0.1" in report.detail and fake.scenario.key not in report.detail
    assert (await make_generator(fake).health()).ok
    assert [r.path for r in fake.requests()] == ["/storage/auth/token?storage_type=fal-cdn-v3"]


@pytest.mark.parametrize("url", ["ftp://fal.example", "queue.fal.run", "http://", "http://host/x?y=1"])
def test_host_fields_must_be_http_urls(url):
    with pytest.raises(ValidationError):
        FalConfig(endpoint=SCHNELL, queue_url=url)


def test_host_fields_default_to_fal_and_lose_a_trailing_slash():
    config = FalConfig(endpoint=SCHNELL, rest_url="http://127.0.0.1:9/")
    assert config.rest_url == "http://127.0.0.1:9"
    assert (config.queue_url, config.run_url, config.cdn_url) == (
        "https://queue.fal.run",
        "https://fal.run",
        "https://v3.fal.media",
    )


# -- retries belong to our retry loop --------------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 2])
async def test_persistent_429_is_rate_limited_after_exactly_our_retries(fake, retries):
    fake.scenario.errors["submit"] = FakeError(429, {"detail": "Too many requests"}, {"Retry-After": "7"})
    config = FalConfig(endpoint=LIGHTNING, retries=retries, retry_backoff_s=0.01, **fake.hosts())
    manager = GeneratorManager(
        {"falai": config},
        default="falai",
        factory=lambda name, cfg: FalGenerator(cfg, name=name, environ={"FAL_KEY": fake.scenario.key}),
    )
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async with manager:
        with pytest.raises(RateLimited) as info:
            await run_chain(
                ["falai"],
                lambda name, number: manager.generate(name, make_job()[0]),
                config_for=manager.config,
                cooldowns=CooldownTracker(),
                rng=random.Random(1),
                sleep=sleep,
            )
    assert info.value.code == "rate_limited" and info.value.attempts == retries + 1
    assert len(fake.requests("POST", "/fal-ai")) == retries + 1  # one submit per attempt, none hidden
    assert slept == [7.0] * retries  # each wait honours Retry-After


# -- progress --------------------------------------------------------------------------------------


async def test_logs_become_progress_messages_when_configured(fake):
    fake.scenario.statuses = [("IN_PROGRESS", None), ("IN_PROGRESS", None), ("COMPLETED", None)]
    fake.scenario.logs = [
        {"message": "loading weights", "level": "INFO", "timestamp": "t0"},
        {"message": "step 2/4", "level": "INFO", "timestamp": "t1"},
        {"message": "done", "level": "INFO", "timestamp": "t2"},
    ]
    job, events = make_job()
    await render(make_generator(fake, progress_logs=True), job)
    assert [message for _, message, _ in events] == ["generating", "loading weights", "step 2/4", "done", "completed"]
    polls = [r.path for r in fake.requests("GET", "/fal-ai") if "/status" in r.path]
    assert len(polls) == 3 and all(path.endswith("/status?logs=true") for path in polls)

    fake.jobs.clear()
    job, events = make_job()
    await render(make_generator(fake), job)
    assert [message for _, message, _ in events] == ["generating", "completed"]


@pytest.mark.parametrize(
    ("output", "error"), [({"images": []}, None), (None, FakeError(422, {"detail": [{"msg": "bad", "type": "x"}]}))]
)
async def test_no_completed_progress_when_the_result_fails(fake, output, error):
    fake.scenario.output = output
    if error is not None:
        fake.scenario.errors["result"] = error
    job, events = make_job()
    with pytest.raises(GenerationFailed):
        await render(make_generator(fake), job)
    assert events and all(fraction is None and message != "completed" for fraction, message, _ in events)


# -- LoRAs -----------------------------------------------------------------------------------------

LORAS = [LoraSpec(name="https://example.test/style.safetensors", strength=0.8), LoraSpec(name="pixel-art")]


async def test_lora_endpoint_gets_the_request_loras(fake):
    result = await render(make_generator(fake, FLUX_LORA), make_job(loras=LORAS)[0])
    (job,) = fake.jobs.values()
    assert job.arguments["loras"] == [
        {"path": "https://example.test/style.safetensors", "scale": 0.8},
        {"path": "pixel-art", "scale": 1.0},
    ]
    assert result.applied["loras"] == [
        {"name": "https://example.test/style.safetensors", "strength": 0.8},
        {"name": "pixel-art", "strength": 1.0},
    ]
    assert "loras" not in result.ignored


async def test_endpoint_without_loras_lists_them_as_ignored(fake: FakeFal):
    result = await render(make_generator(fake, LIGHTNING), make_job(loras=LORAS)[0])
    (job,) = fake.jobs.values()
    assert "loras" not in job.arguments and result.ignored == ["loras"]


async def test_more_loras_than_the_endpoint_takes_is_unsupported(fake):
    loras = [LoraSpec(name=f"lora-{n}") for n in range(4)]
    with pytest.raises(Unsupported, match="at most 3 LoRAs"):
        await render(make_generator(fake, FLUX_LORA), make_job(loras=loras)[0])
    assert not fake.jobs


async def test_the_fake_answers_arguments_fal_would_ignore_but_flags_them(fake):
    """Like fal, the fake does not refuse an argument the endpoint lacks; unlike fal, it tells."""
    result = await render(make_generator(fake, LIGHTNING, arguments={"acceleration": "high"}), make_job()[0])
    assert result.images and fake.dropped == [(LIGHTNING, ["acceleration"])]
    fake.dropped.clear()  # serve_fal would fail this test at teardown otherwise
