"""adaface-eval: verification accuracy of a served model on .bin sets, and threshold calibration.

adaface-eval lfw.bin cfp_fp.bin agedb_30.bin --server HOST:PORT [--json] [--roc roc.png]
adaface-eval calibrate --pairs pairs.csv --far 1e-3 [--write-threshold verify.env]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from adaface_client import AdafaceError, Client
from adaface_client.cli import (
    Progress,
    UsageError,
    add_connection_args,
    connection_options,
    describe_rpc_failure,
)
from adaface_client.evaluation import (
    BinFormatError,
    DatasetResult,
    EvaluationError,
    embed_images,
    evaluate_set,
    far_key,
    load_bin,
    load_pairs_csv,
    pair_scores,
)
from adaface_client.verification import (
    DEFAULT_FARS,
    kfold_accuracy,
    roc_curve,
    threshold_at_far,
)

EXIT_OK = 0
EXIT_USAGE = 2
PROG = "adaface-eval"


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """An object with update(n) and close(): tqdm when installed, else the built-in bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        return Progress(total, sys.stderr, enabled)
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled)


def _far(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a FAR is in (0, 1), got {text}")
    return value


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="localhost:50051", help="host:port (default %(default)s)")
    p.add_argument(
        "--far",
        type=_far,
        action="append",
        metavar="FAR",
        help="false-accept rate to report TAR/threshold at; repeatable "
        f"(default {' '.join(far_key(f) for f in DEFAULT_FARS)})",
    )
    p.add_argument("--json", action="store_true", help="JSON Lines on stdout instead of a table")
    p.add_argument("--roc", type=Path, metavar="PNG", help="also draw the ROC (needs matplotlib)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per request (default: server max)"
    )
    p.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight (default %(default)s)"
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per request (default %(default)s)"
    )
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--no-progress", action="store_true", help="no progress bar")
    bar.add_argument(
        "--progress", action="store_true", help="progress bar even when stderr is not a TTY"
    )
    add_connection_args(p)


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Verification accuracy of the served model on InsightFace .bin validation "
        "sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW): 10-fold accuracy (threshold chosen on nine "
        "folds, applied to the tenth), its std, and TAR at FAR. "
        f"`{PROG} calibrate --help` for threshold calibration.",
        epilog="Exit codes: 0 done, 2 usage error, unreadable file, server unreachable or "
        "images that failed.",
    )
    p.add_argument("bins", type=Path, nargs="+", metavar="BIN", help="InsightFace .bin files")
    p.add_argument(
        "--flip",
        choices=("both", "on", "off"),
        default="both",
        help="server flip fusion: each set is scored with it, without it, or both "
        "(default %(default)s)",
    )
    p.add_argument(
        "--folds", type=int, default=10, help="cross-validation folds (default %(default)s)"
    )
    _common_args(p)
    return p


def _calibrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} calibrate",
        description="Pick the Verify threshold for a target false-accept rate from labelled "
        "pairs scored through the server.",
        epilog="The recommended threshold is the lowest one whose false-accept rate on these "
        "pairs is at most the target; the server accepts a pair when score >= threshold.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--pairs",
        type=Path,
        metavar="CSV",
        help="rows image_a,image_b,same (1/0); relative paths are from the CSV's folder",
    )
    src.add_argument("--bin", type=Path, metavar="BIN", help="an InsightFace .bin instead")
    p.add_argument(
        "--aligned",
        action="store_true",
        help="--pairs images are pre-aligned 112x112 crops (default: the server detects and "
        "aligns the face); .bin crops are always sent as aligned",
    )
    p.add_argument("--flip", action="store_true", help="score with server flip fusion")
    p.add_argument(
        "--write-threshold",
        type=Path,
        metavar="FILE",
        help="write ADAFACE_VERIFY_THRESHOLD=<threshold at the first --far> (an env file "
        "the server reads as --verify-threshold)",
    )
    _common_args(p)
    return p


def _check_common(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    if args.roc is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(
                "--roc needs matplotlib: pip install 'adaface-serving[plot]'"
            ) from None


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.server,
        timeout=args.timeout,
        max_in_flight=args.concurrency,
        batch_size=args.batch_size,
        **connection_options(args),
    )


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and (args.progress or sys.stderr.isatty())


def _warn_untrained(client: Client) -> str:
    info = client.info()
    if info.untrained:
        print(
            f"{PROG}: warning: model {info.model_name} has untrained weights: "
            "accuracy is meaningless",
            file=sys.stderr,
        )
    return info.model_name


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def print_table(results: Sequence[DatasetResult], fars: Sequence[float], out: TextIO) -> None:
    """One row per (set, flip): accuracy mean +- std in %, mean threshold, TAR@FAR in %."""
    heads = ["dataset", "flip", "pairs", "accuracy %", "threshold"]
    heads += [f"TAR@FAR={far_key(f)} %" for f in fars]
    rows = []
    for r in results:
        v = r.result
        row = [
            r.dataset,
            "on" if r.flip_fusion else "off",
            str(v.pairs),
            f"{_pct(v.accuracy_mean)} ± {_pct(v.accuracy_std)}",
            f"{v.best_threshold:.3f}",
        ]
        for far in fars:
            at = v.at_far.get(far)
            row.append("n/a" if at is None else _pct(at[0]))
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    for line in [heads, *rows]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        out.write("\n")
    out.write(
        "accuracy: mean ± std over folds; threshold: cosine similarity, mean of the folds' "
        "best; n/a: too few different-identity pairs for that FAR\n"
    )


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """Save TAR against FAR (log scale) for each (label, scores, issame) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    floor = 1.0
    for label, scores, issame in curves:
        roc = roc_curve(scores, issame)
        keep = roc.far > 0
        floor = min(floor, 1.0 / max(int((~issame).sum()), 1))
        ax.plot(roc.far[keep], roc.tar[keep], label=label)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def run_eval(argv: Sequence[str]) -> int:
    args = _eval_parser().parse_args(argv)
    _check_common(args)
    if args.folds < 2:
        raise UsageError("--folds must be >= 2")
    fars = tuple(args.far) if args.far else DEFAULT_FARS
    flips = {"both": (False, True), "on": (True,), "off": (False,)}[args.flip]
    try:
        sets = [load_bin(path) for path in args.bins]
    except BinFormatError as e:
        raise UsageError(str(e)) from None
    for s in sets:
        if s.pairs < args.folds:
            raise UsageError(f"{s.name}: {s.pairs} pairs, fewer than --folds {args.folds}")
    results: list[DatasetResult] = []
    show = _show_progress(args)
    try:
        with _client(args) as client:
            model = _warn_untrained(client)
            for s in sets:
                for flip in flips:
                    started = time.monotonic()
                    desc = f"{s.name} flip {'on' if flip else 'off'}"
                    bar = progress_bar(len(s.images), desc, show)
                    try:
                        r = evaluate_set(
                            client,
                            s,
                            flip=flip,
                            n_folds=args.folds,
                            fars=fars,
                            progress=bar.update,
                            model=model,
                        )
                    finally:
                        bar.close()
                    results.append(r)
                    if args.json:
                        print(json.dumps(r.to_json()), flush=True)
                    print(
                        f"{PROG}: {desc}: {len(s.images)} images in "
                        f"{time.monotonic() - started:.1f} s",
                        file=sys.stderr,
                    )
    except AdafaceError as e:
        raise UsageError(describe_rpc_failure(args.server, e)) from None
    except EvaluationError as e:
        raise UsageError(str(e)) from None
    if not args.json:
        print_table(results, fars, sys.stdout)
    if args.roc is not None:
        plot_roc(
            [
                (f"{r.dataset} flip {'on' if r.flip_fusion else 'off'}", r.scores, r.issame)
                for r in results
            ],
            args.roc,
        )
        print(f"{PROG}: ROC written to {args.roc}", file=sys.stderr)
    return EXIT_OK


def recommended_threshold(threshold: float) -> float:
    """The 6-decimal value just above `threshold`: the server accepts score >= value, while
    the FAR was measured for score > threshold."""
    return math.floor(threshold * 1e6 + 1.0) / 1e6


def write_threshold_file(path: Path, value: float, note: str) -> None:
    """An env file the server reads: ADAFACE_VERIFY_THRESHOLD is --verify-threshold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {note}\nADAFACE_VERIFY_THRESHOLD={value:.6f}\n", encoding="utf-8")


def run_calibrate(argv: Sequence[str]) -> int:
    args = _calibrate_parser().parse_args(argv)
    _check_common(args)
    fars = tuple(args.far) if args.far else DEFAULT_FARS
    try:
        if args.pairs is not None:
            pairs = load_pairs_csv(args.pairs)
            name, images, issame = pairs.name, [str(p) for p in pairs.images], pairs.issame
            alignment = "aligned" if args.aligned else "detect"
        else:
            vs = load_bin(args.bin)
            name, images, issame, alignment = vs.name, vs.images, vs.issame, "aligned"
    except (BinFormatError, EvaluationError) as e:
        raise UsageError(str(e)) from None
    if issame.all() or not issame.any():
        raise UsageError(f"{name}: calibration needs both same and different pairs")
    show = _show_progress(args)
    try:
        with _client(args) as client:
            model = _warn_untrained(client)
            bar = progress_bar(len(images), name, show)
            try:
                embeddings = embed_images(
                    client,
                    images,
                    flip=args.flip,
                    alignment=alignment,
                    what=name,
                    progress=bar.update,
                )
            finally:
                bar.close()
    except AdafaceError as e:
        raise UsageError(describe_rpc_failure(args.server, e)) from None
    except EvaluationError as e:
        raise UsageError(str(e)) from None
    scores = pair_scores(embeddings)
    rows = []
    for far in fars:
        t = threshold_at_far(scores, issame, far)
        if t is None:
            rows.append({"far": far, "threshold": None, "tar": None, "measured_far": None})
            continue
        rec = recommended_threshold(t)
        rows.append(
            {
                "far": far,
                "threshold": rec,
                "tar": float(np.mean(scores[issame] >= rec)),
                "measured_far": float(np.mean(scores[~issame] >= rec)),
            }
        )
    folds = min(10, issame.size)
    acc_threshold = None
    if folds >= 2:
        _acc, thr = kfold_accuracy(scores, issame, folds)
        acc_threshold = float(np.mean(thr))
    report = {
        "dataset": name,
        "pairs": int(issame.size),
        "same_pairs": int(issame.sum()),
        "different_pairs": int((~issame).sum()),
        "flip_fusion": bool(args.flip),
        "model": model,
        "at_far": [{**row, "far": far_key(row["far"])} for row in rows],
        "best_accuracy_threshold": acc_threshold,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{name}: {report['pairs']} pairs ({report['same_pairs']} same, "
            f"{report['different_pairs']} different), model {model}, "
            f"flip fusion {'on' if args.flip else 'off'}"
        )
        for row in rows:
            if row["threshold"] is None:
                need = math.ceil(1.0 / row["far"])
                print(
                    f"  FAR {far_key(row['far'])}: n/a (needs >= {need} different pairs, "
                    f"have {report['different_pairs']})"
                )
            else:
                print(
                    f"  FAR {far_key(row['far'])}: --verify-threshold {row['threshold']:.6f}  "
                    f"TAR {_pct(row['tar'])} %  measured FAR {row['measured_far']:.2e}"
                )
        if acc_threshold is not None:
            print(f"  best-accuracy threshold (mean of {folds} folds): {acc_threshold:.3f}")
    if args.write_threshold is not None:
        first = rows[0]
        if first["threshold"] is None:
            raise UsageError(
                f"--write-threshold: FAR {far_key(first['far'])} cannot be measured with "
                f"{report['different_pairs']} different pairs"
            )
        write_threshold_file(
            args.write_threshold,
            first["threshold"],
            f"{PROG} calibrate: {name}, {report['pairs']} pairs, model {model}, "
            f"FAR {far_key(first['far'])}, TAR {_pct(first['tar'])} %",
        )
        print(f"{PROG}: wrote {args.write_threshold}", file=sys.stderr)
    if args.roc is not None:
        plot_roc([(name, scores, issame)], args.roc)
        print(f"{PROG}: ROC written to {args.roc}", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["calibrate"]:
            return run_calibrate(argv[1:])
        return run_eval(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
