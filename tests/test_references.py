"""Reference-image normalization against real files in tmp_path and a real local HTTP server."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from image_server.config import ReferencesConfig
from image_server.errors import ReferenceImageError
from image_server.fetch import is_public_address
from image_server.generators.base import ReferenceImage
from image_server.references import normalize_reference, normalize_references, normalize_request_references
from schemas import ImageSource, RenderRequest
from tests.fakes.images import (
    FakeImageServer,
    bomb_png,
    encode,
    jpeg_bytes,
    noise,
    png_bytes,
    serve_images,
    solid,
)

PUBLIC_IP = "93.184.216.34"  # only ever reached through httpx.MockTransport


@pytest.fixture(scope="module")
def image_server() -> Iterator[FakeImageServer]:
    # One server for the module: stopping one takes up to serve_forever's 0.5 s poll.
    with serve_images() as server:
        yield server


@pytest.fixture
def images(image_server: FakeImageServer) -> Iterator[FakeImageServer]:
    image_server.reset()
    try:
        yield image_server
    finally:
        image_server.release.set()  # unblock any handler still waiting


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the root holding a perfectly valid image that must never be served."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.png").write_bytes(png_bytes())
    return path


def files_config(root: Path, **changes: object) -> ReferencesConfig:
    return ReferencesConfig.model_validate({"allowed_roots": [root], **changes})


def http_config(**changes: object) -> ReferencesConfig:
    return ReferencesConfig.model_validate({"allow_private_addresses": True, "http_timeout_s": 2.0, **changes})


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def normalize_uri(uri: str, config: ReferencesConfig, client: httpx.AsyncClient | None = None) -> ReferenceImage:
    return await normalize_reference(ImageSource(uri=uri), config, client=client)


# -- data: and base64 ----------------------------------------------------------------------


async def test_data_uri_png_is_kept_byte_for_byte():
    data = png_bytes((32, 24))
    ref = await normalize_uri(data_uri(data), ReferencesConfig())
    assert (ref.data, ref.format, ref.width, ref.height) == (data, "png", 32, 24)


async def test_raw_base64_with_newlines_and_without_padding():
    data = jpeg_bytes((40, 30))
    wrapped = base64.encodebytes(data).decode()  # 76-character lines
    assert "\n" in wrapped
    ref = await normalize_reference(ImageSource(image_data=wrapped.rstrip("=\n")), ReferencesConfig())
    assert (ref.data, ref.format, ref.width, ref.height) == (data, "jpeg", 40, 30)


async def test_image_data_with_data_uri_prefix():
    data = encode(solid((20, 10)), "WEBP")
    ref = await normalize_reference(ImageSource(image_data=data_uri(data, "image/webp")), ReferencesConfig())
    assert (ref.data, ref.format, ref.width, ref.height) == (data, "webp", 20, 10)


@pytest.mark.parametrize(
    ("image_data", "reason"),
    [
        ("this is not base64!", "not valid base64"),
        ("abcde", "not valid base64"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png,%89PNG", "only base64"),
        ("", "empty"),
    ],
)
async def test_invalid_base64_is_refused(image_data, reason):
    with pytest.raises(ReferenceImageError, match=reason) as caught:
        await normalize_reference(ImageSource(image_data=image_data), ReferencesConfig())
    assert caught.value.code == "reference_image"
    assert str(caught.value).startswith("reference image: ")


async def test_oversize_base64_is_refused_before_decoding():
    config = ReferencesConfig(max_bytes=1024)
    # Invalid base64 too: the size check must come first, so the size is what is reported.
    with pytest.raises(ReferenceImageError, match="larger than the limit of 1024 bytes"):
        await normalize_reference(ImageSource(image_data="!" * 2000), config)
    with pytest.raises(ReferenceImageError, match="larger than the limit of 1024 bytes"):
        await normalize_uri(data_uri(encode(noise(), "PNG")), config)


# -- decoding ------------------------------------------------------------------------------


async def test_non_image_bytes_are_refused():
    with pytest.raises(ReferenceImageError, match="not a supported image"):
        await normalize_uri(data_uri(b"GIF89a? no, just some text that is not an image"), ReferencesConfig())


async def test_decompression_bomb_is_refused():
    bomb = bomb_png(10_000, 10_000)
    assert len(bomb) < 100
    with pytest.raises(ReferenceImageError, match="decompression bomb"):
        await normalize_uri(data_uri(bomb), ReferencesConfig())


@pytest.mark.parametrize("size", [(10_000, 10_000), (20_000, 10_000)])
async def test_decompression_bomb_warning_is_an_error_even_when_warnings_are_ignored(size):
    # max_pixels is raised past the claim, so only Pillow's own check (a warning at 1x its
    # limit, an error at 2x) stands between the header and load(); pytest's
    # filterwarnings=error is switched off here so it cannot do the job for the code.
    config = ReferencesConfig(max_pixels=10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ReferenceImageError, match="decompression bomb"):
            await normalize_uri(data_uri(bomb_png(*size)), config)


async def test_over_max_pixels_is_refused():
    config = ReferencesConfig(max_pixels=64 * 64)
    with pytest.raises(ReferenceImageError, match=r"100x50 \(5000 pixels\), over the limit of 4096"):
        await normalize_uri(data_uri(png_bytes((100, 50))), config)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
async def test_truncated_image_is_refused(fmt):
    data = encode(noise((64, 64)), fmt)
    with pytest.raises(ReferenceImageError, match="truncated or corrupt"):
        await normalize_uri(data_uri(data[: len(data) // 2]), ReferencesConfig())


@pytest.mark.parametrize(
    ("fmt", "mode", "color"),
    [("GIF", "RGB", (255, 0, 0)), ("BMP", "RGB", (0, 128, 0)), ("TIFF", "CMYK", (0, 255, 255, 0))],
)
async def test_other_formats_are_converted_to_png(fmt, mode, color):
    data = encode(solid((12, 8), color, mode), fmt)
    ref = await normalize_uri(data_uri(data, f"image/{fmt.lower()}"), ReferencesConfig())
    assert (ref.format, ref.width, ref.height) == ("png", 12, 8)
    with Image.open(io.BytesIO(ref.data)) as image:
        assert image.format == "PNG"
        assert image.convert("RGB").getpixel((5, 5)) == solid((1, 1), color, mode).convert("RGB").getpixel((0, 0))


async def test_decoding_a_big_image_does_not_block_the_event_loop(root):
    # Four 4096x4096 JPEGs of noise take several hundred ms to decode in all (tasks started
    # together run back to back); on the loop, the ticker would see one gap that long.
    big = Image.frombytes("RGB", (4096, 4096), os.urandom(4096 * 4096 * 3))
    (root / "big.jpg").write_bytes(encode(big, "JPEG", quality=75))
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        sources = [ImageSource(uri=(root / "big.jpg").as_uri())] * 4
        refs = await normalize_references(sources, files_config(root))
    finally:
        stop.set()
        await ticking
    assert [(ref.width, ref.height) for ref in refs] == [(4096, 4096)] * 4
    assert gaps and max(gaps) < 0.2


# -- file:// -------------------------------------------------------------------------------


async def test_file_under_root(root):
    data = png_bytes((10, 20))
    (root / "sub").mkdir()
    (root / "sub" / "a b.png").write_bytes(data)
    ref = await normalize_uri((root / "sub" / "a b.png").as_uri(), files_config(root))
    assert (ref.data, ref.width, ref.height) == (data, 10, 20)


@pytest.mark.parametrize("dots", ["..", "%2e%2e", "%2E%2e", ".%2e"])
async def test_traversal_is_refused(root, outside, dots):
    uri = f"file://{root}/{dots}/outside/secret.png"
    with pytest.raises(ReferenceImageError, match="contains '..'"):
        await normalize_uri(uri, files_config(root))


async def test_symlinked_file_is_refused(root, outside):
    (root / "inside.png").write_bytes(png_bytes())
    (root / "to_outside.png").symlink_to(outside / "secret.png")
    (root / "to_inside.png").symlink_to(root / "inside.png")
    for name in ("to_outside.png", "to_inside.png"):
        with pytest.raises(ReferenceImageError, match="symbolic links are not allowed"):
            await normalize_uri((root / name).as_uri(), files_config(root))


async def test_symlinked_directory_is_refused(root, outside):
    (root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ReferenceImageError, match="symbolic links are not allowed"):
        await normalize_uri((root / "linked" / "secret.png").as_uri(), files_config(root))


async def test_root_reached_through_a_symlink_is_allowed(tmp_path, root):
    (root / "a.png").write_bytes(png_bytes((5, 6)))
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    ref = await normalize_uri((root / "a.png").as_uri(), files_config(alias))
    assert (ref.width, ref.height) == (5, 6)


async def test_fifo_is_refused_without_blocking(root):
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    started = time.perf_counter()
    try:
        with pytest.raises(ReferenceImageError, match="not a regular file"):
            await asyncio.wait_for(normalize_uri(fifo.as_uri(), files_config(root)), 2.0)
    finally:
        # Had the code opened the FIFO for reading, a writer unblocks the stuck thread.
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("relative", "reason"),
    [
        ("", "is a directory"),
        ("sub", "is a directory"),
        ("missing.png", "does not exist"),
        ("sub/no/x.png", "does not"),
    ],
)
async def test_directories_and_missing_files_are_refused(root, relative, reason):
    (root / "sub").mkdir()
    (root / "sub.png").write_bytes(png_bytes())
    uri = f"file://{root}/{relative}"
    with pytest.raises(ReferenceImageError, match=reason):
        await normalize_uri(uri, files_config(root))


async def test_file_outside_every_root_is_refused(root, outside):
    with pytest.raises(ReferenceImageError, match="not under an allowed root"):
        await normalize_uri((outside / "secret.png").as_uri(), files_config(root))


async def test_file_refused_when_no_roots_are_configured(outside):
    with pytest.raises(ReferenceImageError, match="disabled"):
        await normalize_uri((outside / "secret.png").as_uri(), ReferencesConfig())


async def test_oversize_file_is_refused(root):
    (root / "big.png").write_bytes(encode(noise((64, 64)), "PNG"))
    with pytest.raises(ReferenceImageError, match="larger than the limit of 1024 bytes"):
        await normalize_uri((root / "big.png").as_uri(), files_config(root, max_bytes=1024))


async def test_file_uri_with_a_host_is_refused(root):
    (root / "a.png").write_bytes(png_bytes())
    with pytest.raises(ReferenceImageError, match="naming a host"):
        await normalize_uri(f"file://example.com{root}/a.png", files_config(root))


# -- http(s):// ------------------------------------------------------------------------------


async def test_http_success(images):
    ref = await normalize_uri(images.url("/image.png"), http_config())
    assert (ref.data, ref.format, ref.width, ref.height) == (png_bytes(), "png", 32, 24)
    assert images.paths == ["/image.png"]
    assert images.recorder.requests[0].headers["Host"] == images.base_url.removeprefix("http://")


async def test_http_error_status(images):
    with pytest.raises(ReferenceImageError, match="HTTP 404 from 127.0.0.1"):
        await normalize_uri(images.url("/missing"), http_config())


async def test_http_garbage_is_refused(images):
    with pytest.raises(ReferenceImageError, match="not a supported image"):
        await normalize_uri(images.url("/garbage"), http_config())


async def test_http_slow_answer_times_out(images):
    started = time.perf_counter()
    with pytest.raises(ReferenceImageError, match="no complete answer within 0.2 s"):
        await normalize_uri(images.url("/slow"), http_config(http_timeout_s=0.2))
    assert time.perf_counter() - started < 1.5


@pytest.mark.parametrize("route", ["/oversize", "/oversize-stream"])
async def test_http_oversize_is_refused(images, route):
    with pytest.raises(ReferenceImageError, match="larger than the limit of 1024 bytes"):
        await normalize_uri(images.url(route), http_config(max_bytes=1024))


async def test_http_redirects_are_followed_and_bounded(images):
    ref = await normalize_uri(images.url("/redirect?to=/image.jpg"), http_config())
    assert ref.format == "jpeg"
    with pytest.raises(ReferenceImageError, match="more than 3 redirects"):
        await normalize_uri(images.url("/loop"), http_config())
    with pytest.raises(ReferenceImageError, match="redirected to a URL that is not http"):
        await normalize_uri(images.url("/redirect?to=file:///etc/passwd"), http_config())
    assert images.paths == ["/redirect?to=/image.jpg", "/image.jpg"] + ["/loop"] * 4 + [
        "/redirect?to=file:///etc/passwd"
    ]


async def test_http_connection_refused():
    with socket.socket() as probe:  # a port that was free a moment ago, with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ReferenceImageError, match="could not connect to 127.0.0.1"):
        await normalize_uri(f"http://127.0.0.1:{port}/image.png", http_config())


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "127.1",
        "0x7f.1",
        "2130706433",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "10.0.0.1",
        "169.254.169.254",
        "0.0.0.0",
    ],
)
async def test_private_addresses_are_refused_before_connecting(images, host):
    config = ReferencesConfig(http_timeout_s=2.0)
    started = time.perf_counter()
    with pytest.raises(ReferenceImageError, match="resolves to a private address"):
        await normalize_uri(f"http://{host}:{images.port}/image.png", config)
    assert time.perf_counter() - started < 1.0
    assert images.paths == []


async def test_redirect_to_a_private_address_is_refused(images):
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(302, headers={"Location": images.url("/image.png")})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ReferenceImageError, match="'127.0.0.1': it resolves to a private address"):
            await normalize_uri(f"http://{PUBLIC_IP}/start", ReferencesConfig(), client=client)
    assert [str(url) for url in seen] == [f"http://{PUBLIC_IP}/start"]
    assert images.paths == []


def fake_resolver(table: dict[str, list[str]]):
    async def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in table[host]]

    return getaddrinfo


async def test_https_connects_to_the_checked_address_with_the_name_for_tls(monkeypatch):
    # Against DNS rebinding: the request goes to the address that passed the check, and the
    # name travels as Host and as SNI (httpcore verifies the certificate against it).
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_resolver({"images.example": [PUBLIC_IP]}))
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=png_bytes())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        ref = await normalize_uri("https://images.example/a.png?sig=1", ReferencesConfig(), client=client)
    assert ref.format == "png"
    [request] = seen
    assert str(request.url) == f"https://{PUBLIC_IP}/a.png?sig=1"
    assert request.headers["Host"] == "images.example"
    assert request.extensions["sni_hostname"] == "images.example"


async def test_a_name_with_any_private_address_is_refused(monkeypatch):
    table = {"mixed.example": [PUBLIC_IP, "10.1.2.3"]}
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_resolver(table))
    with pytest.raises(ReferenceImageError, match="'mixed.example': it resolves to a private address") as refused:
        await normalize_uri("http://mixed.example/a.png", ReferencesConfig())
    assert "10.1.2.3" not in refused.value.message  # what an internal name resolves to stays inside
    with pytest.raises(ReferenceImageError, match="could not resolve host 'nowhere.example'"):
        await normalize_uri("http://nowhere.example/a.png", ReferencesConfig())


@pytest.mark.parametrize(
    ("address", "public"),
    [
        (PUBLIC_IP, True),
        ("2606:4700::1111", True),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("2002:7f00:1::", False),
        ("64:ff9b::7f00:1", False),
        ("224.0.0.1", False),
        ("100.64.0.1", False),
        ("fe80::1", False),
        ("fec0::1", False),
        ("fc00::1", False),
        ("255.255.255.255", False),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize("uri", ["ftp://example.com/a.png", "gopher://x/", "javascript:alert(1)", "/etc/passwd"])
async def test_unsupported_scheme_is_refused(uri):
    with pytest.raises(ReferenceImageError, match="unsupported URI scheme"):
        await normalize_uri(uri, ReferencesConfig())


# -- several at once ---------------------------------------------------------------------------


async def test_references_are_fetched_concurrently_and_keep_their_order(images):
    # /first answers only once /second has arrived: fetched one after the other, it would fail.
    sources = [ImageSource(uri=images.url("/first")), ImageSource(uri=images.url("/second"))]
    refs = await normalize_references(sources, http_config())
    assert [(ref.format, ref.width) for ref in refs] == [("png", 8), ("jpeg", 16)]


async def test_a_failure_names_its_index():
    sources = [ImageSource(uri=data_uri(png_bytes())), ImageSource(image_data="!!")]
    with pytest.raises(ReferenceImageError, match=r"^reference image 1: image data is not valid base64$"):
        await normalize_references(sources, ReferencesConfig())
    assert await normalize_references([], ReferencesConfig()) == []


async def test_request_references_and_depth_map():
    request = RenderRequest(
        request_id="r-1",
        prompt="p",
        reference_image=ImageSource(uri=data_uri(png_bytes((8, 8)))),
        reference_images=[ImageSource(image_data=base64.b64encode(jpeg_bytes((9, 9))).decode())],
        depth_map=ImageSource(uri=data_uri(png_bytes((7, 7)))),
    )
    refs, depth = await normalize_request_references(request, ReferencesConfig())
    assert [ref.width for ref in refs] == [8, 9]
    assert depth is not None and depth.width == 7
    assert await normalize_request_references(RenderRequest(request_id="r-2", prompt="p"), ReferencesConfig()) == (
        [],
        None,
    )
    broken = request.model_copy(update={"depth_map": ImageSource(image_data="!!")})
    with pytest.raises(ReferenceImageError, match="^depth map: ") as caught:
        await normalize_request_references(broken, ReferencesConfig())
    assert caught.value.request_id == "r-1"
