"""Service configuration: pydantic models mirroring config.toml, and ``load_config``.

Precedence, lowest first: model defaults < config.toml < ``IMAGE_SERVER_*`` environment
< command-line flags. Nested keys use ``__`` in the environment
(``IMAGE_SERVER_SOCKETS__REQUESTS__BIND=tcp://0.0.0.0:5555``); values are read as JSON
where they parse (numbers, booleans, lists) and as strings otherwise.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from image_server.cache.settings import CacheConfig
from image_server.errors import ConfigError
from image_server.generators.base import GeneratorConfig
from image_server.generators.registry import validate_generator_config
from image_server.prompting.settings import PromptingConfig
from image_server.spend.hedging import HedgeConfig
from image_server.spend.settings import SpendConfig

ENV_PREFIX = "IMAGE_SERVER_"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SocketConfig(_Section):
    """One socket: bind or connect (exactly one), and its kind."""

    kind: Literal["sub", "pull", "pub", "xpub", "push"]
    bind: str | None = None
    connect: list[str] = Field(default_factory=list)
    high_water_mark: int = Field(default=1000, ge=0)

    @model_validator(mode="after")
    def _bind_or_connect(self) -> SocketConfig:
        if bool(self.bind) == bool(self.connect):
            raise ValueError("set exactly one of 'bind' or 'connect'")
        return self


_DEFAULT_KINDS = {"requests": "sub", "events": "xpub"}


class SocketsConfig(_Section):
    requests: SocketConfig = SocketConfig(kind="sub", bind="tcp://127.0.0.1:5555")
    events: SocketConfig = SocketConfig(kind="xpub", bind="tcp://127.0.0.1:5556")

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        """A socket given only in part (``IMAGE_SERVER_SOCKETS__REQUESTS__BIND`` with no
        ``[sockets.requests]`` table) keeps its role's default kind."""
        if not isinstance(data, Mapping):
            return data
        filled = dict(data)
        for role, kind in _DEFAULT_KINDS.items():
            table = filled.get(role)
            if isinstance(table, Mapping) and "kind" not in table:
                filled[role] = {"kind": kind, **table}
        return filled

    @model_validator(mode="after")
    def _kinds(self) -> SocketsConfig:
        if self.requests.kind not in ("sub", "pull"):
            raise ValueError("sockets.requests.kind must be 'sub' or 'pull'")
        if self.events.kind not in ("pub", "xpub", "push"):
            raise ValueError("sockets.events.kind must be 'pub', 'xpub' or 'push'")
        return self


class LimitsConfig(_Section):
    max_in_flight: int = Field(default=32, ge=1, le=10_000)
    max_queued: int = Field(default=1000, ge=0, le=1_000_000)
    # Larger inbound messages get RenderError(invalid_request); libzmq itself drops (with a
    # disconnect, and no error to the sender) anything over twice this, before buffering it.
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    # Requests in flight or queued per client (its CURVE key with CURVE on, else its reply_to;
    # clients without one share a bucket); 0 = no cap beyond the share below.
    max_in_flight_per_client: int = Field(default=0, ge=0)
    # No client may hold more than this fraction of max_in_flight + max_queued, so one client's
    # flood leaves room for the others (1.0: a client may take everything).
    max_client_share: float = Field(default=0.5, gt=0, le=1)
    cache_size: int = Field(default=8, ge=1, le=1000)


class ReferencesConfig(_Section):
    """Where reference images may come from and how big they may be."""

    allowed_roots: list[Path] = Field(default_factory=list)
    allow_private_addresses: bool = False
    max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    http_timeout_s: float = Field(default=15.0, gt=0)


class SecurityConfig(_Section):
    """CURVE for every socket (off by default; see SECURITY.md)."""

    curve: bool = False
    secret_key: Path = Path("keys/server.key_secret")  # this service's key pair (mode 0600)
    authorized_keys: Path = Path("keys/authorized")  # public keys of the clients allowed in
    server_public_key: Path | None = None  # for sockets that connect to a CURVE server (a proxy)


class JournalConfig(_Section):
    """The SQLite journal behind the delivery guarantee (``state_dir/journal.sqlite3``)."""

    enabled: bool = True
    retention_s: float = Field(default=7 * 24 * 3600, ge=0)
    # A failed or refused request's body (the request as sent) is kept this long for a look at
    # what went wrong; a successful one's goes when it finishes. Its terminal event stays.
    failed_body_retention_s: float = Field(default=3600, ge=0)
    # Beyond this many bytes new requests end with RenderError(overloaded) naming the quota.
    max_bytes: int | None = Field(default=2 * 1024**3, ge=1024 * 1024)
    prune_interval_s: float = Field(default=3600, gt=0)
    # After a restart, a resumed request's result waits up to this long for a subscriber to
    # its topic (the XPUB sees subscriptions), so clients coming back hear it.
    resume_grace_s: float = Field(default=5.0, ge=0, le=600)


class HttpConfig(_Section):
    """The HTTP listener for /healthz, /readyz and /metrics (off unless enabled)."""

    enabled: bool = False
    host: str = "127.0.0.1"  # loopback: anything else is an explicit choice
    port: int = Field(default=9464, ge=0, le=65535)
    # /healthz fails when the event loop answers later than this.
    max_loop_lag_s: float = Field(default=1.0, gt=0)


class ConsoleConfig(_Section):
    """The live console at ``/console`` on the HTTP listener (off unless enabled; README.md, "Live console")."""

    enabled: bool = False
    # The token a browser must present; required when [http] binds beyond loopback.
    token_env: str = Field(default="IMAGE_SERVER_CONSOLE_TOKEN", pattern=r"^[A-Z_][A-Z0-9_]*$")
    recent: int = Field(default=60, ge=1, le=1000)  # finished renders kept as live cards
    status_interval_s: float = Field(default=2.0, gt=0, le=3600)  # generator health refresh
    # With CURVE on: the console's own key pair; its public key goes in security.authorized_keys.
    client_secret_key: Path | None = None


class LogConfig(_Section):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: Path | None = None  # also write here, rotated at max_bytes, keeping backup_count files
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    backup_count: int = Field(default=5, ge=0, le=1000)


class CompatConfig(_Section):
    """Drop-in behaviour for existing controllers (see README.md, Compatibility profiles)."""

    profile: Literal["none", "experimance"] = "none"
    # Events as one frame of plain JSON, terminal events only (for a PULL controller).
    single_frame_events: bool = False
    # Request fields the schema does not know are echoed back in ImageReady and RenderError.
    echo_unknown_fields: bool = False


# What ``[compat] profile`` sets unless the file says otherwise.
COMPAT_PROFILES: dict[str, dict[str, Any]] = {
    "experimance": {
        "sockets": {
            "requests": {"kind": "pull", "connect": ["tcp://localhost:5564"]},
            "events": {"kind": "push", "connect": ["tcp://localhost:5565"]},
        },
        "compat": {"single_frame_events": True, "echo_unknown_fields": True},
    }
}


class ClusterConfig(_Section):
    """``[cluster]``: the embedded single process (default) or NATS JetStream (distributed mode)."""

    backend: Literal["embedded", "nats"] = "embedded"
    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1)
    # Credentials: secrets come from environment variables or files, never from this file.
    user: str | None = None
    password_env: str | None = None  # the variable holding the password for ``user``
    token_env: str | None = None  # the variable holding a token
    nkey_seed_file: Path | None = None
    creds_file: Path | None = None  # a decentralized-auth .creds file (JWT + nkey seed)
    tls_ca_file: Path | None = None  # trust this CA (turns TLS on)
    tls_cert_file: Path | None = None  # client certificate, when the server wants one
    tls_key_file: Path | None = None
    replicas: int = Field(default=1, ge=1, le=5)  # of every stream and bucket (3 on a 3-node cluster)
    ack_wait_s: float = Field(default=30.0, gt=0, le=3600)  # silence after which a request goes to another worker
    max_deliver: int = Field(default=5, ge=1, le=100)  # deliveries before a request ends with RenderError(internal)
    worker_concurrency: int = Field(default=4, ge=1, le=1000)  # requests one worker renders at once
    worker_heartbeat_s: float = Field(default=2.0, gt=0, le=60)  # a worker is gone after 3 missed beats
    duplicate_window_s: float = Field(default=600.0, gt=0)  # repeats of a request id inside it are dropped
    results_ttl_s: float = Field(default=7 * 24 * 3600, gt=0)  # stored terminal events and images
    events_ttl_s: float = Field(default=3600.0, gt=0)  # how long a stopped gateway can catch up
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _credentials(self) -> ClusterConfig:
        if self.password_env and not self.user:
            raise ValueError("cluster.password_env needs cluster.user")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both cluster.tls_cert_file and cluster.tls_key_file, or neither")
        return self

    @property
    def enabled(self) -> bool:
        return self.backend == "nats"


class ServiceConfig(_Section):
    service_id: str = "image-server"
    state_dir: Path = Path("state")
    output_dir: Path = Path("output")
    default_generator: str = "mock"
    default_project: str = "default"
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=3600)
    shutdown_timeout_s: float = Field(default=10.0, ge=0)
    png_compress_level: int = Field(default=1, ge=0, le=9)
    sockets: SocketsConfig = SocketsConfig()
    limits: LimitsConfig = LimitsConfig()
    references: ReferencesConfig = ReferencesConfig()
    journal: JournalConfig = JournalConfig()
    security: SecurityConfig = SecurityConfig()
    http: HttpConfig = HttpConfig()
    console: ConsoleConfig = ConsoleConfig()
    log: LogConfig = LogConfig()
    compat: CompatConfig = CompatConfig()
    spend: SpendConfig = SpendConfig()
    cache: CacheConfig = CacheConfig()
    prompting: PromptingConfig = PromptingConfig()
    hedging: dict[str, HedgeConfig] = Field(default_factory=dict)  # by generator: off unless listed
    cluster: ClusterConfig = ClusterConfig()
    generators: dict[str, GeneratorConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _console_needs_http(self) -> ServiceConfig:
        if self.console.enabled and not self.http.enabled:
            raise ValueError("console.enabled needs the HTTP listener: set http.enabled = true")
        if self.console.enabled and self.security.curve and self.console.client_secret_key is None:
            raise ValueError("with security.curve on, the console needs console.client_secret_key (a client key pair)")
        return self

    @model_validator(mode="after")
    def _default_exists(self) -> ServiceConfig:
        if self.generators and self.default_generator not in self.generators:
            names = ", ".join(sorted(self.generators))
            raise ValueError(f"default_generator {self.default_generator!r} is not configured (configured: {names})")
        for name, hedge in self.hedging.items():
            unknown = {name, hedge.hedge} - set(self.generators) if self.generators else set()
            if unknown or hedge.hedge == name:
                raise ValueError(f"hedging.{name}: needs two different configured generators (hedge {hedge.hedge!r})")
        return self


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``IMAGE_SERVER_A__B=v`` -> ``{"a": {"b": v}}``."""
    result: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(raw)
    return result


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def _env_name(loc: tuple[Any, ...], env: Mapping[str, Any]) -> str | None:
    """The ``IMAGE_SERVER_*`` variable that set the value at ``loc``, if one did."""
    node: Any = env
    for depth, part in enumerate(loc, start=1):
        if not isinstance(node, Mapping) or str(part) not in node:
            return None
        node = node[str(part)]
        if not isinstance(node, Mapping):
            return ENV_PREFIX + "__".join(str(p).upper() for p in loc[:depth])
    return None


def build_config(
    data: Mapping[str, Any], *, source: str = "<config>", env: Mapping[str, Any] | None = None
) -> ServiceConfig:
    """Validate merged raw data; each generator table by its own strategy's model. An error
    in a value that came from the environment names the variable (``env``), not the file."""
    env = env or {}
    raw = dict(data)
    tables = raw.pop("generators", {}) or {}
    if not isinstance(tables, Mapping):
        raise ConfigError(f"{source}: 'generators' must be a table of tables")
    generators = {}
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [generators.{name}] must be a table")
        try:
            generators[name] = validate_generator_config(name, table)
        except ConfigError as exc:
            from_env = [
                variable for key in table if (variable := _env_name(("generators", name, key), env)) is not None
            ]
            where = f"{source} or {', '.join(from_env)}" if from_env else source
            raise ConfigError(f"{where}: {exc}") from exc
    try:
        return ServiceConfig.model_validate({**raw, "generators": generators})
    except ValidationError as exc:
        details = []
        for e in exc.errors(include_url=False, include_input=False):
            variable = _env_name(e["loc"], env)
            if variable is not None:
                details.append(f"{variable}: {e['msg']}")
            else:
                details.append(f"{source}: {'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}")
        raise ConfigError("; ".join(details)) from exc


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] | None = None,
) -> ServiceConfig:
    """Load the configuration. Precedence: defaults < file < environment < ``overrides``
    (the CLI's flags). With no generators configured anywhere, a ``mock`` generator is
    provided so the service always has something to render with."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        data = read_toml(path)
        source = str(path)
    env = env_overrides(environ)
    data = _deep_merge(data, env)
    if overrides:
        data = _deep_merge(data, overrides)
    if not data.get("generators"):
        data["generators"] = {"mock": {"strategy": "mock"}}
    data = apply_compat_profile(data)
    return build_config(data, source=source, env=env)


def apply_compat_profile(data: dict[str, Any]) -> dict[str, Any]:
    """Fill in what ``[compat] profile`` implies. A socket table left at the built-in default
    (as in the shipped config.toml) takes the profile's; one changed by the user wins."""
    compat = data.get("compat")
    profile = compat.get("profile") if isinstance(compat, Mapping) else None
    preset = COMPAT_PROFILES.get(profile) if isinstance(profile, str) else None
    if preset is None:
        return data
    merged = dict(data)
    sockets = dict(merged.get("sockets") or {})
    defaults = SocketsConfig()
    for role, table in preset["sockets"].items():
        given = sockets.get(role)
        try:
            unchanged = given is None or SocketConfig.model_validate(given) == getattr(defaults, role)
        except ValidationError:
            unchanged = False  # let validation report it
        if unchanged:
            sockets[role] = table
    merged["sockets"] = sockets
    merged["compat"] = {**preset["compat"], **dict(compat or {})}
    return merged
