"""Every Python snippet in README.md and SECURITY.md runs as pasted (in a subprocess).

Only what a reader must change anyway is changed: the service's endpoints become those of
a live test service, and the key files the SECURITY.md snippet loads are generated first.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from image_server.security import generate_keypair

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def snippets(document: str) -> list[str]:
    text = (ROOT / document).read_text()
    return [re.sub(rf"^{indent}", "", body, flags=re.M) for indent, body in SNIPPET.findall(text)]


ALL = [(doc, index) for doc in ("README.md", "SECURITY.md") for index in range(len(snippets(doc)))]


def test_the_documents_have_snippets():
    assert len(snippets("README.md")) >= 2 and len(snippets("SECURITY.md")) >= 1


@pytest.mark.parametrize(("document", "index"), ALL)
async def test_snippet_runs_as_pasted(document, index, service_factory, tmp_path):
    code = snippets(document)[index]
    keys = tmp_path / "keys"
    generate_keypair(keys, "installation-core")
    generate_keypair(keys, "server")
    async with service_factory() as service:
        code = code.replace("tcp://127.0.0.1:5555", service.endpoints["requests"])
        code = code.replace("tcp://127.0.0.1:5556", service.endpoints["events"])
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(60):
            output, _ = await process.communicate()
    text = output.decode()
    assert process.returncode == 0, f"{document} snippet {index} failed:\n{code}\n---\n{text}"
    if "client.render(" in code:
        path = Path(text.splitlines()[0])
        assert path.is_file() and path.suffix == ".png", text
