"""--workers resolution and validation (the processes themselves: tests/integration)."""

from __future__ import annotations

import pytest

from adaface_server.config import parse_settings
from adaface_server.supervisor import resolve_workers


def test_explicit_worker_counts_are_taken_as_given():
    assert resolve_workers("3", cores=2, cuda=False) == 3


def test_auto_is_one_process_per_8_cores_on_cpu_and_up_to_four_with_cuda():
    assert resolve_workers("auto", cores=2, cuda=False) == 1
    assert resolve_workers("auto", cores=16, cuda=False) == 2
    assert resolve_workers("auto", cores=64, cuda=False) == 8
    assert resolve_workers("auto", cores=256, cuda=False) == 8
    assert resolve_workers("auto", cores=16, cuda=True) == 4
    assert resolve_workers("auto", cores=8, cuda=True) == 2
    assert resolve_workers("auto", cores=2, cuda=True) == 1
    # --device cpu on a GPU host: the model runs on the CPU, so the CPU rule
    assert resolve_workers("auto", cores=16, cuda=True, device="cpu") == 2
    assert resolve_workers("auto", cores=16, cuda=True, device="cuda:1") == 4


def test_worker_settings_are_validated(capsys):
    assert parse_settings(["--workers", "auto"], env={}).workers == "auto"
    assert parse_settings([], env={"ADAFACE_WORKERS": "2"}).workers == "2"
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit):
            parse_settings(["--workers", bad], env={})
    assert "--workers must be a number >= 1 or auto, got '-1'" in capsys.readouterr().err
