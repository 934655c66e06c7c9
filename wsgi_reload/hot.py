"""In-process hot reload and hot patching, for processes that cannot restart.

``importlib.reload`` alone leaves ``from mod import func`` copies, registered callbacks,
bound methods and existing instances on the old code. Here a module is re-executed and
the new code is then carried over onto the OLD function and class objects, so every
existing reference runs the new code and instances keep ``isinstance`` and ``super()``.

What cannot be carried over (a closure with other free variables, a function that became
a class, a changed ``__slots__`` layout or base classes) keeps the old object, is logged
precisely and is reported as "needs restart". A file that does not load changes nothing.
Frames already running, generators and coroutines keep the code they started with.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from .files import error_location, module_file
from .monitor import Monitor
from .scanner import Change, Scanner
from .settings import Settings

log = logging.getLogger("wsgi_reload.hot")

_patch_lock = threading.RLock()
"""Held while code is swapped, so two patches never interleave."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass
class PatchReport:
    """What one reload or hotfix did."""

    patched: list[str] = dataclasses.field(default_factory=list)
    added: list[str] = dataclasses.field(default_factory=list)
    needs_restart: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.needs_restart


# --- carrying new code over to old objects ----------------------------------------------


def _patch_function(old: types.FunctionType, new: types.FunctionType, where: str, report: PatchReport) -> bool:
    old_wrapped, new_wrapped = getattr(old, "__wrapped__", None), getattr(new, "__wrapped__", None)
    if isinstance(old_wrapped, types.FunctionType) and isinstance(new_wrapped, types.FunctionType):
        # functools.wraps: the wrapper's code is the decorator's; the change is inside.
        if not _patch_function(old_wrapped, new_wrapped, where, report):
            return False
    if old.__code__.co_freevars != new.__code__.co_freevars:
        report.needs_restart.append(
            f"{where}: its closure now uses {new.__code__.co_freevars}, not {old.__code__.co_freevars}")
        return False
    if old.__code__ != new.__code__:
        old.__code__ = new.__code__
    old.__defaults__ = new.__defaults__
    old.__kwdefaults__ = new.__kwdefaults__
    old.__doc__ = new.__doc__
    old.__annotations__ = new.__annotations__
    wrapped = old.__dict__.get("__wrapped__")
    old.__dict__.update(new.__dict__)
    if wrapped is not None:
        old.__dict__["__wrapped__"] = wrapped  # keep pointing at the object we patched
    report.patched.append(where)
    return True


def _unwrap_descriptor(value: Any) -> Any:
    if isinstance(value, (staticmethod, classmethod)):
        return value.__func__
    return value


def _patch_class(old: type, new: type, where: str, report: PatchReport) -> bool:
    if old.__dict__.get("__slots__") != new.__dict__.get("__slots__"):
        report.needs_restart.append(f"{where}: its __slots__ changed")
        return False
    if [b.__qualname__ for b in old.__bases__] != [b.__qualname__ for b in new.__bases__]:
        report.needs_restart.append(f"{where}: its base classes changed")
        return False
    skip = {"__dict__", "__weakref__", "__module__", "__qualname__"}
    for name, new_value in new.__dict__.items():
        if name in skip:
            continue
        old_value = old.__dict__.get(name)
        attribute = f"{where}.{name}"
        if old_value is not None and _carry(old_value, new_value, attribute, report, inside_class=True):
            continue
        setattr(old, name, new_value)
    for name in [n for n in old.__dict__ if n not in new.__dict__ and n not in skip]:
        if name != "__doc__":
            delattr(old, name)
    return True


def _carry(old: Any, new: Any, where: str, report: PatchReport, inside_class: bool = False) -> bool:
    """Patch ``old`` in place with ``new``; True when ``old`` now behaves as ``new``."""
    old_func, new_func = _unwrap_descriptor(old), _unwrap_descriptor(new)
    if type(old) is not type(new):
        if isinstance(old, (types.FunctionType, type)) or isinstance(new, (types.FunctionType, type)):
            report.needs_restart.append(f"{where}: it was a {type(old).__name__}, now a {type(new).__name__}")
            return True  # keep the old object: nothing else is safe
        return False
    if isinstance(old_func, types.FunctionType) and isinstance(new_func, types.FunctionType):
        _patch_function(old_func, new_func, where, report)
        return True
    if isinstance(old, type) and isinstance(new, type):
        _patch_class(old, new, where, report)
        return True
    if isinstance(old, property) and inside_class:
        return False  # properties are immutable: the new one replaces it, with the module's globals
    return False


def _carry_module(module: types.ModuleType, before: dict[str, Any], report: PatchReport) -> None:
    namespace = module.__dict__
    for name, new in list(namespace.items()):
        if name.startswith("__"):
            continue
        if name not in before:
            report.added.append(f"{module.__name__}.{name}")
            continue
        old = before[name]
        if old is new:
            continue
        if getattr(new, "__module__", module.__name__) != module.__name__:
            continue  # imported from elsewhere: not ours to patch
        if _carry(old, new, f"{module.__name__}.{name}", report):
            namespace[name] = old


# --- reloading modules ------------------------------------------------------------------


def reload_module(module: types.ModuleType) -> PatchReport:
    """Re-execute ``module`` from its source and carry the new code over; a failure changes nothing."""
    report = PatchReport()
    path = module_file(module)
    if path is None or not path.endswith(".py"):
        report.error = f"{module.__name__} has no Python source to reload"
        return report
    try:
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError) as exc:
        report.error = _describe(exc)
        return report
    with _patch_lock:
        before = dict(module.__dict__)
        try:
            exec(code, module.__dict__)
        except BaseException as exc:  # an import-time error: put the old namespace back
            module.__dict__.clear()
            module.__dict__.update(before)
            report.error = _describe(exc)
            return report
        _carry_module(module, before, report)
    return report


def _describe(exc: BaseException) -> str:
    path, line = error_location(exc)
    message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    return f"{path}:{line}: {type(exc).__name__}: {message}" if path else f"{type(exc).__name__}: {message}"


def dependency_order(modules: Iterable[types.ModuleType]) -> list[types.ModuleType]:
    """A module before the modules that import it (among those given)."""
    chosen = {m.__name__: m for m in modules}
    needs: dict[str, set[str]] = {}
    for name, module in chosen.items():
        uses = set()
        for value in list(vars(module).values()):
            other = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            if isinstance(other, str) and other in chosen and other != name:
                uses.add(other)
        needs[name] = uses
    ordered: list[types.ModuleType] = []
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done or name in path:
            return
        for dependency in sorted(needs[name]):
            visit(dependency, (*path, name))
        done.add(name)
        ordered.append(chosen[name])

    for name in sorted(chosen):
        visit(name, ())
    return ordered


class HotReloader:
    """Watches modules and reloads them in place when their files change.

    ``watch(module_or_package)`` and ``add_file(path, module)`` say what to watch;
    ``start()`` runs the shared scanner in a daemon thread. Also a context manager.
    """

    def __init__(self, settings: Settings | None = None,
                 on_reload: Callable[[PatchReport], object] | None = None) -> None:
        self.settings = settings if settings is not None else Settings.load()
        self.on_reload = on_reload
        self._files: dict[str, str] = {}
        self.scanner = Scanner(self.settings, watch_modules=False, sources=[lambda: set(self._files)])
        self.monitor = Monitor(self.scanner, self.apply, name="wsgi_reload-hot")

    def watch(self, target: types.ModuleType | str) -> HotReloader:
        """Watch a module, or a package and every submodule of it already imported."""
        module = sys.modules[target] if isinstance(target, str) else target
        prefix = module.__name__ + "."
        for name, candidate in list(sys.modules.items()):
            if name == module.__name__ or name.startswith(prefix):
                path = module_file(candidate)
                if path is not None:
                    self._files[path] = name
        return self

    def add_file(self, path: str, module: types.ModuleType | str) -> HotReloader:
        """Watch ``path`` as the source of ``module``."""
        self._files[os.path.abspath(path)] = module if isinstance(module, str) else module.__name__
        return self

    def start(self) -> HotReloader:
        """Record the baseline and start watching."""
        self.scanner.scan()
        self.monitor.start()
        return self

    def stop(self) -> None:
        """Stop watching."""
        self.monitor.stop()

    def __enter__(self) -> HotReloader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def apply(self, batch: Sequence[Change]) -> PatchReport:
        """Reload the modules behind a batch of changed files, in dependency order."""
        modules = [sys.modules[self._files[c.path]] for c in batch
                   if c.kind != "deleted" and self._files.get(c.path) in sys.modules]
        total = PatchReport()
        for module in dependency_order(modules):
            report = reload_module(module)
            if report.error:
                log.error("wsgi_reload: %s not reloaded, it does not load: %s; the old code keeps running",
                          module.__name__, report.error)
                total.error = total.error or report.error
                continue
            total.patched += report.patched
            total.added += report.added
            total.needs_restart += report.needs_restart
            log.info("wsgi_reload: reloaded %s in place (%d patched)", module.__name__, len(report.patched))
            for reason in report.needs_restart:
                log.warning("wsgi_reload: needs restart: %s", reason)
        if self.on_reload is not None:
            self.on_reload(total)
        return total


# --- hotfixes ---------------------------------------------------------------------------


def replace(target: Any, name: str | None = None) -> Callable[[F], F]:
    """Decorator: patch a function or method in place with the decorated function's code.

    ``@replace(module_or_class)`` patches the attribute named like the decorated function
    (or ``name``); ``@replace(some_function)`` patches that function itself. Every existing
    reference (imports, callbacks, bound methods) runs the new code.
    """

    def decorate(new: F) -> F:
        attribute = name or new.__name__
        old = target if isinstance(target, types.FunctionType) else getattr(target, attribute)
        where = getattr(old, "__qualname__", attribute)
        report = PatchReport()
        with _patch_lock:
            _carry(old, new, f"{getattr(old, '__module__', '?')}.{where}", report)
        if report.needs_restart:
            raise ValueError("; ".join(report.needs_restart))
        log.info("wsgi_reload: hotfix replaced %s", ", ".join(report.patched))
        return old  # type: ignore[return-value]

    return decorate


def apply_file(path: str) -> PatchReport:
    """Execute a hotfix file once; its ``@replace`` decorators patch the running code."""
    report = PatchReport()
    spec = importlib.util.spec_from_file_location(f"wsgi_reload_hotfix_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        report.error = f"cannot load hotfix file {path}"
        return report
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        report.error = _describe(exc)
        log.error("wsgi_reload: hotfix %s failed: %s", path, report.error)
        return report
    log.info("wsgi_reload: applied hotfix %s", path)
    return report
