"""A watcher process beside a busy worker.

A thread inside a worker that serves requests waits for the GIL after every ``os.stat``
(measured: a 1,000-file scan took over 10 s under load), so a worker that has to watch
hands the job to this small process instead. It watches the worker's manifest, checks
changed code and signals the server; its log lines go back to the worker on stdout,
and it exits when the worker closes its stdin (the worker exited).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

from .check import check_code, python_executable
from .manifest import ManifestReader
from .monitor import Monitor
from .reloader import Reloader
from .scanner import Change, Scanner
from .settings import Settings

log = logging.getLogger("wsgi_reload.sidecar")


class Sidecar:
    """The worker's handle on its watcher process."""

    def __init__(self, manifest_dir: str, settings: Settings, signal_pid: int, signal_name: str, server: str,
                 loaded_at_ns: int) -> None:
        sys_path = [p or os.getcwd() for p in sys.path]
        config = {
            "manifest_dir": manifest_dir,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()},
            "signal_pid": signal_pid,
            "signal": signal_name,
            "server": server,
            "loaded_at_ns": loaded_at_ns,
            "cwd": os.getcwd(),
            "sys_path": sys_path,
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(sys_path)
        self.process = subprocess.Popen(
            [python_executable(), "-c", "from wsgi_reload.sidecar import main; main()", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        threading.Thread(target=self._relay, args=(self.process.stdout,), name="wsgi_reload-sidecar-log",
                         daemon=True).start()

    def _relay(self, stream: IO[str] | None) -> None:
        """Log the sidecar's lines here, where the host server's log handler is."""
        if stream is None:
            return
        for line in stream:
            level, _, message = line.rstrip("\n").partition(" ")
            log.log(logging.getLevelName(level) if level.isupper() else logging.INFO, "%s", message)


def main() -> None:
    """Entry point of the sidecar process."""
    config: dict[str, Any] = json.loads(sys.argv[1])
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger("wsgi_reload")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False

    settings = Settings.load({}, **config["settings"])
    target = config["signal_pid"]
    signum = signal.Signals["SIG" + config["signal"]]

    def trigger(batch: Sequence[Change]) -> None:
        os.kill(target, signum)

    def check(paths: Sequence[str]) -> Any:
        return check_code(paths, settings, cwd=config["cwd"], sys_path=config["sys_path"])

    scanner = Scanner(settings, watch_modules=False, sources=[ManifestReader(config["manifest_dir"])],
                      modules_loaded_at_ns=config["loaded_at_ns"])
    reloader = Reloader(settings, trigger, server=config["server"], check=check)
    monitor = Monitor(scanner, reloader, wake_dirs=[config["manifest_dir"]], name="wsgi_reload-sidecar").start()
    sys.stdin.read()  # returns when the worker that started us exits
    monitor.stop(timeout=1)


if __name__ == "__main__":
    main()
