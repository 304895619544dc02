"""The command line, run as a user runs it: ``python -m image_server ...`` in a subprocess.

Each run gets a temporary working directory and config, and an environment without any
``IMAGE_SERVER_*`` variable of the caller, so nothing lands in the repository's output/.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from image_server.generators.mock.drawing import draw
from tests.fakes.fal import serve_fal
from tests.fakes.kie import FakeKie
from tests.fakes.server import TLS_CERT

REPO = Path(__file__).resolve().parents[1]
MISSING_KEY = "TEST_CLI_ABSENT_OPENAI_KEY"
RED = (230, 20, 20)

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


@pytest.fixture
def run(workdir: Path) -> Run:
    """``run(*args, env=...)``: the CLI in ``workdir``, its output captured as text."""

    def invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environ = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("IMAGE_SERVER_") and key not in (MISSING_KEY, "COLUMNS", "LINES", "FORCE_COLOR")
        }
        environ.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "image_server", *args],
            cwd=workdir,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return invoke


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "test-config.toml"
    path.write_text(
        f"""
output_dir = "{(tmp_path / "output").as_posix()}"
state_dir = "{(tmp_path / "state").as_posix()}"
default_generator = "mock"

[generators.mock]
strategy = "mock"
style = "simple"
{extra}
"""
    )
    return path


def printed_path(stdout: str, tmp_path: Path) -> Path:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    path = Path(lines[0].strip())
    assert path.is_file() and path.is_relative_to(tmp_path / "output"), path
    return path


def table_rows(stdout: str) -> dict[str, list[str]]:
    """A rich table's rows by first cell, each cell's wrapped lines joined again."""
    rows: dict[str, list[str]] = {}
    current: list[str] = []
    for line in stdout.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells[0]:
            current = rows[cells[0]] = cells
        else:
            for index, cell in enumerate(cells):
                current[index] = f"{current[index]} {cell}".strip()
    return rows


def mean(image: Image.Image) -> tuple[float, ...]:
    return tuple(ImageStat.Stat(image.convert("RGB")).mean)


def test_help(run: Run) -> None:
    done = run("--help")
    assert done.returncode == 0, done.stderr
    for command in ("serve", "gateway", "worker", "render", "generators", "demo", "jobs"):
        assert command in done.stdout


def test_demo_renders_through_sockets_and_shows_timings(run: Run, tmp_path: Path, workdir: Path) -> None:
    done = run("--config", str(write_config(tmp_path)), "demo")
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"image:\s+(\S+) \((\d+)x(\d+) png\)", done.stdout)
    assert found, done.stdout
    path = Path(found.group(1))
    assert path.is_file() and path.is_relative_to(tmp_path / "output")
    with Image.open(path) as image:
        assert image.size == (int(found.group(2)), int(found.group(3))) == (768, 512)
    assert re.search(r"service up: requests tcp://127\.0\.0\.1:\d+, events tcp://127\.0\.0\.1:\d+", done.stdout)
    timings = {stage: float(cells[1]) for stage, cells in table_rows(done.stdout).items()}
    assert list(timings) == [
        "client: wait for first Heartbeat",
        *(f"service: {stage}" for stage in ("queued", "normalize", "generate", "store", "total")),
        "client: round trip (incl. heartbeat wait)",
    ], done.stdout
    assert all(ms >= 0 for ms in timings.values())
    assert timings["service: total"] <= timings["client: round trip (incl. heartbeat wait)"]
    assert list(workdir.iterdir()) == []  # everything went to the configured folders


def test_render_prints_the_path_of_an_image_of_that_size(run: Run, tmp_path: Path) -> None:
    done = run(
        "--config", str(write_config(tmp_path)), "render", "a fox in the snow", "--width", "128", "--height", "96"
    )
    assert done.returncode == 0, done.stderr
    path = printed_path(done.stdout, tmp_path)
    assert path.parent.parent == tmp_path / "output" / "default" / "mock"
    assert re.fullmatch(r"cli-[0-9a-f]+_0\.png", path.name)
    with Image.open(path) as image:
        assert image.size == (128, 96) and image.format == "PNG"
        assert "a fox in the snow" in image.text["parameters"]


def test_render_with_a_reference_file(run: Run, tmp_path: Path, workdir: Path) -> None:
    Image.new("RGB", (100, 80), RED).save(workdir / "ref.png")
    done = run(
        "--config", str(write_config(tmp_path)), "render", "a fox", "--width", "96", "--height", "64",
        "--seed", "5", "--reference", "ref.png", "--output-format", "jpeg",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = printed_path(done.stdout, tmp_path)
    with Image.open(path) as image:
        assert image.size == (96, 64) and image.format == "JPEG" and path.suffix == ".jpg"
        guided = mean(image)
    # The same picture without the reference, drawn here; the render is half way to red.
    plain = mean(draw("simple", width=96, height=64, seed=5, prompt="a fox"))
    halfway = tuple((p + r) / 2 for p, r in zip(plain, RED, strict=True))
    assert max(abs(g - h) for g, h in zip(guided, halfway, strict=True)) < 4, (guided, halfway)


def test_render_refuses_a_file_uri_outside_allowed_roots(run: Run, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64)).save(secret)
    done = run("--config", str(write_config(tmp_path)), "render", "p", "--reference", secret.as_uri())
    assert done.returncode == 1
    assert "reference_image" in done.stderr and done.stdout == ""
    assert not (tmp_path / "output").exists()


def test_generators_lists_configured_ones_without_keys(run: Run, tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[generators.cloud]\nstrategy = "openai"\napi_key_env = "{MISSING_KEY}"\n')
    done = run("--config", str(config), "generators")
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert rows == {
        "mock": ["mock", "mock", "yes", "yes", "10", "4"],
        "cloud": ["cloud", "openai", "yes", "yes", "16", "4"],
    }


def test_generators_check_fails_for_a_missing_key(run: Run, tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[generators.cloud]\nstrategy = "openai"\napi_key_env = "{MISSING_KEY}"\n')
    done = run("--config", str(config), "generators", "--check")
    assert done.returncode == 1
    rows = table_rows(done.stdout)
    assert rows["mock"][-1] == "ok mock generator: always available"
    assert rows["cloud"][-1].startswith("failed generator 'cloud' needs an API key")
    # The whole message, unwrapped and uncut, whatever the terminal width.
    assert f"cloud: generator 'cloud' needs an API key in the environment variable {MISSING_KEY}" in done.stderr


def test_generators_check_passes_with_the_shipped_config(run: Run, tmp_path: Path) -> None:
    done = run("--config", str(REPO / "config.toml"), "generators", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert table_rows(done.stdout)["mock"][-1].startswith("ok"), done.stdout


def test_generators_check_reads_kies_credit_balance(run: Run, tmp_path: Path) -> None:
    with FakeKie(api_key="cli-kie-key") as fake:
        table = f'[generators.kie]\nstrategy = "kie"\nbase_url = "{fake.url}"\napi_key_env = "TEST_CLI_KIE_KEY"\n'
        config = write_config(tmp_path, table)
        done = run("--config", str(config), "generators", "--check", env={"TEST_CLI_KIE_KEY": "cli-kie-key"})
        assert done.returncode == 0, done.stdout + done.stderr
        assert table_rows(done.stdout)["kie"][-1] == "ok kie: key accepted; 100 credits left"
        fake.credits = 0
        done = run("--config", str(config), "generators", "--check", env={"TEST_CLI_KIE_KEY": "cli-kie-key"})
        (call, *_) = fake.paths("/api/v1/chat/credit")
    assert done.returncode == 1 and "kie: kie: key accepted, but no credits are left (0)" in done.stderr
    assert call.headers["authorization"] == "Bearer cli-kie-key"


def test_generators_check_makes_an_authenticated_call_to_leonardo_and_runware(run: Run, tmp_path: Path) -> None:
    from tests.fakes.leonardo import FakeLeonardo
    from tests.fakes.runware import FakeRunware

    with FakeLeonardo(api_key="leo-cli-key") as leonardo, FakeRunware(api_key="rw-cli-key") as runware:
        tables = (
            f'[generators.leo]\nstrategy = "leonardo"\nbase_url = "{leonardo.base_url}"\n'
            f'[generators.rw]\nstrategy = "runware"\nbase_url = "{runware.base_url}"\n'
            f'[generators.rw_bad]\nstrategy = "runware"\nbase_url = "{runware.base_url}"\napi_key_env = "RW_WRONG"\n'
        )
        env = {"LEONARDO_API_KEY": "leo-cli-key", "RUNWARE_API_KEY": "rw-cli-key", "RW_WRONG": "nope"}
        done = run("--config", str(write_config(tmp_path, tables)), "generators", "--check", env=env)
        assert [r.path for r in leonardo.requests] == ["/api/rest/v1/me"]
        assert [r.path for r in runware.requests] == ["/v1", "/v1"] and runware.inferences == []  # dry runs
    rows = table_rows(done.stdout)
    assert rows["leo"][-1].startswith("ok") and rows["rw"][-1].startswith("ok"), done.stdout
    assert rows["rw_bad"][-1].startswith("failed") and done.returncode == 1
    assert "rw_bad: rw_bad: authentication failed (HTTP 401)" in done.stderr


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        pytest.param("output_dir = [", "invalid TOML", id="invalid-toml"),
        pytest.param('[generators.mock]\nstrategy = "mock"\ndelay_s = -1\n', "delay_s", id="bad-value"),
        pytest.param(None, "not found", id="missing-file"),
    ],
)
def test_a_bad_config_exits_2_naming_the_file(run: Run, tmp_path: Path, contents: str | None, expected: str) -> None:
    path = tmp_path / "broken.toml"
    if contents is not None:
        path.write_text(contents)
    done = run("--config", str(path), "render", "p")
    assert done.returncode == 2
    assert str(path) in done.stderr and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_shipped_config_renders_from_another_directory(run: Run, tmp_path: Path, workdir: Path) -> None:
    env = {"IMAGE_SERVER_OUTPUT_DIR": str(tmp_path / "output"), "IMAGE_SERVER_STATE_DIR": str(tmp_path / "state")}
    done = run(
        "--config", str(REPO / "config.toml"), "render", "a lighthouse", "--width", "256", "--height", "128", env=env
    )
    assert done.returncode == 0, done.stderr
    path = printed_path(done.stdout, tmp_path)
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        assert image.size == (256, 128)
    assert list(workdir.iterdir()) == []


def test_generators_check_reaches_fal_at_the_configured_host(run: Run, tmp_path: Path) -> None:
    """`generators --check` asks fal's storage for a token at ``rest_url``: here a fake over https
    trusted through the generator's ``ca_bundle``, in a subprocess with no fal module patched."""
    with serve_fal(tls=True) as fake:
        table = (
            '[generators.falai]\nstrategy = "fal"\nendpoint = "fal-ai/fast-lightning-sdxl"\n'
            f'rest_url = "{fake.base_url}"\nca_bundle = "{TLS_CERT}"\n'
        )
        config = write_config(tmp_path, table)
        done = run("--config", str(config), "generators", "--check", env={"FAL_KEY": fake.scenario.key})
        assert done.returncode == 0, done.stdout + done.stderr
        assert table_rows(done.stdout)["falai"][-1].startswith("ok key accepted by fal"), done.stdout
        (token,) = fake.requests("POST", "/storage/auth/token")
        assert token.headers["Authorization"] == f"Key {fake.scenario.key}"
        wrong = run("--config", str(config), "generators", "--check", env={"FAL_KEY": "not-the-key"})
    assert wrong.returncode == 1 and "fal rejected the key in FAL_KEY (HTTP 401)" in wrong.stderr
