"""Server settings: one typed object read once at start-up from flags and ADAFACE_* env vars."""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
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
        default=64 * 1024 * 1024,
        metadata={
            "help": "largest gRPC message, bytes: room for one image at --max-image-bytes "
            "or 64 photos of 1 MiB; callers without a valid token are refused before any "
            "of it is read"
        },
    )
    grace_seconds: float = field(
        default=10.0, metadata={"help": "SIGTERM: time to finish in-flight requests"}
    )
    load_retry_seconds: float = field(
        default=2.0, metadata={"help": "wait between attempts to load a missing model"}
    )
    triton_url: str = field(
        default="localhost:8001", metadata={"help": "--backend triton: Triton's gRPC host:port"}
    )
    triton_model_version: str = field(
        default="", metadata={"help": "model version on Triton ('' = the newest ready one)"}
    )
    triton_timeout_seconds: float = field(
        default=30.0, metadata={"help": "deadline of one inference call to Triton"}
    )
    triton_connect_timeout_seconds: float = field(
        default=5.0, metadata={"help": "deadline of Triton readiness and metadata calls"}
    )
    triton_check_seconds: float = field(
        default=1.0,
        metadata={"help": "how often Triton's model readiness is polled (health follows it)"},
    )
    triton_tls: bool = field(default=False, metadata={"help": "connect to Triton over TLS"})
    triton_root_certificates: str = field(
        default="", metadata={"help": "TLS: PEM CA bundle for Triton ('' = system roots)"}
    )
    triton_private_key: str = field(
        default="", metadata={"help": "TLS: PEM client key, for mutual TLS with Triton"}
    )
    triton_certificate_chain: str = field(
        default="", metadata={"help": "TLS: PEM client certificate chain, for mutual TLS"}
    )
    detector: str = field(
        default="mtcnn",
        metadata={"help": "face detector for ALIGNMENT_DETECT and Detect: mtcnn or none"},
    )
    mtcnn_weights: Path = field(
        default=Path(".cache/mtcnn"),
        metadata={"help": "folder with MTCNN pnet.pt/rnet.pt/onet.pt (make venv fetches them)"},
    )
    detect_max_side: int = field(
        default=1024,
        metadata={"help": "detection runs on photos downscaled to this long side, pixels"},
    )
    detect_device: str = field(
        default="auto",
        metadata={"help": "MTCNN device: auto (the model's --device), cpu, cuda, cuda:N"},
    )
    detect_runtime: str = field(
        default="auto",
        metadata={
            "help": "MTCNN runtime: auto (openvino on CPU when installed, else torch), torch "
            "or openvino (CPU, fp32 or bf16)"
        },
    )
    detect_precision: str = field(
        default="auto",
        metadata={
            "help": "MTCNN precision: auto (fp16 on CUDA, fp32 on CPU, where bf16 measured "
            "slower for its small nets), fp32, bf16 or fp16 (CUDA); upstream_softmax "
            "requests always run in fp32"
        },
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    log_format: str = field(
        default="json",
        metadata={"help": "json (one object per line, one line per request) or text"},
    )
    max_stream_requests: int = field(
        default=1_000_000,
        metadata={"help": "requests accepted on one EmbedStream/EnrollStream/Import stream"},
    )
    stream_idle_seconds: float = field(
        default=60.0,
        metadata={
            "help": "a request stream (EmbedStream, EnrollStream, Import, BuildEpoch) that "
            "sends nothing for this long while the server waits is ended with "
            "DEADLINE_EXCEEDED (0: no limit)"
        },
    )
    tls_certificate: str = field(
        default="", metadata={"help": "TLS: PEM certificate chain of this server ('' = no TLS)"}
    )
    tls_private_key: str = field(default="", metadata={"help": "TLS: PEM private key"})
    tls_client_ca: str = field(
        default="",
        metadata={"help": "mTLS: PEM CA bundle; clients must present a certificate it signed"},
    )
    auth_tokens_file: str = field(
        default="",
        metadata={
            "help": "bearer tokens, one per line; with it (or ADAFACE_AUTH_TOKENS) every "
            "call needs 'authorization: Bearer <token>'"
        },
    )
    admin_tokens_file: str = field(
        default="",
        metadata={
            "help": "admin bearer tokens, one per line (or ADAFACE_ADMIN_TOKENS); with any, "
            "gallery writes need one of them"
        },
    )
    auth_health_open: bool = field(
        default=True, metadata={"help": "with auth on, health checks still need no token"}
    )
    metrics_port: int = field(
        default=9464,
        metadata={"help": "Prometheus /metrics HTTP port (0 picks a free one, -1 turns it off)"},
    )
    http_port: int = field(
        default=-1,
        metadata={
            "help": "HTTP/JSON API and web console port on --host (0 picks a free one, "
            "-1 turns it off)"
        },
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "address /metrics binds (0.0.0.0 for every interface); with tokens "
            "configured a scrape needs 'Authorization: Bearer <token>'"
        },
    )
    metrics_gallery_labels: bool = field(
        default=True,
        metadata={"help": "label gallery sizes by gallery name (false: totals only)"},
    )
    sampling_max_identities: int = field(
        default=2_000_000, metadata={"help": "identities accepted in one Sampling.BuildEpoch"}
    )
    sampling_max_builds: int = field(
        default=2,
        metadata={"help": "BuildEpoch calls run at once; more get RESOURCE_EXHAUSTED"},
    )
    sampling_knn_block: int = field(
        default=2048,
        metadata={
            "help": "tiles kNN only: tile side, memory about 4 * block^2 * 4 bytes per build "
            "(faiss methods batch on their own)"
        },
    )
    sampling_knn_precision: str = field(
        default="fp32",
        metadata={"help": "kNN similarities: fp32 (exact) or bf16 (~3x faster, recall ~0.98)"},
    )
    sampling_knn_method: str = field(
        default="auto",
        metadata={
            "help": "kNN of BuildEpoch: tiles (torch, exact in fp32), faiss-flat (exact), "
            "faiss-ivf (approximate), or auto: tiles on a GPU, else faiss-flat when faiss "
            "is installed, else tiles"
        },
    )
    sampling_knn_device: str = field(
        default="auto",
        metadata={"help": "device of the tiled kNN: cpu, cuda, or auto (cuda when available)"},
    )
    sampling_knn_nprobe: int = field(
        default=16, metadata={"help": "faiss-ivf: inverted lists searched per identity"}
    )

    gallery_path: Path = field(
        default=Path("~/.local/share/adaface-serving/galleries.sqlite3"),
        metadata={"help": "SQLite file holding every gallery (the source of truth)"},
    )
    gallery_dtype: str = field(
        default="float32",
        metadata={"help": "in-memory gallery vectors: float32 or float16 (half the memory)"},
    )
    gallery_index: str = field(
        default="exact",
        metadata={"help": "gallery search index: exact, or hnsw (approximate; needs faiss-cpu)"},
    )
    gallery_device: str = field(
        default="cpu",
        metadata={
            "help": "where exact gallery search runs: cpu, or cuda / cuda:N (an fp16 copy of "
            "every gallery on the GPU, exact fp32 rescoring on the host; --gallery-index exact)"
        },
    )
    gallery_hnsw_m: int = field(default=32, metadata={"help": "hnsw: graph neighbours per node"})
    gallery_hnsw_ef_search: int = field(
        default=128, metadata={"help": "hnsw: search breadth (higher: better recall, slower)"}
    )
    gallery_search_chunk_mb: int = field(
        default=64, metadata={"help": "gallery search: score-matrix memory per chunk, MiB"}
    )
    gallery_search_workers: int = field(
        default=2, metadata={"help": "gallery searches run at once (each uses BLAS threads)"}
    )
    gallery_compact_ratio: float = field(
        default=0.25,
        metadata={"help": "compact a gallery's index when removed rows exceed this fraction"},
    )
    gallery_max_import_bytes: int = field(
        default=8 * 1024**3, metadata={"help": "largest Gallery.Import upload, bytes"}
    )
    # Several processes and replicas on one gallery store.
    gallery_url: str = field(
        default="",
        metadata={
            "help": "PostgreSQL gallery store, postgresql://user@host:5432/db (replaces "
            "--gallery-path; the password comes from PGPASSWORD, PGPASSFILE or "
            "--gallery-password-file, never from this URL's flag)"
        },
    )
    gallery_password_file: str = field(
        default="",
        metadata={"help": "file holding the PostgreSQL password (first line); empty: libpq's"},
    )
    gallery_log_keep: int = field(
        default=100_000,
        metadata={"help": "gallery change-log entries kept; older ones are trimmed (0: never)"},
    )
    verify_threshold: float = field(
        default=0.3,
        metadata={"help": "Gallery.Verify default decision threshold on cosine (tune per model)"},
    )

    # Hardware: device and precision of the embedded backend, pre-forked worker processes.
    device: str = field(
        default="auto",
        metadata={"help": "embedded backend device: auto (CUDA when present), cpu, cuda, cuda:N"},
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "embedded model precision: auto (fastest that passes the parity gate vs "
            "fp32 on the device found), fp32, bf16 or fp16 (CUDA); I/O stays fp32"
        },
    )
    runtime: str = field(
        default="auto",
        metadata={
            "help": "embedded backend runtime: torchscript (model.pt), openvino (the IR "
            "that adaface-export --openvino writes as <model>_openvino; CPU only), or auto: "
            "openvino when that IR exists, openvino is installed and the device is the CPU, "
            "else torchscript"
        },
    )
    workers: str = field(
        default="1",
        metadata={
            "help": "server processes sharing the port under a supervising parent: N or auto "
            "(one per 8 cores on CPU, 1 to 8; up to 4 with CUDA); galleries are shared "
            "through the store"
        },
    )
    reuse_port: bool = field(
        default=False,
        metadata={
            "help": "share the gRPC and HTTP ports with other processes (SO_REUSEPORT; workers)"
        },
    )
    worker_state_dir: str = field(
        default="", metadata={"help": "set by the supervisor: where workers report readiness"}
    )

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)


def _convert(kind: type, text: str) -> object:
    if kind is bool:
        return text.lower() in ("1", "true", "yes", "on")
    return kind(text)


def _parse_bool(text: str) -> bool:
    # argparse's type=bool would turn "--flag false" into True.
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


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
            type=_parse_bool if kind is bool else kind,
            default=default,
            help=f"{f.metadata.get('help', '')} (env {env_name}; default {default})",
        )
    args = parser.parse_args(argv)
    settings = Settings(**vars(args))
    problems = validate(settings)
    if problems:
        parser.error("; ".join(problems))
    return settings


def _url_has_password(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        password = parts.password
    except ValueError:
        return True  # unparsable netloc: refuse rather than risk showing it
    query = urllib.parse.parse_qs(parts.query)
    return bool(password) or "password" in query


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
        "max_stream_requests",
        "sampling_max_identities",
        "sampling_max_builds",
        "sampling_knn_block",
        "sampling_knn_nprobe",
    ):
        if getattr(s, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if s.sampling_knn_precision not in ("fp32", "bf16"):
        problems.append(
            f"--sampling-knn-precision must be fp32 or bf16, got {s.sampling_knn_precision!r}"
        )
    if s.sampling_knn_method not in ("auto", "tiles", "faiss-flat", "faiss-ivf"):
        problems.append(
            "--sampling-knn-method must be auto, tiles, faiss-flat or faiss-ivf, got "
            f"{s.sampling_knn_method!r}"
        )
    if s.sampling_knn_device not in ("auto", "cpu", "cuda"):
        problems.append(
            f"--sampling-knn-device must be auto, cpu or cuda, got {s.sampling_knn_device!r}"
        )
    if s.detector not in ("mtcnn", "none"):
        problems.append(f"--detector must be mtcnn or none, got {s.detector!r}")
    if s.detect_runtime not in ("auto", "torch", "openvino"):
        problems.append(
            f"--detect-runtime must be auto, torch or openvino, got {s.detect_runtime!r}"
        )
    if s.detect_precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(
            f"--detect-precision must be auto, fp32, bf16 or fp16, got {s.detect_precision!r}"
        )
    if s.detect_max_side < 48:
        problems.append(f"--detect-max-side must be >= 48, got {s.detect_max_side}")
    if s.log_format not in ("json", "text"):
        problems.append(f"--log-format must be json or text, got {s.log_format!r}")
    if s.metrics_port < -1 or s.metrics_port > 65535:
        problems.append(f"--metrics-port must be -1..65535, got {s.metrics_port}")
    if s.http_port < -1 or s.http_port > 65535:
        problems.append(f"--http-port must be -1..65535, got {s.http_port}")
    if bool(s.tls_certificate) != bool(s.tls_private_key):
        problems.append("--tls-certificate and --tls-private-key go together")
    if s.tls_client_ca and not s.tls_certificate:
        problems.append("--tls-client-ca (mutual TLS) needs --tls-certificate/--tls-private-key")
    problems.extend(validate_gallery(s))
    problems.extend(validate_hardware(s))
    problems.extend(validate_triton(s))
    for name in ("threads", "max_batch_size"):
        if getattr(s, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0")
    return problems


def validate_gallery(s: Settings) -> list[str]:
    problems = []
    if s.gallery_dtype not in ("float32", "float16"):
        problems.append(f"--gallery-dtype must be float32 or float16, got {s.gallery_dtype!r}")
    if s.gallery_index not in ("exact", "hnsw"):
        problems.append(f"--gallery-index must be exact or hnsw, got {s.gallery_index!r}")
    problems.extend(_gallery_device_problems(s))
    for name in (
        "gallery_hnsw_m",
        "gallery_hnsw_ef_search",
        "gallery_search_chunk_mb",
        "gallery_search_workers",
        "gallery_max_import_bytes",
    ):
        if getattr(s, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if s.gallery_url and not s.gallery_url.startswith(("postgresql://", "postgres://")):
        problems.append("--gallery-url must be a postgresql:// URL")
    elif s.gallery_url and _url_has_password(s.gallery_url):
        # Never echo it: the message (and the URL) may end up in logs.
        problems.append(
            "--gallery-url must not hold a password; use PGPASSWORD, PGPASSFILE or "
            "--gallery-password-file"
        )
    if s.gallery_log_keep < 0:
        problems.append(f"--gallery-log-keep must be >= 0, got {s.gallery_log_keep}")
    if not 0.0 < s.gallery_compact_ratio <= 1.0:
        problems.append(f"--gallery-compact-ratio must be in (0, 1], got {s.gallery_compact_ratio}")
    if not -1.0 <= s.verify_threshold <= 1.0:
        problems.append(f"--verify-threshold must be in [-1, 1], got {s.verify_threshold}")
    return problems


def _gallery_device_problems(s: Settings) -> list[str]:
    if s.gallery_device == "cpu":
        return []
    device = s.gallery_device
    if device.startswith("cuda:") and device[5:].isdigit():
        device = "cuda"
    if device != "cuda":
        return [f"--gallery-device must be cpu, cuda or cuda:N, got {s.gallery_device!r}"]
    if s.gallery_index != "exact":
        return [
            f"--gallery-device {s.gallery_device} needs --gallery-index exact "
            "(the HNSW graph searches on the CPU)"
        ]
    # Refused here, at start-up, rather than on the first gallery load.
    from .gallery.device_search import GalleryDeviceError, resolve_device

    try:
        resolve_device(s.gallery_device)
    except GalleryDeviceError as exc:
        return [str(exc)]
    return []


def validate_triton(s: Settings) -> list[str]:
    problems = []
    for name in (
        "triton_timeout_seconds",
        "triton_connect_timeout_seconds",
        "triton_check_seconds",
    ):
        if getattr(s, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be > 0")
    if s.backend == "triton" and ":" not in s.triton_url:
        problems.append(f"--triton-url must be host:port, got {s.triton_url!r}")
    certificates = (s.triton_root_certificates, s.triton_private_key, s.triton_certificate_chain)
    if any(certificates) and not s.triton_tls:
        problems.append(
            "--triton-root-certificates/-private-key/-certificate-chain need --triton-tls true"
        )
    if bool(s.triton_private_key) != bool(s.triton_certificate_chain):
        problems.append("--triton-private-key and --triton-certificate-chain go together")
    return problems


def validate_hardware(s: Settings) -> list[str]:
    problems = []
    if s.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(f"--precision must be auto, fp32, bf16 or fp16, got {s.precision!r}")
    if s.runtime not in ("auto", "torchscript", "openvino"):
        problems.append(f"--runtime must be auto, torchscript or openvino, got {s.runtime!r}")
    elif s.runtime == "openvino" and s.backend != "torchscript":
        problems.append(
            "--runtime openvino picks the embedded backend's runtime; with --backend triton "
            "point --model at the <model>_openvino model Triton serves"
        )
    elif s.runtime == "openvino" and s.device not in ("auto", "cpu"):
        problems.append(f"--runtime openvino runs on the CPU, got --device {s.device}")
    if not (s.workers == "auto" or (s.workers.isdigit() and int(s.workers) >= 1)):
        problems.append(f"--workers must be a number >= 1 or auto, got {s.workers!r}")
    elif s.workers != "1" and s.http_port == 0:
        problems.append("--http-port 0 picks a port per worker: give --workers a fixed HTTP port")
    device = s.device
    if device.startswith("cuda:"):
        device = "cuda" if device[5:].isdigit() else device
    if device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device must be auto, cpu, cuda or cuda:N, got {s.device!r}")
    return problems
