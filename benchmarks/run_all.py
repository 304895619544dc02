"""Run every benchmark, save the raw figures as JSON and print a markdown table.

    uv run python benchmarks/run_all.py            # about 3 minutes on a quiet 2-core machine
    uv run python benchmarks/run_all.py --runs 1   # quicker, noisier
    uv run python benchmarks/run_all.py --only journal overhead

Results go to benchmarks/results/<UTC time>.json (ignored by git); copy the table into
benchmarks/README.md when the figures change. Each figure is the median over ``--runs``
fresh service processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import bench_cluster
import bench_delay
import bench_jitter
import bench_journal
import bench_memory
import bench_mock_1024
import bench_overhead
import bench_workflows
import PIL
import zmq
from harness import BENCH_DIR

Row = tuple[str, str, str, str]  # figure, measured, target, met


def _met(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "**no**")


def overhead_rows(r: dict[str, Any]) -> list[Row]:
    m = r["median"]
    rows: list[Row] = []
    for label, text in (
        ("journal_on", "journal on"),
        ("journal_off", "journal off"),
        ("journal_on_log_warning", "journal on, log level warning"),
        ("journal_on_metrics", "journal on, metrics on"),
    ):
        v = m[label]
        rows.append(
            (
                f"1. overhead, ready 64x64 PNG, frames, sequential ({text})",
                f"service timings.total p50 {v['service_total_p50_ms']} ms / p99 {v['service_total_p99_ms']} ms; "
                f"round trip p50 {v['round_trip_p50_ms']} ms / p99 {v['round_trip_p99_ms']} ms; "
                f"service CPU {v['service_cpu_per_request_ms']} ms/request "
                f"(event loop thread {v['service_cpu_main_ms']})",
                "p50 < 0.5 ms" if label == "journal_on" else "",
                _met(v["service_total_p50_ms"] < 0.5) if label == "journal_on" else "-",
            )
        )
    cost = m["metrics_cost"]
    rows.append(
        (
            "1. metrics on vs off (journal on)",
            f"service timings.total p50 {cost['service_total_p50_ms']:+.1%}; round trip p50 "
            f"{cost['round_trip_p50_ms']:+.1%}; service CPU/request {cost['service_cpu_per_request_ms']:+.1%}; "
            f"the hook in-process {cost['observe_us_per_request']['on']} us/request (off: "
            f"{cost['observe_us_per_request']['off']} us) = {cost['observe_share_of_service_cpu']:.1%} of the "
            "service CPU per request",
            "< 3 %",
            _met(cost["observe_share_of_service_cpu"] < 0.03 and cost["service_cpu_per_request_ms"] < 0.03),
        )
    )
    rows.append(
        (
            "1. transport floor: bare zmq.asyncio echo process",
            f"1 reply p50 {m['floor_1_reply']['p50_ms']} ms; 5 replies p50 {m['floor_5_reply']['p50_ms']} ms",
            "",
            "-",
        )
    )
    return rows


def mock_rows(r: dict[str, Any]) -> list[Row]:
    m = r["median"]
    return [
        (
            f"2. mock 1024x1024, file delivery, sequential ({r['sequential_requests']})",
            f"{m['sequential_images_per_s']} images/s; p50 {m['sequential_p50_ms']} ms / p99 {m['sequential_p99_ms']} ms",
            "report",
            "-",
        ),
        (
            f"2. mock 1024x1024, file delivery, burst of {r['burst_requests']}",
            f"{m['burst_images_per_s']} images/s; p50 {m['burst_p50_ms']} ms / p99 {m['burst_p99_ms']} ms "
            f"(client re-sends {m['burst_resends']:g})",
            "report",
            "-",
        ),
    ]


def delay_rows(r: dict[str, Any]) -> list[Row]:
    m = r["median"]
    return [
        (
            f"3. {r['figure']}, 256x256",
            f"all done in {m['wall_s']} s (last started at {m['last_started_s']} s, first done at {m['first_ready_s']} s)",
            "< 1.5 s",
            _met(r["met"]),
        )
    ]


def memory_rows(r: dict[str, Any]) -> list[Row]:
    forbidden = ", ".join(r["forbidden_imported"]) or "none"
    return [
        (
            "4. idle RSS of `image-server serve`, mock only",
            f"{r['median']['rss_mb']} MB; heavy/provider modules imported: {forbidden}",
            "< 80 MB, none",
            _met(r["met"]),
        )
    ]


def jitter_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name, m in r["median"].items():
        rows.append(
            (
                f"5. heartbeat jitter (20 ms) while normalizing 10 x 4096x4096 refs as "
                f"{m.get('carried_as', 'base64')}, {name} ({m['message_mb']} MB message)",
                f"p50 {m['during_p50_ms']} ms / p99 {m['during_p99_ms']} ms / max {m['during_max_ms']} ms "
                f"(idle baseline p99 {m['baseline_p99_ms']} ms; normalize {m['normalize_ms']:.0f} ms)",
                f"p99 <= {bench_jitter.TARGET_P99_MS:g} ms",
                _met(m["during_p99_ms"] <= bench_jitter.TARGET_P99_MS),
            )
        )
    return rows


def journal_rows(r: dict[str, Any]) -> list[Row]:
    on, off = r["median"]["journal_on"], r["median"]["journal_off"]
    return [
        (
            "6. mock throughput, bursts of 500 small requests, journal on / off",
            f"{on['images_per_s']} / {off['images_per_s']} images/s (journal costs {r['median']['throughput_cost']:.1%}; "
            f"back-to-back pairs: {', '.join(f'{c:.0%}' for c in r['median']['paired_costs'])})",
            "< 10%",
            _met(r["met"]),
        ),
        (
            "6. send -> RenderAccepted p50, one at a time, journal on / off",
            f"{on['accept_sequential_p50_ms']} / {off['accept_sequential_p50_ms']} ms "
            f"(p99 {on['accept_sequential_p99_ms']} / {off['accept_sequential_p99_ms']} ms)",
            "report",
            "-",
        ),
        (
            "6. send -> RenderAccepted p50, in the bursts of 500, journal on / off",
            f"{on['accept_burst_p50_ms']} / {off['accept_burst_p50_ms']} ms "
            f"(client re-sends {on['resends']:g} / {off['resends']:g})",
            "report",
            "-",
        ),
    ]


def workflow_rows(r: dict[str, Any]) -> list[Row]:
    m, poll_ms = r["median"], r["runpod_poll_interval_s"] * 1000
    return [
        (
            f"7. comfyui overhead beyond the fake's render ({r['render_s'] * 1000:g} ms) and HTTP handling, sequential",
            f"p50 {m['comfyui.overhead_net.p50_ms']} ms / p99 {m['comfyui.overhead_net.p99_ms']} ms "
            f"(with the fake's HTTP handling: p50 {m['comfyui.overhead.p50_ms']} ms / p99 {m['comfyui.overhead.p99_ms']} ms; "
            f"inside the generator, from timings.generate: p50 {m['comfyui.in_generator.p50_ms']} ms)",
            "p50 < 5 ms",
            _met(r["comfyui_met"]),
        ),
        (
            f"7. runpod overhead beyond the job's {r['render_s'] * 1000:g} ms, polling every {poll_ms:g} ms",
            f"p50 {m['runpod.overhead.p50_ms']} ms / p99 {m['runpod.overhead.p99_ms']} ms "
            f"(inside the generator, from timings.generate: p50 {m['runpod.in_generator.p50_ms']} ms)",
            f"p50 < {poll_ms + 5:g} ms (one period + 5)",
            _met(r["runpod_met"]),
        ),
    ]


def cluster_rows(r: dict[str, Any]) -> list[Row]:
    m, target = r["median"], r["target"]
    per_n, scaling = m["images_per_s"], m["scaling"]
    single, nats, added = m["latency_single_ms"], m["latency_nats_ms"], m["added_ms"]
    return [
        (
            "10. NATS mode, mock 0.5 s, concurrency 4 per worker: images/s with 1 / 2 / 3 workers",
            f"{per_n[1]} / {per_n[2]} / {per_n[3]} (x N of one: {scaling[2]:.2f}, {scaling[3]:.2f})",
            f">= {target['scaling']} x N",
            _met(min(scaling[2], scaling[3]) >= target["scaling"]),
        ),
        (
            "10. ready 64x64, frames, sequential: round trip single process vs gateway + worker on NATS",
            f"p50 {single['p50_ms']} vs {nats['p50_ms']} ms (added {added['p50_ms']}); "
            f"p99 {single['p99_ms']} vs {nats['p99_ms']} ms (added {added['p99_ms']})",
            f"added p50 < {target['added_p50_ms']} ms",
            _met(added["p50_ms"] < target["added_p50_ms"]),
        ),
    ]


BENCHMARKS: dict[str, tuple[Callable[[int], dict[str, Any]], Callable[[dict[str, Any]], list[Row]]]] = {
    "overhead": (lambda runs: bench_overhead.run(runs), overhead_rows),
    "mock_1024": (lambda runs: bench_mock_1024.run(runs), mock_rows),
    "delay": (lambda runs: bench_delay.run(runs), delay_rows),
    "memory": (lambda runs: bench_memory.run(runs), memory_rows),
    "jitter": (lambda runs: bench_jitter.run(runs), jitter_rows),
    "journal": (lambda runs: bench_journal.run(runs), journal_rows),
    "workflows": (lambda runs: bench_workflows.run(runs), workflow_rows),
    "cluster": (lambda runs: bench_cluster.run(runs), cluster_rows),
}


def table(rows: list[Row]) -> str:
    lines = ["| figure | measured (median of runs) | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="fresh service processes per figure (default 3)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    names = args.only or list(BENCHMARKS)
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
            "pillow": PIL.__version__,
            "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(),
        },
        "runs": args.runs,
    }
    rows: list[Row] = []
    for name in names:
        measure, format_rows = BENCHMARKS[name]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        results[name] = measure(args.runs)
        results[name]["seconds"] = round(time.monotonic() - t0, 1)
        rows += format_rows(results[name])
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started, 1)
    folder = BENCH_DIR / "results"
    folder.mkdir(exist_ok=True)
    path = folder / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2))
    machine = results["machine"]
    print(
        f"{results['date']}, {machine['cpus']} CPUs, load {machine['loadavg_before'][0]} -> "
        f"{machine['loadavg_after'][0]}, Python {machine['python']}, pyzmq {machine['pyzmq']}, "
        f"libzmq {machine['libzmq']}, Pillow {machine['pillow']}, SQLite {machine['sqlite']}, "
        f"{args.runs} run(s) each, {results['seconds']} s\n"
    )
    print(table(rows))
    print(f"\nraw figures: {path.relative_to(BENCH_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
