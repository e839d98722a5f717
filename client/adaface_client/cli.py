"""adaface-embed: embed every image under a folder through an Embedder server into .npz/.pt."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from adaface_client.client import (
    AdafaceError,
    Client,
    DetectionOptions,
    ImageResult,
    PermissionDenied,
    Unauthenticated,
)
from adaface_client.transport import TOKEN_ENV, check_token, read_token_file, tls_credentials

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
OUTPUT_SUFFIXES = (".npz", ".pt")

_INDEX_PREFIX = re.compile(r"^images\[\d+\]:\s*")

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command line or its inputs (exit code 2)."""


class Progress:
    """A one-line stderr progress bar (tqdm): count, rate and ETA; nothing when disabled."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self._bar = tqdm(
            total=total,
            file=stream,
            disable=not enabled,
            unit="img",
            mininterval=0.1,
            dynamic_ncols=True,
            bar_format="{bar:24} {n_fmt}/{total_fmt} {rate_fmt} ETA {remaining} elapsed {elapsed}",
        )

    def update(self, n: int) -> None:
        self.done += n
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class _RefuseTokenValue(argparse.Action):
    """--token VALUE would put the secret in process lists and shell history: refused, and
    the value is not repeated in the message."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        parser.error(
            f"{option_string} is not accepted (a token on the command line is visible to "
            f"other users): put it in a file for --token-file, or in ${TOKEN_ENV}"
        )


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """The TLS and bearer-token flags every client CLI shares (see connection_options)."""
    g = p.add_argument_group(
        "security",
        f"TLS and the bearer token. The token comes from --token-file, else ${TOKEN_ENV}; "
        "it is never printed.",
    )
    g.add_argument("--token-file", type=Path, metavar="PATH", help="file holding the bearer token")
    # Declared so that "--token" is not taken as an abbreviation of --token-file.
    g.add_argument("--token", action=_RefuseTokenValue, help=argparse.SUPPRESS)
    g.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, trusting the system's CA roots (implied by --tls-ca/--tls-cert)",
    )
    g.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="CA bundle that signed the server's certificate"
    )
    g.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="client certificate, for mutual TLS"
    )
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key (--tls-cert)")


def add_detection_args(p: argparse.ArgumentParser) -> None:
    """The face-detection flags every image-taking CLI shares (see detection_options)."""
    p.add_argument(
        "--aligned",
        action="store_true",
        help="the images are pre-aligned 112x112 crops (default: the server detects the "
        "best face of each photo with MTCNN and aligns it)",
    )
    p.add_argument(
        "--min-face-size",
        type=float,
        default=0.0,
        help="detection: smallest face in pixels (default: the server's, 20)",
    )


def detection_options(args: argparse.Namespace) -> tuple[str, DetectionOptions]:
    """The alignment for plain images and the DetectionOptions from add_detection_args."""
    if args.min_face_size < 0:
        raise UsageError(f"--min-face-size must be >= 0, got {args.min_face_size}")
    return (
        "aligned" if args.aligned else "detect",
        DetectionOptions(min_face_size=args.min_face_size),
    )


def connection_options(
    args: argparse.Namespace, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Client keyword arguments (credentials, token) from add_connection_args' flags and
    $ADAFACE_TOKEN; UsageError for unusable ones. Messages name files, never the token."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    token = None
    if args.token_file is not None:
        try:
            token = read_token_file(args.token_file)
        except OSError as e:
            raise UsageError(
                f"--token-file: cannot read {args.token_file}: {e.strerror or e}"
            ) from None
        except ValueError as e:
            raise UsageError(f"--token-file: {e}") from None
    elif env.get(TOKEN_ENV, "").strip():
        try:
            token = check_token(env[TOKEN_ENV].strip())
        except ValueError as e:
            raise UsageError(f"${TOKEN_ENV}: {e}") from None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together (mutual TLS)")
    credentials = None
    if args.tls or args.tls_ca or args.tls_cert:
        try:
            credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        except OSError as e:
            raise UsageError(f"TLS: cannot read {e.filename}: {e.strerror or e}") from None
        except ValueError as e:
            raise UsageError(f"TLS: {e}") from None
    return {"credentials": credentials, "token": token}


def describe_rpc_failure(server: str, error: AdafaceError) -> str:
    """A one-line reason for a failed call, worded for the usual cause of its code."""
    if isinstance(error, Unauthenticated):
        hint = f"check --token-file / ${TOKEN_ENV}"
        return f"server {server} did not accept the credentials ({hint}): {error}"
    if isinstance(error, PermissionDenied):
        return f"server {server} refused this call for the given token: {error}"
    return f"cannot reach server {server}: {error}"


def find_images(root: Path) -> list[str]:
    """Relative POSIX paths of the images under `root`, recursively, sorted."""
    return find_files(root)[0]


def find_files(root: Path) -> tuple[list[str], list[str]]:
    """(images, other files) under `root` as sorted relative POSIX paths, recursively."""
    images, others = [], []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            (images if Path(name).suffix.lower() in IMAGE_SUFFIXES else others).append(rel)
    return sorted(images), sorted(others)


def describe_skipped(others: Sequence[str], shown: int = 10) -> str:
    """One line naming the non-image files that were left out (the first `shown` of them)."""
    names = ", ".join(others[:shown]) + (
        f", ... {len(others) - shown} more" if len(others) > shown else ""
    )
    kinds = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
    noun = "file" if len(others) == 1 else "files"
    return f"skipped {len(others)} non-image {noun} (not {kinds}): {names}"


def _landmark_values(values: Sequence[Any], where: str) -> list[float]:
    try:
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: landmarks must be 10 numbers") from None
    if flat.size != 10 or not np.all(np.isfinite(flat)):
        raise UsageError(f"{where}: landmarks must be 10 finite numbers, got {flat.size}")
    return flat.tolist()


def _normalise_key(path: str) -> str:
    return Path(path.strip().replace("\\", "/")).as_posix().removeprefix("./")


def load_landmarks(path: Path) -> dict[str, list[float]]:
    """Read landmarks per relative image path from JSON ({path: [10 numbers]}) or CSV
    (path,x1,y1,...,x5,y5, optional header)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--landmarks: cannot read {path}: {e.strerror or e}") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--landmarks: {path} is not valid JSON: {e}") from None
        return {
            _normalise_key(key): _landmark_values(value, f"--landmarks {path}: {key!r}")
            for key, value in data.items()
        }
    out: dict[str, list[float]] = {}
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 11:
            raise UsageError(
                f"--landmarks {path}:{line_no}: need path and 10 numbers, got {len(row)} fields"
            )
        try:
            values = [float(v) for v in row[1:]]
        except ValueError:
            if line_no == 1 or not out:
                continue  # a header row
            raise UsageError(f"--landmarks {path}:{line_no}: landmarks must be numbers") from None
        out[_normalise_key(row[0])] = _landmark_values(values, f"--landmarks {path}:{line_no}")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaface-embed",
        description="Embed every image under PHOTOS_DIR (recursively: jpg, jpeg, png, webp, "
        "bmp) with an adaface-serving Embedder and save features, norms and labels.",
        epilog="Exit codes: 0 all images embedded, 1 some images failed, "
        "2 usage error, server unreachable or nothing to do.",
    )
    p.add_argument("photos_dir", type=Path, metavar="PHOTOS_DIR")
    p.add_argument("--server", default="localhost:50051", help="host:port (default %(default)s)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("features.npz"),
        help=".npz (features, norms, labels) or .pt (torch dict like gallery.pth); "
        "default %(default)s",
    )
    p.add_argument("--flip", action="store_true", help="flip fusion (twice the model time)")
    p.add_argument(
        "--landmarks",
        type=Path,
        metavar="FILE",
        help="JSON {relative path: [x1,y1,...,x5,y5]} or CSV path,x1,...,y5; listed images "
        "are aligned with these landmarks, the others as usual (detected, or --aligned)",
    )
    add_detection_args(p)
    p.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight (default %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per request (default: server max)"
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per request (default %(default)s)"
    )
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--no-progress", action="store_true", help="no progress bar")
    bar.add_argument(
        "--progress", action="store_true", help="progress bar even when stderr is not a TTY"
    )
    add_connection_args(p)
    return p


def _write_output(out: Path, features: np.ndarray, norms: np.ndarray, labels: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: an interrupted run never leaves a torn file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if out.suffix.lower() == ".pt":
                import torch  # only .pt output needs torch

                torch.save(
                    {
                        "features": torch.from_numpy(features),
                        "norms": torch.from_numpy(norms),
                        "labels": list(labels),
                    },
                    f,
                )
            else:
                np.savez(f, features=features, norms=norms, labels=np.array(labels, dtype=str))
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UsageError as e:
        print(f"adaface-embed: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nadaface-embed: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    root: Path = args.photos_dir
    out: Path = args.out
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out must end in .npz or .pt, got {out}")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if not args.timeout > 0:
        raise UsageError("--timeout must be > 0")
    landmarks = load_landmarks(args.landmarks) if args.landmarks else {}
    connection = connection_options(args)

    paths, others = find_files(root)
    if others:
        print(f"adaface-embed: {describe_skipped(others)}", file=sys.stderr)
    if not paths:
        raise UsageError(f"no images (jpg, jpeg, png, webp, bmp) under {root}")
    unknown = sorted(set(landmarks) - set(paths))
    if unknown:
        print(
            f"adaface-embed: warning: {len(unknown)} --landmarks entries match no image, "
            f"e.g. {unknown[0]}",
            file=sys.stderr,
        )

    failures: list[tuple[str, str, str]] = []
    sent_labels: list[str] = []
    pending_marks: deque[list[float] | None] = deque()
    pending_modes: deque[str] = deque()
    plain_mode, detection = detection_options(args)

    def images() -> Iterator[bytes]:
        # Files are read only as requests go out; unreadable ones fail locally.
        for rel in paths:
            try:
                data = (root / rel).read_bytes()
            except OSError as e:
                failures.append((rel, "UNREADABLE", e.strerror or str(e)))
                progress.update(1)
                continue
            sent_labels.append(rel)
            points = landmarks.get(rel)
            pending_marks.append(points)
            pending_modes.append("landmarks" if points is not None else plain_mode)
            yield data

    def marks() -> Iterator[list[float] | None]:
        # Consumed in lockstep with images(): each image pushes its landmarks first.
        while True:
            yield pending_marks.popleft()

    def modes() -> Iterator[str]:
        while True:
            yield pending_modes.popleft()

    show = not args.no_progress and (args.progress or sys.stderr.isatty())
    progress = Progress(len(paths), sys.stderr, show)
    started = time.monotonic()
    try:
        with Client(
            args.server,
            timeout=args.timeout,
            max_in_flight=args.concurrency,
            flip=args.flip,
            batch_size=args.batch_size,
            **connection,
        ) as client:
            try:
                info = client.info()
            except AdafaceError as e:
                raise UsageError(describe_rpc_failure(args.server, e)) from None
            if info.untrained:
                print(
                    f"adaface-embed: warning: model {info.model_name} has untrained weights: "
                    "embeddings are meaningless",
                    file=sys.stderr,
                )
            results: list[ImageResult] = client.embed_results(
                images(),
                landmarks=marks(),
                alignment=modes(),
                progress=progress.update,
                detection=detection,
            )
    except AdafaceError as e:
        progress.close()
        raise UsageError(f"embedding failed: {e}") from None
    progress.close()

    good = [(label, r) for label, r in zip(sent_labels, results, strict=True) if r.ok]
    failures.extend(
        # The path names the image, so the message's "images[i]: " prefix is noise here.
        (label, r.reason or "UNSPECIFIED", _INDEX_PREFIX.sub("", r.message, count=1))
        for label, r in zip(sent_labels, results, strict=True)
        if not r.ok
    )
    failures.sort()
    dim = good[0][1].embedding.shape[0] if good else info.embedding_dim  # type: ignore[union-attr]
    features = np.zeros((len(good), dim), dtype=np.float32)
    norms = np.zeros((len(good), 1), dtype=np.float32)
    for i, (_label, r) in enumerate(good):
        features[i] = r.embedding
        norms[i, 0] = r.norm
    _write_output(out, features, norms, [label for label, _ in good])

    failed_path = out.with_name(out.name + ".failed.txt")
    lines = [f"{label}: {reason}: {message}" for label, reason, message in failures]
    if failures:
        failed_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        for line in lines:
            print(line, file=sys.stderr)
    else:
        # A stale list from an earlier run would blame images that now succeeded.
        failed_path.unlink(missing_ok=True)
    elapsed = time.monotonic() - started
    summary = (
        f"adaface-embed: embedded {len(good)} of {len(paths)} images in {elapsed:.1f} s -> {out}"
    )
    if failures:
        summary += f"; {len(failures)} failed (listed in {failed_path})"
        no_face = sum(1 for _, reason, _ in failures if reason == "NO_FACE")
        if no_face:
            summary += f"; {no_face} had no face"
    print(summary, file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
