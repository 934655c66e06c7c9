"""``wsgi-reload``: run the pre-reload check, or watch files and signal any server safely."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from .check import check_code, compile_files, import_app
from .files import is_glob
from .monitor import Monitor
from .reloader import Reloader
from .scanner import Change, Scanner
from .settings import BACKENDS, CHECK_MODES, Settings, SettingsError

log = logging.getLogger("wsgi_reload.cli")


class TargetError(Exception):
    """The process to signal cannot be used; the message says why and what to do."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsgi-reload`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[wsgi-reload] %(levelname)s %(message)s", stream=sys.stderr)
    if args.command == "check":
        return _check(args)
    return _watch(args, parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsgi-reload", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="import an app the way a reload would; exit 0 if it loads, 1 if not")
    check.add_argument("app", help="the entry point, MODULE:CALLABLE")
    check.add_argument("--timeout", type=float, default=30.0, help="seconds the import may take (default 30)")
    check.add_argument("--chdir", help="directory to import from (default: the current one)")
    check.add_argument("files", nargs="*", help="also compile these files first")

    watch = commands.add_parser("watch", help="signal a process when files change and the code still loads")
    target = watch.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="the process to signal")
    target.add_argument("--pidfile", help="a file holding the pid to signal, read again before each signal")
    watch.add_argument("--signal", default="HUP", help="signal name or number (default HUP)")
    watch.add_argument("--app", help="MODULE:CALLABLE to import before each signal (default: compile only)")
    watch.add_argument("--check", choices=CHECK_MODES,
                       help="pre-signal check (default import with --app, else compile)")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    watch.add_argument("--backend", choices=BACKENDS, default="auto")
    watch.add_argument("--settle", type=float, default=0.1, help="quiet seconds before a batch is reported")
    watch.add_argument("paths", nargs="+", help="files, directories or globs to watch")
    return parser


def _check(args: argparse.Namespace) -> int:
    cwd = os.path.abspath(args.chdir) if args.chdir else os.getcwd()
    sys_path = [cwd] + [p for p in sys.path if p]
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
        pid = _resolve_pid(args.pid, args.pidfile)
        check = args.check or ("import" if args.app else "compile")
        settings = Settings.load(extra_files=args.paths, check=check, app=args.app, interval=args.interval,
                                 backend=args.backend, settle=args.settle)
    except (TargetError, SettingsError) as exc:
        parser.exit(2, f"wsgi-reload: error: {exc}\n")

    cwd = os.getcwd()
    sys_path = [cwd] + [p for p in sys.path if p]

    def send(batch: Sequence[Change]) -> None:
        try:
            target = _resolve_pid(args.pid, args.pidfile)
        except TargetError as exc:
            log.error("wsgi_reload: not signalling: %s", exc)
            return
        os.kill(target, signum)
        log.info("wsgi_reload: sent %s to pid %d", signal.Signals(signum).name, target)

    reloader = Reloader(settings, send, server=f"pid {pid}",
                        check=lambda paths: check_code(paths, settings, cwd=cwd, sys_path=sys_path))
    monitor = Monitor(Scanner(settings, watch_modules=False, modules_loaded_at_ns=started), reloader)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    monitor.start()
    log.info("wsgi_reload: watching %s for pid %d (%s check)", ", ".join(args.paths), pid, check)
    stop.wait()
    monitor.stop()
    return 0


def _signal_number(name: str) -> int:
    if name.isdigit():
        return int(name)
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    try:
        return int(signal.Signals[key])
    except KeyError:
        raise TargetError(f"unknown signal {name!r}: use a name like HUP or USR2, or a number") from None


def _resolve_pid(pid: int | None, pidfile: str | None) -> int:
    """The pid to signal, refusing anything but a live process of this user."""
    if pidfile is not None:
        try:
            with open(pidfile, encoding="ascii") as f:
                text = f.read().strip()
        except OSError as exc:
            raise TargetError(f"cannot read pidfile {pidfile}: {exc.strerror}; is the server running?") from None
        if not text.isdigit():
            raise TargetError(f"pidfile {pidfile} holds {text[:20]!r}, not a pid")
        pid = int(text)
        source = f"pid {pid} from {pidfile}"
    else:
        source = f"pid {pid}"
    assert pid is not None
    if pid <= 1:
        raise TargetError(f"refusing to signal {source}: not a server process")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        stale = " (stale pidfile)" if pidfile else ""
        raise TargetError(f"{source} is not running{stale}") from None
    except PermissionError:
        raise TargetError(f"{source} belongs to another user; run wsgi-reload as that user") from None
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        owner = os.geteuid()
    if owner != os.geteuid():
        raise TargetError(f"{source} belongs to another user; run wsgi-reload as that user")
    if _is_zombie(pid):
        raise TargetError(f"{source} has exited (stale pidfile)" if pidfile else f"{source} has exited")
    return pid


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    sys.exit(main())
