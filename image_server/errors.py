"""The exception tree of image_server; each class maps to one stable ``RenderError.code``.

```
ImageServerError
  ConfigError (ValueError)            bad config file, environment or flag       -
  RequestRejected                     the service will not take this request
    InvalidRequest                    schema ok, but not acceptable            invalid_request
    Overloaded                        queue or in-flight bound reached         overloaded
    Cancelled                         a CancelRequest ended it                 cancelled
    Superseded                        a newer request on its channel           superseded
    OverBudget                        max_cost or a generator's budget         over_budget
  ReferenceImageError                 a reference image can't be used          reference_image
  StorageFailed                       output dir full or not writable          storage (retryable)
  GeneratorError
    GeneratorNotFound (LookupError)   unknown generator name                   unknown_generator
    GeneratorUnavailable              import or credentials failed             generation_failed
    Unsupported                       the generator lacks a capability         unsupported
    GenerationFailed                  the backend refused or errored           generation_failed
      RateLimited                     429 and friends (retry_after)            rate_limited
      ContentPolicy                   prompt or image refused by policy        content_policy
      PromptTooLong                   over the provider's prompt limit         prompt_too_long
    GenerationTimeout (TimeoutError)  no answer in time                        timeout
```

Every error carries optional ``request_id`` and ``generator`` fields; messages never hold
secrets (generators translate provider errors at their boundary and scrub keys).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "Cancelled",
    "ConfigError",
    "ContentPolicy",
    "GenerationFailed",
    "GenerationTimeout",
    "GeneratorError",
    "GeneratorNotFound",
    "GeneratorUnavailable",
    "ImageServerError",
    "InvalidRequest",
    "OverBudget",
    "Overloaded",
    "PromptTooLong",
    "RateLimited",
    "ReferenceImageError",
    "RequestRejected",
    "StorageFailed",
    "Superseded",
    "Unsupported",
]


class ImageServerError(Exception):
    """Base of every error the service reports. ``code`` is the wire code."""

    code: ClassVar[str] = "internal"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        generator: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.generator = generator
        self.retryable = self.default_retryable if retryable is None else retryable
        self.attempts = 0  # provider attempts made before giving up (set by the retry loop)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in (("request_id", self.request_id), ("generator", self.generator)) if v
        )
        return f"{type(self).__name__}({self.message!r}{', ' + fields if fields else ''})"


class ConfigError(ImageServerError, ValueError):
    """The configuration (file, environment or flags) is invalid; the message names where."""


class RequestRejected(ImageServerError):
    pass


class InvalidRequest(RequestRejected):
    code = "invalid_request"


class Overloaded(RequestRejected):
    code = "overloaded"
    default_retryable = True


class Cancelled(RequestRejected):
    code = "cancelled"


class Superseded(RequestRejected):
    code = "superseded"


class OverBudget(RequestRejected):
    """Refused before anything was spent: the estimate exceeds the request's ``max_cost``, or
    every generator that could serve it has spent its daily or monthly budget."""

    code = "over_budget"


class ReferenceImageError(ImageServerError):
    code = "reference_image"


class GeneratorError(ImageServerError):
    code = "generation_failed"


class GeneratorNotFound(GeneratorError, LookupError):
    code = "unknown_generator"


class GeneratorUnavailable(GeneratorError):
    """A strategy could not be loaded (missing extra) or lacks credentials."""


class Unsupported(GeneratorError):
    code = "unsupported"


class GenerationFailed(GeneratorError):
    """The backend refused or errored. ``status`` is the provider's HTTP status if any."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
        generator: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id, generator=generator, retryable=retryable)
        self.status = status
        self.error_type = error_type
        self.retry_after = retry_after


class RateLimited(GenerationFailed):
    code = "rate_limited"
    default_retryable = True


class ContentPolicy(GenerationFailed):
    code = "content_policy"


class PromptTooLong(GenerationFailed):
    code = "prompt_too_long"


class GenerationTimeout(GeneratorError, TimeoutError):
    code = "timeout"
    default_retryable = True


class StorageFailed(ImageServerError):
    """The image was rendered but could not be written (disk full, read-only output dir).
    Retryable: the operator can free space, and the request is worth sending again."""

    code = "storage"
    default_retryable = True
