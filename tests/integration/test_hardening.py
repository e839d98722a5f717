"""What every RPC goes through: tokens, request ids, body and stream limits, deadlines,
metrics and request logs, against real servers on loopback."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, gallery_pb2, gallery_pb2_grpc
from adaface_server.errors import StartupError
from adaface_server.security import fingerprint

from .gallery_support import REPO, crop, free_port, png, vector_sample, wait_serving
from .server_harness import ServerThread, server_settings, serving_with_tokens

USER = "user-token-0123456789abcdef"
ADMIN = "admin-token-fedcba9876543210"


def embed_request(n: int = 1, seed: int = 0) -> embedder_pb2.EmbedRequest:
    return embedder_pb2.EmbedRequest(
        images=[common_pb2.ImageInput(encoded=png(crop(seed + i))) for i in range(n)]
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def failure(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=60, **kwargs)
    return err.value


def trailing(err_or_call) -> dict[str, str]:
    return dict(err_or_call.trailing_metadata() or ())


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def settled_scrape(port: int) -> str:
    """/metrics once no RPC is in flight: a call is counted just after its answer is sent."""
    deadline = time.monotonic() + 10
    while True:
        text = scrape(port)
        if sample_value(text, "adaface_requests_in_flight") == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        metric, _, label_text = key.partition("{")
        got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if metric == name and got == want:
            return float(value)
    return 0.0


@pytest.fixture(scope="module")
def secured(ir18_repository, tmp_path_factory):
    """A server with user and admin tokens."""
    folder = tmp_path_factory.mktemp("tokens")
    users = f"# service accounts\n{USER}\n\n"  # comments and blank lines are allowed
    with serving_with_tokens(*ir18_repository, folder, users, f"{ADMIN}\n") as server:
        yield server


def test_calls_need_a_valid_bearer_token(secured):
    with grpc.insecure_channel(secured.address) as channel:
        embed = embedder_pb2_grpc.EmbedderStub(channel).Embed
        err = failure(embed, embed_request())
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in err.details()
        err = failure(embed, embed_request(), metadata=bearer(USER + "x"))
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == "invalid bearer token"
        err = failure(embed, embed_request(), metadata=(("authorization", f"Basic {USER}"),))
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        for token in (USER, ADMIN):
            response = embed(embed_request(), metadata=bearer(token), timeout=60)
            assert len(response.results[0].embedding.vector) == 4 * 512


def test_gallery_writes_need_the_admin_token(secured):
    with grpc.insecure_channel(secured.address) as channel:
        gallery = gallery_pb2_grpc.GalleryStub(channel)
        create = gallery_pb2.CreateGalleryRequest(name="staff")
        err = failure(gallery.CreateGallery, create, metadata=bearer(USER))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "Gallery/CreateGallery" in err.details() and "admin token" in err.details()
        gallery.CreateGallery(create, metadata=bearer(ADMIN), timeout=60)
        vector = np.ones(512, np.float32) / np.sqrt(512)
        enroll = gallery_pb2.EnrollRequest(
            gallery="staff", identity="alice", samples=[vector_sample(vector)]
        )
        err = failure(gallery.Enroll, enroll, metadata=bearer(USER))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        gallery.Enroll(enroll, metadata=bearer(ADMIN), timeout=60)
        # Reads stay open to user tokens.
        search = gallery_pb2.SearchRequest(gallery="staff", probes=[vector_sample(vector)])
        hits = gallery.Search(search, metadata=bearer(USER), timeout=60)
        assert hits.results[0].matches[0].identity == "alice"


def test_health_is_open_unless_configured(secured, ir18_repository, tmp_path):
    assert secured.health() == health_pb2.HealthCheckResponse.SERVING  # no token
    tokens = tmp_path / "tokens"
    tokens.write_text(USER + "\n")
    repository, model = ir18_repository
    settings = server_settings(
        repository, model, auth_tokens_file=str(tokens), auth_health_open=False
    )
    server = ServerThread(settings).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            err = failure(check, health_pb2.HealthCheckRequest())
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED
            reply = check(health_pb2.HealthCheckRequest(), metadata=bearer(USER), timeout=10)
            assert reply.status in (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
    finally:
        server.stop()


def test_request_ids_come_back_in_trailing_metadata(secured):
    with grpc.insecure_channel(secured.address) as channel:
        embed = embedder_pb2_grpc.EmbedderStub(channel).Embed
        _, call = embed.with_call(
            embed_request(), metadata=(*bearer(USER), ("x-request-id", "order-42")), timeout=60
        )
        assert trailing(call)["x-request-id"] == "order-42"
        _, call = embed.with_call(embed_request(), metadata=bearer(USER), timeout=60)
        assert re.fullmatch(r"[0-9a-f]{32}", trailing(call)["x-request-id"])
        # Errors carry it too: from the interceptor, and from a servicer that adds its own
        # trailing metadata (every image failed).
        err = failure(embed, embed_request(), metadata=(("x-request-id", "no-token-1"),))
        assert trailing(err)["x-request-id"] == "no-token-1"
        bad = embedder_pb2.EmbedRequest(images=[common_pb2.ImageInput(encoded=b"junk")])
        err = failure(embed, bad, metadata=(*bearer(USER), ("x-request-id", "junk-1")))
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert trailing(err)["x-request-id"] == "junk-1"
        assert "adaface-embed-response-bin" in trailing(err)
        # An id that could break log lines is replaced, not echoed.
        _, call = embed.with_call(
            embed_request(),
            metadata=(*bearer(USER), ("x-request-id", "a b c" + "x" * 200)),
            timeout=60,
        )
        assert re.fullmatch(r"[0-9a-f]{32}", trailing(call)["x-request-id"])


def access_records(caplog, statuses: set[str]) -> list[logging.LogRecord]:
    """The request log records, once lines with each of `statuses` are in (the server
    writes its line just after the client has its answer)."""
    deadline = time.monotonic() + 10
    while True:
        records = [r for r in caplog.records if r.name == "adaface_server.access"]
        if {r.fields["status"] for r in records} >= statuses or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_tokens_never_reach_the_logs(secured, caplog):
    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(secured.address) as channel:
        embed = embedder_pb2_grpc.EmbedderStub(channel).Embed
        embed(embed_request(), metadata=bearer(USER), timeout=60)
        failure(embed, embed_request(), metadata=bearer(ADMIN[::-1]))
    access = access_records(caplog, {"OK", "UNAUTHENTICATED"})
    assert {r.fields["status"] for r in access} >= {"OK", "UNAUTHENTICATED"}
    assert any(r.fields.get("caller") == fingerprint(USER) for r in access)
    for secret in (USER, ADMIN, ADMIN[::-1]):
        assert secret not in caplog.text
        assert all(secret not in json.dumps(r.fields) for r in access)


# -- request bodies and streams ------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(ir18_repository):
    repository, model = ir18_repository
    settings = server_settings(
        repository, model, max_message_bytes=256 * 1024, max_stream_requests=3
    )
    server = ServerThread(settings).start()
    server.wait_serving()
    yield server
    server.stop()


def test_garbage_bodies_are_invalid_argument_naming_the_type(limited):
    with grpc.insecure_channel(limited.address) as channel:
        for method, name in (
            ("/adaface.v1.Embedder/Embed", "adaface.v1.EmbedRequest"),
            ("/adaface.v1.Gallery/Search", "adaface.v1.SearchRequest"),
        ):
            raw = channel.unary_unary(method)
            err = failure(raw, b"\xff\xff\xff\xff\x0fnot protobuf")
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert err.details().startswith(f"request is not a valid {name} message")
    assert limited.health() == health_pb2.HealthCheckResponse.SERVING


def test_oversized_requests_name_the_limit(limited):
    big = embedder_pb2.EmbedRequest(images=[common_pb2.ImageInput(encoded=os.urandom(300 * 1024))])
    huge = embedder_pb2.EmbedRequest(images=[common_pb2.ImageInput(encoded=os.urandom(600 * 1024))])
    with grpc.insecure_channel(
        limited.address, options=[("grpc.max_send_message_length", 8 << 20)]
    ) as channel:
        embed = embedder_pb2_grpc.EmbedderStub(channel).Embed
        err = failure(embed, big)
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "max_message_bytes" in err.details() and str(256 * 1024) in err.details()
        # Beyond twice the limit gRPC refuses the message before it is read into memory.
        err = failure(embed, huge)
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        embed(embed_request(), timeout=60)  # still serving


def test_streams_are_cut_at_max_stream_requests(limited):
    with grpc.insecure_channel(limited.address) as channel:
        stream = embedder_pb2_grpc.EmbedderStub(channel).EmbedStream
        responses = stream(iter([embed_request(seed=i) for i in range(5)]), timeout=60)
        answered = 0
        with pytest.raises(grpc.RpcError) as err:
            for response in responses:
                assert response.results[0].embedding.dim == 512
                answered += 1
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "max_stream_requests" in err.value.details()
        assert answered <= 3
        ok = list(stream(iter([embed_request(seed=i) for i in range(3)]), timeout=60))
        assert len(ok) == 3


# -- deadlines and metrics ----------------------------------------------------------------


def test_expired_deadlines_drop_queued_work(ir18_repository):
    """One image per forward pass and 48 callers at once: those whose deadline passes while
    queued get DEADLINE_EXCEEDED and their images never reach the model."""
    repository, model = ir18_repository
    server = ServerThread(server_settings(repository, model, max_batch_size=1)).start()
    try:
        server.wait_serving()
        request = embed_request()
        with grpc.insecure_channel(server.address) as channel:
            embed = embedder_pb2_grpc.EmbedderStub(channel).Embed
            embed(request, timeout=60)  # warm
            batcher = server.app.embedding._batcher
            run_before = batcher.rows_run

            def call(_: int) -> grpc.StatusCode:
                try:
                    embed(request, timeout=0.25)
                    return grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    return exc.code()

            with concurrent.futures.ThreadPoolExecutor(48) as pool:
                codes = list(pool.map(call, range(48)))
            time.sleep(0.5)  # let the batcher drain what is left
            text = settled_scrape(server.app.metrics_port)
        ran = batcher.rows_run - run_before
        ok = codes.count(grpc.StatusCode.OK)
        expired = codes.count(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert ok + expired == 48, codes
        assert expired > 0, codes
        # Expired calls cost (next to) no model time: their rows were dropped while queued or
        # never queued; at most a few finished computing just as their deadline passed.
        assert ok <= ran <= ok + 4, (ok, ran)
        assert ran + batcher.rows_dropped <= 48
        assert sample_value(text, "adaface_rows_dropped_total") == batcher.rows_dropped
        assert sample_value(text, "adaface_deadline_expired_total", method="Embedder/Embed") > 0
    finally:
        server.stop()


def test_metrics_count_requests_images_batches_and_galleries(limited):
    with grpc.insecure_channel(limited.address) as channel:
        embed = embedder_pb2_grpc.EmbedderStub(channel).Embed
        before = settled_scrape(limited.app.metrics_port)
        embed(embed_request(n=3), timeout=60)
        mixed = embed_request(n=1)
        mixed.images.add(encoded=b"\x89PNG truncated")
        embed(mixed, timeout=60)
        failure(embed, embedder_pb2.EmbedRequest())
        gallery = gallery_pb2_grpc.GalleryStub(channel)
        gallery.CreateGallery(gallery_pb2.CreateGalleryRequest(name="metrics"), timeout=60)
        vectors = np.eye(512, dtype=np.float32)[:4]
        for i in range(2):
            samples = [vector_sample(v) for v in vectors[2 * i : 2 * i + 2]]
            enroll = gallery_pb2.EnrollRequest(
                gallery="metrics", identity=f"id{i}", samples=samples
            )
            gallery.Enroll(enroll, timeout=60)
        after = settled_scrape(limited.app.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    embed_ok = {"method": "Embedder/Embed", "code": "OK"}
    assert delta("adaface_requests_total", **embed_ok) == 2
    bad = {"method": "Embedder/Embed", "code": "INVALID_ARGUMENT"}
    assert delta("adaface_requests_total", **bad) == 1
    assert delta("adaface_request_duration_seconds_count", method="Embedder/Embed") == 3
    assert delta("adaface_image_failures_total", reason="UNDECODABLE") == 1
    # 3 + 1 decodable images, no flip fusion asked: 4 rows through the model.
    assert delta("adaface_batch_size_sum") == 4
    assert delta("adaface_inference_duration_seconds_count") >= 2
    assert sample_value(after, "adaface_gallery_identities", gallery="metrics") == 2
    assert sample_value(after, "adaface_gallery_samples", gallery="metrics") == 4
    # 4 samples x 512 float32, their labels and keys at least; no search device
    assert sample_value(after, "adaface_gallery_index_bytes", gallery="metrics", memory="host") >= (
        4 * 512 * 4
    )
    device = 'adaface_gallery_index_bytes{gallery="metrics",memory="device"} 0.0'
    assert device in after.splitlines()
    assert "adaface_queue_depth 0.0" in after
    assert sample_value(after, "adaface_requests_in_flight") == 0


# -- the real process: JSON logs, env tokens, SIGTERM ------------------------------------------


def test_process_logs_json_lines_and_keeps_env_tokens_secret(ir18_repository, tmp_path):
    repository, model = ir18_repository
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "ADAFACE_AUTH_TOKENS": f"{USER},{ADMIN}", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "adaface_server", "--host", "127.0.0.1", "--port", str(port),
        "--model-repository", str(repository), "--model", model, "--threads", "1",
        "--gallery-path", str(tmp_path / "g.db"), "--metrics-port", "0", "--log-format", "json",
    ]  # fmt: skip
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{port}", proc, log_path)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            embed = embedder_pb2_grpc.EmbedderStub(channel).Embed
            embed(
                embed_request(n=2),
                metadata=(*bearer(USER), ("x-request-id", "json-line-1")),
                timeout=60,
            )
            failure(embed, embed_request(), metadata=bearer("not-a-known-token-at-all"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in lines)
    ok = [e for e in lines if e.get("request_id") == "json-line-1"]
    assert len(ok) == 1
    assert ok[0]["rpc"] == "Embedder/Embed" and ok[0]["status"] == "OK"
    assert ok[0]["images"] == 2 and ok[0]["duration_ms"] > 0
    assert ok[0]["caller"] == fingerprint(USER)
    denied = [e for e in lines if e.get("status") == "UNAUTHENTICATED"]
    assert len(denied) == 1 and denied[0]["error"] == "invalid bearer token"
    assert any(e["msg"] == "stopped" for e in lines)
    for secret in (USER, ADMIN, "not-a-known-token-at-all"):
        assert secret not in text


def test_overload_is_refused_before_decoding_for_detect_too(ir18_repository):
    repository, model = ir18_repository
    server = ServerThread(server_settings(repository, model, max_queue=2)).start()
    try:
        server.wait_serving()
        request = embedder_pb2.DetectRequest(
            images=[common_pb2.ImageInput(encoded=png(crop(i))) for i in range(2)]
        )
        with grpc.insecure_channel(server.address) as channel:
            detect = embedder_pb2_grpc.EmbedderStub(channel).Detect

            def call(_: int) -> tuple[grpc.StatusCode, str]:
                try:
                    detect(request, timeout=60)
                    return grpc.StatusCode.OK, ""
                except grpc.RpcError as exc:
                    return exc.code(), exc.details()

            with concurrent.futures.ThreadPoolExecutor(24) as pool:
                answers = list(pool.map(call, range(48)))
        codes = {code for code, _ in answers}
        assert codes == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, answers
        refusal = next(d for c, d in answers if c is grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert (
            "being preprocessed or queued" in refusal and "queue limit of 2 (max_queue)" in refusal
        )
        assert server.app.embedding._preprocessing_rows == 0  # every admission was returned
    finally:
        server.stop()


def test_sighup_rotates_tokens_and_keeps_them_when_the_file_is_bad(ir18_repository, tmp_path):
    repository, model = ir18_repository
    port = free_port()
    log_path = tmp_path / "server.log"
    tokens = tmp_path / "tokens"
    old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
    tokens.write_text(old + "\n")
    command = [
        sys.executable, "-m", "adaface_server", "--host", "127.0.0.1", "--port", str(port),
        "--model-repository", str(repository), "--model", model, "--threads", "1",
        "--gallery-path", str(tmp_path / "g.db"), "--metrics-port", "-1",
        "--auth-tokens-file", str(tokens), "--log-format", "text",
    ]  # fmt: skip
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{port}", proc, log_path)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = embedder_pb2_grpc.EmbedderStub(channel).Info

            def accepted(token: str) -> bool:
                try:
                    info(embedder_pb2.InfoRequest(), metadata=bearer(token), timeout=10)
                    return True
                except grpc.RpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
                    return False

            def reload_until(expect_old: bool, expect_new: bool) -> None:
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while (accepted(old), accepted(new)) != (expect_old, expect_new):
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.05)

            assert accepted(old) and not accepted(new)
            tokens.write_text(new + "\n")
            reload_until(expect_old=False, expect_new=True)
            tokens.write_text("too-short\n")  # a bad file: the tokens in force stay
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "token reload failed" not in log_path.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert accepted(new) and not accepted(old)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "too-short" not in text and old not in text and new not in text


def test_a_busy_port_stops_the_server_naming_it(ir18_repository):
    repository, model = ir18_repository
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = server_settings(repository, model, port=port)
        server = ServerThread(settings)
        server.settings = settings.replace(host="127.0.0.1")  # keep the taken port
        with pytest.raises(StartupError) as err:
            server.start()
        server.loop.call_soon_threadsafe(server.loop.stop)
    assert str(err.value) == (
        f"cannot listen on 127.0.0.1:{port}: the port is in use; if another adaface-server "
        "holds it, pick another port with --port (ADAFACE_PORT)"
    )
