"""The wsgi-reload command: run the pre-reload check, or watch files and signal any server safely."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from . import __version__
from ._check.check import check_code, compile_files, import_app
from ._core.files import is_glob
from ._core.gate import ActionFailed
from ._core.scanner import Change
from ._core.settings import BACKENDS, CHECK_MODES, Settings, SettingsError
from ._core.watcher import Watcher
from ._server.signals import Target, TargetError, from_pidfile

log = logging.getLogger("wsgi_reload.cli")


EXAMPLES = """examples:
  wsgi-reload check myapp:app
  wsgi-reload watch --pidfile /run/myapp.pid --app myapp:app src/ templates/
  wsgi-reload watch --pid 4242 --signal USR2 '**/*.py'
  wsgi-reload watch --touch /srv/myapp/app.wsgi --app myapp:app src/   # mod_wsgi, uWSGI --touch-reload

exit codes: 0 success (check: the app loads), 1 the app does not load or the target exited, 2 bad usage
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsgi-reload`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.command == "check":
        return _check(args, parser)
    return _watch(args, parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsgi-reload",
        description="Run the pre-reload check, or watch files and signal a server only when the new code loads.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wsgi-reload {__version__}")
    # -v and the import path are accepted before or after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug details")
    common.add_argument("--chdir", default=argparse.SUPPRESS,
                        help="directory to import the app from (default: the current one)")
    common.add_argument("--pythonpath", action="append", default=argparse.SUPPRESS, metavar="DIR",
                        help="a directory to import from ahead of everything else (repeatable). By default the "
                             "app's directory comes after the standard library and the installed packages, so "
                             "a file there cannot shadow them")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", parents=[common],
                                help="import an app the way a reload would; exit 0 if it loads, 1 if not, "
                                "2 for bad usage")
    check.add_argument("app", help="the entry point: MODULE:CALLABLE or FILE.py:CALLABLE")
    check.add_argument("--timeout", type=float, default=30.0, help="seconds the import may take (default 30)")
    check.add_argument("files", nargs="*", default=[], help="also compile these files first")

    watch = commands.add_parser("watch", parents=[common],
                                help="signal a process (or touch a file) when files change and the code still loads")
    target = watch.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="the process to signal")
    target.add_argument("--pidfile", help="a file holding the pid to signal, read again before each signal")
    target.add_argument("--touch", metavar="FILE",
                        help="a file to touch instead of signalling, for servers that reload when one is touched "
                             "(mod_wsgi's WSGI script in daemon mode, uWSGI's --touch-reload)")
    watch.add_argument("--signal", default="HUP", help="signal name or number (default HUP)")
    watch.add_argument("--app", help="MODULE:CALLABLE to import before each signal (default: compile only)")
    watch.add_argument("--check", choices=CHECK_MODES,
                       help="pre-signal check (default import with --app, else compile)")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    watch.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="file events (inotify on Linux, else watchfiles), polling, or auto: events when they work")
    watch.add_argument("--settle", type=float, default=Settings.settle, help="quiet seconds before a batch is reported")
    watch.add_argument("paths", nargs="+", help="files, directories or globs to watch")
    return parser


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        Settings.load({}, app=args.app, check_timeout=args.timeout)
    except SettingsError as exc:
        parser.exit(2, f"wsgi-reload: error: {exc}\n")
    cwd, sys_path = _import_path(args, parser)
    result = compile_files(args.files)
    if result.ok:
        result = import_app(args.app, timeout=args.timeout, cwd=cwd, sys_path=sys_path)
    if result.ok:
        sys.stdout.write(f"OK: {args.app} loads\n")
        return 0
    sys.stdout.write(f"ERROR: {result}\n")
    return 1


def _watch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    started = time.time_ns()  # a save after this, even before the first scan, counts
    try:
        signum = _signal_number(args.signal)
        missing = [p for p in args.paths if not is_glob(p) and not os.path.exists(p)]
        if missing:
            raise TargetError(f"no such file or directory: {', '.join(missing)}")
        held = Target(args.pid) if args.pid is not None else None
        if args.touch is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.touch))):
            raise TargetError(f"--touch {args.touch}: its directory does not exist")
        if args.pidfile is not None:
            from_pidfile(args.pidfile).close()  # refuse a bad pidfile now; it is read again before each signal
        check = args.check or ("import" if args.app else "compile")
        settings = Settings.load(extra_files=args.paths, check=check, app=args.app, interval=args.interval,
                                 backend=args.backend, settle=args.settle)
    except (TargetError, SettingsError) as exc:
        parser.exit(2, f"wsgi-reload: error: {exc}\n")

    cwd, sys_path = _import_path(args, parser)
    name = signal.Signals(signum).name

    def send(batch: Sequence[Change]) -> None:
        if args.touch is not None:
            try:
                _touch(args.touch)
            except OSError as exc:
                raise ActionFailed(f"cannot touch {args.touch}: {exc.strerror or exc}") from None
            log.info("wsgi_reload: touched %s", args.touch)
            return
        try:
            target = held if held is not None else from_pidfile(args.pidfile)
            try:
                target.send(signum)
            finally:
                if target is not held:
                    target.close()
        except TargetError as exc:
            raise ActionFailed(str(exc)) from None
        log.info("wsgi_reload: sent %s to %s", name, target.description)

    if args.touch is not None:
        what = f"by touching {args.touch}"
    else:
        what = f"{f'pid {args.pid}' if args.pid is not None else f'the pid in {args.pidfile}'} ({name})"
    watcher = Watcher(settings, send, server=what, modules_loaded_at_ns=started,
                      check=lambda paths: check_code(paths, settings, cwd=cwd, sys_path=sys_path))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    watcher.start()
    code = 0
    while not stop.wait(0.5):
        if held is not None and not held.alive():
            log.error("wsgi_reload: %s has exited; nothing left to signal, stopping", held.description)
            code = 1
            break
    watcher.stop()
    return code


def _touch(path: str) -> None:
    """Set the file's times to now, making it if it is not there (as ``touch`` does), and always
    to a later whole second than before: uWSGI's ``--touch-reload`` compares whole seconds and
    reloads only for a later one (``uwsgi_check_touches`` in core/utils.c of uWSGI 2.0.31), so
    two good saves within one second would otherwise reload once, before the second."""
    try:
        previous = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        return
    later = max(time.time_ns(), (previous // 1_000_000_000 + 1) * 1_000_000_000)
    os.utime(path, ns=(later, later))


def _import_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, list[str]]:
    """The directory and ``sys.path`` the check imports with: ``--pythonpath`` entries first, then
    this interpreter's own path (less the script's directory), then the app's directory, so a
    ``uuid.py`` planted there cannot stand in for the standard library's."""
    chdir = getattr(args, "chdir", None)
    if chdir and not os.path.isdir(chdir):
        parser.exit(2, f"wsgi-reload: error: --chdir {chdir}: no such directory\n")
    cwd = os.path.abspath(chdir) if chdir else os.getcwd()
    first = [os.path.abspath(p) for p in getattr(args, "pythonpath", [])]
    script_dir = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else None
    rest = [p for p in sys.path if p and os.path.abspath(p) not in (cwd, script_dir)]
    return cwd, [*first, *rest, cwd]


def _signal_number(name: str) -> int:
    if name.isdigit():
        return int(name)
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    try:
        return int(signal.Signals[key])
    except KeyError:
        raise TargetError(f"unknown signal {name!r}: use a name like HUP or USR2, or a number") from None


if __name__ == "__main__":
    sys.exit(main())
