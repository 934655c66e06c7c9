"""How long a uWSGI reload leaves nobody answering: prefork against --lazy-apps, in one run.

    python benchmarks/uwsgi_window.py [--edits 10] [--modules 1500]

Without --lazy-apps the app is loaded by the master, so wsgi_reload reloads with uWSGI's
graceful reload (SIGHUP to the master): every worker finishes and exits, the master loads
the app again, then forks. Requests meanwhile wait in the listen backlog; the window is
the slowest request of each reload. With --lazy-apps wsgi_reload replaces the workers one
at a time, so the others keep answering. Same app (the test app plus ``--modules``
imported modules), --master --processes 2 --threads 2, 4 client threads. Printed, never
asserted.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import threading
import time
from pathlib import Path

from _harness import big_app, print_table
from servers import BIN, Server, free_port, get, greeting, server_env, wait_for_body, write


def uwsgi(app: Path, port: int, lazy: bool) -> Server:
    argv = [str(BIN / "uwsgi"), "--master", "--processes", "2", "--threads", "2", "--http-socket",
            f"127.0.0.1:{port}", "--module", "app:application", "--chdir", str(app), "--die-on-term",
            "--disable-logging", "--import", "wsgi_reload.uwsgi", *(["--lazy-apps"] if lazy else [])]
    return Server(argv, port, app, app.parent / "server.log", server_env())


class SlowestRequest:
    """Client threads that keep the slowest request (and the failures) since the last reset."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.slowest = 0.0
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, _ = get(self.port, timeout=30)
            except (OSError, http.client.HTTPException):
                status = 0
            with self._lock:
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.failed += status != 200

    def take(self) -> float:
        with self._lock:
            slowest, self.slowest = self.slowest, 0.0
            return slowest

    def __enter__(self) -> SlowestRequest:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(35)


def measure(name: str, lazy: bool, edits: int, modules: int) -> dict[str, str]:
    app = big_app(modules)
    port = free_port()
    server = uwsgi(app, port, lazy)
    try:
        server.start("v1", ready_timeout=120)
        time.sleep(3)
        windows, latencies = [], []
        with SlowestRequest(port) as load:
            time.sleep(1)
            baseline = load.take()
            for n in range(2, 2 + edits):
                load.take()
                write(app / "greeting.py", greeting(f"v{n}"))
                latencies.append(wait_for_body(port, f"v{n}", timeout=60))
                time.sleep(4)  # the whole reload (a chain replaces one worker after the other)
                windows.append(load.take())
            failed = load.failed
    finally:
        server.stop()
    return {"server": name, "slowest request, no reload s": f"{baseline:.3f}",
            "slowest request per reload p50 s": f"{statistics.median(windows):.3f}",
            "max s": f"{max(windows):.3f}", "save to served p50 s": f"{statistics.median(latencies):.2f}",
            "failed": str(failed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--modules", type=int, default=1500)
    args = parser.parse_args()
    print_table([measure("prefork (graceful reload)", False, args.edits, args.modules),
                 measure("--lazy-apps (chain)", True, args.edits, args.modules)])


if __name__ == "__main__":
    main()
