"""Each server three ways, in one run on one machine: with wsgi_reload, with its own reloader, plain.

    python benchmarks/compare.py [--edits 20] [--idle-seconds 30] [--only gunicorn uwsgi django]
                                 [--backend events] [--write-docs]

- gunicorn: the test app plus ``--modules`` imported modules (1,500), ``-w 2`` sync workers; wsgi_reload as
  the README starts it (``-c configs/reload_config.py``), against ``--reload``.
- uWSGI: the same app, ``--master --processes 2 --threads 2``; ``--import wsgi_reload.uwsgi``
  against ``--py-autoreload 1``.
- Django: the example site under gunicorn ``-w 2``; ``"wsgi_reload.django"`` in
  ``INSTALLED_APPS`` (no gunicorn config) against gunicorn ``--reload`` without it.

Each with the setups users have as well: uWSGI logging every request into a file in the app's
directory, and the Django view writing to ``db.sqlite3`` in ``BASE_DIR`` on every request.

Four client threads throughout. Per row: save-to-served p50/p95/p99 over ``--edits`` edits,
failed requests during good saves and during a 5 s broken save, whether the fix is served,
and the idle CPU of the whole process tree, also above the plain server's (the floor). Our
rows also give the resident memory of a worker, the watcher process and the warm check
process, and a second table says where the time went (``_harness.Timeline``): when, after
the save, the watcher saw the change, the check passed, the first new worker started, it was
ready to serve, the new body was served, and every new worker served.
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

from _harness import STAGES, Site, big_site, django_site, measure, measure_idle, table
from servers import BIN, HERE, Server, server_env

PAGE = HERE.parent / "docs" / "benchmarks.md"
START, END = "<!-- compare:start -->", "<!-- compare:end -->"

Starter = Callable[[Path, int], Server]

OURS = "wsgi_reload"
LOGGED = ", request log in the app dir"
WRITES = ", db.sqlite3 written per request"


def gunicorn(*args: str, app: str = "app:app", **settings: str) -> Starter:
    def start(directory: Path, port: int) -> Server:
        argv = [str(BIN / "gunicorn"), *args, "-w", "2", "-b", f"127.0.0.1:{port}", "--no-control-socket",
                "--chdir", str(directory), app]
        return Server(argv, port, directory, directory.parent / "server.log", server_env(**settings))

    return start


def uwsgi(*args: str, log_in_app: bool = False, **settings: str) -> Starter:
    """``log_in_app``: uWSGI logs every request into a file in the app's directory (``--logto``),
    as a site that keeps its logs beside the code does; otherwise request logging is off."""

    def start(directory: Path, port: int) -> Server:
        logging = ["--logto", str(directory / "uwsgi.log")] if log_in_app else ["--disable-logging"]
        argv = [str(BIN / "uwsgi"), "--master", "--processes", "2", "--threads", "2", "--http-socket",
                f"127.0.0.1:{port}", "--module", "app:application", "--chdir", str(directory), "--die-on-term",
                *logging, *args]
        # With the request log in the app directory uWSGI's whole log goes there, the watcher's
        # lines too: that file is the server's log.
        log = directory / "uwsgi.log" if log_in_app else directory.parent / "server.log"
        return Server(argv, port, directory, log, server_env(**settings))

    return start


def with_floor(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    floor = float(rows[-1]["idle CPU-s/min"])
    for row in rows:
        row["idle above plain"] = f"{float(row['idle CPU-s/min']) - floor:+.3f}"
    return rows


def run_server(name: str, args: argparse.Namespace, modules: int) -> list[dict[str, str]]:
    config = str(HERE.parent / "configs" / "reload_config.py")
    ours = OURS
    backend = {"backend": args.backend}
    site: Callable[[], Site] = lambda: big_site(modules)  # noqa: E731
    logged, writes = LOGGED, WRITES
    # (label, server, site, ours)
    cases: list[tuple[str, Starter, Callable[[], Site], bool]]
    if name == "gunicorn":
        cases = [(ours, gunicorn("-c", config, **backend), site, True),
                 ("gunicorn --reload", gunicorn("--reload"), site, False)]
        plain, plain_site, expect = gunicorn(), site, "v1"
    elif name == "uwsgi":
        cases = [(ours, uwsgi("--import", "wsgi_reload.uwsgi", **backend), site, True),
                 ("--py-autoreload 1", uwsgi("--py-autoreload", "1"), site, False),
                 (ours + logged, uwsgi("--import", "wsgi_reload.uwsgi", log_in_app=True, **backend), site, True),
                 ("--py-autoreload 1" + logged, uwsgi("--py-autoreload", "1", log_in_app=True), site, False)]
        plain, plain_site, expect = uwsgi(), site, "v1"
    else:
        django = "mysite.wsgi:application"
        cases = [(ours, gunicorn(app=django, **backend), lambda: django_site(with_plugin=True), True),
                 ("gunicorn --reload", gunicorn("--reload", app=django), lambda: django_site(with_plugin=False), False),
                 (ours + writes, gunicorn(app=django, **backend),
                  lambda: django_site(with_plugin=True, writes=True), True),
                 ("gunicorn --reload" + writes, gunicorn("--reload", app=django),
                  lambda: django_site(with_plugin=False, writes=True), False)]
        plain, plain_site, expect = gunicorn(app=django), lambda: django_site(with_plugin=False), \
            "hello from the template\n"
    rows = []
    for label, start, make_site, is_ours in cases:
        rows.append(measure(label, start, make_site(), args.edits, args.idle_seconds, expect=expect, ours=is_ours))
        print(section_tables(rows[-1:]), flush=True)
    rows.append(measure_idle("plain", plain, plain_site(), args.idle_seconds, expect=expect))
    return with_floor(rows)


STAGE_COLUMNS = ["reloads seen", *STAGES]


def section_tables(rows: list[dict[str, str]]) -> str:
    """The section's table, then where our reloads spent their time."""
    main = [{k: v for k, v in row.items() if k not in STAGE_COLUMNS} for row in rows]
    stages = [{k: row[k] for k in ["server", *STAGE_COLUMNS]} for row in rows if "reloads seen" in row]
    if not stages:
        return table(main)
    return f"{table(main)}\n\nWhere the time goes (seconds after the save, p50 of each moment):\n\n{table(stages)}"


def p50(rows: list[dict[str, str]], label: str) -> float | None:
    for row in rows:
        if row["server"] == label and row.get("save to served p50 s", "-") != "-":
            return float(row["save to served p50 s"])
    return None


def goals(results: dict[str, list[dict[str, str]]]) -> str:
    """The goals of docs/benchmarks.md, each against what this run measured."""
    lines = ["| goal | measured | met |", "|---|---|---|"]

    def goal(text: str, section: str, label: str, limit: float | None, peer: str | None = None,
             ratio: float | None = None) -> None:
        rows = results.get(section)
        ours = None if rows is None else p50(rows, label)
        theirs = None if rows is None or peer is None else p50(rows, peer)
        if ours is None:
            return
        met = limit is None or ours <= limit
        measured = f"{ours:.2f} s"
        if theirs is not None:
            measured += f", {ours / theirs:.2f}x {peer.split(',')[0]} ({theirs:.2f} s)"
            met = met and ours <= (ratio if ratio is not None else 1.0) * theirs
        lines.append(f"| {text} | {measured} | {'yes' if met else '**no**'} |")

    goal("gunicorn, small app: p50 at most 0.10 s", "gunicorn, small app", OURS, 0.10)
    for section in results:
        if section.startswith("gunicorn, ") and section != "gunicorn, small app":
            goal(f"{section}: at most 0.85x gunicorn --reload", section, OURS, None, "gunicorn --reload", 0.85)
    goal("uWSGI, small app, request log in the app dir: p50 at most 0.5 s and below --py-autoreload",
         "uWSGI, small app", OURS + LOGGED, 0.5, "--py-autoreload 1" + LOGGED)
    goal("Django example site under gunicorn: p50 at most 0.3 s and below --reload",
         "Django example site under gunicorn", OURS, 0.3, "gunicorn --reload")
    goal("the same, db.sqlite3 written per request: p50 at most 0.3 s and below --reload",
         "Django example site under gunicorn", OURS + WRITES, 0.3, "gunicorn --reload" + WRITES)
    for section, rows in results.items():
        for row in rows:
            if row["server"].startswith(OURS) and "idle above plain" in row:
                above = float(row["idle above plain"])
                lines.append(f"| {section}, {row['server']}: idle CPU above plain +0.000 | {above:+.3f} CPU-s/min | "
                             f"{'yes' if above <= 0.005 else '**no**'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--only", nargs="+", choices=["gunicorn", "uwsgi", "django"],
                        default=["gunicorn", "uwsgi", "django"])
    parser.add_argument("--backend", choices=["events", "poll"], default="events")
    parser.add_argument("--modules", type=int, nargs="+", default=[0, 1500],
                        help="gunicorn: one section per size, imported modules added to the app (0: the small test "
                        "app); uWSGI runs the first size")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    machine = (f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, Python "
               f"{sys.version.split()[0]}; {args.edits} edits; 4 client threads")
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:]).replace("--write-docs", "").strip()
    sections = [f"Measured by `{command.strip()}` on {machine}.\n"]
    results: dict[str, list[dict[str, str]]] = {}
    for name in args.only:
        sizes = {"gunicorn": args.modules, "uwsgi": args.modules[:1], "django": [0]}[name]
        for modules in sizes:
            size = f"{modules:,}-module app" if modules else "small app"
            title = {"gunicorn": f"gunicorn, {size}", "uwsgi": f"uWSGI, {size}",
                     "django": "Django example site under gunicorn"}[name]
            results[title] = run_server(name, args, modules)
            sections.append(f"**{title}**\n\n{section_tables(results[title])}\n")
    sections.append(f"**Goals**\n\n{goals(results)}")
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
