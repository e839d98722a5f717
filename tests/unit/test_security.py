"""Bearer tokens and TLS material: loading, roles, constant-time checks, clear start-up errors."""

from __future__ import annotations

import hmac

import pytest

from adaface_server import security
from adaface_server.config import Settings
from adaface_server.errors import StartupError
from adaface_server.security import Role, TokenSet, fingerprint, load_tokens, server_credentials

USER = "u" * 20
ADMIN = "a" * 20


def test_tokens_from_files_and_env_with_roles(tmp_path):
    users = tmp_path / "users"
    users.write_text(f"# comment\n\n  {USER}  \n")
    settings = Settings(auth_tokens_file=str(users))
    env = {"ADAFACE_ADMIN_TOKENS": f"{ADMIN}, {'b' * 16}"}
    tokens = load_tokens(settings, env)
    assert tokens.enabled and tokens.admin_required
    assert tokens.check(USER).role is Role.USER
    assert tokens.check(ADMIN).role is Role.ADMIN
    assert tokens.check("b" * 16).role is Role.ADMIN
    assert tokens.check(USER[:-1]) is None
    assert tokens.check("") is None
    assert tokens.check(USER).name == fingerprint(USER) != USER


def test_no_tokens_means_auth_off():
    tokens = load_tokens(Settings(), {})
    assert not tokens.enabled and not tokens.admin_required


def test_a_token_listed_as_user_and_admin_gets_admin():
    assert TokenSet([ADMIN], [ADMIN]).check(ADMIN).role is Role.ADMIN


def test_every_token_is_compared_whatever_matches(monkeypatch):
    calls = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return compare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    tokens = TokenSet([USER, "c" * 20], [ADMIN])
    for presented in (USER, ADMIN, "nope" * 5):
        calls.clear()
        tokens.check(presented)
        assert len(calls) == 3  # no early exit on a match or a mismatch


def test_bad_token_lines_name_the_line_never_the_token(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{USER}\nshort-secret\n")
    with pytest.raises(StartupError) as err:
        load_tokens(Settings(auth_tokens_file=str(path)), {})
    assert "line 2" in str(err.value) and "short-secret" not in str(err.value)
    with pytest.raises(StartupError) as err:
        load_tokens(Settings(), {"ADAFACE_AUTH_TOKENS": "has space inside the token"})
    assert "ADAFACE_AUTH_TOKENS" in str(err.value) and "space inside" not in str(err.value)
    with pytest.raises(StartupError, match="cannot read token file"):
        load_tokens(Settings(admin_tokens_file=str(tmp_path / "missing")), {})


def test_tls_material_is_checked_at_start(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key.write_text("not a key")
    settings = Settings(tls_certificate=str(cert), tls_private_key=str(key))
    with pytest.raises(StartupError, match=r"private key .* is not a PEM file"):
        server_credentials(settings)
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    with pytest.raises(StartupError, match="cannot read the TLS client CA"):
        server_credentials(settings.replace(tls_client_ca=str(tmp_path / "nope")))
    assert server_credentials(Settings()) is None
