"""The one place provider text is scrubbed of a generator's secrets before anyone sees it.

Strategies quote providers in errors (a 500 body, a model's text-only answer), in results
(a revised prompt) and in health reports. Whatever a strategy did, the ``Generator`` base
class runs every ``generate()`` and ``health()`` of every strategy through here (it wraps
them when the subclass is defined): each ``ImageServerError`` message, each text of a
``GenerationResult`` and each health detail leaves with the secrets replaced by ``***``.
The secrets are the values of the environment variables a generator's config names
(fields ending in ``_env``), and each half of an ``id:secret`` pair, so no strategy has to
list them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from image_server.errors import ImageServerError

R = TypeVar("R")


class HasSecrets(Protocol):
    """What a generator shows of itself here (the base class cannot be imported: it imports us)."""

    @property
    def config(self) -> BaseModel: ...

    @property
    def environ(self) -> Mapping[str, str]: ...


MIN_SECRET_CHARS = 4  # shorter values would blank out ordinary words
MIN_PARTIAL_CHARS = 8  # a message cut mid-key keeps a prefix (or suffix) of it: that much is scrubbed too


def generator_secrets(generator: HasSecrets) -> list[str]:
    """The secret values ``generator`` reads from its environment, longest first."""
    found: set[str] = set()
    for field, value in generator.config:
        if field.endswith("_env") and isinstance(value, str):
            secret = generator.environ.get(value, "").strip()
            found.add(secret)
            found.update(secret.split(":"))
    return sorted((s for s in found if len(s) >= MIN_SECRET_CHARS), key=len, reverse=True)


def scrub_text(text: str, secrets: list[str]) -> str:
    """``text`` with every secret, and every long enough piece cut from either end of one
    (a strategy that cut a message before scrubbing it leaves those), replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
        for length in range(len(secret) - 1, MIN_PARTIAL_CHARS - 1, -1):
            text = text.replace(secret[:length], "***").replace(secret[-length:], "***")
    return text


def _scrub_value(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, Mapping):
        return {key: _scrub_value(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(item, secrets) for item in value]
    return value


class Scrubber:
    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets

    def error(self, exc: ImageServerError) -> None:
        """Scrub ``exc`` in place: its message and arguments (``str`` and ``repr`` use them)."""
        exc.message = scrub_text(exc.message, self.secrets)
        exc.args = tuple(_scrub_value(arg, self.secrets) for arg in exc.args)

    def result(self, result: R) -> R:
        """A dataclass result (``GenerationResult``, ``HealthReport``) with its text fields scrubbed."""
        if not self.secrets or not dataclasses.is_dataclass(result) or isinstance(result, type):
            return result
        changes = {
            field.name: _scrub_value(getattr(result, field.name), self.secrets)
            for field in dataclasses.fields(result)
            if isinstance(getattr(result, field.name), str | list | dict)
        }
        return dataclasses.replace(result, **changes)


@contextmanager
def scrubbed_errors(generator: HasSecrets) -> Iterator[Scrubber]:
    """Scrub the ``ImageServerError`` raised inside (and give the caller a ``Scrubber`` for
    results). Provider errors chained as ``__cause__`` are cut off: they quote the
    provider unscrubbed, and a traceback in the log would print them."""
    scrubber = Scrubber(generator_secrets(generator))
    try:
        yield scrubber
    except ImageServerError as exc:
        scrubber.error(exc)
        if scrubber.secrets and exc.__cause__ is not None:
            exc.__cause__ = None
            exc.__suppress_context__ = True
        raise
