"""Server settings: one typed object read once at start-up from flags and ADAFACE_* env vars."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Every knob of the server. Flag `--max-queue` and env `ADAFACE_MAX_QUEUE` set `max_queue`."""

    host: str = field(default="0.0.0.0", metadata={"help": "address to bind"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    backend: str = field(
        default="torchscript", metadata={"help": "torchscript (in-process) or triton"}
    )
    model_repository: Path = field(
        default=Path("model_repository"), metadata={"help": "Triton-layout model repository"}
    )
    model: str = field(default="adaface_ir50", metadata={"help": "model name in the repository"})
    threads: int = field(
        default=0,
        metadata={"help": "intra-op threads for the embedded backend (0: one per core)"},
    )
    max_batch_size: int = field(
        default=0,
        metadata={"help": "largest forward pass; 0 uses config.pbtxt's max_batch_size"},
    )
    max_queue: int = field(
        default=256,
        metadata={"help": "images waiting for the model before RESOURCE_EXHAUSTED"},
    )
    max_images_per_request: int = field(
        default=64, metadata={"help": "images accepted in one EmbedRequest"}
    )
    max_image_bytes: int = field(
        default=20 * 1024 * 1024, metadata={"help": "largest encoded image, bytes"}
    )
    max_image_pixels: int = field(
        default=40_000_000, metadata={"help": "largest image, width*height pixels"}
    )
    max_stream_inflight: int = field(
        default=8, metadata={"help": "requests of one EmbedStream processed concurrently"}
    )
    preprocess_workers: int = field(
        default=1, metadata={"help": "threads decoding and aligning images"}
    )
    max_message_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "largest gRPC message, bytes"}
    )
    grace_seconds: float = field(
        default=10.0, metadata={"help": "SIGTERM: time to finish in-flight requests"}
    )
    load_retry_seconds: float = field(
        default=2.0, metadata={"help": "wait between attempts to load a missing model"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)


def _convert(kind: type, text: str) -> object:
    if kind is bool:
        return text.lower() in ("1", "true", "yes", "on")
    return kind(text)


def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "Path": Path, "bool": bool}[str(f.type)]


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over ADAFACE_* environment variables, which win over defaults."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="adaface-server", description="AdaFace embedding gRPC server"
    )
    for f in dataclasses.fields(Settings):
        kind = _field_type(f)
        env_name = "ADAFACE_" + f.name.upper()
        default = f.default
        if env_name in env:
            try:
                default = _convert(kind, env[env_name])
            except ValueError:
                parser.error(f"{env_name}={env[env_name]!r} is not a valid {kind.__name__}")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=default,
            help=f"{f.metadata.get('help', '')} (env {env_name}; default {default})",
        )
    args = parser.parse_args(argv)
    settings = Settings(**vars(args))
    problems = validate(settings)
    if problems:
        parser.error("; ".join(problems))
    return settings


def validate(s: Settings) -> list[str]:
    problems = []
    if s.backend not in ("torchscript", "triton"):
        problems.append(f"--backend must be torchscript or triton, got {s.backend!r}")
    for name in (
        "max_queue",
        "max_images_per_request",
        "max_image_bytes",
        "max_image_pixels",
        "max_stream_inflight",
        "preprocess_workers",
        "max_message_bytes",
    ):
        if getattr(s, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("threads", "max_batch_size"):
        if getattr(s, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0")
    return problems
