"""Loads an application in a fresh interpreter and reports whether it loaded.

:mod:`wsgi_reload._check.check` runs this file's source with ``python -I -B -c``, so it must not
import ``wsgi_reload`` itself. The payload (JSON) arrives on standard input; records go out
as JSON lines on file descriptor 3: one ``start``/``end`` pair per user module imported, so
that a crash, an ``os._exit`` or a hang still tells which file was loading, then one
``result`` record.
"""

from __future__ import annotations

import ast
import ctypes
import errno
import importlib
import importlib.abc
import importlib.util
import io
import json
import os
import runpy
import signal
import socket
import sys
import traceback
from typing import Any

RESULT_FD = 3


def _emit(record: dict[str, Any]) -> None:
    data = (json.dumps(record) + "\n").encode()
    while data:
        data = data[os.write(RESULT_FD, data):]


LIBRARY_DIRS: tuple[str, ...] = ()
"""What is not the project's code: ``wsgi_reload._core.files.library_dirs()``, sent in the payload."""


def is_user_file(path: str | None) -> bool:
    """A file of the project's own, not the standard library's or an installed package's."""
    if not path or path.startswith("<"):
        return False
    return not os.path.abspath(path).startswith(LIBRARY_DIRS)


class _ImportTracer(importlib.abc.MetaPathFinder):
    """Reports the start and end of every user module's execution."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader: Any = spec.loader
        origin = spec.origin
        if origin is not None and is_user_file(origin) and hasattr(loader, "exec_module"):
            run = loader.exec_module
            origin = os.path.abspath(origin)

            def exec_module(module: Any) -> None:
                _emit({"event": "start", "file": origin})
                run(module)
                _emit({"event": "end", "file": origin})

            loader.exec_module = exec_module  # each spec has a loader object of its own
        return spec


class Located(Exception):
    """An error the probe found itself, with the file (and line) to blame and a kind to report."""

    def __init__(self, kind: str, message: str, file: str | None, line: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.file = file
        self.line = line


def AppNotFound(message: str, file: str | None) -> Located:  # noqa: N802 - reads as the error it makes
    """The app spec names something that does not exist."""
    return Located("AppNotFound", message, file)


def load_application(target: str) -> object:
    """Import ``module:callable`` (or ``path.py[:callable]``) the way WSGI servers do and return the app."""
    if ":" in target and not target.endswith(":"):
        where, expr = target.split(":", 1)
    else:
        where, expr = target.rstrip(":"), "application"
    if os.sep in where or (where.endswith((".py", ".wsgi")) and os.path.isfile(where)):
        namespace = runpy.run_path(where, run_name="wsgi_reload_probe")
        app = namespace.get(expr)
        if app is None:
            raise AppNotFound(f"{where} defines no {expr!r} (the app is {target})", os.path.abspath(where))
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            if exc.name and (where == exc.name or where.startswith(exc.name + ".")):
                raise AppNotFound(f"No module named {exc.name!r} (the app is {target}); check the module "
                                  "name and the directory the server starts in", None) from None
            raise
        file = getattr(module, "__file__", None)
        node = ast.parse(expr, mode="eval").body
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            factory = _attribute(module, node.func.id, target, file)
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {str(k.arg): ast.literal_eval(k.value) for k in node.keywords}
            app = factory(*args, **kwargs)
        else:
            app = module
            for part in expr.split("."):
                app = _attribute(app, part, target, file)
    if not callable(app):
        raise AppNotFound(f"{target} is not callable", None)
    load_django_urls()
    return app


def ask_ready(app: Any, target: str) -> None:
    """GET ``target`` from the app in-process, as a server would; anything but 2xx or 3xx, or an
    exception, means the new code does not serve. Shared with the gunicorn workers' own call."""
    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "HTTP_HOST": "127.0.0.1", "REMOTE_ADDR": "127.0.0.1", "wsgi.version": (1, 0),
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
               "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False}
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    body = app(environ, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    status = statuses[-1] if statuses else "no status"
    if status[:1] not in ("2", "3"):
        raise Located("NotReady", f"GET {target} answered {status} (the ready_path setting)", None)


def _attribute(obj: object, name: str, target: str, file: str | None) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise AppNotFound(f"{getattr(obj, '__name__', obj)!s} has no attribute {name!r} (the app is {target})",
                          file) from None


def load_django_urls() -> None:
    """Django imports views lazily from the URLconf: import it now so a broken view shows."""
    if "django.conf" not in sys.modules:
        return
    from django.conf import settings

    if not settings.configured or not getattr(settings, "ROOT_URLCONF", None):
        return  # a site that configured itself without a URLconf (settings.configure()) has none to load
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - importing the URLconf is the point


def module_name(path: str) -> str | None:
    """The dotted name ``path`` imports as from ``sys.path`` (the longest entry that holds it)."""
    path = os.path.abspath(path)
    for entry in sorted((os.path.abspath(p) for p in sys.path if p), key=len, reverse=True):
        if not path.startswith(entry.rstrip(os.sep) + os.sep) or not path.endswith(".py"):
            continue
        parts = path[len(entry.rstrip(os.sep)) + 1:-3].split(os.sep)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and all(part.isidentifier() for part in parts):
            return ".".join(parts)
    return None


def check_django_files(paths: list[str]) -> None:
    """Compile changed templates with the engine that owns them, and parse changed ``.mo`` files.

    A template that does not compile fails only when a request renders it, and a broken
    catalog when a translation is activated: neither shows in an import.
    """
    if "django.conf" not in sys.modules:
        return
    from django.conf import settings

    if not settings.configured:
        return
    from django.template import engines

    for path in paths:
        if not os.path.isfile(path) and _generation_bytes(path) is None:
            continue
        if path.endswith(".mo"):
            import gettext

            catalog = _generation_bytes(path)
            try:
                if catalog is None:
                    with open(path, "rb") as f:
                        catalog = f.read()
                gettext.GNUTranslations(io.BytesIO(catalog))
            except Exception as exc:
                raise Located(type(exc).__name__, f"{exc} (a compiled translation catalog)", path) from None
            continue
        owners = [engine for engine in engines.all()
                  if any(os.path.abspath(path).startswith(os.path.abspath(d).rstrip(os.sep) + os.sep)
                         for d in engine.template_dirs)]
        if not owners:
            continue
        source = _generation_bytes(path)
        if source is None:
            with open(path, "rb") as f:
                source = f.read()
        text = source.decode("utf-8", errors="replace")
        for engine in owners:
            try:
                engine.from_string(text)
            except Exception as exc:
                debug = getattr(exc, "template_debug", None) or {}
                raise Located(type(exc).__name__, f"{exc} (template engine {engine.name!r})", path,
                              debug.get("line")) from None


def _generation_bytes(path: str) -> bytes | None:
    """The bytes of ``path`` in the generation being checked, if it has them."""
    module: Any = sys.modules.get(FINDER_MODULE)
    finder = None if module is None else module.installed()
    if finder is None:
        return None
    digest = finder.files.get(os.path.abspath(path))
    return None if digest is None else bytes(module.read_object(finder.store, digest, os.path.abspath(path)))


def import_changed_modules(paths: list[str]) -> None:
    """Import the changed modules a worker had loaded that the app import did not reach.

    Views and helpers imported inside a function load lazily, on the request that needs
    them: without this, a broken one would pass the check and fail in the new workers.
    """
    loaded = {os.path.abspath(f) for f in (getattr(m, "__file__", None) for m in list(sys.modules.values())) if f}
    for path in paths:
        if os.path.abspath(path) in loaded:
            continue
        name = module_name(path)
        if name is not None and name not in sys.modules:
            importlib.import_module(name)


def where_it_would_be(name: str) -> list[str]:
    """The files whose appearance would make ``import name`` work: ``name.py`` and
    ``name/__init__.py`` under each project directory on ``sys.path`` (or under its package)."""
    package, _, leaf = name.rpartition(".")
    if package and package in sys.modules:
        dirs = list(getattr(sys.modules[package], "__path__", []))
    else:
        dirs = [p for p in sys.path if p and os.path.isdir(p) and is_user_file(os.path.join(p, "x.py"))]
        leaf = name.replace(".", os.sep)
    return [os.path.join(os.path.abspath(d), leaf + suffix) for d in dirs for suffix in (".py", os.sep + "__init__.py")]


def _location(exc: BaseException) -> tuple[str | None, int | None, str]:
    """The user's file and line to blame: a SyntaxError's own, else the innermost frame of the user's."""
    if isinstance(exc, Located):
        return exc.file, exc.line, str(exc)
    if isinstance(exc, SyntaxError) and exc.filename:
        return os.path.abspath(exc.filename), exc.lineno, exc.msg
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename and not f.filename.startswith("<")]
    for frame in reversed(frames):
        if is_user_file(frame.filename):
            return os.path.abspath(frame.filename), frame.lineno, str(exc)
    return None, None, str(exc)


FINDER_MODULE = "_wsgi_reload_genimport"


def load_finder(path: str) -> Any:
    """The generation finder (``genimport.py``, loaded by its path), once per process: a warm check
    process loads it before it forks, so that no check compiles it and its imports again."""
    module = sys.modules.get(FINDER_MODULE)
    if module is not None and getattr(module, "__file__", None) == path:
        return module
    spec = importlib.util.spec_from_file_location(FINDER_MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look a module up by name
    spec.loader.exec_module(module)
    return module


def install_generation(generation: dict[str, Any]) -> None:
    """Import the project's files from the generation being checked, as the workers will."""
    load_finder(generation["finder"]).install(generation["store"], generation["id"], generation["files"])


PR_SET_CHILD_SUBREAPER = 36
"""prctl(2): orphaned descendants are re-parented to this process instead of to init."""


def _become_subreaper() -> None:
    """Make every process the app starts, a ``setsid()`` daemon that left our process group
    included, come back to this process when its parent exits, so that it can be killed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the check's process group is still killed


def _children() -> list[int]:
    # spawn.descendants' twin for one level: this file is loaded by path and imports no wsgi_reload.
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{os.getpid()}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children", "rb") as f:
                found.extend(int(pid) for pid in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def _kill_leftovers(rounds: int = 20) -> None:
    """Kill what the app left running. Each child killed hands its own children to us (we are
    their subreaper), so go round until none is left."""
    for _ in range(rounds):
        children = _children()
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


def listening_inodes(port: int | None = None, *, pid: int | str = "self", unix: bool = False) -> set[str]:
    """The inodes of the sockets listening in the network namespace of ``pid`` (Linux): TCP ones
    on ``port`` (on any port: None), and with ``unix`` listening Unix sockets as well. A table
    that cannot be read (tcp6 with IPv6 off) is skipped."""
    found = set()
    for table in ("tcp", "tcp6", "unix") if unix else ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if table == "unix":  # Num RefCount Protocol Flags Type St Inode: __SO_ACCEPTCON
                        if len(fields) > 6 and int(fields[3], 16) & 0x10000:
                            found.add(fields[6])
                    elif len(fields) > 9 and fields[3] == "0A" and (  # TCP_LISTEN
                            port is None or int(fields[1].rsplit(":", 1)[1], 16) == port):
                        found.add(fields[9])
        except (OSError, ValueError):
            continue
    return found


def socket_fds(pid: int) -> dict[str, int]:
    """The socket descriptors of process ``pid``, by socket inode (Linux). Raises OSError when
    its descriptors cannot be listed (gone, not ours to read, or not Linux)."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed since the listing
        if link.startswith("socket:["):
            found[link[8:-1]] = int(name)
    return found


def listener_fds(pid: int, port: int) -> list[int]:
    """The descriptors of process ``pid`` that are sockets listening on TCP ``port`` (Linux)."""
    try:
        sockets = socket_fds(pid)
    except OSError:
        return []
    inodes = listening_inodes(port)
    return sorted(fd for inode, fd in sockets.items() if inode in inodes)


def _bind_aside_of(server_pid: int) -> None:
    """A port the running server already holds (a metrics port its ``--preload`` master opened at
    import) makes the app's bind fail here with EADDRINUSE, though no worker binds it again: in
    the check, such a bind takes a free port of the same address, with one note on stderr."""
    bind = socket.socket.bind

    def bind_aside(self: socket.socket, address: Any) -> None:
        try:
            bind(self, address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not isinstance(address, tuple) or len(address) < 2 \
                    or not listener_fds(server_pid, int(address[1])):
                raise
            sys.stderr.write(f"wsgi_reload check: {address[0]}:{address[1]} is the running server's; bound a free "
                             "port instead\n")
            bind(self, (address[0], 0, *address[2:]))

    socket.socket.bind = bind_aside  # type: ignore[method-assign,assignment]


def main() -> None:
    global LIBRARY_DIRS
    _become_subreaper()
    payload = json.loads(sys.stdin.read())
    if payload.get("server_pid"):
        _bind_aside_of(int(payload["server_pid"]))
    LIBRARY_DIRS = tuple(payload["library_dirs"])
    os.chdir(payload["cwd"])
    sys.path[:] = payload["sys_path"]
    if payload.get("generation"):
        install_generation(payload["generation"])
    sys.meta_path.insert(0, _ImportTracer())
    try:
        app = load_application(payload["app"])
        if payload.get("ready_path"):
            ask_ready(app, payload["ready_path"])
        import_changed_modules(payload.get("modules", ()))
        check_django_files(payload.get("files", ()))
        result: dict[str, object] = {"ok": True}
    except BaseException as exc:  # SystemExit from an app counts as a failure to load too
        path, line, message = _location(exc)
        result = {
            "ok": False,
            "type": exc.kind if isinstance(exc, Located) else type(exc).__name__,
            "message": message if len(message) <= 1000 else message[:1000] + "...",
            "file": path,
            "line": line,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-20000:],
            "watch_for": where_it_would_be(exc.name) if isinstance(exc, ModuleNotFoundError) and exc.name else [],
        }
    _emit({"event": "result", "result": result})
    _kill_leftovers()
    # Skip atexit handlers and thread joins the app may have started.
    os._exit(0)


if __name__ == "__main__":
    main()
