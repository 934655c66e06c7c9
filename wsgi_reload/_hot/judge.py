"""Patches to running code: whether an edit can go into a running process, and where a
loaded function's new code is.

An edit is patchable when the statement-level comparison (:func:`wsgi_reload._hot.statements.plan`)
finds it safe to run only what changed, and each function whose body alone changed keeps
its free variables. :func:`wsgi_reload.hot.reload_source` applies it.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import types
from collections.abc import Iterator

from .._core.files import module_file
from . import statements

patch_lock = threading.RLock()
"""Held while code is swapped, so two patches never interleave."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether an edit can be patched in place, and why not."""

    patchable: bool
    reason: str = ""
    changed: tuple[str, ...] = ()


def code_tree(code: types.CodeType, prefix: str = "") -> Iterator[tuple[str, types.CodeType]]:
    """Every function code object inside ``code``, with the qualified name it gets at run time."""
    for const in code.co_consts:
        if not isinstance(const, types.CodeType) or const.co_name.startswith("<"):
            continue  # comprehensions and lambdas have no stable name of their own
        name = f"{prefix}{const.co_name}"
        is_class_body = const.co_flags & 0x2 == 0 and "__qualname__" in const.co_names
        if is_class_body:
            yield from code_tree(const, f"{name}.")
        else:
            yield name, const
            yield from code_tree(const, f"{name}.<locals>.")


def judge(old_source: str | bytes, new_source: str | bytes, filename: str) -> Verdict:
    """Compare two versions of a file: can a running process take the new one in place?"""
    try:
        plan = statements.plan(old_source, new_source, filename)
        old_codes = dict(code_tree(compile(old_source, filename, "exec", dont_inherit=True)))
        new_codes = dict(code_tree(compile(new_source, filename, "exec", dont_inherit=True)))
    except SyntaxError as exc:
        return Verdict(False, f"does not parse: {exc.msg}")
    if plan.unsafe is not None:
        return Verdict(False, plan.unsafe)
    for name, new in new_codes.items():
        old = old_codes.get(name)
        if name.split(".")[0] in plan.bodies and old is not None and old.co_freevars != new.co_freevars:
            return Verdict(False, f"{name} now closes over {new.co_freevars}, not {old.co_freevars}")
    return Verdict(True, changed=(*plan.bodies, *plan.changed, *plan.added, *plan.removed))


def loaded_functions(module: types.ModuleType) -> Iterator[tuple[str, types.FunctionType]]:
    """Every function of ``module`` reachable from its namespace, with its qualified name:
    functions, methods, the functions in classmethods, staticmethods and properties, and
    what a ``functools.wraps`` wrapper wraps."""
    seen: set[int] = set()

    def walk(namespace: dict[str, object], prefix: str) -> Iterator[tuple[str, types.FunctionType]]:
        for value in list(namespace.values()):
            if id(value) in seen:
                continue
            seen.add(id(value))
            target = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(target, property):
                for accessor in (target.fget, target.fset, target.fdel):
                    if isinstance(accessor, types.FunctionType):
                        yield accessor.__qualname__, accessor
            elif isinstance(target, types.FunctionType) and target.__module__ == module.__name__:
                # A functools.wraps wrapper took the wrapped function's name; its code is not that.
                if target.__code__.co_name == target.__qualname__.rpartition(".")[2]:
                    yield target.__qualname__, target
                # What it wraps: ``__wrapped__``, or (a decorator without functools.wraps) a
                # function in its closure.
                inner = {name: cell.cell_contents for name, cell in zip(target.__code__.co_freevars,
                                                                        target.__closure__ or (), strict=False)
                         if name != "__class__" and _bound(cell)}
                inner["__wrapped__"] = getattr(target, "__wrapped__", None)
                yield from walk(inner, prefix)
            elif isinstance(target, type) and target.__module__ == module.__name__:
                yield from walk(dict(vars(target)), f"{prefix}{target.__qualname__}.")

    yield from walk(dict(vars(module)), "")


def _bound(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def module_for(path: str) -> types.ModuleType | None:
    """The loaded module whose source is ``path``."""
    for module in list(sys.modules.values()):
        if module_file(module) == path:
            return module
    return None
