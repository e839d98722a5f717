"""Who can read /metrics: loopback by default, a bearer token when tokens are configured,
and gallery names only when --metrics-gallery-labels allows."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from adaface.v1 import gallery_pb2, gallery_pb2_grpc
from adaface_server.config import Settings

from .gallery_support import vector_sample
from .server_harness import ServerThread, server_settings

USER = "user-token-0123456789abcdef"
SECRET = "secret-project-x"


def get(port: int, header: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if header is not None:
        request.add_header("Authorization", header)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def private(ir18_repository, tmp_path_factory):
    """Tokens on, gallery labels off, metrics host left at its default."""
    users = tmp_path_factory.mktemp("tokens") / "users"
    users.write_text(f"{USER}\n")
    repository, model = ir18_repository
    settings = server_settings(
        repository, model, auth_tokens_file=str(users), metrics_gallery_labels=False
    )
    server = ServerThread(settings).start()
    yield server
    server.stop()


def test_metrics_listen_on_loopback_by_default(private):
    assert Settings().metrics_host == "127.0.0.1"
    assert private.app.metrics._http.server_address[0] == "127.0.0.1"


def test_with_tokens_a_scrape_needs_one(private):
    port = private.app.metrics_port
    for header in (None, "Bearer wrong-token", f"Basic {USER}", "Bearer "):
        status, body = get(port, header)
        assert status == 401, header
        assert "adaface_" not in body
    status, body = get(port, f"Bearer {USER}")
    assert status == 200
    assert "adaface_requests_in_flight" in body


def test_gallery_names_can_be_kept_out_of_metrics(private):
    private.wait_serving()
    metadata = (("authorization", f"Bearer {USER}"),)
    with grpc.insecure_channel(private.address) as channel:
        gallery = gallery_pb2_grpc.GalleryStub(channel)
        gallery.CreateGallery(
            gallery_pb2.CreateGalleryRequest(name=SECRET), timeout=60, metadata=metadata
        )
        vector = np.random.default_rng(0).standard_normal(512).astype(np.float32)
        gallery.Enroll(
            gallery_pb2.EnrollRequest(
                gallery=SECRET, identity="someone", samples=[vector_sample(vector)]
            ),
            timeout=60,
            metadata=metadata,
        )
    status, body = get(private.app.metrics_port, f"Bearer {USER}")
    assert status == 200
    assert SECRET not in body
    assert "adaface_gallery_identities 1.0" in body.splitlines()
    assert "adaface_gallery_samples 1.0" in body.splitlines()
    assert 'adaface_gallery_index_bytes{memory="device"} 0.0' in body.splitlines()
    host = [line for line in body.splitlines() if line.startswith(
        'adaface_gallery_index_bytes{memory="host"} ')]  # fmt: skip
    assert len(host) == 1 and float(host[0].split()[1]) >= 512 * 4
