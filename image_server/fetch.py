"""Fetch reference-image bytes from ``file://`` and ``http(s)://`` URIs, refusing what a
client must not reach: files outside the allowed roots, symlinks, FIFOs, private addresses.

Every refusal is a ``ReferenceImageError`` whose message says why, without the file's contents.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import httpx

from image_server.config import ReferencesConfig
from image_server.errors import ReferenceImageError

MAX_REDIRECTS = 3
_CHUNK = 1024 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- file:// -----------------------------------------------------------------------------


def read_file_reference(uri: str, config: ReferencesConfig) -> bytes:
    """The bytes of a ``file://`` URI under one of ``config.allowed_roots``.

    Blocking: call it in a worker thread. Refuses ``..`` (also percent-encoded), a symlink
    anywhere below the root, anything but a regular file, and files over ``max_bytes``.
    """
    if not config.allowed_roots:
        raise ReferenceImageError("file:// references are disabled (no references.allowed_roots configured)")
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # e.g. "file://[x/..." ("Invalid IPv6 URL")
        raise ReferenceImageError("invalid file:// URI") from exc
    if parts.netloc not in ("", "localhost"):
        raise ReferenceImageError("file:// URIs naming a host are not supported")
    if parts.query or parts.fragment:
        raise ReferenceImageError("file:// URIs take no query or fragment")
    try:
        shown = unquote(parts.path, errors="strict")
    except UnicodeDecodeError as exc:
        raise ReferenceImageError("file:// path is not valid UTF-8") from exc
    path = PurePosixPath(shown)
    if "\x00" in shown or not path.is_absolute():
        raise ReferenceImageError(f"file:// path {shown!r} is not a valid absolute path")
    if ".." in path.parts:
        raise ReferenceImageError(f"file:// path {shown!r} contains '..'")
    located = _locate(path, config.allowed_roots)
    if located is None:
        raise ReferenceImageError(f"file {shown!r} is not under an allowed root")
    root, relative = located
    if not relative:
        raise ReferenceImageError(f"file {shown!r} is a directory")
    try:
        return read_below(root, relative, config.max_bytes, shown)
    except FileNotFoundError as exc:
        raise ReferenceImageError(f"file {shown!r} does not exist") from exc
    except PermissionError as exc:
        raise ReferenceImageError(f"file {shown!r} is not readable by the service") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink swapped in after the check
            raise ReferenceImageError(f"file {shown!r}: symbolic links are not allowed") from exc
        if exc.errno == errno.ENOTDIR:
            raise ReferenceImageError(f"file {shown!r} does not exist") from exc
        raise ReferenceImageError(f"file {shown!r} could not be read ({exc.strerror})") from exc


def _locate(path: PurePosixPath, roots: Sequence[Path]) -> tuple[Path, tuple[str, ...]] | None:
    """(resolved root, components below it) for the first root holding ``path``.

    A root is matched as configured and as resolved, so a root that is itself reached
    through a symlink (``/tmp`` on macOS) works; symlinks *below* the root never do.
    """
    for root in roots:
        resolved = root.resolve()
        for candidate in (PurePosixPath(os.path.abspath(root)), PurePosixPath(resolved)):
            if path == candidate or candidate in path.parents:
                return resolved, path.parts[len(candidate.parts) :]
    return None


def read_below(root: Path, relative: Sequence[str], max_bytes: int, shown: str) -> bytes:
    # Walk one component at a time with dir_fd and O_NOFOLLOW, so a directory swapped for a
    # symlink between the check and the open cannot lead outside the root.
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in relative[:-1]:
            _check_mode(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), shown, directory=True)
            next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        name = relative[-1]
        # lstat before open: opening a FIFO blocks until a writer appears, so it is never opened.
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        _check_mode(info, shown, directory=False)
        _check_size(info.st_size, max_bytes, shown)
        # O_NONBLOCK: should a FIFO be swapped in after the lstat, open returns at once.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        _check_mode(info, shown, directory=False)
        _check_size(info.st_size, max_bytes, shown)
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, _CHUNK):
            total += len(chunk)
            _check_size(total, max_bytes, shown)  # the file may have grown since fstat
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_mode(info: os.stat_result, shown: str, *, directory: bool) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise ReferenceImageError(f"file {shown!r}: symbolic links are not allowed")
    if directory and not stat.S_ISDIR(info.st_mode):
        raise ReferenceImageError(f"file {shown!r} does not exist")
    if not directory and stat.S_ISDIR(info.st_mode):
        raise ReferenceImageError(f"file {shown!r} is a directory")
    if not directory and not stat.S_ISREG(info.st_mode):
        raise ReferenceImageError(f"file {shown!r} is not a regular file")


def _check_size(size: int, max_bytes: int, shown: str) -> None:
    if size > max_bytes:
        raise ReferenceImageError(f"file {shown!r} is larger than the limit of {max_bytes} bytes")


# -- http(s):// ----------------------------------------------------------------------------


def is_public_address(address: IPAddress) -> bool:
    """True for a globally routable unicast address; IPv4 embedded in IPv6 is judged as IPv4.

    ``ipaddress`` says ``::ffff:127.0.0.1`` is not loopback and ``224.0.0.1`` is global, so
    neither ``is_global`` nor ``is_loopback`` alone is enough.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public_address(embedded)
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


async def resolve_host(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The addresses ``host`` resolves to, all checked; refuses if any one is not public.

    Spellings such as ``127.1``, ``0x7f.1`` or ``2130706433`` are not IP literals to
    Python but resolve to 127.0.0.1, so the check is made on what the resolver returns.
    """
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ReferenceImageError(f"could not resolve host {host!r}") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    if not addresses:
        raise ReferenceImageError(f"could not resolve host {host!r}")
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                # Never say which address: a client must not learn what internal names resolve to.
                raise ReferenceImageError(
                    f"refused {host!r}: it resolves to a private address (references.allow_private_addresses is off)"
                )
    return [str(address) for address in addresses]


async def fetch_http_reference(uri: str, config: ReferencesConfig, client: httpx.AsyncClient | None = None) -> bytes:
    """GET an ``http(s)://`` reference with the address checks, a size cap, at most
    ``MAX_REDIRECTS`` redirects (each re-checked) and one overall deadline."""
    try:
        url = httpx.URL(uri)
    except httpx.InvalidURL as exc:
        raise ReferenceImageError("invalid http(s) URL") from exc
    try:
        if client is not None:
            return await asyncio.wait_for(_follow(client, url, config), config.http_timeout_s)
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as own:
            return await asyncio.wait_for(_follow(own, url, config), config.http_timeout_s)
    except (TimeoutError, httpx.TimeoutException) as exc:  # asyncio's is the builtin on 3.11+
        raise ReferenceImageError(f"no complete answer within {config.http_timeout_s:g} s") from exc


async def _follow(client: httpx.AsyncClient, url: httpx.URL, config: ReferencesConfig) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ReferenceImageError("redirected to a URL that is not http(s)")
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await resolve_host(host, port, allow_private=config.allow_private_addresses)
        result = await _get(client, url, addresses, config)
        if isinstance(result, bytes):
            return result
        url = result
    raise ReferenceImageError(f"more than {MAX_REDIRECTS} redirects")


async def _get(
    client: httpx.AsyncClient, url: httpx.URL, addresses: list[str], config: ReferencesConfig
) -> bytes | httpx.URL:
    """One request, to the checked addresses in turn; the body, or where a redirect points.

    Against DNS rebinding, the request goes to the address that was checked, never to a
    fresh lookup: the URL's host becomes that address and the name travels in ``Host``.
    For https the ``sni_hostname`` extension makes httpcore send the name as SNI and verify
    the certificate against it, so TLS still authenticates the named server. Connection:
    close keeps such a pinned connection out of the client's pool.
    """
    host = url.raw_host.decode("ascii")
    # identity: images are compressed already, and a gzip body could expand a lot per chunk.
    headers = {
        "Host": url.netloc.decode("ascii"),
        "Accept": "image/*",
        "Accept-Encoding": "identity",
        "Connection": "close",
    }
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    for index, address in enumerate(addresses):
        try:
            async with client.stream(
                "GET",
                url.copy_with(host=address),
                headers=headers,
                extensions=extensions,
                follow_redirects=False,
                timeout=config.http_timeout_s,
            ) as response:
                if response.is_redirect:
                    return url.join(response.headers["Location"])
                if not response.is_success:
                    raise ReferenceImageError(f"HTTP {response.status_code} from {host}")
                return await _read_capped(response, config.max_bytes, host)
        except httpx.ConnectError as exc:
            if index == len(addresses) - 1:
                raise ReferenceImageError(f"could not connect to {host}") from exc
        except (httpx.TimeoutException, ReferenceImageError):
            raise
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ReferenceImageError(f"fetching from {host} failed ({type(exc).__name__})") from exc
    raise ReferenceImageError(f"could not connect to {host}")  # pragma: no cover - addresses is never empty


async def _read_capped(response: httpx.Response, max_bytes: int, host: str) -> bytes:
    too_large = ReferenceImageError(f"image from {host} is larger than the limit of {max_bytes} bytes")
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():  # decoded: a gzip bomb is capped too
        total += len(chunk)
        if total > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
