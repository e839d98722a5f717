"""The container health probe (`python -m adaface_server.healthcheck`) against real servers."""

from __future__ import annotations

import subprocess
import sys

from adaface_server.healthcheck import main

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
