"""OutputStore: path layout, atomic writes, delivery modes, formats, fast paths, text chunks."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat, PngImagePlugin

from image_server import storage
from image_server.generators.base import GeneratedImage
from image_server.storage import OutputStore, write_atomic
from schemas import RenderRequest

WHEN = datetime(2024, 2, 29, 23, 30, tzinfo=UTC)
PARAMETERS = {"generator": "mock", "seed": 7, "steps": 20, "prompt": "a fox"}


def request(rid: str = "req-1", **fields: Any) -> RenderRequest:
    fields.setdefault("prompt", "a fox")
    return RenderRequest(request_id=rid, **fields)


def picture(mode: str = "RGB", size: tuple[int, int] = (48, 32), colour: Any = (200, 40, 60)) -> Image.Image:
    image = Image.new(mode, size, colour)
    # Some structure, so that a lossy or wrong decode would show.
    image.paste(Image.new(mode, (size[0] // 2, size[1]), colour if mode == "L" else 0), (0, 0))
    return image


def encode(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk bytes) for every chunk after the signature."""
    found, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        found.append((png[offset + 4 : offset + 8], png[offset : offset + 12 + length]))
        offset += 12 + length
    return found


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(tmp_path / "output")


def store_one(store: OutputStore, image: GeneratedImage, **fields: Any) -> storage.StoredImage:
    (stored,) = store.store(request(**fields), "mock", [image], project="proj", parameters=PARAMETERS, now=WHEN)
    return stored


# -- layout and atomic writes ----------------------------------------------------------


def test_file_delivery_layout(store: OutputStore) -> None:
    images = [GeneratedImage(image=picture(), seed=s) for s in (7, 8, 9)]
    stored = store.store(request("job-1.a"), "mock", images, project="gallery", parameters=PARAMETERS, now=WHEN)
    folder = store.output_dir / "gallery" / "mock" / "20240229"
    assert [Path(s.output.path or "") for s in stored] == [folder.resolve() / f"job-1.a_{n}.png" for n in range(3)]
    assert files_under(store.output_dir) == [folder / f"job-1.a_{n}.png" for n in range(3)]
    for n, item in enumerate(stored):
        assert item.output.uri == Path(item.output.path or "").as_uri() and item.blob is None
        assert (item.output.width, item.output.height, item.output.format) == (48, 32, "png")
        assert item.output.seed == 7 + n


def test_date_folder_is_utc(store: OutputStore) -> None:
    # 23:30 at UTC-5 is already the next day in UTC.
    late_evening = datetime(2024, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    (stored,) = store.store(
        request(), "mock", [GeneratedImage(image=picture())], project="p", parameters={}, now=late_evening
    )
    assert Path(stored.output.path or "").parent.name == "20240302"
    before = datetime.now(UTC).strftime("%Y%m%d")
    (today,) = store.store(request("r2"), "mock", [GeneratedImage(image=picture())], project="p", parameters={})
    after = datetime.now(UTC).strftime("%Y%m%d")
    assert Path(today.output.path or "").parent.name in {before, after}


def test_jpeg_extension_and_sha256_of_the_written_bytes(store: OutputStore) -> None:
    stored = store_one(store, GeneratedImage(image=picture()), output_format="jpeg")
    path = Path(stored.output.path or "")
    assert path.name == "req-1_0.jpg" and path.read_bytes()[:3] == b"\xff\xd8\xff"
    assert stored.output.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_atomic_write_leaves_no_temp_files(store: OutputStore) -> None:
    for index in range(5):
        store_one(store, GeneratedImage(image=picture()), rid=f"r{index}")
    names = [p.name for p in files_under(store.output_dir)]
    assert names == [f"r{index}_0.png" for index in range(5)]  # no .tmp, no dot files


def test_rewrite_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "image.png"
    assert write_atomic(target, b"first version") == target.resolve()
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second" and [p.name for p in target.parent.iterdir()] == ["image.png"]


def test_a_failure_mid_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def disk_full(fd: int, data: Any) -> int:
        """Writes half the data, then fails like a full disk."""
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(tmp_path / "out" / "image.png", b"x" * 10_000)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_folder_removed_while_running_is_made_again(store: OutputStore) -> None:
    first = store_one(store, GeneratedImage(image=picture()), rid="r1")
    shutil.rmtree(store.output_dir)  # an operator's clean-up, while the service runs
    second = store_one(store, GeneratedImage(image=picture()), rid="r2")
    assert Path(second.output.path or "").read_bytes()[:4] == b"\x89PNG"
    assert Path(second.output.path or "").parent == Path(first.output.path or "").parent


def test_paths_are_absolute_when_output_dir_is_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stored = store_one(OutputStore(Path("out")), GeneratedImage(image=picture()))
    path = Path(stored.output.path or "")
    assert path.is_absolute() and path == (tmp_path / "out" / "proj" / "mock" / "20240229" / "req-1_0.png").resolve()
    assert path.is_file()


def test_a_failed_rename_leaves_no_temp_file(tmp_path: Path) -> None:
    # A real failure, no patching: the target name is taken by a non-empty folder.
    target = tmp_path / "image.png"
    target.mkdir()
    (target / "keep").write_bytes(b"")
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"] and target.is_dir()


@pytest.mark.parametrize("bad", ["..", ".hidden", "a/b", "a\\b", "", "nul\x00byte", "../../etc"])
@pytest.mark.parametrize("where", ["project", "generator"])
def test_unsafe_names_are_refused(store: OutputStore, bad: str, where: str) -> None:
    names = {"project": "proj", "generator": "mock", where: bad}
    with pytest.raises(ValueError, match=f"unsafe {where}"):
        store.store(
            request(), names["generator"], [GeneratedImage(image=picture())], project=names["project"], parameters={}
        )
    assert files_under(store.output_dir.parent) == []


# -- delivery modes --------------------------------------------------------------------


def test_inline_delivery_writes_nothing(store: OutputStore) -> None:
    stored = store_one(store, GeneratedImage(image=picture(), seed=3), delivery="inline", output_format="webp")
    data = base64.b64decode(stored.output.data or "")
    assert stored.output.path is None and stored.output.uri is None and stored.blob is None
    assert stored.output.sha256 == hashlib.sha256(data).hexdigest() and stored.output.seed == 3
    assert decode(data).format == "WEBP" and decode(data).size == (48, 32)
    assert files_under(store.output_dir) == []


def test_frames_delivery_numbers_the_blobs(store: OutputStore) -> None:
    images = [GeneratedImage(image=picture(colour=(10 * n, 0, 0))) for n in range(3)]
    stored = store.store(request(delivery="frames"), "mock", images, project="p", parameters=PARAMETERS, now=WHEN)
    assert [item.output.frame for item in stored] == [0, 1, 2]
    for item in stored:
        assert item.blob is not None and item.output.sha256 == hashlib.sha256(item.blob).hexdigest()
        assert decode(item.blob).text["parameters"] == json.dumps(PARAMETERS)
        assert item.output.path is None and item.output.data is None
    assert len({item.blob for item in stored}) == 3
    assert files_under(store.output_dir) == []


def test_url_delivery_passes_provider_urls_through(store: OutputStore) -> None:
    images = [
        GeneratedImage(url="https://cdn.example/out/a.JPG?sig=abc", width=640, height=480, seed=1),
        GeneratedImage(url="https://cdn.example/out/b.webp", width=64, height=64),
        GeneratedImage(url="https://cdn.example/out/c", format="jpeg", width=64, height=64),
        GeneratedImage(url="https://cdn.example/out/d.bin"),
    ]
    stored = store.store(request(delivery="url"), "fal", images, project="p", parameters={}, now=WHEN)
    assert [item.output.uri for item in stored] == [image.url for image in images]
    assert [item.output.format for item in stored] == ["jpeg", "webp", "jpeg", "png"]
    assert (stored[0].output.width, stored[0].output.height, stored[0].output.seed) == (640, 480, 1)
    assert all(item.output.path is None and item.output.sha256 is None for item in stored)
    assert files_under(store.output_dir) == []


def test_url_delivery_without_a_url_stores_the_file(store: OutputStore) -> None:
    stored = store_one(store, GeneratedImage(image=picture()), delivery="url")
    path = Path(stored.output.path or "")
    assert stored.output.uri == path.as_uri() and path.is_file()


# -- formats ---------------------------------------------------------------------------


def test_png_from_pixels_carries_the_parameters(store: OutputStore) -> None:
    stored = store_one(store, GeneratedImage(image=picture()), prompt="東京の夜景 ☔")
    image = decode(Path(stored.output.path or "").read_bytes())
    assert json.loads(image.text["parameters"]) == PARAMETERS and image.text["prompt"] == "東京の夜景 ☔"
    assert image.tobytes() == picture().tobytes()


@pytest.mark.parametrize("source", ["png-bytes", "pixels"])
def test_png_to_jpeg(store: OutputStore, source: str) -> None:
    original = picture()
    image = GeneratedImage(data=encode(original, "PNG"), format="png") if source == "png-bytes" else None
    stored = store_one(store, image or GeneratedImage(image=original), output_format="jpeg", delivery="frames")
    assert stored.blob is not None
    result = decode(stored.blob)
    assert result.format == "JPEG" and result.size == original.size and stored.output.format == "jpeg"
    for got, want in zip(ImageStat.Stat(result).mean, ImageStat.Stat(original).mean, strict=True):
        assert abs(got - want) < 3


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16"])
def test_any_mode_to_jpeg(store: OutputStore, mode: str) -> None:
    colour: Any = {"P": 5, "LA": (120, 255), "CMYK": (0, 200, 100, 0), "I;16": 30000}.get(mode, (200, 40, 60, 128))
    stored = store_one(store, GeneratedImage(image=picture(mode, colour=colour)), output_format="jpeg")
    result = decode(Path(stored.output.path or "").read_bytes())
    assert result.format == "JPEG" and result.mode in ("RGB", "L") and result.size == (48, 32)


def test_rgba_to_webp_keeps_alpha(store: OutputStore) -> None:
    original = picture("RGBA", colour=(200, 40, 60, 255))  # left half fully transparent, right half opaque
    stored = store_one(store, GeneratedImage(data=encode(original, "PNG")), output_format="webp", delivery="frames")
    assert stored.blob is not None
    result = decode(stored.blob)
    assert result.format == "WEBP" and result.mode == "RGBA" and result.size == (48, 32)
    alpha = result.getchannel("A")
    assert alpha.crop((0, 0, 24, 32)).getextrema() == (0, 0)
    assert alpha.crop((24, 0, 48, 32)).getextrema() == (255, 255)


def test_jpeg_to_webp_and_png(store: OutputStore) -> None:
    jpeg = encode(picture(), "JPEG", quality=95)
    for fmt, pil in (("webp", "WEBP"), ("png", "PNG")):
        stored = store_one(store, GeneratedImage(data=jpeg, format="jpeg"), output_format=fmt, delivery="frames")
        assert stored.blob is not None and decode(stored.blob).format == pil
        assert decode(stored.blob).size == (48, 32)


def test_png_fast_path_only_adds_text_chunks(store: OutputStore) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "provider v1")
    provider = encode(picture("RGBA", colour=(10, 20, 30, 200)), "PNG", pnginfo=info, compress_level=9)
    stored = store_one(store, GeneratedImage(data=provider, format="png", width=48, height=32))
    written = Path(stored.output.path or "").read_bytes()
    assert stored.output.sha256 == hashlib.sha256(written).hexdigest()
    before, after = png_chunks(provider), png_chunks(written)
    added = [chunk for chunk in after if chunk not in before]
    assert [kind for kind, _ in added] == [b"iTXt", b"iTXt"]
    assert [chunk for chunk in after if chunk in before] == before  # the rest byte-identical, in order
    assert decode(written).tobytes() == decode(provider).tobytes()
    text = decode(written).text
    assert json.loads(text["parameters"]) == PARAMETERS and text["prompt"] == "a fox"
    assert text["Software"] == "provider v1"


def test_png_fast_path_detects_the_format_from_the_bytes(store: OutputStore) -> None:
    provider = encode(picture(), "PNG", compress_level=9)
    stored = store_one(store, GeneratedImage(data=provider), delivery="frames")
    assert stored.blob is not None
    assert [c for c in png_chunks(stored.blob) if c[0] != b"iTXt"] == png_chunks(provider)


def test_jpeg_fast_path_keeps_the_bytes(store: OutputStore) -> None:
    provider = encode(picture(), "JPEG", quality=71)
    stored = store_one(store, GeneratedImage(data=provider, format="jpeg"), output_format="jpeg")
    assert Path(stored.output.path or "").read_bytes() == provider
    assert stored.output.sha256 == hashlib.sha256(provider).hexdigest()
    assert (stored.output.width, stored.output.height) == (48, 32)


def test_webp_fast_path_keeps_the_bytes(store: OutputStore) -> None:
    provider = encode(picture(), "WEBP", quality=50)
    stored = store_one(store, GeneratedImage(data=provider), output_format="webp", delivery="inline")
    assert base64.b64decode(stored.output.data or "") == provider


def test_png_compress_level_is_used(tmp_path: Path) -> None:
    noisy = Image.effect_noise((128, 128), 40).convert("RGB")
    sizes = []
    for level in (0, 9):
        (stored,) = OutputStore(tmp_path / f"level{level}", png_compress_level=level).store(
            request(delivery="frames"), "mock", [GeneratedImage(image=noisy)], project="p", parameters={}
        )
        assert stored.blob is not None and decode(stored.blob).tobytes() == noisy.tobytes()
        sizes.append(len(stored.blob))
    assert sizes[0] > sizes[1]


def test_an_image_without_data_or_pixels_is_an_error(store: OutputStore) -> None:
    with pytest.raises(ValueError, match="neither data nor pixels"):
        store_one(store, GeneratedImage(width=10, height=10))


def test_written_files_honour_the_umask(tmp_path: Path) -> None:
    # Another user's display process must be able to read the images (mkstemp would give 0600).
    for umask, expected in ((0o022, 0o644), (0o077, 0o600)):
        previous = os.umask(umask)
        try:
            path = write_atomic(tmp_path / f"u{umask:o}" / "image.png", b"data")
        finally:
            os.umask(previous)
        assert path.stat().st_mode & 0o777 == expected


def test_bytes_are_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    write_atomic(tmp_path / "image.png", b"data")
    assert events == ["fsync", "replace"]


def test_a_mislabelled_provider_image_is_re_encoded(store: OutputStore) -> None:
    jpeg = encode(picture(), "JPEG", quality=95)
    stored = store_one(store, GeneratedImage(data=jpeg, format="png"), delivery="frames")
    assert stored.blob is not None and decode(stored.blob).format == "PNG"
    assert decode(stored.blob).size == (48, 32) and decode(stored.blob).text["prompt"] == "a fox"


@pytest.mark.parametrize("request_id", ["..", ".", ".hidden", "a:b", "-rf", "plain-id_9", "scene.3"])
def test_request_ids_become_file_names_that_cannot_surprise(tmp_path, request_id):
    from image_server.storage import file_stem

    stem = file_stem(request_id)
    # Starts with a letter or digit: no hidden file, no "..", no option-like leading dash; no colon.
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", stem) and ".." not in stem, stem
    if request_id in ("plain-id_9", "scene.3"):
        assert stem == request_id
    assert file_stem("a_b") != file_stem("a:b") != file_stem("a;b")


def test_only_small_ready_made_images_without_a_file_are_stored_on_the_loop(tmp_path):
    """``is_quick`` decides what the pipeline stores without a thread hop: nothing to encode,
    nothing written to disk, and little to hash."""
    store = OutputStore(tmp_path)
    png = encode(picture(), "PNG")
    ready = [GeneratedImage(data=png, format="png", width=48, height=32)]
    assert store.is_quick(request(delivery="frames"), ready)
    assert store.is_quick(request(delivery="inline"), ready)
    assert not store.is_quick(request(delivery="file"), ready)  # a file: fsync on a thread
    assert not store.is_quick(request(delivery="frames", output_format="jpeg"), ready)  # to encode
    assert not store.is_quick(request(delivery="frames"), [GeneratedImage(image=picture())])  # pixels
    big = os.urandom(storage.QUICK_STORE_BYTES + 1)
    assert not store.is_quick(request(delivery="frames"), [GeneratedImage(data=png + big, format="png")])
    assert list(tmp_path.iterdir()) == []
