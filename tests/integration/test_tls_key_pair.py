"""A TLS key that does not belong to its certificate stops the server before it binds, with
a message naming both files; a busy port keeps its own message."""

from __future__ import annotations

import socket

import pytest

from adaface_server.errors import StartupError

from .pki import make_pki
from .server_harness import ServerThread, server_settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def start_failure(settings) -> StartupError:
    server = ServerThread(settings)
    try:
        with pytest.raises(StartupError) as err:
            server.start()
    finally:
        server.loop.call_soon_threadsafe(server.loop.stop)
        server.thread.join(10)
    return err.value


def test_a_key_of_another_certificate_is_named_with_both_files(ir18_repository, pki):
    repository, model = ir18_repository
    certificate, _ = pki.server
    _, wrong_key = pki.client
    settings = server_settings(
        repository, model, tls_certificate=str(certificate), tls_private_key=str(wrong_key)
    )
    err = start_failure(settings)
    assert str(err) == (
        f"the TLS private key {wrong_key} does not match the certificate {certificate}"
    )


def test_a_busy_port_with_a_good_key_pair_says_the_port_is_in_use(ir18_repository, pki):
    repository, model = ir18_repository
    certificate, key = pki.server
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = server_settings(
            repository, model, tls_certificate=str(certificate), tls_private_key=str(key)
        ).replace(port=port)
        server = ServerThread(settings)
        server.settings = settings.replace(host="127.0.0.1")  # keep the busy port
        try:
            with pytest.raises(StartupError) as err:
                server.start()
        finally:
            server.loop.call_soon_threadsafe(server.loop.stop)
            server.thread.join(10)
    assert str(err.value).startswith(f"cannot listen on 127.0.0.1:{port}: the port is in use;")
    assert "key" not in str(err.value)
