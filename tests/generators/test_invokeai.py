"""InvokeAIGenerator against a local fake InvokeAI: requests as the server sees them, outcomes, errors."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from image_server.config import build_config
from image_server.errors import GenerationFailed, GeneratorUnavailable, InvalidRequest, Unsupported
from image_server.generators import ReferenceImage, RenderJob, validate_generator_config
from image_server.generators.invokeai import InvokeAIConfig, InvokeAIGenerator
from schemas import LoraSpec, RenderRequest
from tests.fakes.images import serve_images, solid_bytes
from tests.fakes.invokeai import FakeInvokeAI, Item
from tests.fakes.invokeai_store import record
from tests.fakes.multipart import parse_multipart
from tests.test_config import SHIPPED, uncomment_examples

DEADLINE = 10.0


@pytest.fixture(scope="module")
def server() -> Iterator[FakeInvokeAI]:
    with FakeInvokeAI() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeInvokeAI) -> FakeInvokeAI:
    server.reset()
    server.version, server.token = "6.9.0", None
    return server


def make(fake: FakeInvokeAI, environ: dict[str, str] | None = None, **fields) -> InvokeAIGenerator:
    fields = {"model": "Dreamshaper 8", "poll_interval_s": 0.01, "poll_max_interval_s": 0.02} | fields
    return InvokeAIGenerator(InvokeAIConfig(base_url=fake.url, **fields), name="invoke", environ=environ or {})


@pytest.fixture
async def gen(fake: FakeInvokeAI) -> AsyncIterator[InvokeAIGenerator]:
    async with make(fake) as generator:
        assert isinstance(generator, InvokeAIGenerator)
        yield generator


def job(prompt: str = "a red fox", references: list[ReferenceImage] | None = None, **fields) -> RenderJob:
    return RenderJob(request=RenderRequest(request_id="r1", prompt=prompt, **fields), references=references or [])


def reference(size: tuple[int, int] = (40, 20)) -> ReferenceImage:
    return ReferenceImage(data=solid_bytes((1, 2, 3), size), format="png", width=size[0], height=size[1])


def enqueued(fake: FakeInvokeAI) -> dict:
    (batch,) = fake.batches
    return batch


async def render(generator: InvokeAIGenerator, request_job: RenderJob):
    async with asyncio.timeout(DEADLINE):
        return await generator.generate(request_job)


# -- success ---------------------------------------------------------------------------------------


async def test_text_to_image_uses_the_model_defaults_and_reports_what_it_applied(fake, gen) -> None:
    result = await render(gen, job(seed=2**40 + 5, negative_prompt="blur", style="noir"))

    graph = enqueued(fake)["graph"]
    assert graph["nodes"]["model_loader"]["model"]["key"] == "k-sd15"
    assert graph["nodes"]["seed"]["value"] == 5  # InvokeAI seeds are uint32: taken modulo 2**32
    # Dreamshaper's default_settings in InvokeAI: 25 steps, cfg 6.5, dpmpp_2m, 512x768.
    assert graph["nodes"]["denoise"]["steps"] == 25 and graph["nodes"]["denoise"]["scheduler"] == "dpmpp_2m"
    assert (graph["nodes"]["noise"]["width"], graph["nodes"]["noise"]["height"]) == (512, 768)
    assert fake.ignored_fields == []
    (image,) = result.images
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert decoded.size == (512, 768) and image.format == "png"
    assert (image.width, image.height, image.seed) == (512, 768, 5)
    assert result.applied == {
        "model": "Dreamshaper 8",
        "base": "sd-1",
        "width": 512,
        "height": 768,
        "steps": 25,
        "seed": 5,
        "cfg_scale": 6.5,
        "negative_prompt": True,
        "scheduler": "dpmpp_2m",
    }
    assert result.ignored == ["style"]


async def test_request_values_win_over_config_and_model_defaults(fake) -> None:
    async with make(fake, steps=40, cfg_scale=9.0, width=640) as generator:
        result = await render(generator, job(steps=12, guidance_scale=3.0, width=777, height=600))
    denoise = enqueued(fake)["graph"]["nodes"]["denoise"]
    assert (denoise["steps"], denoise["cfg_scale"]) == (12, 3.0)
    assert result.applied["width"] == 776 and result.applied["height"] == 600  # rounded to multiples of 8


async def test_flux_by_key_with_auto_picked_components(fake) -> None:
    async with make(fake, model="k-flux-dev") as generator:
        result = await render(generator, job(negative_prompt="x", width=1000, height=1000))
    nodes = enqueued(fake)["graph"]["nodes"]
    assert nodes["model_loader"]["type"] == "flux_model_loader"
    assert nodes["model_loader"]["vae_model"]["key"] == "k-vae-flux"  # the FLUX VAE, not the SDXL one
    assert nodes["denoise"]["guidance"] == 3.5 and nodes["denoise"]["num_steps"] == 28
    assert result.applied["width"] == 1008 and result.ignored == ["negative_prompt"]
    assert result.applied["components"] == [
        "t5_bnb_int8_quantized_encoder",
        "clip-vit-large-patch14",
        "FLUX.1-schnell_ae",
    ]


async def test_image_to_image_uploads_the_reference_as_a_user_intermediate(fake, gen) -> None:
    result = await render(gen, job(references=[reference((400, 200))], strength=0.4))

    (upload,) = [r for r in fake.requests if urlsplit(r.path).path == "/api/v1/images/upload"]
    assert parse_qs(urlsplit(upload.path).query) == {"image_category": ["user"], "is_intermediate": ["true"]}
    _, files = parse_multipart(upload.body, upload.headers["Content-Type"])
    assert [(f.field, f.content_type, f.data) for f in files] == [("file", "image/png", reference((400, 200)).data)]
    nodes = enqueued(fake)["graph"]["nodes"]
    assert nodes["init_resize"]["image"]["image_name"] in fake.images
    assert nodes["denoise"]["denoising_start"] == pytest.approx(0.6)
    # Dreamshaper's default size wins over the reference's shape; the resized reference is not returned.
    assert len(result.images) == 1 and result.images[0].width == 512
    assert result.applied["strength"] == 0.4 and result.applied["reference_images"] == 1


async def test_outputs_go_on_the_project_board_created_once(fake, gen) -> None:
    await asyncio.gather(*(render(gen, job(project="gallery-a")) for _ in range(3)))
    await render(gen, job(project="gallery-b"))

    assert sorted(fake.boards.values()) == ["gallery-a", "gallery-b"]
    boards = {name: board_id for board_id, name in fake.boards.items()}
    outputs = [b["graph"]["nodes"]["output"]["board"]["board_id"] for b in fake.batches]
    assert outputs == [boards["gallery-a"]] * 3 + [boards["gallery-b"]]
    placed = [i["board_id"] for i in fake.images.values() if not i["is_intermediate"]]
    assert sorted(placed) == sorted(outputs)


async def test_several_images_vary_the_seed_through_batch_data(fake, gen) -> None:
    result = await render(gen, job(num_images=3, seed=10))
    batch = enqueued(fake)
    assert batch["data"] == [[{"node_path": "seed", "field_name": "value", "items": [10, 11, 12]}]]
    assert [image.seed for image in result.images] == [10, 11, 12]
    assert len(fake.items) == 3


async def test_servers_before_6_find_their_items_through_the_queue_list(fake, gen) -> None:
    fake.version = "5.15.0"  # enqueue_batch answers without item_ids
    result = await render(gen, job(num_images=2))
    assert len(result.images) == 2
    assert "/api/v1/queue/default/list" in fake.paths("GET")


async def test_loras_resolved_by_name_and_applied_in_order(fake, gen) -> None:
    loras = [LoraSpec(name="Film Grain", strength=0.5), LoraSpec(name="k-lora-sd", strength=1.2)]
    result = await render(gen, job(loras=loras))
    nodes = enqueued(fake)["graph"]["nodes"]
    assert (nodes["lora_1"]["lora"]["key"], nodes["lora_1"]["weight"]) == ("k-lora-sd2", 0.5)
    assert (nodes["lora_2"]["lora"]["key"], nodes["lora_2"]["weight"]) == ("k-lora-sd", 1.2)
    assert result.applied["loras"] == [
        {"name": "Film Grain", "strength": 0.5},
        {"name": "Detail Tweaker", "strength": 1.2},
    ]


async def test_model_listings_are_cached_until_a_render_fails(fake, gen) -> None:
    await render(gen, job())
    await render(gen, job())
    assert fake.paths("GET").count("/api/v2/models/") == 1
    fake.fail_with = ("RuntimeError", "boom")
    with pytest.raises(GenerationFailed):
        await render(gen, job())
    fake.fail_with = None
    await render(gen, job())
    assert fake.paths("GET").count("/api/v2/models/") == 2


async def test_progress_follows_the_queue_item(fake, gen) -> None:
    fake.pending_polls, fake.running_polls = 2, 2
    seen: list[tuple[float | None, str | None]] = []
    await render(gen, RenderJob(RenderRequest(request_id="p", prompt="x"), progress=lambda f, m: seen.append((f, m))))
    assert seen == [(None, "queued"), (None, "generating"), (1.0, "completed")]


# -- failures --------------------------------------------------------------------------------------


async def test_a_failed_item_is_generation_failed_with_its_message_not_its_traceback(fake, gen) -> None:
    fake.fail_with = ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(GenerationFailed) as caught:
        await render(gen, job())
    error = caught.value
    assert "OutOfMemoryError: CUDA out of memory" in error.message and "Traceback" not in error.message
    assert (error.code, error.retryable, error.error_type, error.request_id) == (
        "generation_failed",
        False,
        "OutOfMemoryError",
        "r1",
    )


async def test_an_item_cancelled_on_the_server_ends_the_render(fake, gen) -> None:
    fake.hold = True
    task = asyncio.create_task(render(gen, job()))
    await asyncio.to_thread(fake.started.wait, DEADLINE)
    fake.cancel(1)
    with pytest.raises(GenerationFailed, match="canceled on the InvokeAI server"):
        await task


async def test_cancelling_the_render_cancels_our_queue_item(fake, gen) -> None:
    fake.hold = True
    task = asyncio.create_task(render(gen, job()))
    await asyncio.to_thread(fake.started.wait, DEADLINE)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.cancelled == [1] and "/api/v1/queue/default/i/1/cancel" in fake.paths("PUT")


async def test_a_vanished_item_is_retryable(fake, gen) -> None:
    fake.hold = True
    task = asyncio.create_task(render(gen, job()))
    await asyncio.to_thread(fake.started.wait, DEADLINE)
    with fake.lock:
        fake.items.clear()  # someone cleared the queue
    with pytest.raises(GenerationFailed, match="disappeared") as caught:
        await task
    assert caught.value.retryable


@pytest.mark.parametrize(
    ("model", "error", "words"),
    [
        ("No Such Model", InvalidRequest, ["'No Such Model'", "installed: ", "Dreamshaper 8 (sd-1)"]),
        ("Twin", InvalidRequest, ["more than one", "sd-1, sdxl", "set 'base'"]),
        ("SD3.5 Medium", Unsupported, ["sd-3 model", "sd-1, sd-2, sdxl, flux"]),
    ],
)
async def test_model_problems_name_the_model(fake, model, error, words) -> None:
    async with make(fake, model=model) as generator:
        with pytest.raises(error) as caught:
            await render(generator, job())
        health = await generator.health()
    assert all(word in caught.value.message for word in words), caught.value.message
    assert not health.ok and model in health.detail  # `generators --check` says it before any request
    assert fake.batches == []


async def test_base_picks_between_same_named_models(fake) -> None:
    async with make(fake, model="Twin", base="sdxl") as generator:
        await render(generator, job())
    assert enqueued(fake)["graph"]["nodes"]["model_loader"]["model"]["key"] == "k-twin-x"


@pytest.mark.parametrize(
    ("lora", "words"),
    [("Nope", ["no LoRA named 'Nope'", "Detail Tweaker (sd-1)"]), ("Pixel Art XL", ["is for sdxl", "model is sd-1"])],
)
async def test_lora_problems_are_invalid_requests(fake, gen, lora, words) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await render(gen, job(loras=[LoraSpec(name=lora)]))
    assert all(word in caught.value.message for word in words), caught.value.message
    assert fake.batches == [] and fake.boards == {}


@pytest.mark.parametrize(
    ("route", "words"),
    [
        ("models", "InvokeAI answered the model list with a body that is not JSON"),
        ("enqueue", "InvokeAI answered the graph with a body that is not JSON"),
        ("item", "InvokeAI answered the queue item 1 with a body that is not JSON"),
        ("image", "InvokeAI returned an image that is not PNG, JPEG or WebP"),
    ],
)
async def test_a_server_answering_nonsense_is_a_clear_error(fake, gen, route, words) -> None:
    fake.nonsense = {route}
    with pytest.raises(GenerationFailed, match=words) as caught:
        await render(gen, job())
    assert not caught.value.retryable


async def test_a_server_that_is_down_is_retryable(fake) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before use: nothing listens there
    generator = InvokeAIGenerator(InvokeAIConfig(base_url=f"http://127.0.0.1:{port}", model="m"), name="down")
    async with generator:
        with pytest.raises(GenerationFailed, match="could not reach") as caught:
            await render(generator, job())
        health = await generator.health()
    assert caught.value.retryable and not health.ok


async def test_a_graph_the_server_refuses_is_not_retried(fake, gen) -> None:
    api = gen._api
    assert api is not None
    with pytest.raises(GenerationFailed, match="InvokeAI refused the graph: batch.graph.nodes.x:") as caught:
        await api.enqueue({"graph": {"nodes": {"x": {"id": "x", "type": "no_such_node"}}, "edges": []}, "runs": 1})
    assert caught.value.status == 422 and not caught.value.retryable


async def test_the_token_is_sent_and_never_shown(fake) -> None:
    token = "planted-invokeai-token-0123"
    fake.token = token
    async with make(fake, token_env="INVOKE_TOKEN", environ={"INVOKE_TOKEN": token}) as generator:
        await render(generator, job())
    assert {r.headers["Authorization"] for r in fake.requests} == {f"Bearer {token}"}
    async with make(fake, token_env="INVOKE_TOKEN", environ={"INVOKE_TOKEN": "wrong-token-456"}) as generator:
        with pytest.raises(GenerationFailed) as caught:
            await render(generator, job())
    assert caught.value.status == 401 and "wrong-token-456" not in caught.value.message
    with pytest.raises(GeneratorUnavailable, match="INVOKE_TOKEN"):
        async with make(fake, token_env="INVOKE_TOKEN"):
            pass


async def test_health_reports_the_version_and_model(fake, gen) -> None:
    report = await gen.health()
    assert report.ok and report.detail == "invoke: InvokeAI 6.9.0; model Dreamshaper 8 (sd-1)"


def test_config_table_is_validated() -> None:
    config = validate_generator_config("inv", {"strategy": "invokeai", "model": "Dreamshaper 8"})
    assert isinstance(config, InvokeAIConfig) and config.base_url == "http://127.0.0.1:9090"
    with pytest.raises(ValueError, match="model"):
        validate_generator_config("inv", {"strategy": "invokeai"})
    with pytest.raises(ValueError, match="poll_max_interval_s"):
        validate_generator_config("inv", {"strategy": "invokeai", "model": "m", "poll_interval_s": 5})


async def test_strength_without_a_reference_is_reported_ignored(fake, gen) -> None:
    result = await render(gen, job(strength=0.5))
    assert result.ignored == ["strength"] and "strength" not in result.applied


@pytest.mark.parametrize("optional", [False, True], ids=["as-shipped", "with-optional-knobs"])
async def test_the_config_toml_examples_render_against_invokeai(fake, optional) -> None:
    """The documented tables, pointed at the fake, render with the models they name."""
    tables = build_config(tomllib.loads(uncomment_examples(SHIPPED, optional=optional))).generators
    families = []
    for name in ("invokeai_sdxl", "invokeai_flux"):
        config = tables[name].model_copy(update={"base_url": fake.url, "poll_interval_s": 0.01})
        assert isinstance(config, InvokeAIConfig)
        fake.token = "planted-example-token" if config.token_env else None  # an optional knob
        generator = InvokeAIGenerator(config, name=name, environ={"INVOKEAI_TOKEN": "planted-example-token"})
        async with generator:
            result = await render(generator, job(project="docs"))
        families.append(result.applied["base"])
        assert result.images and result.applied["board"] == "docs"
    assert families == ["sdxl", "flux"]


@pytest.mark.parametrize(("version", "route"), [("6.9.0", "/i/1/cancel"), ("5.15.0", "/cancel_by_batch_ids")])
async def test_a_cancel_during_enqueue_still_cancels_what_was_enqueued(fake, gen, version, route) -> None:
    fake.version, fake.hold = version, True
    fake.enqueue_gate = gate = threading.Event()
    task = asyncio.create_task(render(gen, job()))
    await asyncio.to_thread(fake.enqueue_seen.wait, DEADLINE)
    task.cancel()  # while the server has not answered the enqueue yet
    await asyncio.sleep(0)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.cancelled == [1] and f"/api/v1/queue/default{route}" in fake.paths("PUT")


async def test_a_v5_queue_is_paged_through_to_find_our_items(fake, gen) -> None:
    fake.version = "5.15.0"
    with fake.lock:
        for number in range(1, 251):  # other clients' items ahead of ours, over three pages
            fake.items[number] = Item(number, "someone-else", {}, status="completed")
        fake.next_id = 251
    result = await render(gen, job(num_images=2))
    assert [image.seed for image in result.images] == [result.applied["seed"], result.applied["seed"] + 1]
    lists = [r for r in fake.requests if urlsplit(r.path).path.endswith("/list")]
    assert len(lists) == 3 and parse_qs(urlsplit(lists[-1].path).query)["cursor"] == ["200"]


async def test_a_model_installed_after_the_listing_was_cached_is_found(fake, gen) -> None:
    await render(gen, job(loras=[LoraSpec(name="Detail Tweaker")]))
    fake.models.models.append(record("k-new", "Fresh LoRA", "sd-1", "lora"))
    result = await render(gen, job(loras=[LoraSpec(name="Fresh LoRA")]))
    assert result.applied["loras"] == [{"name": "Fresh LoRA", "strength": 1.0}]


async def test_a_base_url_that_is_not_invokeai_says_so() -> None:
    with serve_images() as other:  # answers 404 text/plain to every path InvokeAI would serve
        generator = InvokeAIGenerator(InvokeAIConfig(base_url=other.base_url, model="m"), name="wrong")
        async with generator:
            with pytest.raises(GenerationFailed, match="is base_url an InvokeAI server") as caught:
                await render(generator, job())
    assert not caught.value.retryable


def test_generators_check_on_the_command_line(fake, tmp_path) -> None:
    """``image-server generators --check``, run as a user runs it, against the fake server."""
    config = tmp_path / "config.toml"
    config.write_text(
        'default_generator = "good"\n'
        f'[generators.good]\nstrategy = "invokeai"\nbase_url = "{fake.url}"\nmodel = "Juggernaut XL v9"\n'
        f'[generators.typo]\nstrategy = "invokeai"\nbase_url = "{fake.url}"\nmodel = "Jugernaut XL"\n'
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_SERVER_")} | {"COLUMNS": "300"}
    done = subprocess.run(
        [sys.executable, "-m", "image_server", "--config", str(config), "generators", "--check"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    problems = [line for line in done.stderr.splitlines() if line.startswith(("good:", "typo:"))]
    assert problems == [
        "typo: typo: no main model named 'Jugernaut XL' is installed in InvokeAI; installed: Dreamshaper 8 (sd-1), "
        "FLUX Dev (flux), FLUX Schnell (Quantized) (flux), Juggernaut XL v9 (sdxl), SD3.5 Medium (sd-3), "
        "Twin (sd-1), Twin (sdxl)"
    ]
    assert "ok good: InvokeAI 6.9.0; model Juggernaut XL v9 (sdxl)" in done.stdout


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"depth_map": {"uri": "data:image/png;base64,AAAA"}}, "does not take a depth map"),
        ({"reference_images": [{"uri": "data:,a"}, {"uri": "data:,b"}]}, "at most 1 reference images"),
        ({"num_images": 5}, "at most 4 images"),
    ],
)
async def test_what_the_graphs_cannot_take_is_unsupported(fake, gen, fields, words) -> None:
    with pytest.raises(Unsupported, match=words):
        await render(gen, job(**fields))
    assert fake.requests == []
