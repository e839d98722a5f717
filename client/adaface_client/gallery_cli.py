"""adaface-gallery: create, fill, search and move galleries on an adaface server."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaface_client.cli import (
    IMAGE_SUFFIXES,
    UsageError,
    add_connection_args,
    add_detection_args,
    connection_options,
    describe_rpc_failure,
    detection_options,
    find_images,
)
from adaface_client.client import AdafaceError, PermissionDenied, Unauthenticated
from adaface_client.gallery import EnrollResult, GalleryClient, GalleryInfo, IdentityRef

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_ERROR = 2
PROG = "adaface-gallery"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--server", default="localhost:50051", help="host:port of the server")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    add_connection_args(p)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="create an empty gallery pinned to the served model")
    c.add_argument("name")
    c.add_argument("--model-checksum", default="", help="pin to this model instead")
    c.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("list", help="list galleries")

    d = sub.add_parser("delete", help="delete a gallery")
    d.add_argument("name")

    e = sub.add_parser(
        "enroll", help="enroll FOLDER/<identity>/<images> (one subfolder per identity)"
    )
    e.add_argument("name")
    e.add_argument("folder", type=Path)
    e.add_argument("--mode", choices=("create", "append", "upsert"), default="create")
    e.add_argument("--flip", action="store_true", help="flip fusion")
    e.add_argument("--window", type=int, default=32, help="enrollments in flight")
    add_detection_args(e)

    i = sub.add_parser("identities", help="list a gallery's identities")
    i.add_argument("name")

    s = sub.add_parser("search", help="top-k identities for probe images (or .npy vectors)")
    s.add_argument("name")
    s.add_argument("probes", nargs="+", type=Path)
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--min-score", type=float, default=None)
    s.add_argument("--scoring", choices=("max", "mean"), default="max")
    s.add_argument("--flip", action="store_true")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_detection_args(s)

    v = sub.add_parser(
        "verify", help="1:1 score; operands are image paths, .npy vectors or id:IDENTITY"
    )
    v.add_argument("a")
    v.add_argument("b")
    v.add_argument("--gallery", default="", help="gallery of id: operands")
    v.add_argument("--threshold", type=float, default=None)
    v.add_argument("--scoring", choices=("max", "mean"), default="max")
    v.add_argument("--flip", action="store_true")
    add_detection_args(v)

    x = sub.add_parser("export", help="write a gallery to an export file")
    x.add_argument("name")
    x.add_argument("out", type=Path)

    m = sub.add_parser("import", help="create a gallery from an export file or a seed .pth")
    m.add_argument("file", type=Path)
    m.add_argument("--name", default="", help="gallery name (default: the file's)")
    m.add_argument(
        "--format",
        choices=("auto", "native", "seed_pth"),
        default="auto",
        help="auto: seed_pth for .pth/.pt files, native otherwise",
    )
    m.add_argument("--model-checksum", default="", help="seed_pth: model of the features")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        connection = connection_options(args)
        with GalleryClient(args.server, timeout=args.timeout, **connection) as client:
            return COMMANDS[args.command](client, args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (Unauthenticated, PermissionDenied) as e:
        print(f"{PROG}: {describe_rpc_failure(args.server, e)}", file=sys.stderr)
        return EXIT_ERROR
    except AdafaceError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


def _print_gallery(g: GalleryInfo) -> None:
    print(
        f"{g.name}\tidentities={g.identity_count}\tsamples={g.sample_count}\tdim={g.dim}\t"
        f"model={g.model_checksum[:12]}\tindex={g.index}/{g.dtype}\t"
        f"memory={g.index_bytes / 2**20:.1f}MiB"
    )


def _create(client: GalleryClient, args: argparse.Namespace) -> int:
    metadata = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--meta needs KEY=VALUE, got {item!r}")
        metadata[key] = value
    _print_gallery(
        client.create_gallery(args.name, model_checksum=args.model_checksum, metadata=metadata)
    )
    return EXIT_OK


def _list(client: GalleryClient, args: argparse.Namespace) -> int:
    for g in client.list_galleries():
        _print_gallery(g)
    return EXIT_OK


def _delete(client: GalleryClient, args: argparse.Namespace) -> int:
    identities, samples = client.delete_gallery(args.name)
    print(f"deleted {args.name}: {identities} identities, {samples} samples")
    return EXIT_OK


def _identity_folders(root: Path) -> list[tuple[str, list[Path]]]:
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        images = [sub / rel for rel in find_images(sub)]
        if images:
            out.append((sub.name, images))
    if not out:
        raise UsageError(
            f"no identity subfolders with images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}"
        )
    return out


def _enroll(client: GalleryClient, args: argparse.Namespace) -> int:
    folders = _identity_folders(args.folder)
    images_of = dict(folders)
    enrolled = failed_images = failed_ids = 0

    def items() -> Iterator[tuple[str, list[Path]]]:
        yield from folders

    alignment, detection = detection_options(args)
    for result in client.enroll_many(
        args.name,
        items(),
        mode=args.mode,
        flip=args.flip,
        window=args.window,
        alignment=alignment,
        detection=detection,
    ):
        if isinstance(result, EnrollResult):
            enrolled += 1
            for index, reason, message in result.errors:
                failed_images += 1
                path = images_of[result.identity][index]
                print(f"failed: {path}: {reason}: {message}", file=sys.stderr)
        else:
            failed_ids += 1
            identity = getattr(result, "identity", "?")
            print(f"failed: {identity}: {result}", file=sys.stderr)
    total = sum(len(v) for _, v in folders)
    print(
        f"enrolled {enrolled} of {len(folders)} identities into {args.name} "
        f"({total - failed_images} of {total} images; {failed_ids} identities failed)"
    )
    return EXIT_OK if not (failed_images or failed_ids) else EXIT_SOME_FAILED


def _identities(client: GalleryClient, args: argparse.Namespace) -> int:
    for ident in client.list_identities(args.name):
        meta = json.dumps(ident.metadata) if ident.metadata else ""
        print(f"{ident.identity}\tsamples={ident.sample_count}\t{meta}".rstrip())
    return EXIT_OK


def _probe(path: Path) -> Any:
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path).astype(np.float32).reshape(-1)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read vector {path}: {e}") from None
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    return str(path)


def _search(client: GalleryClient, args: argparse.Namespace) -> int:
    probes = [_probe(p) for p in args.probes]
    alignment, detection = detection_options(args)
    results = client.search(
        args.name,
        probes,
        top_k=args.top_k,
        min_score=args.min_score,
        scoring=args.scoring,
        flip=args.flip,
        alignment=alignment,
        detection=detection,
    )
    failed = 0
    report = []
    for path, r in zip(args.probes, results, strict=True):
        if not r.ok:
            failed += 1
            print(f"failed: {path}: {r.reason}: {r.message}", file=sys.stderr)
        report.append(
            {
                "probe": str(path),
                "error": None if r.ok else f"{r.reason}: {r.message}",
                "matches": [
                    {"identity": m.identity, "score": round(m.score, 6), "sample_id": m.sample_id}
                    for m in r.matches
                ],
            }
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for item in report:
            if item["error"] is None:
                found = ", ".join(f"{m['identity']} {m['score']:.4f}" for m in item["matches"])
                print(f"{item['probe']}: {found or '(no match)'}")
    return EXIT_OK if not failed else EXIT_SOME_FAILED


def _operand(text: str) -> Any:
    if text.startswith("id:"):
        return IdentityRef(text[3:])
    return _probe(Path(text))


def _verify(client: GalleryClient, args: argparse.Namespace) -> int:
    alignment, detection = detection_options(args)
    r = client.verify(
        _operand(args.a),
        _operand(args.b),
        gallery=args.gallery,
        threshold=args.threshold,
        scoring=args.scoring,
        flip=args.flip,
        alignment=alignment,
        detection=detection,
    )
    verdict = "MATCH" if r.match else "no match"
    print(f"score {r.score:.4f} threshold {r.threshold:.4f}: {verdict}")
    return EXIT_OK


def _export(client: GalleryClient, args: argparse.Namespace) -> int:
    written = client.export(args.name, args.out)
    print(f"exported {args.name} to {args.out} ({written} bytes)")
    return EXIT_OK


def _import(client: GalleryClient, args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise UsageError(f"{args.file} is not a file")
    fmt = args.format
    if fmt == "auto":
        fmt = "seed_pth" if args.file.suffix.lower() in (".pth", ".pt") else "native"
    if fmt == "seed_pth" and not args.name:
        raise UsageError("--name is required to import a seed .pth gallery")
    info = client.import_gallery(
        args.file, name=args.name, format=fmt, model_checksum=args.model_checksum
    )
    _print_gallery(info)
    return EXIT_OK


COMMANDS = {
    "create": _create,
    "list": _list,
    "delete": _delete,
    "enroll": _enroll,
    "identities": _identities,
    "search": _search,
    "verify": _verify,
    "export": _export,
    "import": _import,
}

if __name__ == "__main__":
    sys.exit(main())
