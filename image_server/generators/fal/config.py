"""fal.ai endpoints and the ``[generators.<name>]`` table of strategy ``fal``.

Each fal endpoint takes its own argument set (providers/API_CONTRACTS.md section 1.6); an
``EndpointSpec`` says which, so requests are mapped faithfully and the rest is reported.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from image_server.generators.base import Capabilities, GeneratorConfig

SizePreset = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]
FalFormat = Literal["jpeg", "png"]
MiB = 1024 * 1024

# Argument keys the strategy fills from the request and the typed fields below; ``arguments``
# may not set them, so there is one place (and one validation) for each.
MANAGED_ARGUMENTS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "seed",
        "image_size",
        "num_images",
        "num_inference_steps",
        "guidance_scale",
        "strength",
        "format",
        "output_format",
        "enable_safety_checker",
        "image_url",
        "loras",
    }
)


class EndpointSpec(BaseModel):
    """What one fal endpoint accepts. The default is a conservative generic text-to-image set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_to_image: bool = True
    image_to_image: bool = False
    image_field: str = "image_url"
    image_size: bool = True
    seed: bool = True
    negative_prompt: bool = False
    guidance_scale: bool = False
    strength: bool = False
    loras: bool = False  # takes ``loras: [{"path", "scale"}]`` (fal's LoRA endpoints, e.g. flux-lora)
    max_loras: int = Field(default=3, ge=1, le=16)
    steps_choices: tuple[int, ...] | None = None  # sent as strings (fast-lightning-sdxl's enum)
    steps_range: tuple[int, int] | None = None  # sent as an int, clamped into the range
    max_images: int = Field(default=1, ge=1, le=8)
    format_field: Literal["format", "output_format"] = "output_format"

    @model_validator(mode="after")
    def _coherent(self) -> EndpointSpec:
        if not (self.text_to_image or self.image_to_image):
            raise ValueError("an endpoint must take text_to_image, image_to_image or both")
        if self.steps_choices is not None and self.steps_range is not None:
            raise ValueError("set steps_choices or steps_range, not both")
        if self.strength and not self.image_to_image:
            raise ValueError("strength only applies to image_to_image endpoints")
        return self

    @property
    def takes_steps(self) -> bool:
        return self.steps_choices is not None or self.steps_range is not None

    def capabilities(self) -> Capabilities:
        accepted = {
            "seed": self.seed,
            "negative_prompt": self.negative_prompt,
            "steps": self.takes_steps,
            "guidance_scale": self.guidance_scale,
            "strength": self.strength,
        }
        return Capabilities(
            text_to_image=self.text_to_image,
            image_to_image=self.image_to_image,
            max_reference_images=1 if self.image_to_image else 0,
            max_images=self.max_images,
            loras=self.loras,
            parameters=frozenset(name for name, ok in accepted.items() if ok),
        )


_LIGHTNING = {"steps_choices": (1, 2, 4, 8), "max_images": 8, "format_field": "format"}
_I2I = {"text_to_image": False, "image_to_image": True, "strength": True}

KNOWN_ENDPOINTS: dict[str, EndpointSpec] = {
    "fal-ai/fast-lightning-sdxl": EndpointSpec.model_validate(_LIGHTNING),
    "fal-ai/fast-lightning-sdxl/image-to-image": EndpointSpec.model_validate({**_LIGHTNING, **_I2I}),
    "fal-ai/flux/schnell": EndpointSpec(steps_range=(1, 12), guidance_scale=True, max_images=4),
    # Output follows the input image, so this endpoint has no image_size.
    "fal-ai/flux/dev/image-to-image": EndpointSpec.model_validate(
        {**_I2I, "image_size": False, "steps_range": (1, 50), "guidance_scale": True, "max_images": 4}
    ),
    # FLUX.1 [dev] with LoRAs (API_CONTRACTS.md section 1.6: ``loras`` items are ``{path, scale}``).
    "fal-ai/flux-lora": EndpointSpec(steps_range=(1, 50), guidance_scale=True, max_images=4, loras=True),
}

HostURL = Annotated[
    str, Field(pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$"), AfterValidator(lambda url: url.rstrip("/"))
]


class FalConfig(GeneratorConfig):
    """One fal endpoint. The key is read from the environment variable ``api_key_env``."""

    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset(
        {"num_inference_steps", "guidance_scale", "strength", "image_size", "enable_safety_checker", "output_format"}
    )

    strategy: Literal["fal"] = "fal"
    endpoint: str = Field(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$")
    api_key_env: str = Field(default="FAL_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    image_size: SizePreset | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    strength: float | None = Field(default=None, ge=0.0, le=1.0)
    enable_safety_checker: bool = True
    output_format: FalFormat | None = None  # None: follow the request (png when it asks for webp)
    # How a reference image reaches fal: inline data URI, fal storage upload, or by size ("auto").
    upload: Literal["data_uri", "storage", "auto"] = "auto"
    upload_threshold_bytes: int = Field(default=1 * MiB, ge=0)  # auto: storage above this size
    poll_interval_s: float = Field(default=0.25, gt=0, le=30)
    arguments: dict[str, Any] = Field(default_factory=dict)  # extra endpoint inputs, e.g. acceleration
    request_timeout_s: float = Field(default=60.0, gt=0, le=600)
    download_timeout_s: float = Field(default=60.0, gt=0, le=600)
    cancel_timeout_s: float = Field(default=2.0, gt=0, le=30)
    health_check: Literal["key", "storage_token"] = "storage_token"
    # Where fal lives (http or https), per generator: a proxy, a regional gateway or a test server.
    # fal-client reads its hosts from module globals at import, so the strategy speaks fal's queue
    # and storage HTTP APIs itself (API_CONTRACTS.md sections 1.3 and 1.5) with its own httpx clients.
    queue_url: HostURL = "https://queue.fal.run"
    run_url: HostURL = "https://fal.run"
    rest_url: HostURL = "https://rest.fal.ai"  # storage tokens and the GCS upload fallback
    cdn_url: HostURL = "https://v3.fal.media"  # reference uploads
    mode: Literal["queue", "run"] = "queue"  # run: one synchronous POST to run_url, no queue
    proxy: HostURL | None = None  # for every fal call of this generator; None: HTTP(S)_PROXY if set
    ca_bundle: str | None = None  # PEM file trusted for https, for this generator only
    progress_logs: bool = False  # fal's log lines as progress messages (asks the queue for logs)
    endpoint_spec: EndpointSpec | None = None  # replaces the built-in table (needed for unknown endpoints)

    @property
    def spec(self) -> EndpointSpec:
        """The spec in effect: ``endpoint_spec`` if given, else the built-in one, else generic."""
        if self.endpoint_spec is not None:
            return self.endpoint_spec
        return KNOWN_ENDPOINTS.get(self.endpoint, EndpointSpec())

    @model_validator(mode="after")
    def _fits_endpoint(self) -> FalConfig:
        spec = self.spec
        unsupported = [
            name
            for name, value, ok in (
                ("image_size", self.image_size, spec.image_size),
                ("num_inference_steps", self.num_inference_steps, spec.takes_steps),
                ("guidance_scale", self.guidance_scale, spec.guidance_scale),
                ("strength", self.strength, spec.strength),
            )
            if value is not None and not ok
        ]
        if unsupported:
            raise ValueError(f"endpoint {self.endpoint!r} does not take {', '.join(unsupported)}")
        managed = sorted(MANAGED_ARGUMENTS.intersection(self.arguments) | {spec.image_field} & set(self.arguments))
        if managed:
            raise ValueError(f"arguments may not set {', '.join(managed)}: use the request or the dedicated fields")
        return self
