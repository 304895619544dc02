"""Figure 4: resident memory of an idle ``image-server serve``, and what it has imported.

The service runs as ``python -m image_server serve`` (what the ``image-server`` console
script runs) with only the mock configured, as the shipped config.toml has it. Once it
heartbeats and has idled a moment, VmRSS is read from /proc/<pid>/status and the shared
objects it mapped from /proc/<pid>/maps. A second start through serve_wrapper.py dumps
``sys.modules`` on SIGUSR1, to show that no provider SDK or ML library was imported.

    uv run python benchmarks/bench_memory.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from harness import machine, median_of, running_service

TARGET_MB = 80.0
GENERATORS = {"mock": {"strategy": "mock", "style": "detailed", "concurrency": 8}}
IDLE_S = 1.0
# Heavy or provider-specific modules that an idle mock-only service must not import.
FORBIDDEN = ("torch", "diffusers", "transformers", "numpy", "fal_client", "openai", "google", "anthropic", "boto3")


def _mapped_libraries(pid: int) -> list[str]:
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if ".so" in path:
            names.add(Path(path).name)
    return sorted(names)


def measure() -> dict[str, Any]:
    with running_service(GENERATORS) as service:
        time.sleep(IDLE_S)  # let startup garbage settle; the service is idle meanwhile
        rss_kib = service.rss_kib()
        libraries = _mapped_libraries(service.pid)
    heavy = [lib for lib in libraries if any(name in lib.lower() for name in FORBIDDEN)]
    return {"rss_mb": round(rss_kib / 1024, 1), "mapped_so": len(libraries), "heavy_so": heavy, "machine": machine()}


def imported_modules(timeout_s: float = 10.0) -> list[str]:
    """Top-level module names in an idle service (via the wrapper's SIGUSR1 dump)."""
    with running_service(GENERATORS, wrapper=True, env={"BENCH_MODULES_DUMP": "modules.json"}) as service:
        dump = service.folder / "modules.json"  # relative to the service's cwd, its temp dir
        service.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while not dump.exists() or not dump.stat().st_size:
            if time.monotonic() > deadline:
                raise RuntimeError("the service wrote no module list")
            time.sleep(0.05)
        time.sleep(0.05)  # the handler writes in one call; give it a moment to finish
        names: list[str] = json.loads(dump.read_text())
        return names


def run(runs: int = 3) -> dict[str, Any]:
    samples = [measure() for _ in range(runs)]
    modules = imported_modules()
    forbidden = sorted(name for name in modules if name in FORBIDDEN)
    third_party = [name for name in modules if name not in sys.stdlib_module_names and not name.startswith("_")]
    rss = median_of(samples, "rss_mb")
    return {
        "figure": "idle resident memory, mock only",
        "median": {"rss_mb": rss},
        "target": f"under {TARGET_MB:g} MB, no torch or provider SDK imported",
        "met": rss < TARGET_MB and not forbidden and not any(s["heavy_so"] for s in samples),
        "forbidden_imported": forbidden,
        "third_party_modules": third_party,
        "modules": modules,
        "runs": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.runs), indent=2))


if __name__ == "__main__":
    main()
