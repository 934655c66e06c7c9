"""Body-only patches: decide from the old and new source whether an edit can be applied in
place, and apply it to a loaded module without running its module-level code again.

An edit is patchable when nothing but function or method bodies changed: the module with
every function body blanked out compiles to the same tree, and each changed function keeps
its free variables. Applying it swaps the ``__code__`` of the loaded functions, found by
qualified name, so every existing reference runs the new body.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import types
from collections.abc import Iterator

from .files import module_file
from .hot import _patch_lock


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether an edit can be patched in place, and why not."""

    patchable: bool
    reason: str = ""
    changed: tuple[str, ...] = ()


class _BlankBodies(ast.NodeTransformer):
    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.body = [ast.Pass()]
        return node

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.body = [ast.Pass()]
        return node


def _shape(tree: ast.Module) -> str:
    # Decorators, signatures, defaults, classes and module-level statements stay; bodies go.
    return ast.dump(_BlankBodies().visit(tree), include_attributes=False)


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
    """Compare two versions of a file: can the new one be applied by swapping function bodies?"""
    try:
        old_tree, new_tree = ast.parse(old_source, filename), ast.parse(new_source, filename)
    except SyntaxError as exc:
        return Verdict(False, f"does not parse: {exc.msg}")
    if _shape(old_tree) != _shape(new_tree):
        return Verdict(False, "more than function bodies changed")
    old_codes = dict(code_tree(compile(old_source, filename, "exec", dont_inherit=True)))
    new_codes = dict(code_tree(compile(new_source, filename, "exec", dont_inherit=True)))
    if old_codes.keys() != new_codes.keys():
        return Verdict(False, "the set of functions changed")
    changed = []
    for name, new in new_codes.items():
        old = old_codes[name]
        if old.co_freevars != new.co_freevars:
            return Verdict(False, f"{name} now closes over {new.co_freevars}, not {old.co_freevars}")
        if old.replace(co_firstlineno=1, co_linetable=b"") != new.replace(co_firstlineno=1, co_linetable=b""):
            changed.append(name)
    return Verdict(True, changed=tuple(changed))


def _functions(module: types.ModuleType) -> Iterator[tuple[str, types.FunctionType]]:
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
                yield target.__qualname__, target
                wrapped = getattr(target, "__wrapped__", None)
                if isinstance(wrapped, types.FunctionType):
                    yield wrapped.__qualname__, wrapped
            elif isinstance(target, type) and target.__module__ == module.__name__:
                yield from walk(dict(vars(target)), f"{prefix}{target.__qualname__}.")

    yield from walk(dict(vars(module)), "")


def apply(module: types.ModuleType, new_source: str | bytes, filename: str) -> list[str]:
    """Swap in the new bodies of ``module``'s functions; returns what it patched.

    Raises ``ValueError`` naming the function when a loaded function cannot take its new body.
    """
    codes = dict(code_tree(compile(new_source, filename, "exec", dont_inherit=True)))
    patched = []
    with _patch_lock:
        for qualname, func in _functions(module):
            new = codes.get(qualname)
            if new is None or func.__code__ == new:
                continue
            if func.__code__.co_freevars != new.co_freevars:
                raise ValueError(f"{module.__name__}.{qualname} cannot take the new body: its free variables differ")
            func.__code__ = new
            patched.append(f"{module.__name__}.{qualname}")
    return patched


def module_for(path: str) -> types.ModuleType | None:
    """The loaded module whose source is ``path``."""
    for module in list(sys.modules.values()):
        if module_file(module) == path:
            return module
    return None
