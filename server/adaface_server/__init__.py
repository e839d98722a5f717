"""AdaFace embedding server: preprocessing, batching, backends and gRPC services."""

__version__ = "0.1.0"
