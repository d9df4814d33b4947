"""``focaltrack serve``: run the service in the foreground until SIGINT / SIGTERM / shutdown.

    focaltrack serve --driver sim
    focaltrack serve --config /etc/focaltrack/focaltrack.toml
    focaltrack serve --workspace /tmp/ws --control-port 0 --pub-port 0 --metrics-port 0

Logs go to stderr. Once serving, the bound endpoints are logged and written to
``<workspace>/run/endpoints.json`` (``{"control", "pub", "metrics", "pid", "started_utc"}``),
which is how a caller finds the ports it asked to be chosen (port 0). One service per
workspace: a second one on the same workspace exits with status 2 and one line naming the
running one's pid and endpoints. Exit status 0 after a clean shutdown, 2 on a configuration or
startup error, 1 on a fatal error while running.
Module-level imports are light: the service (torch, zmq, h5py) loads inside `run`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

log = logging.getLogger("focaltrack.serve")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run the service (control, publish, metrics) in the foreground",
        description=(
            "Run the focaltrack service: control over ZeroMQ (ROUTER), localizations and "
            "tracks published (PUB), Prometheus metrics over HTTP. Settings: defaults < "
            "--config FILE < FOCALTRACK_<SECTION>_<KEY> environment < these options. "
            "Stops cleanly on SIGINT/SIGTERM or the shutdown command."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--driver", choices=("sim", "micromanager"), help="driver.kind")
    p.add_argument("--mm-app-path", metavar="DIR", help="driver.mm_app_path")
    p.add_argument("--mm-config", metavar="FILE", help="driver.mm_config")
    p.add_argument("--attach", action="store_true", default=None, help="driver.attach = true")
    p.add_argument(
        "--pixel-size", type=float, metavar="UM", help="driver.pixel_size_um (µm in the sample)"
    )
    p.add_argument("--workspace", metavar="DIR", help="workspace.dir")
    p.add_argument("--bind", metavar="ADDR", help="network.bind (default 127.0.0.1)")
    p.add_argument("--control-port", type=int, metavar="N", help="network.control_port (0: any)")
    p.add_argument("--pub-port", type=int, metavar="N", help="network.pub_port (0: any)")
    p.add_argument("--metrics-port", type=int, metavar="N", help="network.metrics_port (0: any)")
    p.add_argument("--sim-size", type=int, metavar="PX", help="sim.width and sim.height")
    p.add_argument("--sim-emitters", type=int, metavar="N", help="sim.n_emitters")
    p.add_argument("--device", metavar="DEV", help="analysis.device (cpu, cuda, ...)")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log.level")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``section.key`` overrides the options give (None = not given)."""
    size = getattr(args, "sim_size", None)
    return {
        "driver.kind": args.driver,
        "driver.mm_app_path": args.mm_app_path,
        "driver.mm_config": args.mm_config,
        "driver.attach": args.attach,
        "driver.pixel_size_um": args.pixel_size,
        "workspace.dir": args.workspace,
        "network.bind": args.bind,
        "network.control_port": args.control_port,
        "network.pub_port": args.pub_port,
        "network.metrics_port": args.metrics_port,
        "sim.width": size,
        "sim.height": size,
        "sim.n_emitters": args.sim_emitters,
        "analysis.device": args.device,
        "log.level": args.log_level,
    }


def run(args: argparse.Namespace) -> int:
    from focaltrack.daemon.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides=overrides_from_args(args))
    except ConfigError as e:
        print(f"focaltrack serve: configuration error: {e}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(getattr(logging, cfg.log.level))
    return serve(cfg)


def serve(cfg: Any) -> int:
    """Run a `Service` for ``cfg`` until a signal or a ``shutdown`` request; exit status."""
    from focaltrack.daemon.config import ConfigError
    from focaltrack.daemon.service import Service, ServiceError
    from focaltrack.drivers.base import DriverError

    svc = Service(cfg)
    serving = False

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        if serving:
            svc.request_shutdown()
        else:  # still starting (opening the driver, loading the model): abandon the start
            raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        try:
            svc.start()
            serving = True
        except KeyboardInterrupt:
            log.info("stopped while starting")
            return 0
        except ConfigError as e:
            print(f"focaltrack serve: configuration error: {e}", file=sys.stderr)
            return 2
        except (ServiceError, DriverError, OSError, ValueError) as e:
            print(f"focaltrack serve: could not start: {e}", file=sys.stderr)
            return 2
        # Wake up regularly so signals are handled promptly on every platform.
        while not svc.join(0.5):
            pass
        return svc.exit_code
    finally:
        if not svc.stopped:
            svc.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
