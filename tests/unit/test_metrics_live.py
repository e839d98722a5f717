"""Scrape-time gauges: what one server exports, and what the parent of --workers N reads
from its workers' multiprocess files (each worker run here as its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from adaface_server.metrics import _Live

SIZES = (("a", 2, 5), ("b", 1, 3))  # (gallery, identities, samples): the shared store's
MEMORY = (("a", 1000, 0), ("b", 600, 200))  # (gallery, host, device bytes): per worker


def live(gallery_labels: bool, in_flight: int = 3) -> _Live:
    gauges = _Live(gallery_labels)
    gauges.in_flight = lambda: in_flight
    gauges.queue_depth = lambda: 7
    gauges.gallery_sizes = lambda: SIZES
    gauges.gallery_memory = lambda: MEMORY
    return gauges


def exported(registry: CollectorRegistry) -> set[str]:
    lines = generate_latest(registry).decode().splitlines()
    return {line for line in lines if line and not line.startswith("#")}


ONE_SERVER = {
    True: {
        "adaface_requests_in_flight 3.0",
        "adaface_queue_depth 7.0",
        'adaface_gallery_identities{gallery="a"} 2.0',
        'adaface_gallery_identities{gallery="b"} 1.0',
        'adaface_gallery_samples{gallery="a"} 5.0',
        'adaface_gallery_samples{gallery="b"} 3.0',
        'adaface_gallery_index_bytes{gallery="a",memory="host"} 1000.0',
        'adaface_gallery_index_bytes{gallery="a",memory="device"} 0.0',
        'adaface_gallery_index_bytes{gallery="b",memory="host"} 600.0',
        'adaface_gallery_index_bytes{gallery="b",memory="device"} 200.0',
    },
    False: {
        "adaface_requests_in_flight 3.0",
        "adaface_queue_depth 7.0",
        "adaface_gallery_identities 3.0",
        "adaface_gallery_samples 8.0",
        'adaface_gallery_index_bytes{memory="host"} 1600.0',
        'adaface_gallery_index_bytes{memory="device"} 200.0',
    },
}


@pytest.mark.parametrize("gallery_labels", [True, False])
def test_one_server_exports_per_gallery_values_or_only_totals(gallery_labels):
    registry = CollectorRegistry()
    registry.register(live(gallery_labels))
    assert exported(registry) == ONE_SERVER[gallery_labels]


WORKER = """
import asyncio
from adaface_server.supervisor import publish_live_gauges
from tests.unit.test_metrics_live import live

async def main():
    task = asyncio.create_task(publish_live_gauges(live({labels}, {in_flight}), seconds=60))
    await asyncio.sleep(0.2)  # one publication
    task.cancel()

asyncio.run(main())
"""


@pytest.mark.parametrize("gallery_labels", [True, False])
def test_workers_gauges_add_up_what_each_holds_and_share_gallery_sizes(tmp_path, gallery_labels):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    for in_flight in (3, 4):  # two workers
        script = WORKER.format(labels=gallery_labels, in_flight=in_flight)
        subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, check=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    values = exported(registry)
    # Each worker's own: summed. The store's gallery sizes: the same in every worker.
    common = {"adaface_requests_in_flight 7.0", "adaface_queue_depth 14.0"}
    if gallery_labels:
        galleries = {
            'adaface_gallery_identities{gallery="a"} 2.0',
            'adaface_gallery_identities{gallery="b"} 1.0',
            'adaface_gallery_samples{gallery="a"} 5.0',
            'adaface_gallery_samples{gallery="b"} 3.0',
            'adaface_gallery_index_bytes{gallery="a",memory="host"} 2000.0',
            'adaface_gallery_index_bytes{gallery="a",memory="device"} 0.0',
            'adaface_gallery_index_bytes{gallery="b",memory="host"} 1200.0',
            'adaface_gallery_index_bytes{gallery="b",memory="device"} 400.0',
        }
    else:
        galleries = {
            "adaface_gallery_identities 3.0",
            "adaface_gallery_samples 8.0",
            'adaface_gallery_index_bytes{memory="host"} 3200.0',
            'adaface_gallery_index_bytes{memory="device"} 400.0',
        }
    assert values == common | galleries
