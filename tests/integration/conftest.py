"""Integration fixtures: a real embedding server on loopback serving the ir_18 test model."""

from __future__ import annotations

import pytest

from .server_harness import ServerThread, server_settings


@pytest.fixture(scope="session")
def embed_server(ir18_repository):
    """A SERVING server: `.address` is "127.0.0.1:PORT", `.spec` the exported ModelSpec."""
    repository, name = ir18_repository
    server = ServerThread(server_settings(repository, name, max_images_per_request=32)).start()
    server.wait_serving()
    yield server
    server.stop()
