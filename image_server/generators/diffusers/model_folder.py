"""Finding a pipeline on disk and what family it is, without importing torch.

Blocking file-system work: call these from a worker thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from image_server.errors import GeneratorUnavailable, InvalidRequest, Unsupported
from image_server.generators.diffusers.config import REPO_ID, DiffusersConfig, Family


@dataclass(frozen=True)
class FamilyDefaults:
    steps: int
    guidance_scale: float
    size: int
    size_multiple: int  # the VAE (and FLUX's patching) needs sides divisible by this
    negative_prompt: bool


DEFAULTS: dict[str, FamilyDefaults] = {
    "sd15": FamilyDefaults(steps=30, guidance_scale=7.5, size=512, size_multiple=8, negative_prompt=True),
    "sdxl": FamilyDefaults(steps=30, guidance_scale=5.0, size=1024, size_multiple=8, negative_prompt=True),
    "flux": FamilyDefaults(steps=28, guidance_scale=3.5, size=1024, size_multiple=16, negative_prompt=False),
}


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    family: str  # a key of DEFAULTS
    pipeline_class: str


def resolve(spec: str, *, revision: str | None, generator: str, what: str = "model") -> Path:
    """A local folder, or the cached snapshot of a Hugging Face repo id (never downloaded)."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return local.resolve()
    if REPO_ID.fullmatch(spec):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo_id=spec, revision=revision, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise GeneratorUnavailable(
                f"generator {generator!r}: {what} {spec} is neither a folder nor in the Hugging Face cache "
                f"(nothing is downloaded; fetch it first, e.g. `hf download {spec}`)",
                generator=generator,
            ) from exc
    raise GeneratorUnavailable(f"generator {generator!r}: {what} folder {local} does not exist", generator=generator)


def family_of(pipeline_class: str) -> str | None:
    if "Flux" in pipeline_class:
        return "flux"
    if "StableDiffusionXL" in pipeline_class:
        return "sdxl"
    if pipeline_class.startswith("StableDiffusion"):
        return "sd15"
    return None


def inspect_model(config: DiffusersConfig, generator: str) -> ModelFolder:
    """Resolve ``config.model`` and read its ``model_index.json``: a clear error names the path."""
    path = resolve(config.model, revision=config.revision, generator=generator)
    index_file = path / "model_index.json"
    try:
        index = json.loads(index_file.read_text())
        pipeline_class = str(index["_class_name"])
    except FileNotFoundError:
        raise GeneratorUnavailable(
            f"generator {generator!r}: {path} is not a diffusers pipeline folder (no model_index.json)",
            generator=generator,
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GeneratorUnavailable(
            f"generator {generator!r}: unreadable {index_file}: {exc!r}", generator=generator
        ) from exc
    family: Family | str | None = config.family if config.family != "auto" else family_of(pipeline_class)
    if family is None:
        raise GeneratorUnavailable(
            f"generator {generator!r}: {pipeline_class} in {index_file} is not a supported family "
            "(SD 1.5, SDXL, FLUX); set family if it is one of them",
            generator=generator,
        )
    return ModelFolder(path, family, pipeline_class)


def lora_file(lora_dir: Path | None, name: str, *, request_id: str, generator: str) -> Path:
    """``<lora_dir>/<name>.safetensors``; a URL, a path or a missing file is refused clearly."""
    if "://" in name:
        raise Unsupported(
            f"generator {generator!r} loads LoRAs by name from its lora_dir, not from URLs ({name!r})",
            request_id=request_id,
            generator=generator,
        )
    if lora_dir is None:
        raise Unsupported(
            f"generator {generator!r} has no lora_dir configured", request_id=request_id, generator=generator
        )
    stem = name.removesuffix(".safetensors")
    if not stem or stem.startswith(".") or "/" in stem or "\\" in stem:
        raise InvalidRequest(f"LoRA name {name!r} is not a plain file name", request_id=request_id, generator=generator)
    path = lora_dir.expanduser() / f"{stem}.safetensors"
    if not path.is_file():
        raise InvalidRequest(f"LoRA {stem!r} not found: no {path}", request_id=request_id, generator=generator)
    return path
