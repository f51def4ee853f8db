#!/usr/bin/env python
"""Serve a local web page for refining one image: upload it, paint the broken region, pick the start, compare.

    python scripts/app.py --ckpt demo                  # the shipped demo experts; then open the printed URL
    python scripts/app.py --ckpt outputs/quickstart/checkpoints/latesteps_500_750.ckpt \
                          --ckpt outputs/quickstart/checkpoints/latesteps_750_1000.ckpt

The page serves on 127.0.0.1 only (this machine) unless --listen is given.  It fetches nothing from the internet, sends
no telemetry and makes no sharing links.  Each result is written to <outdir>/<request id>/ with the name and PNG
metadata ``scripts/refine.py`` writes.  Requests run one at a time on the device.  This file only parses arguments and
starts the server; the app is :mod:`ldm.app`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
from typing import Any

from ldm.cli import EXIT_USAGE, OneLineParser, add_loading_flags, check_outdir, decimal_int, one_line_error

PROG = "app.py"
EXIT_OUTPUT = 3  # the output folder cannot be created (as scripts/refine.py)
EXIT_INTERRUPTED = 130  # Ctrl+C while the models load (as the other scripts)
EPILOG = f"""
exit codes: 0 stopped with Ctrl+C (a running request stops after its current sampling step); {EXIT_USAGE} bad
arguments, checkpoint or config, or the port is taken (nothing served); {EXIT_OUTPUT} the output folder cannot be
created; {EXIT_INTERRUPTED} Ctrl+C before serving. Needs the app extra: pip install -e .[app]
"""


def port_number(text: str) -> int:
    """An argparse ``type`` for a TCP port: 0 (any free port) to 65535."""
    try:
        value = decimal_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number in [0, 65535] (0 picks a free one)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line (bad arguments exit with code 2 in one line, before any model is loaded)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument(
        "--ckpt",
        action="append",
        required=True,
        metavar="PATH",
        help="expert checkpoint, or 'demo' for the shipped demo experts; repeat once per expert (each runs "
        "the steps in its window; the page's start slider spans the union of the windows)",
    )
    p.add_argument("--config", metavar="YAML", help="model config for checkpoints that carry none (e.g. CompVis releases)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="network precision via autocast; fp16 needs CUDA (default: %(default)s)",
    )
    p.add_argument("--port", type=port_number, default=7860, help="TCP port; 0 picks a free one (default: %(default)s)")
    p.add_argument(
        "--listen",
        action="store_true",
        help="serve on every network interface (anyone who can reach this machine can use the page and "
        "download results); default: 127.0.0.1 only",
    )
    p.add_argument("--outdir", default="outputs/app", help="results go to OUTDIR/<request id>/ (default: %(default)s)")
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use the EMA weights when the checkpoint has them (default: on)",
    )
    add_loading_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log each request")
    return p


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (bound before the models load, so a taken port fails at once)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    """Run the server until Ctrl+C; returns the exit code (see EPILOG)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    )
    try:
        import uvicorn

        from ldm.app.guards import header_timeout_protocol
        from ldm.app.handlers import measure_step_cost
        from ldm.app.server import create_app
    except ImportError as exc:
        _err(f"error: the web app needs the app extra ({one_line_error(exc)}); install it with pip install -e .[app]")
        return EXIT_USAGE
    from ldm.checkpoint import CheckpointError
    from ldm.refine import Refiner
    from ldm.util import ConfigError

    problem = check_outdir(args.outdir)  # predicted now, created only once the experts load
    if problem:
        _err(f"error: {problem}")
        return EXIT_OUTPUT
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    try:
        sock = bind(host, args.port)
    except OSError as exc:
        why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror or one_line_error(exc)})"
        _err(f"error: port {args.port} on {host} {why}; pass another --port (0 picks a free one)")
        return EXIT_USAGE
    with sock:
        try:
            refiner = Refiner.from_checkpoints(
                args.ckpt,
                device=args.device,
                precision=args.precision,
                ema=args.ema,
                config=args.config,
                allow_outside_window=args.allow_outside_window,
                trust_config=args.trust_config,
                unsafe_load=args.unsafe_load,
            )
        except (CheckpointError, ConfigError, ValueError, OSError) as exc:
            _err(f"error: {one_line_error(exc)}")
            return EXIT_USAGE
        except KeyboardInterrupt:
            _err("interrupted")
            return EXIT_INTERRUPTED
        try:
            os.makedirs(args.outdir, exist_ok=True)
        except OSError as exc:
            _err(f"error: output folder {args.outdir}: {exc.strerror or one_line_error(exc)}")
            return EXIT_OUTPUT
        port = sock.getsockname()[1]
        where = " and on every other interface of this machine" if args.listen else ""
        print(
            f"{refiner.describe()}\nserving on http://127.0.0.1:{port}/{where} (Ctrl+C to stop); results in {args.outdir}",
            flush=True,
        )
        if args.listen:
            _err(f"warning: listening on every interface: anyone who can reach port {port} can use the page")
        try:
            step_cost = measure_step_cost(refiner)
            megapixel = (1024 // refiner.first_stage.factor) ** 2  # latent pixels of a 1024 x 1024 image
            logging.getLogger(PROG).info(
                "on a 1024x1024 image one sampling step takes about %.2f s here, its encode + decode %.2f s",
                step_cost.step_seconds(megapixel),
                step_cost.first_stage_seconds(1024, 1024, refiner.first_stage.factor, refiner.tiling),
            )
            app = create_app(refiner, args.outdir, listen=args.listen, step_cost=step_cost)
            config = uvicorn.Config(
                app,
                log_level="warning",
                access_log=args.verbose,
                http=header_timeout_protocol(),
                ws="none",
                lifespan="on",
                server_header=False,
            )
            # While serving, uvicorn's own handler takes Ctrl+C: it stops serving, the app's shutdown waits for the
            # worker (the running request ends after its current step), then uvicorn restores the handler below and
            # raises the signal again.  This handler ignores that one and any later Ctrl+C (pressed twice, or during
            # the exit): the server is already stopping, and a KeyboardInterrupt there would print a traceback.
            signal.signal(signal.SIGINT, _stopping)
            _server(uvicorn, config).run(sockets=[sock])
        except KeyboardInterrupt:  # before uvicorn took the signal (while the app was built): stopped all the same
            pass
    print("stopped", flush=True)
    return 0


def _stopping(_signum: int, _frame: object) -> None:
    """SIGINT once the server is (being) stopped: nothing left to interrupt."""


def _server(uvicorn: Any, config: Any) -> Any:
    """A uvicorn server whose second Ctrl+C (while it waits for open connections or the running request's step) stops
    the process at once, with exit 0 and no traceback.  uvicorn's own "force quit" would skip the app's shutdown and
    cancel it mid-way: a traceback in the log, and the worker left inside torch as the interpreter exits (that aborted
    with exit 134).  Finished outputs are complete files (atomic writes); the running request is abandoned."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                _err("second Ctrl+C: stopped at once, without waiting for a running request")
                print("stopped", flush=True)
                sys.stderr.flush()
                os._exit(0)
            super().handle_exit(sig, frame)

    return Server(config)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl+C while Python imports the app, before main's own handlers
        _err("interrupted")
        sys.exit(EXIT_INTERRUPTED)
