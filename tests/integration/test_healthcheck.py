"""The container health probe (`python -m adaface_server.healthcheck`) against real servers."""

from __future__ import annotations

import subprocess
import sys
import time

from adaface_server.healthcheck import main

from .pki import make_pki
from .server_harness import ServerThread, server_settings
from .triton_harness import free_port


def test_probe_exits_0_on_a_serving_server(embed_server, capsys):
    assert main(["--address", embed_server.address]) == 0
    assert capsys.readouterr().out.strip() == f"{embed_server.address}: SERVING"


def test_probe_exits_1_when_nothing_listens():
    address = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaface_server.healthcheck",
            "--address",
            address,
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout.strip() == f"{address}: UNREACHABLE: UNAVAILABLE"


def test_probe_follows_tls_mutual_tls_and_closed_health(ir18_repository, tmp_path, monkeypatch):
    pki = make_pki(tmp_path)
    token = tmp_path / "token"
    token.write_text("probe-token-0123456789\n")
    repository, model = ir18_repository
    server_cert, server_key = pki.server
    settings = server_settings(
        repository,
        model,
        tls_certificate=str(server_cert),
        tls_private_key=str(server_key),
        tls_client_ca=str(pki.ca),
        auth_tokens_file=str(token),
        auth_health_open=False,
    )
    server = ServerThread(settings).start()
    try:
        address = server.address
        client_cert, client_key = pki.client
        full = [
            *("--address", address, "--tls-ca", str(pki.ca)),
            *("--tls-cert", str(client_cert), "--tls-key", str(client_key)),
            *("--token-file", str(token), "--timeout", "5"),
        ]
        deadline = time.monotonic() + 120
        while main(full) != 0:  # NOT_SERVING until the model has loaded
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Each missing piece is refused: plaintext, no client certificate, no token.
        assert main(["--address", address, "--tls-ca", "", "--timeout", "5"]) == 1
        assert main(full[:4] + full[8:]) == 1  # no client certificate
        assert main(full[:8] + full[10:]) == 1  # no token
        assert main(full[:6] + full[10:]) == 1  # a client certificate without its key
        # In the container the probe finds the server's TLS settings in its environment.
        monkeypatch.setenv("ADAFACE_PORT", address.rsplit(":", 1)[1])
        monkeypatch.setenv("ADAFACE_TLS_CERTIFICATE", str(pki.ca))
        monkeypatch.setenv("ADAFACE_HEALTHCHECK_TLS_CERT", str(client_cert))
        monkeypatch.setenv("ADAFACE_HEALTHCHECK_TLS_KEY", str(client_key))
        monkeypatch.setenv("ADAFACE_HEALTHCHECK_TOKEN_FILE", str(token))
        assert main([]) == 0
    finally:
        server.stop()
