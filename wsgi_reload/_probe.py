"""Loads an application in a fresh interpreter and reports whether it loaded.

:mod:`wsgi_reload.check` runs this file's source with ``python -B -c``, so it must not import
``wsgi_reload`` itself: the child's ``sys.path`` is the parent's, set from the payload
on standard input, and the result goes back as one JSON object on a pipe.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import runpy
import sys
import traceback


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
            raise LookupError(f"{where} defines no {expr!r}")
    else:
        module = importlib.import_module(where)
        node = ast.parse(expr, mode="eval").body
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            factory = getattr(module, node.func.id)
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {str(k.arg): ast.literal_eval(k.value) for k in node.keywords}
            app = factory(*args, **kwargs)
        else:
            app = module
            for part in expr.split("."):
                app = getattr(app, part)
    if not callable(app):
        raise TypeError(f"{target} is not callable")
    _load_django_urls()
    return app


def _load_django_urls() -> None:
    """Django imports views lazily from the URLconf: import it now so a broken view shows."""
    if "django.conf" not in sys.modules:
        return
    from django.conf import settings

    if not settings.configured:
        return
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - importing the URLconf is the point


def _location(exc: BaseException) -> tuple[str | None, int | None, str]:
    if isinstance(exc, SyntaxError) and exc.filename:
        return os.path.abspath(exc.filename), exc.lineno, exc.msg
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename and not frame.filename.startswith("<"):
            return os.path.abspath(frame.filename), frame.lineno, str(exc)
    return None, None, str(exc)


def main() -> None:
    payload = json.loads(sys.stdin.read())
    sys.path[:] = payload["sys_path"]
    result_fd = payload["result_fd"]
    try:
        load_application(payload["app"])
        result: dict[str, object] = {"ok": True}
    except BaseException as exc:  # SystemExit from an app counts as a failure to load too
        path, line, message = _location(exc)
        result = {
            "ok": False,
            "type": type(exc).__name__,
            "message": message,
            "file": path,
            "line": line,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
    with os.fdopen(result_fd, "w", encoding="utf-8") as out:
        json.dump(result, out)
    sys.stdout.flush()
    # Skip atexit handlers and thread joins the app may have started.
    os._exit(0)


if __name__ == "__main__":
    main()
