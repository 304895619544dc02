"""MockGenerator: determinism, styles, image-to-image, delay, failures, handlers, image_dir."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from image_server.errors import ConfigError, GenerationFailed
from image_server.generators.base import GeneratedImage, GenerationResult, GeneratorConfig, ReferenceImage, RenderJob
from image_server.generators.mock import MockConfig, MockGenerator
from image_server.manager import GeneratorManager
from schemas import RenderRequest

RED = (230, 20, 20)


def make_generator(handler=None, **config) -> MockGenerator:
    return MockGenerator(MockConfig(strategy="mock", **config), name="mocky", handler=handler)


def make_job(
    rid: str = "r1", *, references: list[ReferenceImage] | None = None, attempt: int = 1, **fields
) -> RenderJob:
    fields.setdefault("prompt", "a red fox in the snow")
    return RenderJob(RenderRequest(request_id=rid, **fields), references=references or [], attempt=attempt)


async def render(generator: MockGenerator, job: RenderJob) -> GenerationResult:
    async with generator:
        return await generator.generate(job)


async def pixels(job: RenderJob, **config) -> Image.Image:
    result = await render(make_generator(**config), job)
    image = result.images[0].image
    assert image is not None
    return image


def same_pixels(a: Image.Image | None, b: Image.Image | None) -> bool:
    assert a is not None and b is not None
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def solid_reference(colour: tuple[int, int, int] = RED, size: tuple[int, int] = (80, 60)) -> ReferenceImage:
    return ReferenceImage(data=encoded(Image.new("RGB", size, colour)), format="png", width=size[0], height=size[1])


def distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5


# -- drawing ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["simple", "detailed", "debug"])
async def test_same_inputs_same_pixels_and_seed_changes_them(style: str) -> None:
    job = make_job(seed=42, width=160, height=96)
    first = await pixels(job, style=style)
    again = await pixels(make_job(seed=42, width=160, height=96), style=style)  # a fresh instance and job
    other_seed = await pixels(make_job(seed=43, width=160, height=96), style=style)
    assert same_pixels(first, again)
    assert not same_pixels(first, other_seed)
    other_prompt = await pixels(make_job(seed=42, width=160, height=96, prompt="a blue whale"), style=style)
    assert not same_pixels(first, other_prompt)


@pytest.mark.parametrize("style", ["simple", "detailed", "debug"])
async def test_each_style_renders_at_the_requested_size(style: str) -> None:
    result = await render(make_generator(style=style), make_job(width=200, height=72, seed=1))
    image = result.images[0]
    assert image.image is not None and image.image.size == (200, 72) and image.image.mode == "RGB"
    assert (image.width, image.height) == (200, 72)
    assert result.applied["style"] == style and result.prompt == "a red fox in the snow"
    # Not a blank canvas: the prompt (or the parameter block) is drawn on it.
    assert len(image.image.getcolors(200 * 72) or []) > 1


async def test_styles_differ_and_request_style_beats_config() -> None:
    drawn = {s: await pixels(make_job(seed=5, width=96, height=96), style=s) for s in ("simple", "detailed", "debug")}
    assert not same_pixels(drawn["simple"], drawn["detailed"])
    assert not same_pixels(drawn["simple"], drawn["debug"])
    assert not same_pixels(drawn["detailed"], drawn["debug"])
    asked = await render(make_generator(style="simple"), make_job(seed=5, width=96, height=96, style="DEBUG"))
    assert asked.applied["style"] == "debug" and same_pixels(asked.images[0].image, drawn["debug"])
    # A style the mock does not know falls back to the configured one.
    unknown = await render(make_generator(style="detailed"), make_job(seed=5, width=96, height=96, style="oil"))
    assert unknown.applied["style"] == "detailed" and same_pixels(unknown.images[0].image, drawn["detailed"])


async def test_debug_style_shows_the_request_parameters() -> None:
    base = await pixels(make_job(seed=9, width=256, height=256, steps=10), style="debug")
    more_steps = await pixels(make_job(seed=9, width=256, height=256, steps=30), style="debug")
    other_id = await pixels(make_job("r2", seed=9, width=256, height=256, steps=10), style="debug")
    assert not same_pixels(base, more_steps) and not same_pixels(base, other_id)


async def test_default_size_and_seed_derived_from_request_id() -> None:
    result = await render(make_generator(), make_job("abc"))
    assert result.images[0].image is not None and result.images[0].image.size == (1024, 1024)
    again = await render(make_generator(), make_job("abc"))
    other = await render(make_generator(), make_job("abd"))
    assert result.applied["seed"] == again.applied["seed"] == result.images[0].seed
    assert other.applied["seed"] != result.applied["seed"]
    assert result.applied == {"width": 1024, "height": 1024, "seed": result.applied["seed"], "style": "simple"}


async def test_num_images_use_seed_plus_index() -> None:
    result = await render(make_generator(style="detailed"), make_job(seed=100, width=64, height=64, num_images=3))
    assert [image.seed for image in result.images] == [100, 101, 102]
    assert result.applied == {"width": 64, "height": 64, "seed": 100, "style": "detailed"}
    for index, image in enumerate(result.images):
        alone = await pixels(make_job(seed=100 + index, width=64, height=64), style="detailed")
        assert same_pixels(image.image, alone)
    assert not same_pixels(result.images[0].image, result.images[1].image)


async def test_progress_is_reported_while_drawing() -> None:
    seen: list[tuple[float | None, str | None]] = []
    job = make_job(width=64, height=64)
    job.progress = lambda fraction, message: seen.append((fraction, message))
    await render(make_generator(), job)
    assert seen == [(None, "drawing")]


async def test_needs_a_mock_config_and_reports_health() -> None:
    with pytest.raises(TypeError, match="MockConfig"):
        MockGenerator(GeneratorConfig(strategy="other"))
    generator = make_generator()
    assert (await generator.health()).ok
    caps = generator.capabilities
    assert caps.text_to_image and caps.image_to_image and caps.max_reference_images == 10


# -- image-to-image --------------------------------------------------------------------


async def test_image_to_image_moves_the_picture_toward_the_reference() -> None:
    plain = await pixels(make_job(seed=3, width=128, height=128), style="detailed")
    guided = await render(
        make_generator(style="detailed"), make_job(seed=3, width=128, height=128, references=[solid_reference()])
    )
    image = guided.images[0].image
    assert image is not None and image.size == (128, 128)
    plain_mean = tuple(ImageStat.Stat(plain).mean)
    guided_mean = tuple(ImageStat.Stat(image).mean)
    assert distance(guided_mean, RED) < distance(plain_mean, RED) - 20
    # Default strength 0.5: half way between the text-to-image picture and the reference.
    halfway = tuple((p + r) / 2 for p, r in zip(plain_mean, RED, strict=True))
    assert distance(guided_mean, halfway) < 3
    assert guided.applied["strength"] == 0.5


async def test_strength_zero_keeps_the_reference_and_one_ignores_it() -> None:
    reference = solid_reference((10, 200, 40))
    kept = await pixels(make_job(seed=3, width=64, height=64, strength=0.0, references=[reference]))
    assert kept.getcolors() == [(64 * 64, (10, 200, 40))]
    replaced = await pixels(make_job(seed=3, width=64, height=64, strength=1.0, references=[reference]))
    assert same_pixels(replaced, await pixels(make_job(seed=3, width=64, height=64)))


# -- delay and failures ----------------------------------------------------------------


async def test_delay_waits_then_draws() -> None:
    generator = make_generator(delay_s=0.2)
    started = time.perf_counter()
    result = await render(generator, make_job(width=64, height=64))
    assert time.perf_counter() - started >= 0.2 and len(result.images) == 1


async def test_delay_is_cancellable() -> None:
    in_delay = asyncio.Event()

    def handler(job: RenderJob) -> None:
        in_delay.set()  # the handler returns None: generate() goes straight on into its delay

    generator = make_generator(handler, delay_s=60)
    task = asyncio.create_task(generator.generate(make_job(width=64, height=64)))
    async with asyncio.timeout(5):
        await in_delay.wait()
    started = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(1):
            await task
    assert time.perf_counter() - started < 0.5


async def test_fail_rate_one_always_fails_retryably() -> None:
    generator = make_generator(fail_rate=1.0)
    for attempt in (1, 2, 3):
        with pytest.raises(GenerationFailed, match="simulated failure") as failed:
            await render(generator, make_job("doomed", attempt=attempt))
        assert failed.value.retryable and failed.value.request_id == "doomed" and failed.value.generator == "mocky"


async def test_failures_are_deterministic_per_request_and_attempt() -> None:
    async def outcomes(attempt: int) -> list[bool]:
        generator = make_generator(fail_rate=0.5)
        results = []
        for index in range(40):
            try:
                await generator.generate(make_job(f"req-{index}", attempt=attempt, width=64, height=64))
                results.append(True)
            except GenerationFailed:
                results.append(False)
        return results

    first = await outcomes(1)
    assert await outcomes(1) == first  # a fresh instance decides the same way
    assert 8 <= first.count(False) <= 32  # about half fail
    assert await outcomes(2) != first  # a retry is a new draw: it can succeed where attempt 1 failed


async def test_request_overrides_reach_the_mock_through_the_manager() -> None:
    # The manager builds the instance with generator_config applied; the mock reads self.config.
    async with GeneratorManager({"mock": MockConfig(strategy="mock")}, default="mock") as manager:
        job = make_job("ovr", width=64, height=64)
        with pytest.raises(GenerationFailed, match="fail_rate=1.0"):
            await manager.generate("mock", job, overrides={"fail_rate": 1.0})
        styled = await manager.generate("mock", job, overrides={"style": "debug"})
        assert styled.applied["style"] == "debug"
        assert (await manager.generate("mock", job)).applied["style"] == "simple"


# -- handlers --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_handler_result_is_returned_and_none_falls_through(kind: str) -> None:
    scripted = GenerationResult(images=[GeneratedImage(image=Image.new("RGB", (8, 8)), seed=1)], prompt="scripted")
    seen: list[RenderJob] = []

    def sync_handler(job: RenderJob) -> GenerationResult | None:
        seen.append(job)
        return scripted if job.request.prompt == "script me" else None

    async def async_handler(job: RenderJob) -> GenerationResult | None:
        await asyncio.sleep(0)
        return sync_handler(job)

    generator = make_generator(sync_handler if kind == "sync" else async_handler, fail_rate=1.0)
    job = make_job(prompt="script me")
    assert await render(generator, job) is scripted  # the handler runs before the simulated failure
    assert seen == [job]
    drawn_generator = make_generator(sync_handler if kind == "sync" else async_handler)
    drawn = await render(drawn_generator, make_job(prompt="draw me", width=64, height=64))
    assert drawn is not scripted and drawn.images[0].image is not None and drawn.images[0].image.size == (64, 64)
    assert [j.request.prompt for j in seen] == ["script me", "draw me"]


async def test_handler_exceptions_propagate() -> None:
    def handler(job: RenderJob) -> None:
        raise GenerationFailed("scripted refusal", request_id=job.request.request_id)

    with pytest.raises(GenerationFailed, match="scripted refusal"):
        await render(make_generator(handler), make_job())


# -- image_dir -------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (90, 70), (200, 30, 30)).save(folder / "a.png")
    Image.new("RGB", (100, 50), (30, 200, 30)).save(folder / "b.jpg", quality=95)
    Image.new("RGB", (60, 60), (30, 30, 200)).save(folder / "c.webp", quality=95)
    (folder / "notes.txt").write_text("not an image")
    (folder / "d.png").mkdir()  # a folder with an image suffix is not an image
    return folder


async def test_image_dir_serves_the_folder_files_untouched(image_dir: Path) -> None:
    files = {p.read_bytes(): p for p in image_dir.iterdir() if p.is_file() and p.suffix != ".txt"}
    generator = make_generator(image_dir=image_dir)
    by_seed: dict[int, GeneratedImage] = {}
    async with generator:
        for seed in range(12):
            image = (await generator.generate(make_job(f"s{seed}", seed=seed))).images[0]
            assert image.data is not None and image.image is None and image.seed == seed
            by_seed[seed] = image
    assert {image.data for image in by_seed.values()} == set(files)  # every image in the folder, nothing else
    for image in by_seed.values():
        assert image.data is not None
        with Image.open(files[image.data]) as opened:
            assert (image.width, image.height) == opened.size
            assert image.format == {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[str(opened.format)]
    # The choice depends on the seed alone: a fresh instance serves the same file for it.
    again = await render(make_generator(image_dir=image_dir), make_job("other-id", seed=4))
    assert again.images[0].data == by_seed[4].data


async def test_image_dir_fits_to_a_requested_size_and_blends_references(image_dir: Path) -> None:
    colours = {(200, 30, 30), (30, 200, 30), (30, 30, 200)}
    generator = make_generator(image_dir=image_dir)
    async with generator:
        for seed in range(3):
            image = (await generator.generate(make_job(seed=seed, width=96, height=64))).images[0].image
            assert image is not None and image.size == (96, 64)
            mean = tuple(ImageStat.Stat(image).mean)
            assert min(distance(mean, colour) for colour in colours) < 6
        white = solid_reference((255, 255, 255))
        guided = await generator.generate(make_job(seed=0, width=64, height=64, references=[white]))
    image = guided.images[0].image
    assert image is not None and image.size == (64, 64) and guided.images[0].data is None
    assert min(distance(tuple(ImageStat.Stat(image).mean), colour) for colour in colours) > 20


@pytest.mark.parametrize("contents", ["empty", "only_text", "missing"])
async def test_image_dir_without_images_is_a_config_error_at_open(tmp_path: Path, contents: str) -> None:
    folder = tmp_path / "pictures"
    if contents != "missing":
        folder.mkdir()
    if contents == "only_text":
        (folder / "readme.md").write_text("no images here")
    generator = make_generator(image_dir=folder)
    with pytest.raises(ConfigError, match="image_dir") as refused:
        await generator.open()
    assert refused.value.generator == "mocky" and str(folder) in refused.value.message


async def test_unreadable_folder_image_fails_the_render(tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(GenerationFailed, match="broken.png"):
        await render(make_generator(image_dir=folder), make_job(seed=0))


async def test_image_dir_is_listed_lazily_without_open(image_dir: Path) -> None:
    # generate() without a prior open(), as a bare instance in a script would be used.
    result = await make_generator(image_dir=image_dir).generate(make_job(seed=0, width=64, height=64))
    image = result.images[0].image
    assert image is not None and image.size == (64, 64)
    colours = {(200, 30, 30), (30, 200, 30), (30, 30, 200)}
    assert min(distance(tuple(ImageStat.Stat(image).mean), colour) for colour in colours) < 6
