"""Command-line entry point: `adaface-server` / `python -m adaface_server`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from . import logs
from .app import App
from .config import Settings, parse_settings
from .errors import StartupError
from .supervisor import resolve_workers, run_workers

log = logging.getLogger("adaface_server")


async def run(settings: Settings) -> None:
    app = App(settings)
    await app.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # Token rotation without a restart: edit the token files, then `kill -HUP <pid>`.
    loop.add_signal_handler(signal.SIGHUP, app.reload_tokens)
    await stopping.wait()
    log.info("shutting down: finishing in-flight requests (grace %.1fs)", settings.grace_seconds)
    await app.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_settings(argv)
    logs.configure(settings.log_level, settings.log_format)
    try:
        workers = resolve_workers(settings.workers, device=settings.device)
        if workers > 1:
            return run_workers(settings, argv, workers)
        asyncio.run(run(settings))
    except StartupError as exc:
        print(f"adaface-server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
