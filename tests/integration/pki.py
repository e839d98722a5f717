"""A throw-away PKI for TLS tests, made with the openssl CLI (keys never leave the folder)."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path
from types import SimpleNamespace


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(cwd: Path, name: str) -> None:
    _openssl(
        cwd, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
        "-out", f"{name}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _leaf(cwd: Path, ca: str, name: str, extensions: str) -> None:
    _openssl(
        cwd, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr",
    )  # fmt: skip
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-set_serial", f"0x{secrets.token_hex(8)}", "-days", "2", "-out", f"{name}.pem",
        "-extfile", f"{name}.ext",
    )  # fmt: skip


def make_pki(d: Path) -> SimpleNamespace:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a
    second CA (trusted by nobody) with a client of its own."""
    _ca(d, "ca")
    _ca(d, "other_ca")  # trusted by nobody: its clients and servers must be refused
    _leaf(d, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
          "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")  # fmt: skip
    _leaf(d, "ca", "client", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    _leaf(d, "other_ca", "stranger", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    return SimpleNamespace(
        dir=d,
        ca=d / "ca.pem",
        other_ca=d / "other_ca.pem",
        server=(d / "server.pem", d / "server.key"),
        client=(d / "client.pem", d / "client.key"),
        stranger=(d / "stranger.pem", d / "stranger.key"),
    )
