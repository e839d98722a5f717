"""`--workers 2`: a supervising parent and two real server processes sharing one gRPC port
(SO_REUSEPORT), restart of a killed worker, SIGTERM drain, aggregated /metrics, galleries
shared through the store and one HTTP port for both workers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, gallery_pb2, gallery_pb2_grpc

from .gallery_support import (
    REPO,
    crop,
    free_port,
    png,
    unit_vectors,
    vector_sample,
    wait_serving,
)


class Workers:
    """`python -m adaface_server --workers 2` as a child process."""

    def __init__(
        self,
        repository: Path,
        model: str,
        tmp_path: Path,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tmp_path / "supervisor.log"
        command = [
            sys.executable, "-m", "adaface_server", "--workers", "2",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--model-repository", str(repository), "--model", model,
            "--threads", "1", "--precision", "fp32", "--detector", "none",
            "--gallery-path", str(tmp_path / "g.db"), "--metrics-port", "0",
            "--metrics-host", "127.0.0.1", "--log-format", "text", "--grace-seconds", "10",
            *extra,
        ]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"worker \d started: pid (\d+)", self.text())]

    def metrics_port(self) -> int:
        match = re.search(r"metrics of 2 workers on http://127.0.0.1:(\d+)/metrics", self.text())
        assert match, self.text()
        return int(match.group(1))

    def answering_pids(self, calls: int = 200) -> set[int]:
        """Worker pids seen over `calls` Info calls, each on a fresh connection."""
        seen = set()
        for _ in range(calls):
            with grpc.insecure_channel(self.address) as channel:
                reply = embedder_pb2_grpc.EmbedderStub(channel).Info(
                    embedder_pb2.InfoRequest(), timeout=30
                )
            seen.add(reply.worker_pid)
            if len(seen) == 2:
                break
        return seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workers(ir18_repository, tmp_path):
    repository, model = ir18_repository
    group = Workers(repository, model, tmp_path)
    try:
        wait_serving(group.address, group.proc, group.log, timeout=300)
        yield group
    finally:
        group.stop()


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest()
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def info_count(metrics: str) -> float:
    """Sum of adaface_requests_total for Embedder/Info answered OK (samples of every worker)."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("adaface_requests_total{") and all(
            label in line for label in ('method="Embedder/Info"', 'code="OK"')
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_workers_share_the_port_and_metrics_add_up(workers):
    pids = workers.worker_pids()
    assert len(pids) == 2
    # A worker waiting for the other at start-up never had a backend to lose.
    assert "back: SERVING" not in workers.text() and "lost: NOT_SERVING" not in workers.text()
    seen = workers.answering_pids()
    assert seen == set(pids), (seen, pids)
    # Both workers' counters are aggregated on the parent's one /metrics port.
    url = f"http://127.0.0.1:{workers.metrics_port()}/metrics"
    before = info_count(urllib.request.urlopen(url, timeout=10).read().decode())
    for _ in range(10):
        workers.answering_pids(calls=1)
    after = info_count(urllib.request.urlopen(url, timeout=10).read().decode())
    assert after - before == 10
    assert before >= 2  # the calls above reached both workers, each counted once
    # Scrape-time gauges of both workers are summed too (each worker publishes its own).
    scraped = urllib.request.urlopen(url, timeout=10).read().decode()
    for gauge in ("adaface_requests_in_flight", "adaface_queue_depth"):
        values = [line for line in scraped.splitlines() if line.startswith(gauge + " ")]
        assert values == [f"{gauge} 0.0"], scraped


def test_a_killed_worker_is_restarted(workers):
    first, second = workers.worker_pids()
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while len(workers.worker_pids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(workers.worker_pids()) == 3, workers.text()
    assert f"(pid {first}) exited with status -9" in workers.text()
    replacement = workers.worker_pids()[2]
    wait_serving(workers.address, workers.proc, workers.log, timeout=300)
    assert workers.answering_pids() == {second, replacement}


def test_sigterm_drains_both_workers(workers):
    pids = workers.worker_pids()
    request = embedder_pb2.EmbedRequest(
        images=[
            common_pb2.ImageInput(encoded=png(crop(i)), alignment=common_pb2.ALIGNMENT_ALIGNED)
            for i in range(16)
        ]
    )
    channel = grpc.insecure_channel(workers.address)
    try:
        future = embedder_pb2_grpc.EmbedderStub(channel).Embed.future(request, timeout=120)
        time.sleep(0.3)  # the call is in flight
        workers.proc.send_signal(signal.SIGTERM)
        response = future.result()  # drained, not cut off
        assert len(response.results) == 16 and all(r.embedding.vector for r in response.results)
    finally:
        channel.close()
    assert workers.proc.wait(120) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    text = workers.text()
    assert "shutting down 2 workers" in text and "all workers stopped" in text
    assert text.count("shutting down: finishing in-flight requests") == 2


def test_workers_refuse_a_port_a_plain_server_holds(ir18_repository, tmp_path):
    repository, model = ir18_repository
    with socket.socket() as held:  # a plain, non-sharing listener
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "adaface_server", "--workers", "2", "--host", "127.0.0.1",
             "--port", str(port), "--model-repository", str(repository), "--model", model,
             "--metrics-port", "-1", "--gallery-path", str(tmp_path / "g.db")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_workers_share_galleries_the_http_port_and_a_guarded_metrics_port(
    ir18_repository, tmp_path
):
    """Each call on a fresh connection lands on either worker (the kernel spreads them):
    a write acknowledged by one is read by the other, the HTTP API is served by both on one
    port, and the aggregated /metrics asks for a token as a single server's does."""
    repository, model = ir18_repository
    http_port = free_port()
    group = Workers(
        repository, model, tmp_path, extra=("--http-port", str(http_port)),
        env={"ADAFACE_AUTH_TOKENS": "worker-test-token"},
    )  # fmt: skip
    auth = (("authorization", "Bearer worker-test-token"),)
    try:
        wait_serving(group.address, group.proc, group.log, timeout=300)
        pids = set(group.worker_pids())
        assert len(pids) == 2

        def gallery_call(method: str, request):
            with grpc.insecure_channel(group.address) as channel:
                stub = gallery_pb2_grpc.GalleryStub(channel)
                return getattr(stub, method)(request, timeout=60, metadata=auth)

        gallery_call("CreateGallery", gallery_pb2.CreateGalleryRequest(name="workers"))
        vectors = unit_vectors(30, seed=7)
        for i, vector in enumerate(vectors):
            gallery_call(
                "Enroll",
                gallery_pb2.EnrollRequest(
                    gallery="workers", identity=f"p{i}", samples=[vector_sample(vector)]
                ),
            )
            found = gallery_call(
                "Search",
                gallery_pb2.SearchRequest(
                    gallery="workers", probes=[vector_sample(vector)], top_k=1
                ),
            )
            assert found.results[0].matches[0].identity == f"p{i}"
        listed = gallery_call("GetGallery", gallery_pb2.GetGalleryRequest(name="workers"))
        assert listed.identity_count == 30

        seen_http = set()
        for _ in range(200):  # urllib opens a new connection per request
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/info",
                headers={"Authorization": "Bearer worker-test-token"},
            )
            with urllib.request.urlopen(request, timeout=30) as reply:
                seen_http.add(int(json.loads(reply.read())["worker_pid"]))
            if seen_http == pids:
                break
        assert seen_http == pids

        url = f"http://127.0.0.1:{group.metrics_port()}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        scrape = urllib.request.Request(url, headers={"Authorization": "Bearer worker-test-token"})
        # Each worker holds its own copy of the index (30 rows in a 1,024-row buffer on
        # both): the host bytes add up to twice what one worker reports.
        index_bytes = 'adaface_gallery_index_bytes{gallery="workers",memory="%s"}'
        wanted = {
            'adaface_gallery_identities{gallery="workers"}': 30.0,
            index_bytes % "host": 2.0 * listed.index_bytes,
            index_bytes % "device": 0.0,
        }
        deadline = time.monotonic() + 30  # workers republish their gauges every second
        while True:
            text = urllib.request.urlopen(scrape, timeout=10).read().decode()
            samples = dict(
                (key, float(value))
                for key, _, value in (line.rpartition(" ") for line in text.splitlines())
                if key in wanted
            )
            if samples == wanted or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert listed.index_bytes > 0
        assert samples == wanted, text
    finally:
        group.stop()


def test_the_sampling_build_limit_holds_across_workers(ir18_repository, tmp_path):
    """--sampling-max-builds 1 with 2 workers: while one worker runs a long build, a build
    sent to either worker is refused; once it ends, a build runs again."""
    from adaface.v1 import sampling_pb2, sampling_pb2_grpc

    from .test_build_cancellation import OPTIONS, long_build

    repository, model = ir18_repository
    slow = ("--sampling-knn-method", "tiles", "--sampling-knn-block", "64")  # a long kNN
    group = Workers(repository, model, tmp_path, extra=("--sampling-max-builds", "1", *slow))
    small = sampling_pb2.BuildEpochRequest(
        options=OPTIONS,
        identities=[
            sampling_pb2.IdentityRecord(sample_count=2, vector=v.astype("<f4").tobytes())
            for v in unit_vectors(40, seed=3, dim=8)
        ],
    )

    def build(channel: grpc.Channel, request, timeout: float = 60) -> list:
        return list(
            sampling_pb2_grpc.SamplingStub(channel).BuildEpoch(iter([request]), timeout=timeout)
        )

    try:
        wait_serving(group.address, group.proc, group.log, timeout=300)
        # Channels of one process share connections unless each keeps its own pool.
        own = [("grpc.use_local_subchannel_pool", 1)]
        holder = grpc.insecure_channel(group.address, options=own)
        long_call = sampling_pb2_grpc.SamplingStub(holder).BuildEpoch(
            iter(long_build(80_000)), timeout=300
        )
        deadline = time.monotonic() + 120
        while "kNN over 80000 identities started" not in group.text():
            assert time.monotonic() < deadline, group.text()[-3000:]
            time.sleep(0.05)
        refused_by: set[int] = set()
        for _ in range(200):
            with grpc.insecure_channel(group.address, options=own) as channel:  # a new connection
                pid = (
                    embedder_pb2_grpc.EmbedderStub(channel)
                    .Info(embedder_pb2.InfoRequest(), timeout=30)
                    .worker_pid
                )
                with pytest.raises(grpc.RpcError) as err:
                    build(channel, small)
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert "across the server's workers" in err.value.details()
            refused_by.add(pid)
            if len(refused_by) == 2:
                break
        assert len(refused_by) == 2, "every fresh connection reached the same worker"
        long_call.cancel()
        holder.close()
        deadline = time.monotonic() + 120
        while True:  # the slot is free once the cancelled kNN has really stopped
            with grpc.insecure_channel(group.address) as channel:
                try:
                    replies = build(channel, small)
                    break
                except grpc.RpcError as exc:
                    assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.2)
        assert replies[0].WhichOneof("part") == "header"
    finally:
        group.stop()
