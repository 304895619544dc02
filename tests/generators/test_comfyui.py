"""The comfyui strategy against the fake ComfyUI (HTTP + websocket on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from image_server.errors import ConfigError, GenerationFailed, InvalidRequest, Unsupported
from image_server.generators.base import ReferenceImage, RenderJob
from image_server.generators.comfyui import ComfyUIConfig, ComfyUIGenerator
from image_server.generators.registry import validate_generator_config
from schemas import LoraSpec, RenderRequest
from tests.fakes.comfyui import FakeComfyUI, images_in
from tests.fakes.images import png_bytes

FIXTURES = Path(__file__).parent.parent / "fixtures" / "workflows"
DEADLINE = 10.0
SD15 = {
    "file": "sd15_text_to_image.json",
    "inputs": {
        "prompt": "6.inputs.text",
        "negative_prompt": "7.inputs.text",
        "seed": "3.inputs.seed",
        "steps": "3.inputs.steps",
        "cfg": "3.inputs.cfg",
        "width": "5.inputs.width",
        "height": "5.inputs.height",
    },
    "outputs": ["9"],
}
SDXL_I2I = {
    "file": "sdxl_img2img.json",
    "inputs": {"reference_images": ["10.inputs.image"], "denoise": "3.inputs.denoise", "seed": "3.inputs.seed"},
}


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    folder = tmp_path / "workflows"
    shutil.copytree(FIXTURES, folder)
    return folder


@pytest.fixture
def fake():
    with FakeComfyUI() as server:
        yield server


def make(fake: FakeComfyUI, folder: Path, **fields: Any) -> ComfyUIGenerator:
    table = {"strategy": "comfyui", "base_url": fake.url, "workflows_dir": str(folder), "poll_interval_s": 0.02}
    table |= {"workflows": {"sd15": SD15, "sdxl_i2i": SDXL_I2I}} | fields
    config = validate_generator_config("comfy", table)
    assert isinstance(config, ComfyUIConfig)
    return ComfyUIGenerator(config, name="comfy")


def job(progress: list[Any] | None = None, references: int = 0, **fields: Any) -> RenderJob:
    request = RenderRequest.model_validate({"request_id": "c-1", "prompt": "a lighthouse"} | fields)
    refs = [ReferenceImage(png_bytes((16, 16)), "png", 16, 16) for _ in range(references)]
    sink = (lambda f, m: progress.append((f, m))) if progress is not None else (lambda f, m: None)
    return RenderJob(request, refs, progress=sink)


def posted_graph(fake: FakeComfyUI) -> dict[str, Any]:
    (prompt,) = [r.json() for r in fake.requests if r.path.endswith("/prompt") and r.method == "POST"]
    assert prompt["client_id"] and prompt["prompt_id"]
    return prompt["prompt"]


async def test_text_to_image_maps_request_fields_and_reports_progress(fake, workflows):
    progress: list[Any] = []
    async with make(fake, workflows) as generator:
        result = await generator.generate(
            job(progress, seed=42, steps=12, guidance_scale=5.5, width=640, height=384, negative_prompt="blurry")
        )
    graph = posted_graph(fake)
    assert graph["6"]["inputs"]["text"] == "a lighthouse" and graph["7"]["inputs"]["text"] == "blurry"
    assert (graph["3"]["inputs"]["seed"], graph["3"]["inputs"]["steps"], graph["3"]["inputs"]["cfg"]) == (42, 12, 5.5)
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (640, 384)
    (image,) = result.images
    assert image.format == "png" and image.seed == 42 and image.data is not None
    assert fake.files[("output", "", "ComfyUI_00001_.png")] == image.data
    assert result.applied == {"workflow": "sd15", "seed": 42, "width": 640, "height": 384, "steps": 12, "cfg": 5.5}
    # progress value/max from the sampler's events; binary preview frames in between were skipped
    assert [f for f, _ in progress if f is not None] == [1 / 3, 2 / 3, 1.0]
    assert "/view" in fake.paths("GET") and "/history/" not in " ".join(fake.paths())


async def test_references_are_uploaded_to_a_per_request_subfolder(fake, workflows):
    async with make(fake, workflows, workflow="sdxl_i2i") as generator:
        result = await generator.generate(job(references=1, strength=0.45, seed=3))
    ((sub, name, data),) = list(images_in(fake))
    assert sub.startswith("image_server/c-1-") and name == "ref1.png" and data == png_bytes((16, 16))
    graph = posted_graph(fake)
    assert graph["10"]["inputs"]["image"] == f"{sub}/{name}"
    assert graph["3"]["inputs"]["denoise"] == 0.45
    assert graph["6"]["inputs"]["text"] == "a lighthouse" and graph["7"]["inputs"]["text"] == ""  # placeholders
    assert result.applied["reference_images"] == 1


async def test_a_style_and_request_loras_rewire_the_posted_graph(fake, workflows):
    styles = {"noir": {"lora": "noir.safetensors", "cinematic": "cine.safetensors", "prompt_prefix": "film noir, "}}
    async with make(fake, workflows, styles=styles) as generator:
        result = await generator.generate(job(style="noir", loras=[{"name": "alice.safetensors"}]))
    graph = posted_graph(fake)
    chain = [graph[i] for i in ("10", "11", "12")]
    assert [n["inputs"]["lora_name"] for n in chain] == ["noir.safetensors", "alice.safetensors", "cine.safetensors"]
    assert [n["inputs"]["strength_model"] for n in chain] == [1.0, 0.85, 0.95]
    assert chain[0]["inputs"]["model"] == ["4", 0] and chain[2]["inputs"]["clip"] == ["11", 1]
    assert graph["3"]["inputs"]["model"] == ["12", 0] and graph["6"]["inputs"]["clip"] == ["12", 1]
    assert graph["6"]["inputs"]["text"] == "film noir, a lighthouse" and result.prompt == "film noir, a lighthouse"
    assert result.applied["loras"][1] == {"name": "alice.safetensors", "strength": 0.85, "role": "character"}
    assert result.applied["style"] == "noir"


async def test_node_errors_become_invalid_request_naming_node_class_and_message(fake, workflows):
    async with make(fake, workflows, workflow="sdxl_i2i") as generator:
        with pytest.raises(InvalidRequest) as caught:
            await generator.generate(job())  # no reference: LoadImage keeps "example.png", never uploaded
    message = str(caught.value)
    assert "node 10 (LoadImage): Custom validation failed for node" in message and "example.png" in message
    assert caught.value.code == "invalid_request" and caught.value.request_id == "c-1"


async def test_an_unknown_node_class_is_invalid_request(fake, workflows):
    graph = json.loads((workflows / "sd15_text_to_image.json").read_text())
    graph["9"]["class_type"] = "NoSuchNode"
    (workflows / "broken.json").write_text(json.dumps(graph))
    async with make(fake, workflows, workflows={"b": {"file": "broken.json", "outputs": ["9"]}}) as generator:
        with pytest.raises(
            InvalidRequest, match=r"invalid_prompt: Cannot execute because node NoSuchNode does not exist"
        ):
            await generator.generate(job())


async def test_execution_error_is_generation_failed_without_the_traceback(fake, workflows):
    fake.fail_node_class = "VAEDecode"
    async with make(fake, workflows) as generator:
        with pytest.raises(GenerationFailed) as caught:
            await generator.generate(job())
    assert "node 8 (VAEDecode): RuntimeError: CUDA out of memory" in str(caught.value)
    assert "SECRET_TRACEBACK_LINE" not in str(caught.value) and not caught.value.retryable


async def test_other_prompts_events_on_the_socket_are_ignored(fake, workflows):
    fake.foreign_events = True  # another prompt's progress, executed, error and null node first
    progress: list[Any] = []
    async with make(fake, workflows) as generator:
        result = await generator.generate(job(progress))
    assert len(result.images) == 1 and ("output", "", "other.png") not in fake.files
    assert [f for f, _ in progress if f is not None] == [1 / 3, 2 / 3, 1.0]
    assert "/history/" not in " ".join(fake.paths())


@pytest.mark.parametrize("drop_after", [0, 4])
async def test_a_dropped_websocket_falls_back_to_history_without_losing_the_render(fake, workflows, drop_after):
    fake.drop_websocket_after = drop_after
    fake.render_s = 0.2
    async with make(fake, workflows) as generator:
        result = await generator.generate(job())
    assert len(result.images) == 1
    assert any(p.startswith("/history/") for p in fake.paths("GET"))


async def test_renders_share_one_websocket_and_get_their_own_events(fake, workflows):
    fake.render_s = 0.05
    first_progress: list[Any] = []
    second_progress: list[Any] = []
    async with make(fake, workflows) as generator:
        first, second = await asyncio.gather(
            generator.generate(job(first_progress, seed=1)), generator.generate(job(second_progress, seed=2))
        )
        third = await generator.generate(job(seed=3))
    assert fake.ws_connects == 1
    client_ids = {r.json()["client_id"] for r in fake.requests if r.path == "/prompt"}
    assert len(client_ids) == 1  # one client id: both prompts' events arrive on the one socket
    assert len({first.images[0].data, second.images[0].data, third.images[0].data}) == 1  # same colour...
    downloaded = [r.path for r in fake.requests if r.path.startswith("/view")]
    assert len(set(downloaded)) == 3  # ...but each render fetched its own file
    for progress in (first_progress, second_progress):
        assert [f for f, _ in progress if f is not None] == [1 / 3, 2 / 3, 1.0]


async def test_a_prompt_posted_as_soon_as_the_socket_opens_is_followed_on_it(fake, workflows):
    # ComfyUI answers the /ws handshake before it files the socket under our client id: a
    # prompt posted in between would run with its events sent nowhere (how the suite hung
    # under load). The render waits for the server's first frame before posting.
    fake.ws_register_delay_s = 0.3
    progress: list[Any] = []
    async with make(fake, workflows, events_quiet_s=600) as generator:
        async with asyncio.timeout(DEADLINE):
            result = await generator.generate(job(progress))
    assert len(result.images) == 1
    assert [f for f, _ in progress if f is not None] == [1 / 3, 2 / 3, 1.0]
    assert "/history/" not in " ".join(fake.paths())


async def test_a_socket_that_never_sends_its_first_frame_is_given_up_for_polling(fake, workflows):
    fake.ws_register_delay_s = 5.0  # longer than request_timeout_s, which bounds opening /ws
    async with make(fake, workflows, request_timeout_s=2.0, events_quiet_s=600) as generator:
        async with asyncio.timeout(DEADLINE):
            result = await generator.generate(job())
    assert len(result.images) == 1 and fake.ws_connects == 0
    assert any(p.startswith("/history/") for p in fake.paths("GET"))


async def test_an_older_server_that_assigns_its_own_prompt_ids(fake, workflows):
    fake.honour_prompt_id = False
    progress: list[Any] = []
    async with make(fake, workflows) as generator:
        result = await generator.generate(job(progress))
    (sent,) = [r.json()["prompt_id"] for r in fake.requests if r.path == "/prompt"]
    (assigned,) = fake.engine.history
    assert sent != assigned and len(result.images) == 1
    assert [f for f, _ in progress if f is not None] == [1 / 3, 2 / 3, 1.0]
    assert "/history/" not in " ".join(fake.paths())  # followed on the socket under the server's id


async def test_a_render_after_a_dropped_websocket_connects_again(fake, workflows):
    async with make(fake, workflows) as generator:
        fake.drop_websocket_after = 0
        await generator.generate(job())
        fake.drop_websocket_after = None
        await generator.generate(job())
    assert fake.ws_connects == 2
    assert sum(p.startswith("/history/") for p in fake.paths("GET")) >= 1


async def test_a_prompt_the_server_forgot_is_a_retryable_failure_not_a_hang(fake, workflows):
    fake.lose_prompts = True
    async with make(fake, workflows, websocket=False) as generator:
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(
                GenerationFailed, match="ComfyUI no longer knows prompt .* \\(restarted\\?\\)"
            ) as caught:
                await generator.generate(job())
    assert caught.value.retryable
    (prompt_id,) = [r.json()["prompt_id"] for r in fake.requests if r.path == "/prompt"]
    assert fake.paths("GET") == [f"/history/{prompt_id}", "/queue", f"/history/{prompt_id}"]  # one poll, then given up


async def test_polling_only_when_the_websocket_is_off(fake, workflows):
    async with make(fake, workflows, websocket=False) as generator:
        result = await generator.generate(job())
    assert len(result.images) == 1 and fake.ws_connects == 0


async def wait_until(predicate) -> None:
    async with asyncio.timeout(DEADLINE):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_cancel_interrupts_only_our_running_prompt_and_deletes_our_pending_one(fake, workflows):
    fake.render_s = 30.0
    async with make(fake, workflows) as generator:
        first = asyncio.create_task(generator.generate(job()))
        await wait_until(lambda: fake.engine.running is not None)
        running_id = fake.engine.running.prompt_id
        second = asyncio.create_task(generator.generate(job()))
        await wait_until(lambda: len(fake.engine.pending) == 1)
        pending_id = fake.engine.pending[0].prompt_id
        second.cancel()
        await wait_until(lambda: [pending_id] in fake.queue_deletes)
        assert fake.interrupts == [] and not fake.engine.pending and fake.engine.running.prompt_id == running_id
        first.cancel()
        await wait_until(lambda: fake.interrupts)
        await asyncio.gather(first, second, return_exceptions=True)
    assert fake.interrupts == [{"prompt_id": running_id}]  # never a global interrupt
    await wait_until(lambda: running_id in fake.engine.history)
    assert fake.engine.history[running_id]["status"]["status_str"] == "error"


async def test_a_server_that_is_down_or_restarting_is_retryable(fake, workflows):
    fake.refuse = 503
    async with make(fake, workflows) as generator:
        with pytest.raises(GenerationFailed) as caught:
            await generator.generate(job())
    assert caught.value.retryable and caught.value.status == 503
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    async with make(fake, workflows, base_url=f"http://127.0.0.1:{port}") as generator:
        with pytest.raises(GenerationFailed, match="could not reach") as caught:
            await generator.generate(job())
        assert caught.value.retryable
        assert not (await generator.health()).ok


async def test_a_server_answering_nonsense_is_a_clear_failure(fake, workflows):
    fake.nonsense_prompt = True
    async with make(fake, workflows) as generator:
        with pytest.raises(GenerationFailed, match="answered /prompt without a prompt_id"):
            await generator.generate(job())


async def test_health_reports_version_device_and_free_vram(fake, workflows):
    async with make(fake, workflows) as generator:
        report = await generator.health()
    assert report.ok and "ComfyUI 0.8.0 on cuda:0 NVIDIA GeForce RTX 4090" in report.detail
    assert "21.3 of 24.0 GiB VRAM free" in report.detail


async def test_bad_requests_get_clear_errors(fake, workflows):
    async with make(fake, workflows) as generator:
        with pytest.raises(Unsupported, match=r"'sd15' has an input for 0 reference image\(s\), not 1"):
            await generator.generate(job(references=1))  # sd15 has no LoadImage slot
        with pytest.raises(InvalidRequest, match="11 LoRAs .* at most 10"):
            await generator.generate(job(loras=[{"name": f"l{i}.safetensors"} for i in range(11)]))
        with pytest.raises(Unsupported, match="is a URL"):
            await generator.generate(job(loras=[LoraSpec(name="https://example.com/x.safetensors").model_dump()]))
        with pytest.raises(InvalidRequest, match="must be a file name"):
            await generator.generate(job(loras=[{"name": "../../etc/passwd"}]))
    assert "/prompt" not in fake.paths("POST")


# -- config: mistakes stop the service at start-up -----------------------------------------------


def table(workflows: Path, spec: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"strategy": "comfyui", "workflows_dir": str(workflows), "workflows": {"w": spec}} | fields


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (
            {"prompt": "66.inputs.text"},
            r"sd15_text_to_image.json: inputs.prompt = '66.inputs.text' names node 66, which",
        ),
        (
            {"seed": "3.inputs.noise_seed"},
            r"sd15_text_to_image.json: inputs.seed = '3.inputs.noise_seed' names input 'noise_seed' of node 3 \(KSampler\)",
        ),
        ({"prompt": "6.text"}, r"inputs.prompt: '6.text' is not a node input"),
        ({"colour": "6.inputs.text"}, r"unknown request field\(s\) colour"),
    ],
)
def test_a_mapping_to_a_missing_node_or_input_is_a_config_error(workflows, inputs, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_generator_config("comfy", table(workflows, {"file": "sd15_text_to_image.json", "inputs": inputs}))


def test_workflow_file_problems_are_config_errors(workflows):
    (workflows / "ui.json").write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(ConfigError, match="UI format; export it with 'Export \\(API\\)'"):
        validate_generator_config("comfy", table(workflows, {"file": "ui.json"}))
    with pytest.raises(ConfigError, match="missing.json cannot be read"):
        validate_generator_config("comfy", table(workflows, {"file": "missing.json"}))
    graph = json.loads((workflows / "sd15_text_to_image.json").read_text())
    graph["6"]["inputs"]["text"] = "{{promt}}"
    (workflows / "typo.json").write_text(json.dumps(graph))
    with pytest.raises(ConfigError, match=r"node 6 input 'text' has an unknown placeholder \{\{promt\}\}"):
        validate_generator_config("comfy", table(workflows, {"file": "typo.json"}))


def test_a_request_may_pick_only_a_configured_workflow(workflows):
    config = validate_generator_config("comfy", table(workflows, SD15) | {"workflows": {"a": SD15, "b": SDXL_I2I}})
    assert type(config).OVERRIDABLE == frozenset({"workflow"})
    assert config.model_validate(config.model_dump() | {"workflow": "b"}).compiled().name == "b"
    with pytest.raises(ValueError, match="unknown workflow 'c'; allowed: a, b"):
        config.model_validate(config.model_dump() | {"workflow": "c"})


# -- the builder's other paths: depth maps, style defaults, placeholder defaults -----------------


async def test_depth_map_and_style_defaults(fake, workflows):
    graph = json.loads((workflows / "sdxl_img2img.json").read_text())
    graph["12"] = {"inputs": {"image": "{{depth_map}}"}, "class_type": "LoadImage", "_meta": {"title": "depth"}}
    graph["5"] = {
        "inputs": {"width": "{{width}}", "height": "{{height}}", "batch_size": 1},
        "class_type": "EmptyLatentImage",
    }
    graph["3"]["inputs"]["steps"] = "{{steps}}"
    (workflows / "depth.json").write_text(json.dumps(graph))
    spec = {"file": "depth.json", "inputs": {"reference_images": ["10.inputs.image"]}, "defaults": {"steps": 30}}
    styles = {"wide": {"width": 1216, "height": 832, "negative_prompt": "lowres"}}
    async with make(fake, workflows, workflows={"d": spec}, styles=styles) as generator:
        depth = ReferenceImage(png_bytes((8, 8)), "png", 8, 8)
        request = RenderRequest(request_id="c-2", prompt="a pier", style="wide")
        ref = ReferenceImage(png_bytes((16, 16)), "png", 16, 16)
        result = await generator.generate(RenderJob(request, [ref], depth_map=depth))
        assert generator.capabilities.depth_map and generator.capabilities.max_reference_images == 1
    posted = posted_graph(fake)
    sub = posted["10"]["inputs"]["image"].rpartition("/")[0]
    assert posted["12"]["inputs"]["image"] == f"{sub}/depth.png"
    assert (posted["5"]["inputs"]["width"], posted["5"]["inputs"]["height"]) == (1216, 832)  # the style's size
    assert posted["3"]["inputs"]["steps"] == 30  # the workflow's default for {{steps}}
    assert posted["7"]["inputs"]["text"] == "lowres"  # the style's negative prompt
    assert result.applied["steps"] == 30 and result.applied["style"] == "wide"


async def test_a_placeholder_without_a_value_or_default_is_invalid_request(fake, workflows):
    graph = json.loads((workflows / "sd15_text_to_image.json").read_text())
    graph["3"]["inputs"]["cfg"] = "{{cfg}}"
    (workflows / "cfg.json").write_text(json.dumps(graph))
    async with make(fake, workflows, workflows={"c": {"file": "cfg.json"}}) as generator:
        with pytest.raises(InvalidRequest, match=r"has a \{\{cfg\}\} placeholder and the request gives no cfg"):
            await generator.generate(job())
        await generator.generate(job(guidance_scale=4.0))
    assert posted_graph(fake)["3"]["inputs"]["cfg"] == 4.0


async def test_an_unknown_style_is_invalid_request(fake, workflows):
    async with make(fake, workflows, styles={"noir": {"prompt_prefix": "noir "}}) as generator:
        with pytest.raises(InvalidRequest, match="unknown style 'pastel'; configured styles: noir"):
            await generator.generate(job(style="pastel"))


async def test_a_silent_websocket_is_given_up_for_history_polling():
    # A socket that stays open but says nothing about our prompt (a proxy that stopped passing
    # frames, a lost final event) must not hold the render until its timeout.
    from image_server.generators.comfyui.follow import WebsocketLost, follow_events

    silent: asyncio.Queue[Any] = asyncio.Queue()
    async with asyncio.timeout(5):
        with pytest.raises(WebsocketLost):
            await follow_events(silent, "p1", progress=lambda *_: None, generator="comfy", quiet_s=0.05)
