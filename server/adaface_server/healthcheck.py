"""Container health probe: exit 0 when the local server's grpc.health.v1 says SERVING.

`python -m adaface_server.healthcheck [--address HOST:PORT]` (the image's HEALTHCHECK); the
default address is 127.0.0.1 on ADAFACE_PORT (50051), so it follows the server's own setting.

It follows the server's TLS settings too: with ADAFACE_TLS_CERTIFICATE set it dials TLS,
trusting `--tls-ca` (default: that certificate file itself, which holds the CA for a
self-signed or full-chain certificate). Under mutual TLS it presents `--tls-cert/--tls-key`,
and with `--auth-health-open false` it sends the bearer token from `--token-file`. Every
flag also reads ADAFACE_HEALTHCHECK_<FLAG> from the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str) -> bytes | None:
    return Path(path).expanduser().read_bytes() if path else None


def channel_for(
    address: str, ca: str = "", certificate: str = "", key: str = "", server_name: str = ""
) -> grpc.Channel:
    """A plaintext channel, or a TLS one when a CA is given."""
    if not ca:
        return grpc.insecure_channel(address)
    if bool(certificate) != bool(key):
        # gRPC would abort the process on half a key pair.
        raise ValueError("--tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(_read(ca), _read(key), _read(certificate))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    channel: grpc.Channel | None = None,
    token: str = "",
) -> str:
    """The health status name of service at address, or "UNREACHABLE: <code>"."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with channel or grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            return f"UNREACHABLE: {exc.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _env(name: str, default: str = "") -> str:
    return os.environ.get("ADAFACE_HEALTHCHECK_" + name, default)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaface_server.healthcheck")
    port = os.environ.get("ADAFACE_PORT", "50051")
    parser.add_argument("--address", default=_env("ADDRESS", f"127.0.0.1:{port}"))
    parser.add_argument("--service", default="", help="'' = the whole server")
    parser.add_argument("--timeout", type=float, default=3.0)
    server_certificate = os.environ.get("ADAFACE_TLS_CERTIFICATE", "")
    parser.add_argument(
        "--tls-ca", default=_env("TLS_CA", server_certificate), help="'' = plaintext"
    )
    parser.add_argument("--tls-cert", default=_env("TLS_CERT"), help="mutual TLS: client cert")
    parser.add_argument("--tls-key", default=_env("TLS_KEY"), help="mutual TLS: client key")
    parser.add_argument(
        "--server-name", default=_env("SERVER_NAME"), help="TLS name to verify, if not the host"
    )
    parser.add_argument("--token-file", default=_env("TOKEN_FILE"), help="bearer token file")
    args = parser.parse_args(argv)
    try:
        channel = channel_for(
            args.address, args.tls_ca, args.tls_cert, args.tls_key, args.server_name
        )
        token = Path(args.token_file).expanduser().read_text().strip() if args.token_file else ""
    except OSError as exc:
        print(f"{args.address}: cannot read {exc.filename}: {exc.strerror}")
        return 1
    except ValueError as exc:
        print(f"{args.address}: {exc}")
        return 1
    status = check(args.address, args.service, args.timeout, channel=channel, token=token)
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
