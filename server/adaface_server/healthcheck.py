"""Container health probe: exit 0 when the local server's grpc.health.v1 says SERVING.

`python -m adaface_server.healthcheck [--address HOST:PORT]` (the image's HEALTHCHECK); the
default address is 127.0.0.1 on ADAFACE_PORT (50051), so it follows the server's own setting.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status name of service at address, or "UNREACHABLE: <code>"."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"UNREACHABLE: {exc.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaface_server.healthcheck")
    parser.add_argument("--address", default=f"127.0.0.1:{os.environ.get('ADAFACE_PORT', '50051')}")
    parser.add_argument("--service", default="", help="'' = the whole server")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout)
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
