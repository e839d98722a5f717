"""Sampling build slots: counted in memory for one server, shared through flock'ed files by
the workers of one server; a slot held by a process that dies is free again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from adaface_server.errors import ResourceExhausted
from adaface_server.sampling.slots import BuildSlots

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from adaface_server.sampling.slots import BuildSlots
    with BuildSlots(int(sys.argv[2]), Path(sys.argv[1])).take():
        print("holding", flush=True)
        time.sleep(600)
    """
)


def test_a_lone_server_counts_its_builds() -> None:
    slots = BuildSlots(2)
    with slots.take(), slots.take():
        assert slots.running == 2
        with (
            pytest.raises(ResourceExhausted, match=r"2 index builds already running \("),
            slots.take(),
        ):
            pass
    assert slots.running == 0
    with slots.take():
        assert slots.running == 1


def test_workers_share_the_limit_and_a_dead_holder_frees_its_slot(tmp_path) -> None:
    here = BuildSlots(2, tmp_path)
    other = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "2"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "holding"
        with (
            here.take(),  # the second of two slots
            pytest.raises(ResourceExhausted, match="across the server's workers"),
            BuildSlots(2, tmp_path).take(),  # another worker: none left
        ):
            pass
        other.kill()  # SIGKILL: the kernel drops its lock
        other.wait()
        with here.take(), BuildSlots(2, tmp_path).take():
            pass
    finally:
        other.kill()
