"""Each server three ways, in one run on one machine: with wsgi_reload, with its own reloader, plain.

    python benchmarks/compare.py [--edits 20] [--idle-seconds 30] [--only gunicorn uwsgi django]
                                 [--backend events] [--write-docs]

- gunicorn: the test app plus ``--modules`` imported modules (1,500), ``-w 2`` sync workers; wsgi_reload as
  the README starts it (``-c configs/reload_config.py``), against ``--reload``.
- uWSGI: the same app, ``--master --processes 2 --threads 2``; ``--import wsgi_reload.uwsgi``
  against ``--py-autoreload 1``.
- Django: the example site under gunicorn ``-w 2``; ``"wsgi_reload.django"`` in
  ``INSTALLED_APPS`` (no gunicorn config) against gunicorn ``--reload`` without it.

Four client threads throughout. Per row: save-to-served p50/p95/p99 over ``--edits`` edits,
failed requests during good saves and during a 5 s broken save, whether the fix is served,
and the idle CPU of the whole process tree, also above the plain server's (the floor).
``--write-docs`` puts the tables into docs/benchmarks.md between the compare markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path

from _harness import Site, big_site, django_site, measure, measure_idle, table
from servers import BIN, HERE, Server, server_env

PAGE = HERE.parent / "docs" / "benchmarks.md"
START, END = "<!-- compare:start -->", "<!-- compare:end -->"

Starter = Callable[[Path, int], Server]


def gunicorn(*args: str, app: str = "app:app", **settings: str) -> Starter:
    def start(directory: Path, port: int) -> Server:
        argv = [str(BIN / "gunicorn"), *args, "-w", "2", "-b", f"127.0.0.1:{port}", "--no-control-socket",
                "--chdir", str(directory), app]
        return Server(argv, port, directory, directory.parent / "server.log", server_env(**settings))

    return start


def uwsgi(*args: str, **settings: str) -> Starter:
    def start(directory: Path, port: int) -> Server:
        argv = [str(BIN / "uwsgi"), "--master", "--processes", "2", "--threads", "2", "--http-socket",
                f"127.0.0.1:{port}", "--module", "app:application", "--chdir", str(directory), "--die-on-term",
                "--disable-logging", *args]
        return Server(argv, port, directory, directory.parent / "server.log", server_env(**settings))

    return start


def with_floor(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    floor = float(rows[-1]["idle CPU-s/min"])
    for row in rows:
        row["idle above plain"] = f"{float(row['idle CPU-s/min']) - floor:+.3f}"
    return rows


def run_server(name: str, args: argparse.Namespace) -> list[dict[str, str]]:
    config = str(HERE.parent / "configs" / "reload_config.py")
    ours = f"wsgi_reload ({args.backend})"
    backend = {"backend": args.backend}
    site: Callable[[], Site] = lambda: big_site(args.modules)  # noqa: E731
    if name == "gunicorn":
        cases = [(ours, gunicorn("-c", config, **backend)), ("gunicorn --reload", gunicorn("--reload"))]
        plain, expect = gunicorn(), "v1"
    elif name == "uwsgi":
        cases = [(ours, uwsgi("--import", "wsgi_reload.uwsgi", **backend)),
                 ("--py-autoreload 1", uwsgi("--py-autoreload", "1"))]
        plain, expect = uwsgi(), "v1"
    else:
        django = "mysite.wsgi:application"
        cases = [(ours, gunicorn(app=django, **backend)), ("gunicorn --reload", gunicorn("--reload", app=django))]
        plain, expect = gunicorn(app=django), "hello from the template\n"
    rows = []
    for label, start in cases:
        fresh = django_site(with_plugin=label == ours) if name == "django" else site()
        rows.append(measure(label, start, fresh, args.edits, args.idle_seconds, expect=expect))
        print(table(rows[-1:]), flush=True)
    plain_site = django_site(with_plugin=False) if name == "django" else site()
    rows.append(measure_idle("plain", plain, plain_site, args.idle_seconds, expect=expect))
    return with_floor(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--only", nargs="+", choices=["gunicorn", "uwsgi", "django"],
                        default=["gunicorn", "uwsgi", "django"])
    parser.add_argument("--backend", choices=["events", "poll"], default="events")
    parser.add_argument("--modules", type=int, default=1500, help="imported modules added to the gunicorn and "
                        "uWSGI app (0: the small test app)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    machine = (f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, Python "
               f"{sys.version.split()[0]}; {args.edits} edits; 4 client threads")
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:]).replace("--write-docs", "").strip()
    sections = [f"Measured by `{command.strip()}` on {machine}.\n"]
    for name in args.only:
        size = f"{args.modules:,}-module app" if args.modules else "small app"
        title = {"gunicorn": f"gunicorn, {size}", "uwsgi": f"uWSGI, {size}",
                 "django": "Django example site under gunicorn"}[name]
        sections.append(f"**{title}**\n\n{table(run_server(name, args))}\n")
    text = "\n".join(sections)
    print("\n" + text)
    if args.write_docs:
        readme = PAGE.read_text()
        block = f"{START}\n{text}{END}"
        if START not in readme:
            raise SystemExit(f"{PAGE} has no {START} ... {END} block to fill")
        PAGE.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S))


if __name__ == "__main__":
    main()
