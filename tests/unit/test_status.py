"""Status messages stay short enough to travel in the grpc-message header."""

from __future__ import annotations

from adaface_server.api.status import MAX_DETAILS_BYTES, clip_details


def test_short_details_pass_unchanged():
    assert clip_details("images[0]: bad") == "images[0]: bad"


def test_long_details_are_cut_on_a_character_boundary():
    text = "identity 'é" + "é" * 5000 + "' not found"
    clipped = clip_details(text)
    assert clipped.endswith(" ...(cut)") and clipped.startswith("identity 'é")
    assert len(clipped.encode()) <= MAX_DETAILS_BYTES
    clipped.encode("utf-8", errors="strict")  # no half character left behind
