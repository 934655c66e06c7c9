"""In-process hot reload and hot patching, for processes that cannot restart.

``importlib.reload`` alone re-runs the whole module (``CACHE = {}`` starts over) and leaves
``from mod import func`` copies, registered callbacks, bound methods and existing instances
on the old code. Here the old and new source are compared by top-level statement
(:mod:`.statements`): only new or changed statements run, in a scratch namespace; a
definition whose function bodies alone changed runs nothing, its code is swapped. The new
code is then carried over onto the OLD function and class objects, so every existing
reference runs it and instances keep ``isinstance`` and ``super()``; unchanged statements,
their objects and every reference to them are left alone. The result is applied in one
step: no other thread runs while the module's names and code are swapped, and a failure
before that leaves the module exactly as it was. Where running statements piecemeal would
be wrong (an unchanged statement computed from a changed one), the whole module runs again,
and the report says why.

What cannot be carried over (a closure with other free variables, a function that became
a class, a changed ``__slots__`` layout or base classes, a class built by a custom metaclass
such as a Django model) keeps the old object, is logged precisely and is reported as
"needs restart". Frames already running, generators and coroutines keep the code they
started with.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from ._core.files import error_location, module_file
from ._core.scanner import Change
from ._core.settings import Settings
from ._core.watcher import Watcher
from ._hot import statements
from ._hot.judge import code_tree, loaded_functions, patch_lock

log = logging.getLogger("wsgi_reload.hot")

PAUSE_SWITCH_INTERVAL = 1.0
"""Seconds another thread may wait for the GIL while a module is swapped (it takes microseconds)."""

T = TypeVar("T")


@dataclasses.dataclass
class PatchReport:
    """What one reload or hotfix did."""

    patched: list[str] = dataclasses.field(default_factory=list)
    """Functions and classes that now run the new code, in place."""
    added: list[str] = dataclasses.field(default_factory=list)
    changed: list[str] = dataclasses.field(default_factory=list)
    """Names bound to a new value (a changed constant, import or assignment)."""
    removed: list[str] = dataclasses.field(default_factory=list)
    needs_restart: list[str] = dataclasses.field(default_factory=list)
    whole_module: str | None = None
    """Why the whole module ran again instead of only what changed, or None."""
    ran_again: list[str] = dataclasses.field(default_factory=list)
    """Unchanged statements that ran again because what they use at load time changed, and why."""
    error: str | None = None

    def extend(self, other: PatchReport) -> None:
        """Add another module's report to this one."""
        for field in ("patched", "added", "changed", "removed", "needs_restart"):
            getattr(self, field).extend(getattr(other, field))
        self.whole_module = self.whole_module or other.whole_module
        self.error = self.error or other.error

    @property
    def ok(self) -> bool:
        return self.error is None and not self.needs_restart


# --- carrying new code over to old objects ----------------------------------------------


def _patch_function(old: types.FunctionType, new: types.FunctionType, where: str, report: PatchReport,
                    seen: set[int] | None = None) -> bool:
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
    kept = _carry_closure(old, new, where, report, (seen or set()) | {id(old)})
    wrapped = old.__dict__.get("__wrapped__")
    old.__dict__.update(new.__dict__)
    if wrapped is not None:
        old.__dict__["__wrapped__"] = wrapped  # keep pointing at the object we patched
    elif id(old.__dict__.get("__wrapped__")) in kept:
        # It started using functools.wraps: point at the decorated function patched in place.
        old.__dict__["__wrapped__"] = kept[id(old.__dict__["__wrapped__"])]
    wrong = _runs_other_code(old, new)
    if wrong is not None:
        report.needs_restart.append(f"{where}: {wrong} after patching; it would run other code than the new source")
        return False
    report.patched.append(where)
    return True


def _carry_closure(old: types.FunctionType, new: types.FunctionType, where: str, report: PatchReport,
                   seen: set[int]) -> dict[int, types.FunctionType]:
    """The statement that made ``new`` ran again (a decorator's wrapper, a factory's function):
    its closure holds what that run made. A function there (the decorated function, inside a
    wrapper without ``functools.wraps``) is patched in place, so that references to it run the
    new code too; anything else (a decorator's argument) is the new value. The implicit
    ``__class__`` cell of a method already holds the class it is patched into. Returns the
    functions patched in place, by the id of the new function they now stand for. ``seen``: the
    functions being patched up the call chain (closures that call each other)."""
    kept: dict[int, types.FunctionType] = {}
    for name, old_cell, new_cell in zip(old.__code__.co_freevars, old.__closure__ or (), new.__closure__ or (),
                                        strict=False):
        if name == "__class__":
            continue
        try:
            old_value, new_value = old_cell.cell_contents, new_cell.cell_contents
        except ValueError:  # an empty cell: the variable is not bound yet
            continue
        if old_value is new_value:
            continue
        if isinstance(old_value, types.FunctionType) and isinstance(new_value, types.FunctionType) \
                and old_value.__code__.co_freevars == new_value.__code__.co_freevars:
            if id(old_value) in seen:
                continue  # being patched further up: it gets the new code there
            inner = PatchReport()  # reported as part of ``where``
            _patch_function(old_value, new_value, f"{where} (the {name} it calls)", inner, seen)
            report.needs_restart.extend(inner.needs_restart)
            kept[id(new_value)] = old_value
        else:
            old_cell.cell_contents = new_value
    return kept


def _runs_other_code(old: types.FunctionType, new: types.FunctionType, depth: int = 0) -> str | None:
    """Why ``old`` does not behave as ``new`` now, or None: its code, defaults and closure,
    the functions in its closure included, must be the new ones."""
    if old.__code__ != new.__code__:
        return "its code is not the new code"
    if old.__defaults__ != new.__defaults__ or old.__kwdefaults__ != new.__kwdefaults__:
        return "its defaults are not the new ones"
    for name, old_cell, new_cell in zip(old.__code__.co_freevars, old.__closure__ or (), new.__closure__ or (),
                                        strict=False):
        try:
            old_value, new_value = old_cell.cell_contents, new_cell.cell_contents
        except ValueError:
            continue
        if old_value is new_value or name == "__class__":
            continue
        if isinstance(old_value, types.FunctionType) and isinstance(new_value, types.FunctionType) and depth < 8:
            inner = _runs_other_code(old_value, new_value, depth + 1)
            if inner is not None:
                return f"the {name} it calls: {inner}"
            continue
        return f"its closure's {name} is not the new value"
    return None


def _unwrap_descriptor(value: Any) -> Any:
    if isinstance(value, (staticmethod, classmethod)):
        return value.__func__
    return value


def _accessors(value: Any) -> list[Any]:
    """The functions inside a class attribute: a method, the function of a classmethod or
    staticmethod, a property's getter, setter and deleter."""
    if isinstance(value, property):
        return [value.fget, value.fset, value.fdel]
    return [_unwrap_descriptor(value)]


def _for_class(value: Any, new_class: type, old_class: type) -> Any:
    """``value`` from the new class body, to be set on the old class. A method that uses
    zero-argument ``super()`` or ``__class__`` closes over a cell holding the class its body was
    compiled in; on the old class it needs a cell holding the old class, or ``super()`` fails on
    every old instance. It gets a copy with that cell: the new class keeps its own, for the
    instances made from it while the module ran."""
    if isinstance(value, property):
        accessors = [_for_class(f, new_class, old_class) for f in (value.fget, value.fset, value.fdel)]
        if accessors == [value.fget, value.fset, value.fdel]:
            return value
        return property(accessors[0], accessors[1], accessors[2], value.__doc__)
    if isinstance(value, (classmethod, staticmethod)):
        func = _for_class(value.__func__, new_class, old_class)
        return value if func is value.__func__ else type(value)(func)
    if not isinstance(value, types.FunctionType) or "__class__" not in value.__code__.co_freevars:
        return value
    index = value.__code__.co_freevars.index("__class__")
    closure = list(value.__closure__ or ())
    if closure[index].cell_contents is not new_class:
        return value
    closure[index] = types.CellType(old_class)
    copy = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, tuple(closure))
    copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = value.__kwdefaults__, value.__qualname__, value.__doc__
    copy.__dict__.update(value.__dict__)
    copy.__annotations__ = value.__annotations__
    return copy


def _same_closure(old: Any, new: Any) -> bool:
    pairs = zip(_accessors(old), _accessors(new), strict=False)
    return all(not isinstance(a, types.FunctionType) or not isinstance(b, types.FunctionType)
               or a.__code__.co_freevars == b.__code__.co_freevars for a, b in pairs)


def _patch_class(old: type, new: type, where: str, report: PatchReport) -> bool:
    if type(old) is not type or type(new) is not type:
        metaclass = type(old) if type(old) is not type else type(new)
        report.needs_restart.append(
            f"{where}: it is built by the metaclass {metaclass.__module__}.{metaclass.__qualname__} (a Django model, "
            "an enum, an ABC ...), which patching in place would bypass")
        return False
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
        if old_value is not None and _same_closure(old_value, new_value) \
                and _carry(old_value, new_value, attribute, report, inside_class=True):
            continue
        # New, or a method that now closes over other variables (it started using super()):
        # the class gets the new object; references taken from the old one keep the old code.
        setattr(old, name, _for_class(new_value, new, old))
        if old_value is not None and callable(_unwrap_descriptor(new_value)):
            report.patched.append(attribute)
    for name in [n for n in old.__dict__ if n not in new.__dict__ and n not in skip]:
        if name != "__doc__":
            delattr(old, name)
    return True


def _carry(old: Any, new: Any, where: str, report: PatchReport, inside_class: bool = False) -> bool:
    """Patch ``old`` in place with ``new``; True when ``old`` now behaves as ``new``, or must
    stay as it is (the reason is then in ``report.needs_restart``)."""
    old_func, new_func = _unwrap_descriptor(old), _unwrap_descriptor(new)
    if type(old) is not type(new) and not (isinstance(old, type) and isinstance(new, type)):
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
    if isinstance(old, property) and isinstance(new, property) and inside_class:
        pairs = list(zip(_accessors(old), _accessors(new), strict=False))
        if all((a is None) == (b is None) for a, b in pairs):
            for a, b in pairs:
                if isinstance(a, types.FunctionType) and isinstance(b, types.FunctionType):
                    _patch_function(a, b, where, report)
            return True
        return False  # a setter or deleter came or went: the new property replaces the old
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


@contextlib.contextmanager
def _others_paused() -> Iterator[None]:
    """Other Python threads wait while the module is swapped: the interpreter hands the GIL
    over only after the switch interval, and the swap is over in microseconds, with no I/O.
    (On a free-threaded build this is only the patch lock.)"""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(PAUSE_SWITCH_INTERVAL)
    try:
        with patch_lock:
            yield
    finally:
        sys.setswitchinterval(interval)


# --- reloading modules ------------------------------------------------------------------


def reload_module(module: types.ModuleType, old_source: str | bytes | None = None) -> PatchReport:
    """Bring ``module`` up to its source file, keeping what did not change; a failure changes nothing.

    ``old_source`` is the source the module runs now; by default the one recorded by
    :func:`remember_source` or by the last reload. Without either, the whole module runs again.
    """
    path = module_file(module)
    if path is None or not path.endswith(".py"):
        return PatchReport(error=f"{module.__name__} has no Python source to reload")
    try:
        with open(path, "rb") as f:
            new_source = f.read()
    except OSError as exc:
        return PatchReport(error=_describe(exc))
    with patch_lock:
        if old_source is None:
            old_source = _sources.get(module.__name__)
        report = reload_source(module, old_source, new_source, path)
        if report.error is None:
            _sources[module.__name__] = new_source
    return report


_sources: dict[str, bytes] = {}
"""The source each module runs, to compare the next version with."""


def remember_source(module: types.ModuleType) -> None:
    """Record the source ``module`` runs now (read from its file), so that the next reload
    runs only what changed. :class:`HotReloader` does this for what it watches.

    The file may have been saved since the module was imported: its functions are compared
    with the code compiled from what is read, and on a difference nothing is recorded (the
    next reload then runs the whole module, which is right whatever the module runs)."""
    path = module_file(module)
    if path is None or not path.endswith(".py"):
        return
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError:
        return
    stale = _differs_from_loaded(module, source, path)
    if stale is not None:
        log.info("wsgi_reload: %s changed since %s was imported (%s); its next reload runs the whole module",
                 path, module.__name__, stale)
        _sources.pop(module.__name__, None)
        return
    _sources[module.__name__] = source


def _codes_by_name(source: bytes | ast.Module, filename: str) -> dict[str, list[types.CodeType]]:
    """Every function's code compiled from ``source``, by qualified name, in source order (a
    property's getter and setter share one name)."""
    codes: dict[str, list[types.CodeType]] = {}
    for qualname, code in code_tree(compile(source, filename, "exec", dont_inherit=True)):
        codes.setdefault(qualname, []).append(code)
    return codes


def _differs_from_loaded(module: types.ModuleType, source: bytes, path: str) -> str | None:
    """Which loaded function was not compiled from ``source``, or None when all were."""
    try:
        codes = _codes_by_name(source, path)
    except (SyntaxError, ValueError):
        return "it does not compile"
    for qualname, func in loaded_functions(module):
        if func.__code__ not in codes.get(qualname, [func.__code__]):
            return f"{qualname} differs"
    return None


def reload_source(module: types.ModuleType, old_source: str | bytes | None, new_source: str | bytes,
                  filename: str, *, whole_module: bool = True) -> PatchReport:
    """Apply the change from ``old_source`` (what ``module`` runs) to ``new_source`` in place.

    Only new or changed top-level statements run; see the module docstring. When that is not
    safe, or ``old_source`` is None, the whole module runs again, unless ``whole_module`` is
    False: then nothing changes and ``report.whole_module`` says why.
    """
    with patch_lock:  # one reload at a time: each compares with what the last one left
        return _reload_source(module, old_source, new_source, filename, whole_module)


def _reload_source(module: types.ModuleType, old_source: str | bytes | None, new_source: str | bytes,
                   filename: str, whole_module: bool) -> PatchReport:
    report = PatchReport()
    try:
        new_tree = ast.parse(new_source, filename)
        plan = statements.plan(old_source, new_source, filename) if old_source is not None else None
    except (SyntaxError, ValueError) as exc:
        report.error = _describe(exc)
        return report
    unsafe = "the source it runs now was not recorded" if plan is None else plan.unsafe
    if unsafe is not None or plan is None:
        report.whole_module = unsafe
        if whole_module:
            _reload_whole(module, new_tree, filename, report)
        return report
    try:
        swaps = _body_swaps(module, plan, new_tree, filename, report)
        code = compile(statements.module_for_statements(plan.run, new_tree), filename, "exec", dont_inherit=True)
        scratch: dict[str, Any] = {}
        # The module's globals, a scratch namespace for what the statements bind: the module
        # does not change while they run, and functions they define get the module's globals.
        exec(code, module.__dict__, scratch)
    except BaseException as exc:  # noqa: BLE001 - an import-time error of any kind leaves all as it was
        report.error = _describe(exc)
        return report
    _apply(module, plan, scratch, swaps, report)
    report.ran_again = list(plan.ran_again)
    _follow_moved_lines(module, new_tree, filename)
    return report


def _follow_moved_lines(module: types.ModuleType, tree: ast.Module, filename: str) -> None:
    """Lines added or removed above an unchanged function move it: give it the code compiled
    at its new place, which differs in line numbers only, so that tracebacks, ``inspect`` and
    debuggers point at the right line."""
    codes = _codes_by_name(tree, filename)
    for qualname, func in loaded_functions(module):
        candidates = codes.get(qualname, [])
        if len(candidates) == 1 and func.__code__ != candidates[0] and _same_but_lines(func.__code__, candidates[0]):
            func.__code__ = candidates[0]


def _same_but_lines(old: types.CodeType, new: types.CodeType) -> bool:
    """The same code, compiled at other lines."""
    def shape(code: types.CodeType) -> tuple[object, ...]:
        return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, code.co_flags,
                code.co_argcount, code.co_kwonlyargcount, code.co_posonlyargcount, len(code.co_consts))

    if shape(old) != shape(new):
        return False
    for a, b in zip(old.co_consts, new.co_consts, strict=True):
        if isinstance(a, types.CodeType) and isinstance(b, types.CodeType):
            if not _same_but_lines(a, b):
                return False
        elif type(a) is not type(b) or a != b:
            return False
    return True


def _body_swaps(module: types.ModuleType, plan: statements.Plan, tree: ast.Module, filename: str,
                report: PatchReport) -> list[tuple[types.FunctionType, types.CodeType, str]]:
    """The loaded functions of the definitions whose bodies alone changed, with their new code."""
    if not plan.bodies:
        return []
    changed = set(plan.bodies)
    # A property's getter and setter share one qualified name: they are told apart by their
    # order in the source, in the loaded code and in the new code alike.
    codes = _codes_by_name(tree, filename)
    loaded: dict[str, list[types.FunctionType]] = {}
    for qualname, func in loaded_functions(module):
        if qualname.split(".")[0] in changed and qualname in codes:
            loaded.setdefault(qualname, []).append(func)
    hidden = {q for q in codes if q.split(".")[0] in changed and "<locals>" not in q and q not in loaded}
    for qualname, func in _functions_out_of_sight(module, hidden):
        loaded.setdefault(qualname, []).append(func)
    swaps = []
    found = set()
    for qualname, funcs in loaded.items():
        funcs.sort(key=lambda f: f.__code__.co_firstlineno)
        if len(funcs) != len(codes[qualname]):
            report.needs_restart.append(f"{module.__name__}.{qualname}: {len(codes[qualname])} definitions of that "
                                        f"name now, {len(funcs)} loaded")
            found.add(qualname)
            continue
        for func, new in zip(funcs, codes[qualname], strict=True):
            swaps.extend(_body_swap(module, qualname, func, new, report))
        found.add(qualname)
    for qualname in codes:
        if qualname.split(".")[0] in changed and "<locals>" not in qualname and qualname not in found:
            report.needs_restart.append(f"{module.__name__}.{qualname}: no live function of that name was found; "
                                        "whatever holds the old one runs the old body")
    return swaps


def _replace_method(module: types.ModuleType, qualname: str, func: types.FunctionType, new: types.CodeType) -> bool:
    """A method whose body started or stopped using zero-argument ``super()`` or ``__class__``:
    its implicit ``__class__`` cell came or went, which no code swap can do, since a function's
    closure cannot change size. The class gets a new function made from the new code, with the
    cell holding the class; True when that was done. (A bound method taken before keeps the
    old function.)"""
    *path, name = qualname.split(".")
    owner: Any = module
    for part in path:
        owner = owner.__dict__.get(part) if isinstance(owner, (type, types.ModuleType)) else None
    if not isinstance(owner, type):
        return False
    closure = (types.CellType(owner),) if new.co_freevars == ("__class__",) else None
    method = types.FunctionType(new, func.__globals__, func.__name__, func.__defaults__, closure)
    method.__kwdefaults__, method.__qualname__, method.__doc__ = func.__kwdefaults__, func.__qualname__, func.__doc__
    method.__dict__.update(func.__dict__)
    method.__annotations__ = func.__annotations__
    attribute = owner.__dict__.get(name)
    if attribute is func:
        setattr(owner, name, method)
    elif isinstance(attribute, (classmethod, staticmethod)) and attribute.__func__ is func:
        setattr(owner, name, type(attribute)(method))
    else:
        return False
    return True


def _functions_out_of_sight(module: types.ModuleType, qualnames: set[str]) -> list[tuple[str, types.FunctionType]]:
    """The live functions of ``module`` with these qualified names that its namespace does not
    reach (a decorator that returns a registry, not the function): found among all objects."""
    if not qualnames:
        return []
    import gc

    filename = module_file(module)
    return [(f.__qualname__, f) for f in gc.get_objects()
            if isinstance(f, types.FunctionType) and f.__qualname__ in qualnames
            and f.__module__ == module.__name__ and os.path.abspath(f.__code__.co_filename) == filename]


def _body_swap(module: types.ModuleType, qualname: str, func: types.FunctionType, new: types.CodeType,
               report: PatchReport) -> list[tuple[types.FunctionType, types.CodeType, str]]:
    """One loaded function and its new code, unless its closure changed (then it needs a restart)."""
    where = f"{module.__name__}.{qualname}"
    if func.__code__.co_freevars != new.co_freevars:
        if {*func.__code__.co_freevars, *new.co_freevars} <= {"__class__"} and _replace_method(module, qualname,
                                                                                                func, new):
            report.patched.append(where)  # the class holds a new function: zero-argument super() came or went
            return []
        report.needs_restart.append(f"{where}: its closure now uses {new.co_freevars}, not {func.__code__.co_freevars}")
        return []
    return [(func, new, where)] if func.__code__ != new else []


def _apply(module: types.ModuleType, plan: statements.Plan, scratch: dict[str, Any],
           swaps: list[tuple[types.FunctionType, types.CodeType, str]], report: PatchReport) -> None:
    namespace = module.__dict__
    annotations = scratch.pop("__annotations__", None)
    # A function or class of this module that exists already takes the new code in place;
    # anything else (a value, an import, a function from elsewhere) is bound anew.
    definitions = {name for name, new in scratch.items()
                   if name in namespace and _defined_in(new, module) and _defined_in(namespace[name], module)}
    values = {name: value for name, value in scratch.items() if name not in definitions}
    with _others_paused():
        # New names first, so that new code finds them the moment it is in place.
        namespace.update(values)
        if isinstance(annotations, dict):
            namespace.setdefault("__annotations__", {}).update(annotations)
        for name in sorted(definitions):
            if not _carry(namespace[name], scratch[name], f"{module.__name__}.{name}", report):
                namespace[name] = scratch[name]
                report.changed.append(f"{module.__name__}.{name}")
        for func, code, where in swaps:
            func.__code__ = code
            report.patched.append(where)
        for name in plan.removed:
            namespace.pop(name, None)
    prefix = module.__name__ + "."
    report.added += [prefix + name for name in plan.added]
    report.changed += [prefix + name for name in plan.changed if name in values]
    report.removed += [prefix + name for name in plan.removed]


def _defined_in(value: Any, module: types.ModuleType) -> bool:
    """A function (plain, class- or static method) or class whose home is ``module``."""
    target = _unwrap_descriptor(value)
    return isinstance(target, (types.FunctionType, type)) and getattr(target, "__module__", None) == module.__name__


def _reload_whole(module: types.ModuleType, tree: ast.Module, filename: str, report: PatchReport) -> None:
    """Run the whole module again in its own namespace, then carry the new code over. Names
    are overwritten one by one, never missing; on an error the old namespace comes back,
    in the same dict."""
    try:
        code = compile(tree, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        report.error = _describe(exc)
        return
    with patch_lock:
        before = dict(module.__dict__)
        try:
            exec(code, module.__dict__)
        except BaseException as exc:  # noqa: BLE001 - an import-time error: put the old namespace back
            with _others_paused():
                module.__dict__.update(before)
                for name in [n for n in module.__dict__ if n not in before]:
                    del module.__dict__[name]
            report.error = _describe(exc)
            return
        _carry_module(module, before, report)


def _summary(report: PatchReport) -> str:
    parts = [f"{len(report.patched)} patched"]
    for label, names in (("changed", report.changed), ("added", report.added), ("removed", report.removed)):
        if names:
            parts.append(f"{label} {', '.join(names)}")
    parts.extend(report.ran_again)
    return "; ".join(parts)


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
        # Each module's own reload is its check (a module that does not load keeps its old code),
        # so batches go straight to apply(), not through the gate.
        self.watcher = Watcher(self.settings, self.apply, server="in-process reload",
                               sources=[lambda: set(self._files)], on_batch=self.apply, on_tick=lambda: None,
                               name="wsgi_reload-hot")
        self.scanner = self.watcher.scanner

    def watch(self, target: types.ModuleType | str) -> HotReloader:
        """Watch a module, or a package and every submodule of it already imported."""
        module = sys.modules[target] if isinstance(target, str) else target
        prefix = module.__name__ + "."
        for name, candidate in list(sys.modules.items()):
            if name == module.__name__ or name.startswith(prefix):
                path = module_file(candidate)
                if path is not None:
                    self._files[path] = name
                    remember_source(candidate)
        return self

    def add_file(self, path: str, module: types.ModuleType | str) -> HotReloader:
        """Watch ``path`` as the source of ``module``."""
        name = module if isinstance(module, str) else module.__name__
        self._files[os.path.abspath(path)] = name
        if name in sys.modules:
            remember_source(sys.modules[name])
        return self

    def start(self) -> HotReloader:
        """Record the baseline and start watching."""
        self.scanner.scan()
        self.watcher.start(announce=False)
        return self

    def stop(self) -> None:
        """Stop watching."""
        self.watcher.stop()

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
            total.extend(report)
            if report.error:
                log.error("wsgi_reload: %s not reloaded, it does not load: %s; the old code keeps running",
                          module.__name__, report.error)
                continue
            if report.whole_module:
                log.warning("wsgi_reload: %s ran the whole module again: %s; its module-level state started over",
                            module.__name__, report.whole_module)
            log.info("wsgi_reload: reloaded %s in place: %s", module.__name__, _summary(report))
            for reason in report.needs_restart:
                log.warning("wsgi_reload: needs restart: %s", reason)
        if self.on_reload is not None:
            self.on_reload(total)
        return total


# --- hotfixes ---------------------------------------------------------------------------


def replace(target: Any, name: str | None = None) -> Callable[[T], T]:
    """Decorator: patch a function or method in place with the decorated function's code.

    ``@replace(module_or_class)`` patches the attribute named like the decorated function
    (or ``name``); ``@replace(some_function)`` patches that function itself. On a class, the
    attribute can be a method, a classmethod, a staticmethod or a property, and the decorated
    function may carry the same decorator or none (a property's getter is then patched).
    Every existing reference (imports, callbacks, bound methods) runs the new code.
    Raises ``ValueError`` when the code cannot be moved over (see the module docstring).
    """

    def decorate(new: T) -> T:
        new_func = _accessors(new)[0]
        attribute = name or str(getattr(new_func, "__name__", ""))
        if isinstance(target, types.FunctionType):
            old: Any = target
        elif isinstance(target, type):
            old = _class_attribute(target, attribute)
        else:
            old = getattr(target, attribute)
        old_func = _accessors(old)[0]
        where = f"{getattr(old_func, '__module__', '?')}.{getattr(old_func, '__qualname__', attribute)}"
        report = PatchReport()
        with patch_lock:
            if isinstance(old, property) and isinstance(new, property):
                if not _carry(old, new, where, report, inside_class=True):
                    raise ValueError(f"{where}: the new property has other accessors (a setter or deleter "
                                     "came or went); define it in the class and reload instead")
            else:
                _carry(old_func, new_func, where, report)
        if report.needs_restart:
            raise ValueError("; ".join(report.needs_restart))
        log.info("wsgi_reload: hotfix replaced %s", ", ".join(report.patched))
        return old  # type: ignore[no-any-return]

    return decorate


def _class_attribute(cls: type, attribute: str) -> Any:
    """The attribute as stored in the class or a base (the classmethod or property itself)."""
    for klass in cls.__mro__:
        if attribute in klass.__dict__:
            return klass.__dict__[attribute]
    raise AttributeError(f"{cls.__qualname__} has no attribute {attribute!r} to replace")


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
