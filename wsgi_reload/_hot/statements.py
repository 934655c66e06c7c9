"""Two versions of a module, compared by top-level statement: what to run again, what to leave.

A reload that keeps module state runs only the statements that are new or changed, so an
unchanged ``CACHE = {}`` keeps its dict and every reference to it. An unchanged statement
that uses at load time something that changed (``TITLE = LABEL.upper()`` after a changed
``LABEL``, ``handler = make_handler()`` after a changed ``make_handler``) runs again with
them, and so does whatever uses what it binds; :func:`plan` finds those, and says why. For
shapes it cannot run piecemeal it says why, and the caller runs the whole module instead.
Pure syntax: nothing here imports or runs code.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from collections.abc import Iterable, Iterator

DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
NESTED_SCOPES_RUN_LATER = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
"""Scopes of their own (before 3.12 for all, after PEP 709 still for generator expressions):
their loop variables are not module names, and their lookups skip a scratch namespace."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a statement-level reload of one module does."""

    run: tuple[ast.stmt, ...] = ()
    """New or changed statements whose shape changed, in source order: they run again."""
    bodies: tuple[str, ...] = ()
    """Definitions whose function bodies alone changed: their code is swapped, nothing runs."""
    changed: tuple[str, ...] = ()
    """Names an old statement bound too, now bound by a statement that runs again."""
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    """Names no statement binds any more: they leave the module."""
    unsafe: str | None = None
    """Why only running the whole module is right, or None."""
    ran_again: tuple[str, ...] = ()
    """Unchanged statements that run again because what they use at load time changed, and why."""


class _BlankBodies(ast.NodeTransformer):
    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.body = [ast.Pass()]
        return node

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.body = [ast.Pass()]
        return node


def shape(node: ast.AST) -> str:
    """The statement with every function body blanked: equal shapes differ in bodies alone."""
    import copy

    return ast.dump(_BlankBodies().visit(copy.deepcopy(node)), include_attributes=False)


def bound_names(statement: ast.stmt) -> set[str]:
    """The module-level names a statement binds (``*`` for a star import)."""
    names: set[str] = set()
    for node in _walk_run_now(statement, into_definitions=False, into_comprehensions=False):
        if isinstance(node, DEFINITIONS):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            names.add(node.name)
    return names


def _walk_run_now(node: ast.AST, into_definitions: bool = True, into_comprehensions: bool = True) -> Iterator[ast.AST]:
    """The nodes evaluated when ``node`` runs at module level: not the bodies of functions and
    lambdas (they run when called), not class bodies unless ``into_definitions``, and of a
    comprehension only its first iterable unless ``into_comprehensions``."""
    yield node
    if isinstance(node, COMPREHENSIONS) and not into_comprehensions:
        yield from _walk_run_now(node.generators[0].iter, into_definitions, into_comprehensions)
        return
    if isinstance(node, NESTED_SCOPES_RUN_LATER):
        if isinstance(node, ast.Lambda):
            yield from _walk_run_now(node.args)
            return
        parts: list[ast.AST | None] = [*node.decorator_list, node.args, node.returns]
        for part in parts:
            if part is not None:
                yield from _walk_run_now(part)
        return
    if isinstance(node, ast.ClassDef) and not into_definitions:
        for part in (*node.decorator_list, *node.bases, *node.keywords):
            yield from _walk_run_now(part)
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk_run_now(child, into_definitions, into_comprehensions)


def names_read_now(statement: ast.stmt) -> set[str]:
    """Names a statement looks up while it runs at module level (class bodies included)."""
    return {n.id for n in _walk_run_now(statement) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def names_called_now(statement: ast.stmt) -> set[str]:
    """Names a statement calls while it runs: ``f()``, ``Thing.create()`` (both through the
    name they start from) and decorators."""
    called: set[str] = set()
    for node in _walk_run_now(statement):
        callees = [node.func] if isinstance(node, ast.Call) else []
        if isinstance(node, DEFINITIONS):
            callees += node.decorator_list
        for callee in callees:
            while isinstance(callee, (ast.Attribute, ast.Call, ast.Subscript)):
                callee = callee.func if isinstance(callee, ast.Call) else callee.value
            if isinstance(callee, ast.Name):
                called.add(callee.id)
    return called


def _read_in_nested_scopes_now(statement: ast.stmt) -> set[str]:
    """Names looked up, while the statement runs, from a scope of its own: a class body or a
    comprehension. Those scopes see the module's globals, not the names a piecemeal run has
    bound so far."""
    names: set[str] = set()
    nested: list[ast.AST] = []
    for node in _walk_run_now(statement, into_definitions=False):
        if isinstance(node, ast.ClassDef):
            nested += node.body
        elif isinstance(node, COMPREHENSIONS):
            nested.append(node)
    for part in nested:
        names.update(n.id for n in _walk_run_now(part) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load))
    return names


def _functions_reading(tree: ast.Module) -> dict[str, set[str]]:
    """For each module-level function and class, every name read anywhere inside it."""
    reads: dict[str, set[str]] = {}
    for statement in tree.body:
        if isinstance(statement, DEFINITIONS):
            reads[statement.name] = {n.id for n in ast.walk(statement)
                                     if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return reads


def plan(old_source: str | bytes, new_source: str | bytes, filename: str = "<module>") -> Plan:
    """Compare two versions of a module by top-level statement.

    Raises ``SyntaxError`` when either does not parse.
    """
    old_tree, new_tree = ast.parse(old_source, filename), ast.parse(new_source, filename)
    old_keys = [ast.dump(s, include_attributes=False) for s in old_tree.body]
    new_keys = [ast.dump(s, include_attributes=False) for s in new_tree.body]
    matcher = difflib.SequenceMatcher(None, old_keys, new_keys, autojunk=False)
    kept_old: set[int] = set()
    kept_new: set[int] = set()
    for block in matcher.get_matching_blocks():
        kept_old.update(range(block.a, block.a + block.size))
        kept_new.update(range(block.b, block.b + block.size))
    gone = [s for i, s in enumerate(old_tree.body) if i not in kept_old]
    fresh = [(i, s) for i, s in enumerate(new_tree.body) if i not in kept_new]

    # A definition that only changed inside function bodies is patched by swapping code:
    # its decorators do not run again (a route registered twice, a signal connected twice).
    old_shapes = {(s.name, shape(s)): s for s in gone if isinstance(s, DEFINITIONS)}
    bodies: dict[int, str] = {}
    run: list[tuple[int, ast.stmt]] = []
    for index, statement in fresh:
        same_shape = None
        if isinstance(statement, DEFINITIONS):
            same_shape = old_shapes.pop((statement.name, shape(statement)), None)
        if same_shape is not None:
            bodies[index] = same_shape.name
            gone.remove(same_shape)
        else:
            run.append((index, statement))

    old_bound: set[str] = set().union(*(bound_names(s) for s in old_tree.body))
    new_bound: set[str] = set().union(*(bound_names(s) for s in new_tree.body))
    gone_bound: set[str] = set().union(*(bound_names(s) for s in gone))
    removed = sorted(gone_bound - new_bound)
    # An unchanged statement that uses at load time what changed (TITLE = LABEL.upper() after a
    # changed LABEL, a decorator call of a changed function) runs again too, and so, in turn,
    # does whatever uses what it binds: only that much of the module runs, not all of it.
    ran_again: list[str] = []
    while True:
        run_bound: set[str] = set().union(*(bound_names(s) for _, s in run))
        reason, more = _why_unsafe(new_tree, run, kept_new, run_bound, old_bound, set(removed), bodies)
        if reason is not None or not more:
            break
        for index, why in more:
            kept_new.discard(index)
            bodies.pop(index, None)
            run.append((index, new_tree.body[index]))
            ran_again.append(why)
        run.sort(key=lambda item: item[0])
    changed = sorted(run_bound & old_bound)
    added = sorted(run_bound - old_bound)
    return Plan(tuple(s for _, s in run), tuple(bodies.values()), tuple(changed), tuple(added), tuple(removed),
                reason, tuple(ran_again))


def _why_unsafe(tree: ast.Module, run: list[tuple[int, ast.stmt]], kept: set[int], run_bound: set[str],
                old_bound: set[str], removed: set[str],
                bodies: dict[int, str]) -> tuple[str | None, list[tuple[int, str]]]:
    """Why only running the whole module is right (or None), and the statements that must run
    again with those that changed, each with why."""
    for _, statement in run:
        if isinstance(statement, (ast.Delete, ast.Global, ast.Nonlocal)):
            return f"line {statement.lineno}: a changed {type(statement).__name__.lower()} statement", []
        if "*" in bound_names(statement):
            return f"line {statement.lineno}: a changed star import", []
    # Definitions keep their objects (new code is carried onto them); anything else is a new value.
    carried = {s.name for _, s in run if isinstance(s, DEFINITIONS)} & old_bound
    rebound = run_bound - carried
    carried |= set(bodies.values())
    first_run = min((i for i in range(len(tree.body)) if i not in kept), default=len(tree.body))
    more: list[tuple[int, str]] = []
    for index, statement in enumerate(tree.body):
        if index not in kept and index not in bodies:
            continue
        reads = names_read_now(statement)
        stale = (reads & rebound) if index > first_run else set()
        called = names_called_now(statement) & carried - {bodies.get(index)} if index > first_run else set()
        missing = reads & removed
        line = statement.lineno
        if missing:
            return f"line {line} uses {', '.join(sorted(missing))}, which is gone", []
        if stale:
            more.append((index, f"line {line} runs again: it was computed from {', '.join(sorted(stale))}, which "
                                "changed above it"))
        elif called:
            more.append((index, f"line {line} runs again: it calls {', '.join(sorted(called))} while the module "
                                "loads, and that changed"))
    if more:
        return None, more
    reads_of = _functions_reading(tree)
    for _, statement in run:
        hidden = _read_in_nested_scopes_now(statement) & run_bound
        for name in names_called_now(statement):
            hidden |= reads_of.get(name, set()) & run_bound
        if hidden:
            return (f"line {statement.lineno} reads {', '.join(sorted(hidden))} from a nested scope while it runs, "
                    "and that changes in the same save"), []
    return None, []


def module_for_statements(statements: Iterable[ast.stmt], tree_of: ast.Module) -> ast.Module:
    """A module of ``statements`` that keeps the original's ``from __future__`` imports."""
    future = [s for s in tree_of.body if isinstance(s, ast.ImportFrom) and s.module == "__future__"]
    body = future + [s for s in statements if s not in future]
    return ast.Module(body=body, type_ignores=[])
