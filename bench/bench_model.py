"""Raw TorchScript throughput of an exported AdaFace model across batch, threads and layout.

Usage: python bench/bench_model.py [--arch ir_50] [--seconds 2.5] [--optimization freeze ...]

Exports random weights into a temp repository once per (layout, optimization), then times
model.pt alone (no server, no preprocessing) in interleaved passes and prints img/s per
configuration plus the best. bench_server.py imports raw_throughput from here.
Figures are only comparable within one run: neighbours on the machine move them a lot.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

DEFAULT_BATCHES = (1, 4, 8, 16, 32)
DEFAULT_THREADS = (1, 2)
WARMUP_CALLS = 2  # the profiling executor specialises the graph during the first calls


@contextlib.contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _inputs(batch_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch_size, 3, 112, 112, generator=generator) * 2 - 1


def _timed_rate(
    model: torch.jit.ScriptModule, x: torch.Tensor, threads: int, seconds: float
) -> float:
    with _num_threads(threads), torch.inference_mode():
        calls = 0
        started = time.perf_counter()
        while True:
            model(x)
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return calls * x.shape[0] / elapsed


def _warm(model: torch.jit.ScriptModule, x: torch.Tensor, threads: int) -> None:
    with _num_threads(threads), torch.inference_mode():
        for _ in range(WARMUP_CALLS):
            model(x)


def raw_throughput(model_path: Path, batch_size: int, threads: int, seconds: float) -> float:
    """Images/s of the TorchScript file at model_path on CPU, timed for about `seconds`."""
    model = torch.jit.load(str(model_path), map_location="cpu").eval()
    x = _inputs(batch_size)
    _warm(model, x, threads)
    return _timed_rate(model, x, threads, seconds)


def _export(arch: str, repository: Path, channels_last: bool, optimization: str) -> Path:
    from adaface_server.models.export import export_model

    name = f"bench_{'cl' if channels_last else 'nchw'}_{optimization}"
    report = export_model(
        None,
        arch,
        repository,
        name,
        max_batch_size=max(DEFAULT_BATCHES),
        optimization=optimization,
        channels_last=channels_last,
    )
    return report.model_path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ir_50")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per config")
    parser.add_argument("--passes", type=int, default=2, help="interleaved passes (best kept)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    parser.add_argument("--threads", type=int, nargs="+", default=list(DEFAULT_THREADS))
    parser.add_argument(
        "--layouts", nargs="+", choices=("channels_last", "nchw"), default=["channels_last", "nchw"]
    )
    parser.add_argument(
        "--optimization",
        nargs="+",
        choices=("none", "freeze"),
        default=["freeze"],
        help="exporter graph variants to compare (default: the exporter's default only)",
    )
    args = parser.parse_args(argv)
    # The exporter's untrained-weights banner is expected here.
    logging.basicConfig(level=logging.ERROR)

    started = time.perf_counter()
    configs: list[tuple[str, str, int, int]] = []
    models: dict[tuple[str, str], torch.jit.ScriptModule] = {}
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        for layout in args.layouts:
            for optimization in args.optimization:
                t0 = time.perf_counter()
                path = _export(args.arch, Path(tmp), layout == "channels_last", optimization)
                print(
                    f"exported {args.arch} {layout}/{optimization} in "
                    f"{time.perf_counter() - t0:.1f} s",
                    flush=True,
                )
                models[layout, optimization] = torch.jit.load(str(path)).eval()
                configs += [
                    (layout, optimization, threads, batch)
                    for threads in args.threads
                    for batch in args.batch_sizes
                ]
    inputs = {batch: _inputs(batch) for batch in args.batch_sizes}
    for layout, optimization, threads, batch in configs:
        _warm(models[layout, optimization], inputs[batch], threads)
    # Interleaved passes, best pass kept: a burst from a neighbouring process then hurts one
    # pass of one configuration instead of skewing a whole block of the table.
    rates = dict.fromkeys(configs, 0.0)
    for _ in range(args.passes):
        for config in configs:
            layout, optimization, threads, batch = config
            rate = _timed_rate(
                models[layout, optimization], inputs[batch], threads, args.seconds / args.passes
            )
            rates[config] = max(rates[config], rate)
    rows = [(*config, rate) for config, rate in rates.items()]

    best = max(rows, key=lambda r: r[4])
    print()
    print(f"{args.arch} raw TorchScript throughput (img/s), torch {torch.__version__}")
    print(
        f"{'layout':13s} {'graph':7s} {'thr':>3s} "
        + " ".join(f"{'b' + str(b):>7s}" for b in args.batch_sizes)
    )
    for layout in args.layouts:
        for optimization in args.optimization:
            for threads in args.threads:
                cells = {r[3]: r[4] for r in rows if r[:3] == (layout, optimization, threads)}
                line = " ".join(f"{cells[b]:7.1f}" for b in args.batch_sizes)
                print(f"{layout:13s} {optimization:7s} {threads:3d} {line}")
    print(
        f"best: {best[0]} {best[1]} threads={best[2]} batch={best[3]} -> {best[4]:.1f} img/s "
        f"(run took {time.perf_counter() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
