"""Graceful code reloading for gunicorn, uWSGI and Django that never reloads into broken code.

The core is server-agnostic: :class:`Scanner` finds changed files, :func:`check_code`
proves the new code loads, :class:`ReloadGate` acts only on code that loads, and
:class:`Watcher` runs them in a thread for one server. The adapters
:mod:`wsgi_reload.gunicorn`, :mod:`wsgi_reload.uwsgi` and :mod:`wsgi_reload.django` turn a
good change into the server's own graceful reload.
"""

from ._check.check import CheckResult, check_code, checking, compile_files, import_app
from ._core.files import failed_imports
from ._core.gate import ActionFailed, ReloadGate
from ._core.monitor import Monitor
from ._core.scanner import Change, Scanner, code_changed
from ._core.settings import Settings, SettingsError
from ._core.watcher import Watcher

__version__ = "0.1.0"

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
