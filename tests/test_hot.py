"""In-process hot reload: every classic trap, patched and asserted through the old references."""

from __future__ import annotations

import importlib
import itertools
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsgi_reload import Settings
from wsgi_reload.hot import HotReloader, apply_file, dependency_order, reload_module, replace

_counter = itertools.count()


@pytest.fixture
def load(tmp_path: Path) -> Iterator[object]:
    """Write a module and import it; calling the returned function with new source rewrites it."""
    sys.path.insert(0, str(tmp_path))
    names: list[str] = []

    def make(source: str, name: str | None = None) -> types.ModuleType:
        name = name or f"hot_mod_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return importlib.import_module(name)

    yield make
    sys.path.remove(str(tmp_path))
    for name in names:
        sys.modules.pop(name, None)


def rewrite(module: types.ModuleType, source: str) -> None:
    Path(module.__file__ or "").write_text(textwrap.dedent(source))


BASE = """
import functools

def helper():
    return "old"

def closure_maker():
    x = 1
    def inner():
        return ("old", x)
    return inner

closure = closure_maker()

def deco(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper

@deco
def decorated():
    return "old"

class Base:
    def who(self):
        return "base-old"

class Thing(Base):
    kind = "old"

    def who(self):
        return "thing-old+" + super().who()

    @classmethod
    def make(cls):
        return "cm-old"

    @staticmethod
    def static():
        return "sm-old"

    @property
    def prop(self):
        return "prop-old"

    class Inner:
        def hello(self):
            return "inner-old"
"""


def test_every_trap_sees_the_new_code_through_old_references(load: object) -> None:
    module = load(BASE)  # type: ignore[operator]
    copied_helper = module.helper                # from mod import helper
    callbacks = [module.helper]                  # a callback registered before the reload
    instance = module.Thing()                    # an existing instance
    bound = instance.who                         # a bound method
    old_class = module.Thing
    decorated = module.decorated
    inner = module.Thing.Inner()
    rewrite(module, BASE.replace("old", "new"))
    report = reload_module(module)
    assert report.error is None and report.needs_restart == []
    assert copied_helper() == "new" and callbacks[0]() == "new"
    assert bound() == "thing-new+base-new"
    assert isinstance(instance, module.Thing) and module.Thing is old_class
    assert instance.who() == "thing-new+base-new"       # super() still works
    assert module.Thing.make() == "cm-new" and module.Thing.static() == "sm-new"
    assert instance.prop == "prop-new" and module.Thing.kind == "new"
    assert decorated() == "new"                          # through functools.wraps
    assert inner.hello() == "inner-new"                  # nested class
    assert module.closure() == ("new", 1)                # same free variables: patched


def test_a_closure_with_new_free_variables_keeps_the_old_code(load: object) -> None:
    module = load("def closure_maker():\n    x = 1\n    def inner():\n        return x\n    return inner\n\n"  # type: ignore[operator]
                  "closure = closure_maker()\n")
    before, maker = module.closure, module.closure_maker
    rewrite(module, "def closure_maker():\n    x = 1\n    y = 2\n    def inner():\n        return (x, y)\n"
                    "    return inner\n\nclosure = closure_maker()\n")
    report = reload_module(module)
    assert module.closure is before and before() == 1
    assert module.closure_maker is maker  # its body changed fine; the closure it made did not
    assert report.needs_restart == [f"{module.__name__}.closure: its closure now uses ('x', 'y'), not ('x',)"]


def test_a_function_that_became_a_class_keeps_the_old_function(load: object) -> None:
    module = load("def thing():\n    return 'function'\n")  # type: ignore[operator]
    old = module.thing
    rewrite(module, "class thing:\n    pass\n")
    report = reload_module(module)
    assert module.thing is old and old() == "function"
    assert report.needs_restart == [f"{module.__name__}.thing: it was a function, now a type"]


def test_changed_slots_need_a_restart(load: object) -> None:
    module = load("class P:\n    __slots__ = ('x',)\n    def get(self):\n        return 'old'\n")  # type: ignore[operator]
    point = module.P()
    rewrite(module, "class P:\n    __slots__ = ('x', 'y')\n    def get(self):\n        return 'new'\n")
    report = reload_module(module)
    assert point.get() == "old"
    assert report.needs_restart == [f"{module.__name__}.P: its __slots__ changed"]


@pytest.mark.parametrize("broken, error", [
    ("def helper(:\n", "SyntaxError"),
    ("def helper():\n    return 'new'\n\nraise RuntimeError('import time')\n", "RuntimeError"),
])
def test_a_broken_file_changes_nothing(load: object, broken: str, error: str) -> None:
    module = load(BASE)  # type: ignore[operator]
    before = dict(module.__dict__)
    rewrite(module, broken)
    report = reload_module(module)
    assert report.error is not None and error in report.error and module.__file__ in report.error
    assert module.__dict__ == before
    assert module.helper() == "old"


def test_patching_is_safe_under_concurrent_calls(load: object) -> None:
    module = load("def value():\n    return 0\n")  # type: ignore[operator]
    func = module.value
    seen: set[object] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def call() -> None:
        while not stop.is_set():
            try:
                seen.add(func())
            except BaseException as exc:  # noqa: BLE001 - any error fails the test
                errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for n in range(1, 30):
            rewrite(module, f"def value():\n    return {n}\n")
            assert reload_module(module).error is None
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert func() == 29 and seen <= set(range(30))


def test_dependency_order_puts_a_module_before_its_importers(load: object) -> None:
    base = load("def f():\n    return 1\n")  # type: ignore[operator]
    user = load(f"from {base.__name__} import f\n\ndef g():\n    return f()\n")  # type: ignore[operator]
    assert dependency_order([user, base]) == [base, user]


def test_the_hot_reloader_watches_real_files(load: object) -> None:
    module = load(BASE)  # type: ignore[operator]
    copied = module.helper
    reports: list[object] = []
    with HotReloader(Settings(interval=0.05, settle=0.05, backend="poll"), on_reload=reports.append) as hot:
        hot.watch(module)
        time.sleep(0.2)
        rewrite(module, BASE.replace('return "old"', 'return "watched"', 1))
        deadline = time.monotonic() + 10
        while copied() != "watched" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert copied() == "watched"
    assert reports


def test_replace_patches_functions_and_methods_in_place(load: object) -> None:
    module = load(BASE)  # type: ignore[operator]
    callback = module.helper
    instance = module.Thing()

    @replace(module)
    def helper() -> str:
        return "fixed"

    @replace(module.Base, "who")
    def who_fixed(self: object) -> str:
        return "base-fixed"

    assert callback() == "fixed" and helper is callback
    assert instance.who() == "thing-old+base-fixed"
    with pytest.raises(ValueError, match="closure now uses"):  # Thing.who calls super(): needs its class cell

        @replace(module.Thing, "who")
        def who_outside_the_class(self: object) -> str:
            return "cannot"


def test_apply_file_runs_a_hotfix_once(load: object, tmp_path: Path) -> None:
    module = load(BASE)  # type: ignore[operator]
    fix = tmp_path / "fix_1.py"
    fix.write_text(f"import {module.__name__} as target\nfrom wsgi_reload.hot import replace\n\n"
                   "@replace(target)\ndef helper():\n    return 'hotfixed'\n")
    report = apply_file(str(fix))
    assert report.error is None
    assert module.helper() == "hotfixed"
    broken = tmp_path / "fix_2.py"
    broken.write_text("def (:\n")
    assert "SyntaxError" in (apply_file(str(broken)).error or "")


# --- body-only patches (gunicorn's patch mode) ---------------------------------------------

from wsgi_reload.patch import apply, judge  # noqa: E402

PATCH_BASE = """
X = 1

def f(a, b=2):
    return a + b

class C:
    def m(self):
        return 1

def outer():
    y = 1
    def inner():
        return y
    return inner
"""


@pytest.mark.parametrize("edit, patchable, reason", [
    (("return a + b", "return a * b"), True, ""),
    (("return 1\n", "return 11\n"), True, ""),
    (("X = 1", "X = 2"), False, "more than function bodies changed"),
    (("b=2", "b=3"), False, "more than function bodies changed"),
    (("def f(a, b=2):", "@staticmethod\ndef f(a, b=2):"), False, "more than function bodies changed"),
    (("        return y", "        return y + X"), True, ""),
    (("    y = 1\n    def inner():\n        return y", "    y = 1\n    z = 2\n    def inner():\n        return y + z"),
     False, "outer.<locals>.inner now closes over ('y', 'z'), not ('y',)"),
])
def test_judge_accepts_only_body_changes(edit: tuple[str, str], patchable: bool, reason: str) -> None:
    verdict = judge(PATCH_BASE, PATCH_BASE.replace(*edit), "x.py")
    assert verdict.patchable is patchable
    assert verdict.reason == reason


def test_apply_swaps_bodies_without_running_module_code(load: object) -> None:
    module = load(PATCH_BASE + "\nCALLS = []\nCALLS.append(1)\n")  # type: ignore[operator]
    f, instance = module.f, module.C()
    new = PATCH_BASE.replace("return a + b", "return a * b").replace("return 1\n", "return 11\n")
    patched = apply(module, new + "\nCALLS = []\nCALLS.append(1)\n", module.__file__)
    assert f(3) == 6 and instance.m() == 11
    assert module.CALLS == [1]  # the module body did not run again
    assert f"{module.__name__}.f" in patched and f"{module.__name__}.C.m" in patched


def test_a_worker_that_cannot_take_a_patch_makes_the_master_fall_back(load: object, tmp_path: Path) -> None:
    import json

    from wsgi_reload.hybrid import PATCH_FILE, PatchApplier, PatchPublisher

    module = load("def outer():\n    y = 1\n    def inner():\n        return y\n    return inner\n\n"  # type: ignore[operator]
                  "kept = outer()\n")
    shared = tmp_path / "manifests"
    shared.mkdir()
    publisher = PatchPublisher(str(shared), str(tmp_path))
    reasons: list[str] = []
    # What only this worker has loaded: the published source gives ``inner`` other free variables.
    new = ("def outer():\n    y = 1\n    z = 2\n    def inner():\n        return y + z\n    return inner\n\n"
           "kept = outer()\n")
    (shared / PATCH_FILE).write_text(json.dumps({"generation": 1, "files": {module.__file__: new}}))
    publisher.watch_for_failures(reasons.append, seconds=5)
    PatchApplier(str(shared)).maybe_apply()
    deadline = time.monotonic() + 5
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(reasons) == 1 and "free variables differ" in reasons[0]
    assert module.kept() == 1  # the worker kept its old code
