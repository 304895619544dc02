"""``[cache]`` in config.toml: the result cache's bounds and where it is on by default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True  # off: no cache lookups or writes (identical requests still coalesce)
    max_bytes: int = Field(default=1024**3, ge=0)  # on disk, under state_dir/cache
    max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    memory_bytes: int = Field(default=64 * 1024**2, ge=0)  # recently used entries kept in memory too
    # Generators whose requests use the cache unless they say ``cache: false``; others only
    # when a request says ``cache: true``.
    default_on: list[str] = Field(default_factory=list)
