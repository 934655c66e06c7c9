"""Graceful code reloading for gunicorn, uWSGI and Django that never reloads into broken code.

The core is server-agnostic: :class:`Scanner` finds changed files, :func:`check_code`
proves the new code loads, :class:`ReloadGate` acts only on code that loads, and
:class:`Watcher` runs them in a thread for one server. The adapters
:mod:`wsgi_reload.gunicorn`, :mod:`wsgi_reload.uwsgi` and :mod:`wsgi_reload.django` turn a
good change into the server's own graceful reload.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._check.check import CheckResult, check_code, checking, compile_files, import_app
    from ._core.files import failed_imports
    from ._core.gate import ActionFailed, ReloadGate
    from ._core.monitor import Monitor
    from ._core.scanner import Change, Scanner, code_changed
    from ._core.settings import Settings, SettingsError
    from ._core.watcher import Watcher

__version__ = "0.1.0"

# Each public name is imported on first use: every worker imports this package (it is the parent
# of wsgi_reload.django and wsgi_reload.gunicorn) while it boots, and a worker needs none of the
# scanner, gate or watcher, which live in the watcher process. A new worker's boot is on the
# path from a save to the first request served with it.
_WHERE = {
    "CheckResult": "._check.check", "check_code": "._check.check", "checking": "._check.check",
    "compile_files": "._check.check", "import_app": "._check.check",
    "failed_imports": "._core.files",
    "ActionFailed": "._core.gate", "ReloadGate": "._core.gate",
    "Monitor": "._core.monitor",
    "Change": "._core.scanner", "Scanner": "._core.scanner", "code_changed": "._core.scanner",
    "Settings": "._core.settings", "SettingsError": "._core.settings",
    "Watcher": "._core.watcher",
}

__all__ = [
    "ActionFailed",
    "Change",
    "CheckResult",
    "Monitor",
    "ReloadGate",
    "Scanner",
    "Settings",
    "SettingsError",
    "Watcher",
    "__version__",
    "check_code",
    "checking",
    "code_changed",
    "compile_files",
    "failed_imports",
    "import_app",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
