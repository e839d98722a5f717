"""Triton settings: flags and ADAFACE_* env vars, booleans, and what validation refuses."""

from __future__ import annotations

import pytest

from adaface_server.config import parse_settings


def test_triton_flags_and_env_vars():
    s = parse_settings(
        ["--backend", "triton", "--triton-timeout-seconds", "2.5"],
        env={"ADAFACE_TRITON_URL": "triton:8001", "ADAFACE_TRITON_TLS": "true"},
    )
    assert (s.backend, s.triton_url, s.triton_timeout_seconds) == ("triton", "triton:8001", 2.5)
    assert s.triton_tls is True
    assert s.triton_model_version == "" and s.triton_check_seconds == 1.0


@pytest.mark.parametrize(("text", "value"), [("true", True), ("no", False), ("0", False)])
def test_boolean_flags_parse_words(text, value):
    assert parse_settings(["--triton-tls", text], env={}).triton_tls is value


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--triton-tls", "maybe"], "expected true or false, got 'maybe'"),
        (["--backend", "triton", "--triton-url", "nohost"], "--triton-url must be host:port"),
        (["--triton-timeout-seconds", "0"], "--triton-timeout-seconds must be > 0"),
        (["--triton-root-certificates", "ca.pem"], "need --triton-tls true"),
        (
            ["--triton-tls", "true", "--triton-private-key", "k.pem"],
            "--triton-private-key and --triton-certificate-chain go together",
        ),
    ],
)
def test_bad_triton_settings_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, env={})
    assert message in capsys.readouterr().err
