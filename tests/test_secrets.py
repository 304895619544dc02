"""A planted API key never leaves the process: not in events, ServiceStatus, logs, exceptions,
health reports, config reprs or the files the service writes, whatever the provider does.

Each cloud strategy reads the key from the real environment (as in production) and talks to
its local fake (tests/fakes), scripted to fail every way we know: wrong key (some fakes echo
the presented key back), 5xx bodies repeating the key, malformed answers, timeouts, and a
port nobody listens on. Requests go through a live service over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from image_server.client import RenderFailed
from image_server.errors import ImageServerError
from image_server.generators.base import RenderJob
from image_server.generators.registry import get_generator_class, validate_generator_config
from schemas import ImageReady, RenderError, RenderRequest as Request, decode_frames
from tests.fakes.cloudflare import FakeCloudflare, envelope
from tests.fakes.fal import FakeError, FalScenario, serve_fal
from tests.fakes.gemini import FakeGemini
from tests.fakes.kie import FakeKie
from tests.fakes.leonardo import FakeLeonardo
from tests.fakes.openai import ScriptedError, fake_openai, server_error
from tests.fakes.runpod import FakeRunPod
from tests.fakes.runware import FakeRunware

PLANTED = "sk-PLANTED-abc123-SECRET"
FAL_PLANTED = f"PLANTEDID:{PLANTED}"  # fal keys are "key_id:key_secret"; neither half may leak
# A distinctive fragment of each half too: a message cut mid-key would slip past a whole-key scrub.
NEEDLES = (PLANTED, "PLANTED", "abc123-SECRET")
KEY_ENV = "IMGSRV_TEST_PROVIDER_KEY"
ACCOUNT_ENV = "IMGSRV_TEST_CF_ACCOUNT"
DEADLINE = 10.0
FAST = {"retries": 1, "retry_backoff_s": 0.01, "timeout_s": 2.0}


def dead_url() -> str:
    """An address on this machine where nothing listens (a port that was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@dataclass
class Provider:
    """A running fake, the generator table aimed at it, and the failure modes it can play."""

    table: dict[str, Any]
    dead_table: dict[str, Any]
    modes: dict[str, Callable[[], None]]
    key_seen: Callable[[], bool]  # the fake received the planted key (so it was really in play)
    key: str = PLANTED
    around_dead: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


@contextlib.contextmanager
def openai_provider() -> Iterator[Provider]:
    with fake_openai(api_key=PLANTED) as fake:

        def mode(**knobs: Any) -> Callable[[], None]:
            def apply() -> None:
                fake.reset()
                fake.api_key = knobs.get("api_key", PLANTED)
                if "error" in knobs:
                    fake.fail_next(knobs["error"], times=2)  # each attempt (one retry) meets it
                for name in ("delay_s", "malformed", "revised_prompt"):
                    setattr(fake, name, knobs.get(name, getattr(fake, name)))

            return apply

        table = {"strategy": "openai", "api_key_env": KEY_ENV, "request_timeout_s": 0.3, **FAST}
        echo = ScriptedError(500, f"upstream rejected credentials {PLANTED} for this org", "server_error")
        # The key straddles the 500 characters kept of a message: a cut before scrubbing leaks half.
        cut = ScriptedError(500, "x" * 490 + PLANTED, "server_error")
        yield Provider(
            table={**table, "base_url": fake.base_url},
            dead_table={**table, "base_url": dead_url() + "/v1"},
            modes={
                "ok": mode(),
                # A 200 whose revised prompt repeats the key (it reaches ImageReady.prompt).
                "200-echo-revised-prompt": mode(revised_prompt=f"a lighthouse; credentials {PLANTED}"),
                "wrong-key-echoed": mode(api_key="sk-the-right-one"),  # 401 quoting the presented key
                "500-echo": mode(error=echo),
                "500-echo-cut": mode(error=cut),
                "500": mode(error=server_error(503)),
                "malformed": mode(malformed="json"),
                "timeout": mode(delay_s=2.0),
            },
            key_seen=lambda: any(PLANTED in str(r.headers) for r in fake.requests),
        )


@contextlib.contextmanager
def gemini_provider() -> Iterator[Provider]:
    with FakeGemini(api_key=PLANTED) as fake:

        def mode(scenario: str, api_key: str = PLANTED, text: str | None = None) -> Callable[[], None]:
            def apply() -> None:
                fake.reset()
                fake.__dict__.pop("answer", None)
                fake.scenario, fake.api_key, fake.delay_s = scenario, api_key, 2.0
                if scenario == "echo_cut":  # the key straddles the 300 characters kept of a message
                    fake.answer = lambda parts: (500, fake.error_body(500, "x" * 290 + PLANTED), {})
                if text is not None:
                    fake.text = text

            return apply

        def text_only(text: str) -> Callable[[], None]:
            return mode("text_only", text=text)

        table = {"strategy": "gemini", "api_key_env": KEY_ENV, "request_timeout_s": 0.3, **FAST}
        yield Provider(
            table={**table, "base_url": fake.url},
            dead_table={**table, "base_url": dead_url()},
            modes={
                "ok": mode("ok"),
                "wrong-key": mode("ok", api_key="the-right-one"),
                "500-echo": mode("echo_key"),
                "500-echo-cut": mode("echo_cut"),
                # 200s without an image whose text repeats the key: quoted in the RenderError.
                "200-echo-text-only": text_only(f"I will not draw; your key is {PLANTED}."),
                "200-echo-text-only-cut": text_only("y" * 280 + PLANTED),  # straddles the 300 kept
                "500": mode("internal"),
                "malformed": mode("malformed"),
                "timeout": mode("slow"),
            },
            key_seen=lambda: any(PLANTED in str(r.headers) for r in fake.requests),
        )


@contextlib.contextmanager
def cloudflare_provider() -> Iterator[Provider]:
    with FakeCloudflare(api_token=PLANTED) as fake:

        def mode(scenario: str, token: str = PLANTED) -> Callable[[], None]:
            def apply() -> None:
                fake.reset()
                fake.__dict__.pop("answer", None)
                fake.scenario, fake.api_token, fake.delay_s = scenario, token, 2.0
                if scenario == "echo_cut":  # the key straddles the 300 characters kept of a message
                    body = envelope(errors=[(5000, "x" * 284 + PLANTED)])
                    fake.answer = lambda token, account, model: (500, body, {}, "application/json")

            return apply

        table = {
            "strategy": "cloudflare",
            "api_token_env": KEY_ENV,
            "account_id_env": ACCOUNT_ENV,
            "request_timeout_s": 0.3,
            **FAST,
        }
        yield Provider(
            table={**table, "base_url": fake.base_url},
            dead_table={**table, "base_url": dead_url() + "/client/v4"},
            modes={
                "ok": mode("ok"),
                "wrong-key": mode("ok", token="the-right-one"),
                "500-echo": mode("echo_secrets"),
                "500-echo-cut": mode("echo_cut"),
                "500": mode("internal"),
                "malformed": mode("malformed"),
                "timeout": mode("slow"),
            },
            key_seen=lambda: any(PLANTED in str(r.headers) for r in fake.requests),
        )


@contextlib.contextmanager
def fal_provider() -> Iterator[Provider]:
    scenario = FalScenario(key=FAL_PLANTED)
    with serve_fal(scenario) as fake:

        def mode(**knobs: Any) -> Callable[[], None]:
            def apply() -> None:
                fake.release_all()
                fake.stopping.clear()
                fake.scenario = FalScenario(**{"key": FAL_PLANTED, **knobs})

            return apply

        echo = {"detail": f"No user found for Key {FAL_PLANTED}", "error_type": "auth"}
        table = {"strategy": "fal", "endpoint": "fal-ai/fast-lightning-sdxl", "api_key_env": KEY_ENV, **FAST}
        table |= fake.hosts() | {"progress_logs": True}
        table |= {"poll_interval_s": 0.01, "request_timeout_s": 0.5, "cancel_timeout_s": 0.5, "timeout_s": 0.6}
        dead = dead_url()
        yield Provider(
            table=table,
            dead_table={**table, "queue_url": dead, "rest_url": dead, "cdn_url": dead},
            modes={
                "ok": mode(),
                "wrong-key": mode(key="right-id:right-secret"),
                "401-echo": mode(errors={"submit": FakeError(401, echo)}),
                "500-echo-status": mode(errors={"status": FakeError(500, {"detail": f"boom {FAL_PLANTED}"})}),
                # The cut at 497 characters of a detail falls inside the key's secret half.
                "500-echo-cut": mode(errors={"submit": FakeError(500, {"detail": "x" * 473 + FAL_PLANTED})}),
                "malformed-result": mode(raw_result=b'{"images": [{"url": "' + FAL_PLANTED.encode()),
                # fal's log lines become progress messages: one that quotes the key is scrubbed.
                "log-leak": mode(
                    logs=[{"message": f"authorized with {FAL_PLANTED}", "level": "INFO"}],
                    errors={"result": FakeError.platform(500, "runner_server_error")},
                ),
                "timeout": mode(hang_at_poll=0),
            },
            key_seen=lambda: any(PLANTED in str(r.headers) for r in fake.requests()),
            key=FAL_PLANTED,
        )


@contextlib.contextmanager
def kie_provider() -> Iterator[Provider]:
    with FakeKie(api_key=PLANTED) as fake:

        def mode(api_key: str = PLANTED, **knobs: Any) -> Callable[[], None]:
            def apply() -> None:
                fake.reset()
                fake.__dict__.pop("poll", None)
                fake.api_key = api_key
                for name, value in knobs.items():
                    if name in fake.errors:  # scripted answers for those calls
                        fake.errors[name].extend(value)
                    else:
                        setattr(fake, name, value)

            return apply

        def malformed() -> None:
            mode()()
            fake.poll = lambda task_id: {"state": "success", "resultJson": '{"resultUrls": "' + PLANTED}

        cut = "x" * 290 + PLANTED  # the key straddles the 300 characters kept of a message
        table = {"strategy": "kie", "api_key_env": KEY_ENV, "request_timeout_s": 0.3, **FAST}
        table |= {"poll_interval_s": 0.01, "poll_max_interval_s": 0.02, "timeout_s": 0.6}
        dead = dead_url()
        yield Provider(
            table={**table, "base_url": fake.url, "upload_base_url": fake.url},
            dead_table={**table, "base_url": dead, "upload_base_url": dead},
            modes={
                "ok": mode(),
                "wrong-key-echoed": mode(api_key="the-right-one", echo_key=True),  # 401 quoting the key
                "500-echo": mode(create=[(500, f"upstream rejected {PLANTED}")] * 2),
                "500-echo-cut": mode(create=[(500, cut)] * 2),
                "poll-echo-on-200": mode(echo_key=True, poll=[(455, "maintenance")] * 10),
                "fail-echo-cut": mode(fail=("501", cut)),
                "malformed": malformed,
                "timeout": mode(polls_per_state=10_000),
            },
            key_seen=lambda: any(PLANTED in str(r.headers) for r in fake.requests),
        )


@contextlib.contextmanager
def leonardo_provider() -> Iterator[Provider]:
    with FakeLeonardo(api_key=PLANTED) as fake:

        def mode(scenario: str, api_key: str = PLANTED, padding: int = 0) -> Callable[[], None]:
            def apply() -> None:
                fake.reset()
                fake.scenario, fake.api_key, fake.echo_padding = scenario, api_key, padding  # type: ignore[assignment]

            return apply

        table = {"strategy": "leonardo", "api_key_env": KEY_ENV, "request_timeout_s": 0.3, **FAST}
        table |= {"poll_interval_s": 0.01, "poll_max_interval_s": 0.05, "cleanup_timeout_s": 0.5}
        yield Provider(
            table={**table, "base_url": fake.base_url},
            dead_table={**table, "base_url": dead_url() + "/api/rest/v1"},
            modes={
                "ok": mode("ok"),
                "wrong-key": mode("ok", api_key="the-right-one"),
                "500-echo": mode("echo_key"),
                # The key straddles the 300 characters kept of a message: a cut before scrubbing leaks half.
                "500-echo-cut": mode("echo_key", padding=250),
                "500": mode("internal"),
                "malformed": mode("malformed"),
                "timeout": mode("hang"),  # PENDING until the render's deadline
            },
            key_seen=lambda: any(PLANTED in str(r.headers) for r in fake.requests),
        )


@contextlib.contextmanager
def runware_provider() -> Iterator[Provider]:
    with FakeRunware(api_key=PLANTED) as fake:

        def mode(scenario: str, api_key: str = PLANTED, padding: int = 0) -> Callable[[], None]:
            def apply() -> None:
                fake.reset()
                fake.scenario, fake.api_key, fake.echo_padding, fake.delay_s = scenario, api_key, padding, 2.0  # type: ignore[assignment]

            return apply

        table = {"strategy": "runware", "api_key_env": KEY_ENV, "request_timeout_s": 0.3, **FAST}
        yield Provider(
            table={**table, "base_url": fake.base_url},
            dead_table={**table, "base_url": dead_url() + "/v1"},
            modes={
                "ok": mode("ok"),
                "wrong-key": mode("ok", api_key="the-right-one"),
                "500-echo": mode("echo_key"),
                "500-echo-cut": mode("echo_key", padding=260),
                "500": mode("internal"),
                "malformed": mode("malformed"),
                "timeout": mode("slow"),
            },
            key_seen=lambda: any(PLANTED in str(r.headers) for r in fake.requests),
        )


@contextlib.contextmanager
def runpod_provider() -> Iterator[Provider]:
    with FakeRunPod(api_key=PLANTED) as fake:
        default_error = fake.error

        def mode(api_key: str = PLANTED, **knobs: Any) -> Callable[[], None]:
            def apply() -> None:
                fake.api_key, fake.echo_key, fake.submit_error, fake.malformed = api_key, False, None, False
                fake.statuses, fake.outcome, fake.error = ["IN_QUEUE", "IN_PROGRESS"], "COMPLETED", default_error
                for name, value in knobs.items():
                    setattr(fake, name, value)

            return apply

        workflows = Path(__file__).resolve().parents[1] / "examples" / "workflows"
        table = {"strategy": "runpod", "endpoint_id": fake.endpoint_id, "api_key_env": KEY_ENV, **FAST}
        table |= {"poll_interval_s": 0.01, "poll_max_interval_s": 0.02, "timeout_s": 0.6, "request_timeout_s": 0.3}
        table |= {"workflows_dir": str(workflows), "workflows": {"w": {"file": "sd15_text_to_image.json"}}}
        yield Provider(
            table={**table, "base_url": fake.url},
            dead_table={**table, "base_url": dead_url()},
            modes={
                "ok": mode(),
                "wrong-key-echoed": mode(api_key="the-right-one", echo_key=True),
                "500-echo": mode(submit_error=(500, f"upstream rejected Bearer {PLANTED}")),
                "500-echo-cut": mode(submit_error=(500, "x" * 280 + PLANTED)),  # the key straddles the 300 kept
                "failed-echo": mode(outcome="FAILED", error=f"worker saw key {PLANTED}"),
                "malformed": mode(malformed=True),
                "timeout": mode(statuses=["IN_QUEUE"] * 100_000),
            },
            key_seen=lambda: any(PLANTED in str(r.headers) for r in fake.requests),
        )


SUCCEEDS = ("ok", "200-echo-revised-prompt")  # modes that end in ImageReady

PROVIDERS = {
    "openai": openai_provider,
    "gemini": gemini_provider,
    "cloudflare": cloudflare_provider,
    "fal": fal_provider,
    "kie": kie_provider,
    "leonardo": leonardo_provider,
    "runware": runware_provider,
    "runpod": runpod_provider,
}


@dataclass
class Corpus:
    """Every piece of output gathered, labelled, to search for the key."""

    texts: list[tuple[str, str | bytes]] = field(default_factory=list)

    def add(self, label: str, value: str | bytes) -> None:
        self.texts.append((label, value))

    def add_exception(self, label: str, exc: BaseException) -> None:
        self.add(f"{label}: str", str(exc))
        self.add(f"{label}: repr", repr(exc))
        # The whole chain (__cause__ and __context__), as logger.exception would print it.
        self.add(f"{label}: traceback", "".join(traceback.format_exception(exc)))

    def leaks(self) -> list[str]:
        found = []
        for label, value in self.texts:
            blob = value if isinstance(value, bytes) else value.encode("utf-8", "backslashreplace")
            found += [f"{label}: {needle!r}" for needle in NEEDLES if needle.encode() in blob]
        return found


def files_under(folder: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield str(path.relative_to(folder)), path.read_bytes()


async def through_the_service(
    provider: Provider, corpus: Corpus, service_factory: Any, client_for: Any, raw_peer: Any
) -> dict[str, Any]:
    """Every mode, then the dead port, as renders through a live service; returns each outcome."""
    generators = {"planted": provider.table, "planted_dead": provider.dead_table}
    outcomes: dict[str, Any] = {}
    async with service_factory(generators=generators, default_generator="planted") as service:
        corpus.add("config repr", repr(service.config))
        corpus.add("config json", service.config.model_dump_json())
        peer = await raw_peer(service)
        tapped: list[list[bytes]] = []

        async def tap() -> None:  # a catch-all SUB: every event the service publishes
            while True:
                tapped.append(await peer.sub.recv_multipart())

        tapping = asyncio.create_task(tap())
        try:
            async with client_for(service) as client:
                runs = [(name, apply, "planted", contextlib.nullcontext) for name, apply in provider.modes.items()]
                runs.append(("dead-port", lambda: None, "planted_dead", provider.around_dead))
                for name, apply, generator, around in runs:
                    apply()
                    with around():
                        try:
                            result = await client.render(
                                request_id=f"secret-{name}", prompt="p", generator=generator, timeout=DEADLINE
                            )
                            outcomes[name] = result.event
                        except RenderFailed as exc:
                            corpus.add_exception(f"client {name}", exc)
                            outcomes[name] = exc.event
                status = await client.status(timeout=DEADLINE)
                corpus.add("ServiceStatus", status.model_dump_json())
                corpus.add("service repr", f"{service!r} {service.manager!r}")
                # The catch-all SUB has seen the status answer too: it saw everything before it.
                async with asyncio.timeout(DEADLINE):
                    while not any(frames[0].startswith(b"ServiceStatus") for frames in tapped):
                        await asyncio.sleep(0.01)
        finally:
            tapping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tapping
    for index, frames in enumerate(tapped):
        for number, frame in enumerate(frames):
            corpus.add(f"event {index} frame {number} ({decode_frames(frames).topic})", frame)
    return outcomes


async def directly(strategy: str, provider: Provider, corpus: Corpus) -> list[str]:
    """Each mode against a generator used directly: its exceptions and health reports. Returns
    the modes that raised (every failing one must)."""
    raised: list[str] = []
    runs = [(name, apply, provider.table, contextlib.nullcontext) for name, apply in provider.modes.items()]
    runs.append(("dead-port", lambda: None, provider.dead_table, provider.around_dead))
    for name, apply, table, around in runs:
        apply()
        config = validate_generator_config("planted", table)
        generator = get_generator_class(strategy)(config, name="planted")
        corpus.add(f"generator repr {name}", repr(generator))
        with around():
            async with generator, asyncio.timeout(DEADLINE):
                corpus.add(f"health {name}", repr(await generator.health()))
                try:
                    # The manager's per-attempt deadline, as a bare asyncio timeout: fal's client
                    # would wait out a hung status poll (its own timeout is for whole calls).
                    async with asyncio.timeout(config.timeout_s):
                        await generator.generate(RenderJob(Request(request_id=f"direct-{name}", prompt="p")))
                except (ImageServerError, TimeoutError) as exc:
                    corpus.add_exception(f"direct {name}", exc)
                    raised.append(name)
    return raised


@pytest.mark.parametrize("strategy", sorted(PROVIDERS))
async def test_a_planted_key_appears_nowhere(
    strategy, service_factory, client_for, raw_peer, caplog, capfd, monkeypatch, tmp_path
):
    caplog.set_level(logging.DEBUG)  # every logger, third-party ones included
    corpus = Corpus()
    with PROVIDERS[strategy]() as provider:
        monkeypatch.setenv(KEY_ENV, provider.key)
        monkeypatch.setenv(ACCOUNT_ENV, "0123456789abcdef0123456789abcdef")
        outcomes = await through_the_service(provider, corpus, service_factory, client_for, raw_peer)
        raised = await directly(strategy, provider, corpus)
        assert provider.key_seen(), "the fake never received the planted key: the test proves nothing"
    corpus.add("log", caplog.text)
    for record in caplog.records:  # formatted anew: exc_info and stack_info in full
        corpus.add(f"log record {record.name}", logging.Formatter().format(record))
    out, err = capfd.readouterr()
    corpus.add("stdout", out)
    corpus.add("stderr", err)
    for name, data in files_under(tmp_path):  # journal (SQLite and WAL), stored images
        corpus.add(f"file {name}", data)

    assert not corpus.leaks(), corpus.leaks()
    # The modes did what they were meant to: the 200s succeed (or fail for want of an image),
    # every other one is a RenderError.
    successes = {name: outcomes.pop(name) for name in SUCCEEDS if name in outcomes}
    assert successes and all(isinstance(event, ImageReady) for event in successes.values()), successes
    assert all(isinstance(event, RenderError) for event in outcomes.values()), outcomes
    # Where the provider echoed the key, it was there to leak, and was scrubbed.
    assert all("***" in event.message for name, event in outcomes.items() if "echo" in name), outcomes
    assert all("***" in event.model_dump_json() for name, event in successes.items() if "echo" in name), successes
    assert raised == [*(name for name in provider.modes if name not in SUCCEEDS), "dead-port"]
