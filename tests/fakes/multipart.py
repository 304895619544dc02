"""A small, byte-exact multipart/form-data parser for fake servers (the ``email`` parser rewrites line ends)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class UploadedFile:
    """One file part: the form field it came in, its filename, declared type and exact bytes."""

    field: str
    filename: str
    content_type: str
    data: bytes


def _param(disposition: str, name: str) -> str | None:
    match = re.search(rf'(?:^|;)\s*{name}="([^"]*)"', disposition)
    return match[1] if match else None


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, list[str]], list[UploadedFile]]:
    """Split a multipart body into text fields (name -> values in order) and file parts.

    Raises ``ValueError`` when the body is not well-formed multipart for ``content_type``'s boundary.
    """
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise ValueError("multipart content type without a boundary")
    delimiter = b"--" + match[1].encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise ValueError("multipart body is not closed by its boundary")
    fields: dict[str, list[str]] = {}
    files: list[UploadedFile] = []
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise ValueError("multipart part is not delimited by CRLF")
        head, sep, data = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a header block")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name = _param(disposition, "name")
        if name is None:
            raise ValueError("multipart part without a name")
        filename = _param(disposition, "filename")
        if filename is None:
            fields.setdefault(name, []).append(data.decode("utf-8"))
        else:
            files.append(UploadedFile(name, filename, headers.get("content-type", "application/octet-stream"), data))
    return fields, files
