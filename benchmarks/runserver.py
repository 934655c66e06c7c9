"""``manage.py runserver`` with wsgi_reload against Django's own reloader, under load, in one run.

    python benchmarks/runserver.py [--edits 10]

The example site, copied fresh for each, served by runserver (with its autoreloader) while 4
client threads request its page; each edit changes the view's greeting. Prints save to served
(p50, p95), the requests that failed during the good saves and during a 5 s broken save, and
whether the fix is served.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _harness import django_site, measure, print_table
from servers import Server, server_env


def runserver(app: Path, port: int) -> Server:
    argv = [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}"]
    return Server(argv, port, app, app.parent / "server.log", server_env())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for name, plugin in (("runserver + wsgi_reload", True), ("runserver (Django's reloader)", False)):
        site = django_site(with_plugin=plugin)
        rows.append(measure(name, runserver, site, args.edits, idle_seconds=1.0,
                            expect="hello from the template\n"))
    print_table(rows)


if __name__ == "__main__":
    main()
