"""wsgi_reload's uWSGI adapter against uWSGI's own --py-autoreload 1, in one run.

    python benchmarks/reload_uwsgi.py [--edits 20] [--idle-seconds 30]

Same app (the test app plus 1,500 imported modules), --master --processes 2 --threads 2,
same client load (4 threads). Prints save-to-new-response latency (p50, p95), failed
requests during reloads and during a 5 s broken save, whether the server recovers after
the fix, and the idle CPU of the whole process tree. A second wsgi_reload row runs
single-threaded workers, where uWSGI itself can drop a connection during a reload.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _harness import measure, print_table
from servers import BIN, Server, server_env


def uwsgi(app: Path, port: int, *extra: str) -> Server:
    argv = [str(BIN / "uwsgi"), "--master", "--processes", "2", "--http-socket", f"127.0.0.1:{port}",
            "--module", "app:application", "--chdir", str(app), "--die-on-term", "--disable-logging", *extra]
    return Server(argv, port, app, app.parent / "server.log", server_env())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    rows = [
        measure("wsgi_reload, --threads 2", lambda a, p: uwsgi(a, p, "--threads", "2", "--import",
                                                                 "wsgi_reload.uwsgi"), args.edits, args.idle_seconds),
        measure("wsgi_reload, 1 thread", lambda a, p: uwsgi(a, p, "--import", "wsgi_reload.uwsgi"),
                args.edits, args.idle_seconds),
        measure("--py-autoreload 1", lambda a, p: uwsgi(a, p, "--threads", "2", "--py-autoreload", "1"),
                args.edits, args.idle_seconds),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
