"""The HTTP port's transport: TLS and mutual TLS with the gRPC port's certificates, and a
busy port named at start-up."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request

import pytest

from adaface_server.errors import StartupError

from .pki import make_pki
from .server_harness import ServerThread, server_settings


def _get(url: str, context: ssl.SSLContext) -> dict:
    with urllib.request.urlopen(url, timeout=30, context=context) as response:
        return json.loads(response.read())


def test_http_uses_tls_and_demands_client_certificates_like_grpc(ir18_repository, tmp_path):
    repository, model = ir18_repository
    pki = make_pki(tmp_path)
    settings = server_settings(
        repository,
        model,
        http_port=0,
        tls_certificate=str(pki.server[0]),
        tls_private_key=str(pki.server[1]),
        tls_client_ca=str(pki.ca),
    )
    server = ServerThread(settings).start()
    try:
        url = f"https://127.0.0.1:{server.app.http_port}/openapi.json"
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        trusted.load_cert_chain(*pki.client)
        assert _get(url, trusted)["openapi"].startswith("3.")
        anonymous = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(url, anonymous)  # no client certificate: the handshake is refused
        stranger = ssl.create_default_context(cafile=str(pki.ca))
        stranger.load_cert_chain(*pki.stranger)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(url, stranger)
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext is refused
            urllib.request.urlopen(url.replace("https:", "http:"), timeout=30).read()
    finally:
        server.stop()


def test_a_busy_http_port_stops_the_server_naming_it(ir18_repository):
    repository, model = ir18_repository
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerThread(server_settings(repository, model, http_port=port))
        with pytest.raises(StartupError) as err:
            server.start()
        server.loop.call_soon_threadsafe(server.loop.stop)
    assert str(err.value) == f"cannot listen on 127.0.0.1:{port} (--http-port): the port is in use"
