"""Start-up as an operator sees it: `python -m adaface_server` run as a subprocess, one warning
for untrained weights, one clear error for a taken port; tests leave no temp files behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from .gallery_support import REPO, free_port, wait_serving
from .server_harness import MTCNN_WEIGHTS


def test_second_server_on_the_same_ports_fails_with_one_clear_message(
    ir18_repository, tmp_path: Path
) -> None:
    repository, model = ir18_repository
    port, metrics_port = free_port(), free_port()
    # Both servers get the same flags, as two `make serve` runs with the defaults would.
    args = [
        sys.executable, "-m", "adaface_server", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
        "--model-repository", str(repository), "--model", model, "--threads", "1",
        "--mtcnn-weights", str(MTCNN_WEIGHTS), "--gallery-path", str(tmp_path / "g.db"),
        "--log-format", "text",
    ]  # fmt: skip
    log = (tmp_path / "first.log").open("w+")
    first = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}", first, tmp_path / "first.log", timeout=180)
        second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=180)
    finally:
        first.terminate()
        first.wait(60)
        log.seek(0)
        first_log = log.read()
        log.close()

    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"adaface-server: error: cannot listen on 127.0.0.1:{port}: the port is in use; if "
        "another adaface-server holds it, pick another port with --port (ADAFACE_PORT)"
    ], second.stderr
    assert "Traceback" not in second.stderr

    # The untrained-weights banner is loud, but said once.
    assert first_log.count("HAS RANDOM, UNTRAINED WEIGHTS") == 1, first_log


def test_throw_away_server_files_are_removed_when_the_tests_end() -> None:
    code = textwrap.dedent(
        """
        from pathlib import Path
        from tests.integration.server_harness import server_settings
        settings = server_settings(Path("model_repository"), "m")
        settings.gallery_path.write_bytes(b"x")
        print(settings.gallery_path)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    gallery = Path(proc.stdout.strip())
    assert gallery.name == "g.db" and gallery.parent.name.startswith("adaface-gallery-")
    assert not gallery.parent.exists() and not gallery.parent.parent.exists()
