"""One settings object for every adapter, read from keyword arguments and ``WSGI_RELOAD_*``."""

from __future__ import annotations

import dataclasses
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
    """Seconds between two polls (and the safety rescan period of the event backend)."""
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
    settle: float = 0.1
    """Seconds the files must be quiet before a batch of changes is reported."""
    app: str | None = None
    """The entry point the import check loads (``module:callable``); adapters fill it in."""
    mode: str = "restart"
    """gunicorn: ``restart`` (graceful reload) or ``patch`` (swap function bodies in the workers when
    only bodies changed, else reload)."""

    def __post_init__(self) -> None:
        _require_number("interval", self.interval, minimum=0.01)
        _require_number("check_timeout", self.check_timeout, minimum=0.1)
        _require_number("settle", self.settle, minimum=0.0)
        _require_choice("backend", self.backend, BACKENDS)
        _require_choice("check", self.check, CHECK_MODES)
        _require_choice("mode", self.mode, MODES)
        for name in ("extra_files", "include", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                raise SettingsError(
                    f"wsgi_reload setting {name}={value!r} is not valid: give a list of paths or globs"
                )
        if self.app is not None and not _APP_PATTERN.match(self.app):
            raise SettingsError(
                f"wsgi_reload setting app={self.app!r} is not valid: "
                "use 'package.module:callable' or 'file.py:callable'"
            )

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Build settings from ``WSGI_RELOAD_*`` variables, then keyword overrides.

        Raises :class:`SettingsError` with one clear line for an unknown name or a bad value.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX):].lower()
            if name not in _FIELDS:
                raise SettingsError(
                    f"unknown environment variable {key}: wsgi_reload accepts "
                    + ", ".join(ENV_PREFIX + f.upper() for f in _FIELDS)
                )
            values[name] = _parse_env(key, name, raw)
        for name, value in overrides.items():
            if name not in _FIELDS:
                raise SettingsError(
                    f"unknown wsgi_reload setting {name!r}: accepted settings are " + ", ".join(_FIELDS)
                )
            values[name] = _normalise(name, value)
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
_APP_PATTERN = re.compile(r"^([A-Za-z_][\w.]*|\S.*\.(py|wsgi))(:[A-Za-z_][\w.]*(\(.*\))?)?$")


def _parse_env(key: str, name: str, raw: str) -> Any:
    if name in _LIST_FIELDS:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if name in _FLOAT_FIELDS:
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{key}={raw!r} is not a number: give seconds, like 1 or 0.5") from None
    if name == "app":
        return raw.strip() or None
    return raw.strip()


def _normalise(name: str, value: Any) -> Any:
    if name in _LIST_FIELDS:
        if isinstance(value, (str, os.PathLike)):
            return (os.fspath(value),)
        if isinstance(value, Iterable):
            return tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
    return value


def _require_number(name: str, value: object, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SettingsError(f"wsgi_reload setting {name}={value!r} is not a number: give seconds, like 1 or 0.5")
    if value < minimum:
        raise SettingsError(f"wsgi_reload setting {name}={value!r} is too small: it must be at least {minimum}")


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(
            f"wsgi_reload setting {name}={value!r} is not valid: use one of " + ", ".join(choices)
        )
