"""wsgi_reload's gunicorn adapter against gunicorn's own --reload, in one run.

    python benchmarks/reload_gunicorn.py [--edits 20] [--idle-seconds 30]

Same app (the test app plus 1,500 imported modules), same workers (-w 2, sync), same
client load (4 threads). Prints save-to-new-response latency (p50, p95), failed requests
during reloads and during a 5 s broken save, and the idle CPU of the whole process tree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _harness import measure, print_table
from servers import BIN, HERE, Server, server_env


def ours(app: Path, port: int) -> Server:
    argv = [str(BIN / "gunicorn"), "-c", str(HERE.parent / "configs" / "reload_config.py"), "-w", "2",
            "-b", f"127.0.0.1:{port}", "--no-control-socket", "app:app"]
    return Server(argv, port, app, app.parent / "server.log", server_env())


def gunicorn_reload(app: Path, port: int) -> Server:
    argv = [str(BIN / "gunicorn"), "--reload", "-w", "2", "-b", f"127.0.0.1:{port}", "--no-control-socket", "app:app"]
    return Server(argv, port, app, app.parent / "server.log", server_env())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    rows = [
        measure("wsgi_reload (poll)", ours, args.edits, args.idle_seconds),
        measure("gunicorn --reload", gunicorn_reload, args.edits, args.idle_seconds),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
