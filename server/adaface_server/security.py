"""Transport security and caller authentication: TLS credentials and bearer tokens.

Tokens come from files (one per line, `#` comments) and/or the ADAFACE_AUTH_TOKENS /
ADAFACE_ADMIN_TOKENS environment variables (comma-separated). They never enter Settings, so
they never show up in `--help`, in logs or in error messages; a caller is identified in logs
by a short fingerprint of its token instead.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from .config import Settings
from .errors import StartupError

AUTH_TOKENS_ENV = "ADAFACE_AUTH_TOKENS"
ADMIN_TOKENS_ENV = "ADAFACE_ADMIN_TOKENS"
MIN_TOKEN_CHARS = 16


class Role(enum.IntEnum):
    """What a caller may do; higher includes lower."""

    USER = 1
    ADMIN = 2


def fingerprint(token: str) -> str:
    """A log-safe name for a token: 8 hex digits of its SHA-256."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Caller:
    role: Role
    name: str  # fingerprint, safe to log


class TokenSet:
    """Bearer tokens with their roles, compared in constant time.

    `check` compares the presented token against every known token with
    `hmac.compare_digest` and never stops early, so response time does not reveal how many
    leading characters matched nor which entry came close.
    """

    def __init__(self, users: Iterable[str] = (), admins: Iterable[str] = ()) -> None:
        self._entries: list[tuple[bytes, Role]] = []
        for token in users:
            self._entries.append((token.encode(), Role.USER))
        for token in admins:
            self._entries.append((token.encode(), Role.ADMIN))
        self.admin_required = any(role is Role.ADMIN for _, role in self._entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @property
    def count(self) -> int:
        return len(self._entries)

    def check(self, presented: str) -> Caller | None:
        candidate = presented.encode()
        best: Role | None = None
        for token, role in self._entries:
            if hmac.compare_digest(token, candidate) and (best is None or role > best):
                best = role
        return None if best is None else Caller(best, fingerprint(presented))


def bearer_allowed(tokens: TokenSet, header: str | None) -> bool:
    """Whether an HTTP `Authorization` header may pass: any valid token does, and with no
    tokens configured no header is needed."""
    if not tokens.enabled:
        return True
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    return scheme.lower() == "bearer" and bool(token) and tokens.check(token) is not None


def _read_tokens(source: str, text: str) -> list[str]:
    tokens = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_TOKEN_CHARS or any(c.isspace() for c in line):
            # Says where, never what: the line may be a real secret with a typo.
            raise StartupError(
                f"{source} line {number}: a token must be at least {MIN_TOKEN_CHARS} "
                "characters without spaces"
            )
        tokens.append(line)
    return tokens


def _tokens(path: str, env_name: str, env: Mapping[str, str]) -> list[str]:
    tokens: list[str] = []
    if path:
        try:
            text = Path(path).expanduser().read_text()
        except OSError as exc:
            raise StartupError(f"cannot read token file {path}: {exc.strerror}") from None
        tokens += _read_tokens(path, text)
    if env.get(env_name):
        tokens += _read_tokens(env_name, env[env_name].replace(",", "\n"))
    return tokens


def load_tokens(settings: Settings, env: Mapping[str, str] | None = None) -> TokenSet:
    """Every configured token; an empty set means authentication is off."""
    env = os.environ if env is None else env
    users = _tokens(settings.auth_tokens_file, AUTH_TOKENS_ENV, env)
    admins = _tokens(settings.admin_tokens_file, ADMIN_TOKENS_ENV, env)
    return TokenSet(users, admins)


def _read_pem(path: str, what: str, marker: bytes) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None
    # gRPC only reports a bad PEM as a failure to bind; say which file is wrong instead.
    if b"-----BEGIN " not in data or marker not in data:
        raise StartupError(f"the TLS {what} {path} is not a PEM file with a {marker.decode()}")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port, or None for plaintext.

    With `tls_client_ca` the server demands a client certificate signed by that CA (mTLS)."""
    if not settings.tls_certificate:
        return None
    key = _read_pem(settings.tls_private_key, "private key", b"PRIVATE KEY")
    chain = _read_pem(settings.tls_certificate, "certificate", b"CERTIFICATE")
    client_ca = None
    if settings.tls_client_ca:
        client_ca = _read_pem(settings.tls_client_ca, "client CA", b"CERTIFICATE")
    _check_key_pair(settings.tls_certificate, settings.tls_private_key)  # every file read
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _check_key_pair(certificate: str, private_key: str) -> None:
    """gRPC only reports a key that does not fit its certificate as a failure to bind;
    OpenSSL (through `ssl`) says so precisely, before any port is touched."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key gets an empty password and fails here (gRPC cannot use one).
        context.load_cert_chain(
            Path(certificate).expanduser(), Path(private_key).expanduser(), password=b""
        )
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(
                f"the TLS private key {private_key} does not match the certificate {certificate}"
            ) from None
        raise StartupError(
            f"cannot use the TLS certificate {certificate} with the private key "
            f"{private_key}: {exc.reason or exc}"
        ) from None
