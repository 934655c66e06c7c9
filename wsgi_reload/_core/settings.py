"""One settings object for every adapter, read from keyword arguments and ``WSGI_RELOAD_*``."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .files import is_glob

ENV_PREFIX = "WSGI_RELOAD_"

BACKENDS = ("auto", "poll", "events")
CHECK_MODES = ("import", "compile", "off")
MODES = ("restart", "patch")


class SettingsError(ValueError):
    """A setting is unknown or has a value that cannot be used.

    The message is one line that names the setting and says what it accepts.
    """


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to watch, how to watch it, and how to check the code before a reload."""

    interval: float = 1.0
    """Seconds between two polls with the polling backend, and between two tries of a reload that
    could not be sent. The event backend's safety rescan has its own period (300 s with inotify,
    20 s with watchfiles)."""
    backend: str = "auto"
    """``auto`` (events when they work, else polling), ``poll`` or ``events``."""
    extra_files: tuple[str, ...] = ()
    """Extra files, directories or globs to watch besides the imported modules."""
    include: tuple[str, ...] = ()
    """Path prefixes or globs that are always watched, even where an exclude matches."""
    exclude: tuple[str, ...] = ()
    """Path prefixes or globs never watched, on top of the default excludes."""
    check: str = "import"
    """Pre-reload check: ``import`` (compile, then import the app in a subprocess), ``compile`` or ``off``."""
    check_timeout: float = 30.0
    """Seconds the import check may take before it counts as failed."""
    settle: float = 0.05
    """Seconds the files must be quiet before a batch of changes acts (with inotify: no event
    for a watched file for that long, which every write to one resets). A watcher's check
    runs meanwhile; a ``Monitor`` of its own reports the batch then."""
    app: str | None = None
    """The entry point the import check loads (``module:callable``); adapters fill it in."""
    mode: str = "restart"
    """gunicorn: ``restart`` (graceful reload) or ``patch`` (swap function bodies in the workers when
    only bodies changed, else reload)."""
    spare: bool = True
    """Django under gunicorn with no gunicorn config: keep one worker more, which has imported
    Django and waits to load the next save, so that a save is served in a fraction of the time
    (it costs a worker's memory). ``False`` (``WSGI_RELOAD_SPARE=0``) boots each new worker from
    scratch instead."""
    ready_path: str | None = None
    """A path (``/healthz``) the check, and each new gunicorn worker before it counts as loaded, GETs
    from the app in-process; a status other than 2xx or 3xx, or an exception, refuses the reload."""

    def __post_init__(self) -> None:
        problems = [f"wsgi_reload setting {name}={getattr(self, name)!r} {problem}"
                    for name in _FIELDS if (problem := _problem(name, getattr(self, name)))]
        if problems:
            raise SettingsError("; ".join(problems))

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Build settings from ``WSGI_RELOAD_*`` variables, then keyword overrides.

        Raises :class:`SettingsError` with one line that names every unknown name and bad
        value, each by the environment variable or keyword it came from.
        """
        environ = os.environ if environ is None else environ
        # (name, value, how the user wrote the name, and the value, and the prefix of near misses)
        given: list[tuple[str, Any, str, str, str]] = []
        for key, raw in environ.items():
            if key.startswith(ENV_PREFIX):
                name = key[len(ENV_PREFIX):].lower()
                given.append((name, _parse_env(name, raw), f"environment variable {key}", f"{key}={raw!r}", ENV_PREFIX))
        for name, value in overrides.items():
            value = _normalise(name, value)
            given.append((name, value, f"wsgi_reload setting {name!r}", f"wsgi_reload setting {name}={value!r}", ""))
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name, value, named, written, prefix in given:
            if name not in _FIELDS:
                problems.append(f"unknown {named}{_did_you_mean(name, prefix)}")
            elif problem := _problem(name, value):
                problems.append(f"{written} {problem}")
            else:
                values[name] = value
        if problems:
            raise SettingsError("; ".join(problems))
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed, validated like the original."""
        return Settings.load({}, **{**dataclasses.asdict(self), **changes})


def missing_extra_files(settings: Settings, base: str | None = None) -> list[str]:
    """Extra files (not globs) that do not exist: worth a warning, since they are only watched for appearing."""
    base = os.getcwd() if base is None else base
    return [
        p for p in settings.extra_files
        if not is_glob(p) and not os.path.exists(os.path.join(base, os.path.expanduser(p)))
    ]


_FIELDS = tuple(f.name for f in dataclasses.fields(Settings))
_LIST_FIELDS = ("extra_files", "include", "exclude")
_FLOAT_FIELDS = ("interval", "check_timeout", "settle")
_BOOL_FIELDS = {"spare"}
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_CHOICES = {"backend": BACKENDS, "check": CHECK_MODES, "mode": MODES}
_APP_PATTERN = re.compile(r"^([A-Za-z_][\w.]*|\S.*\.(py|wsgi))(:[A-Za-z_][\w.]*(\(.*\))?)?$")


_LIMITS = {"interval": (0.01, 3600.0), "check_timeout": (0.1, 3600.0), "settle": (0.0, 60.0)}
"""(minimum, maximum) seconds: a value past them is a typo, and inf or 1e10 would overflow a timer."""


def _parse_env(name: str, raw: str) -> Any:
    if name in _LIST_FIELDS:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if name in _FLOAT_FIELDS:
        try:
            return float(raw)
        except ValueError:
            return raw  # reported by _problem as not a number
    if name in ("app", "ready_path"):
        return raw.strip() or None
    if name in _BOOL_FIELDS:
        return _BOOL_WORDS.get(raw.strip().lower(), raw)  # a word that is none of them is reported
    return raw.strip()


def _normalise(name: str, value: Any) -> Any:
    if name in _LIST_FIELDS:
        if isinstance(value, (str, os.PathLike)):
            return (os.fspath(value),)
        if isinstance(value, Iterable):
            return tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
    return value


def _problem(name: str, value: Any) -> str | None:
    """What is wrong with one setting's value, or None; the caller says where the value came from."""
    if name in _FLOAT_FIELDS:
        low, high = _LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"is not a number of seconds: give one from {low:g} to {high:g}, like 1 or 0.5"
        if not low <= value <= high:
            return f"is out of range: give seconds from {low:g} to {high:g}"
        return None
    if name in _BOOL_FIELDS:
        return None if isinstance(value, bool) else "is not valid: give True or False (1 or 0 in the environment)"
    if name in _CHOICES:
        choices = _CHOICES[name]
        return None if value in choices else "is not valid: use one of " + ", ".join(choices)
    if name in _LIST_FIELDS:
        if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
            return "is not valid: give a list of paths or globs"
        if any(os.path.normpath(os.path.expanduser(v)) == os.sep for v in value):
            return "names the whole file system (/): give the project's own directories or globs"
        return None
    if name == "app" and value is not None and not (isinstance(value, str) and _APP_PATTERN.match(value)):
        return "is not valid: use 'package.module:callable' or 'file.py:callable'"
    if name == "ready_path" and value is not None and not (
            isinstance(value, str) and value.startswith("/") and len(value) < 2000 and value.isprintable()
            and " " not in value):
        return "is not valid: give a URL path starting with /, like /healthz"
    return None


def _did_you_mean(name: str, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, _FIELDS, n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{close[0].upper() if prefix else close[0]}?" if close else ""
    accepted = ", ".join(prefix + f.upper() for f in _FIELDS) if prefix else ", ".join(_FIELDS)
    return f"{hint} (accepted: {accepted})"
