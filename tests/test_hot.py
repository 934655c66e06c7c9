"""In-process hot reload: every classic trap, patched and asserted through the old references."""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsgi_reload import Change, Settings
from wsgi_reload._hot import statements
from wsgi_reload._hot.judge import Verdict
from wsgi_reload.hot import (
    HotReloader,
    apply_file,
    dependency_order,
    reload_module,
    reload_source,
    remember_source,
    replace,
)

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
        module = importlib.import_module(name)
        remember_source(module)  # what HotReloader.watch does: the next reload compares with this
        return module

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
    assert report.needs_restart and all("its closure now uses ('x', 'y'), not ('x',)" in reason
                                        for reason in report.needs_restart)


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


def test_replace_patches_classmethods_staticmethods_and_properties(load: object) -> None:
    module = load(BASE)  # type: ignore[operator]
    instance, thing = module.Thing(), module.Thing
    bound_make, static_function = module.Thing.make, module.Thing.static  # taken before the fix

    @replace(module.Thing)
    @classmethod
    def make(cls: type) -> str:
        return f"cm-fixed for {cls.__name__}"

    @replace(module.Thing)
    @staticmethod
    def static() -> str:
        return "sm-fixed"

    @replace(module.Thing)
    @property
    def prop(self: object) -> str:
        return "prop-fixed"

    assert thing.make() == "cm-fixed for Thing" and bound_make() == "cm-fixed for Thing"
    assert thing.static() == "sm-fixed" and static_function() == "sm-fixed"
    assert instance.prop == "prop-fixed"

    @replace(module.Thing, "make")
    def plain_make(cls: type) -> str:
        return "cm-plain"

    @replace(module.Thing, "static")
    def plain_static() -> str:
        return "sm-plain"

    @replace(module.Thing, "prop")
    def plain_getter(self: object) -> str:
        return "prop-plain"

    assert thing.make() == "cm-plain" and thing.static() == "sm-plain" and instance.prop == "prop-plain"
    assert module.Thing is thing and isinstance(instance, module.Thing)


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


# --- statement-level reload: module state survives -------------------------------------------

STATEFUL = """
STATE = {"n": 0}
CACHE = {}


def bump():
    STATE["n"] += 1
    return STATE["n"]


def greet():
    return "hello"
"""


def test_module_state_survives_a_reload_of_another_function(load: object) -> None:
    module = load(STATEFUL)  # type: ignore[operator]
    state, cache = module.STATE, module.CACHE          # from mod import STATE, CACHE
    for _ in range(3):
        module.bump()
    cache["warm"] = True
    rewrite(module, STATEFUL.replace('"hello"', '"hello again"'))
    report = reload_module(module)
    assert report.error is None and report.whole_module is None
    assert module.greet() == "hello again"
    assert module.bump() == 4                           # not 1: the dict was not made again
    assert module.STATE is state and module.CACHE is cache and cache == {"warm": True}
    assert report.patched == [f"{module.__name__}.greet"] and report.changed == []


def test_a_changed_constant_is_replaced_and_reported(load: object) -> None:
    module = load(STATEFUL + "\nLIMIT = 1\n\n\ndef limit():\n    return LIMIT\n")  # type: ignore[operator]
    module.bump()
    rewrite(module, STATEFUL + "\nLIMIT = 2\n\n\ndef limit():\n    return LIMIT\n")
    report = reload_module(module)
    assert module.LIMIT == 2 and module.limit() == 2
    assert report.changed == [f"{module.__name__}.LIMIT"] and report.whole_module is None
    assert module.bump() == 2


def test_a_removed_function_leaves_the_module(load: object) -> None:
    module = load(STATEFUL)  # type: ignore[operator]
    rewrite(module, STATEFUL.replace('def greet():\n    return "hello"\n', ""))
    report = reload_module(module)
    assert not hasattr(module, "greet")
    assert report.removed == [f"{module.__name__}.greet"] and report.whole_module is None


def test_a_new_helper_and_the_body_that_calls_it_arrive_together(load: object) -> None:
    module = load(STATEFUL)  # type: ignore[operator]
    greet = module.greet
    module.bump()
    rewrite(module, STATEFUL.replace('    return "hello"', '    return shout("hello")')
            + '\n\nPUNCTUATION = "!"\n\n\ndef shout(text):\n    return text.upper() + PUNCTUATION\n')
    report = reload_module(module)
    assert greet() == "HELLO!" and module.bump() == 2
    assert sorted(report.added) == [f"{module.__name__}.PUNCTUATION", f"{module.__name__}.shout"]


def test_a_changed_import_runs_again(load: object) -> None:
    module = load("import json as codec\nfrom os import sep as separator\nSTATE = {}\n")  # type: ignore[operator]
    state = module.STATE
    rewrite(module, "import pickle as codec\nfrom os import sep as separator\nSTATE = {}\n")
    report = reload_module(module)
    assert module.codec.__name__ == "pickle" and module.STATE is state
    assert report.changed == [f"{module.__name__}.codec"] and report.whole_module is None


def test_a_function_defined_under_an_if_takes_the_new_code_in_place(load: object) -> None:
    source = ("import sys\n\nif sys.platform:\n    def which():\n        return 'old'\n"
              "else:\n    def which():\n        return 'other'\n")
    module = load(source)  # type: ignore[operator]
    callback = module.which
    rewrite(module, source.replace("'old'", "'new'"))
    report = reload_module(module)
    assert callback() == "new" and module.which is callback and report.whole_module is None


def test_a_changed_import_of_a_function_never_patches_the_library(load: object) -> None:
    import os.path
    import posixpath

    join_code = os.path.join.__code__
    module = load("from os.path import join as combine\n")  # type: ignore[operator]
    rewrite(module, "from posixpath import basename as combine\n")
    report = reload_module(module)
    assert module.combine is posixpath.basename and os.path.join.__code__ is join_code
    assert report.changed == [f"{module.__name__}.combine"] and report.patched == []


def test_an_unchanged_statement_computed_from_a_changed_one_runs_again_and_nothing_else(load: object) -> None:
    source = 'LABEL = "count"\nTITLE = LABEL.upper()\nSTATE = {"n": 0}\nSHOUT = TITLE + "!"\n'
    module = load(source)  # type: ignore[operator]
    module.STATE["n"] = 5
    rewrite(module, source.replace('"count"', '"total"'))
    report = reload_module(module)
    assert module.TITLE == "TOTAL" and module.SHOUT == "TOTAL!"  # and what was computed from TITLE in turn
    assert report.whole_module is None
    assert report.ran_again == ["line 2 runs again: it was computed from LABEL, which changed above it",
                                "line 4 runs again: it was computed from TITLE, which changed above it"]
    assert module.STATE == {"n": 5}                     # the rest of the module keeps its state


def test_a_statement_that_cannot_run_alone_runs_the_whole_module(load: object,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    source = 'LIMIT = 1\nSQUARES = [n * LIMIT for n in range(3)]\nSTATE = {"n": 0}\n'
    module = load(source)  # type: ignore[operator]
    module.STATE["n"] = 5
    hot = HotReloader(Settings(backend="poll"))
    hot.watch(module)
    rewrite(module, source.replace("LIMIT = 1", "LIMIT = 2"))
    with caplog.at_level(logging.WARNING, logger="wsgi_reload"):
        report = hot.apply([Change(module.__file__, "modified")])
    assert report.whole_module is not None and report.whole_module.startswith("line 2 reads LIMIT from a nested")
    assert "ran the whole module again: line 2 reads LIMIT" in caplog.text
    assert module.SQUARES == [0, 2, 4] and module.STATE == {"n": 0}  # the price: state starts over


def test_an_import_time_error_leaves_the_same_module_dict_as_it_was(load: object) -> None:
    module = load(STATEFUL)  # type: ignore[operator]
    namespace, before = module.__dict__, dict(module.__dict__)
    rewrite(module, STATEFUL + "\nEXTRA = 1\nBROKEN = 1 / 0\n")
    report = reload_module(module)
    assert report.error is not None and "ZeroDivisionError" in report.error
    assert module.__dict__ is namespace and module.__dict__ == before and not hasattr(module, "EXTRA")
    rewrite(module, STATEFUL + "\nEXTRA = 1\n")        # compared with what still runs: STATEFUL
    assert reload_module(module).added == [f"{module.__name__}.EXTRA"]


CLASSES = """
class Base:
    def describe(self):
        return "base"


class Child(Base):
    def describe(self):
        return "child+" + super().describe()
"""


def test_an_added_method_using_super_works_on_old_instances(load: object) -> None:
    module = load(CLASSES)  # type: ignore[operator]
    child, child_class = module.Child(), module.Child
    rewrite(module, CLASSES.replace("class Child(Base):", "class Child(Base):\n    def extra(self):\n"
                                    "        return 'extra+' + super().describe()\n"))
    report = reload_module(module)
    assert report.error is None and report.needs_restart == []
    assert module.Child is child_class
    assert child.extra() == "extra+base"
    assert child.describe() == "child+base"


def test_a_method_that_starts_using_super_works_on_old_instances(load: object) -> None:
    module = load(CLASSES)  # type: ignore[operator]
    child = module.Child()
    rewrite(module, CLASSES.replace("class Base:", "class Base:\n    def hello(self):\n        return 'hi'\n")
            .replace('        return "child+" + super().describe()',
                     '        return "child+" + super().describe()\n\n    def hello(self):\n'
                     '        return "child " + super().hello()'))
    report = reload_module(module)
    assert report.needs_restart == [] and child.hello() == "child hi"


def test_a_class_built_by_a_custom_metaclass_is_refused(load: object) -> None:
    source = ("class Registry(type):\n    made = []\n\n    def __new__(mcs, name, bases, ns):\n"
              "        cls = super().__new__(mcs, name, bases, ns)\n        mcs.made.append(name)\n"
              "        return cls\n\nclass Model(metaclass=Registry):\n    size = 1\n")
    module = load(source)  # type: ignore[operator]
    model = module.Model
    rewrite(module, source.replace("size = 1", "size = 2\n    colour = 'red'"))
    report = reload_module(module)
    assert module.Model is model and model.size == 1 and not hasattr(model, "colour")
    assert report.needs_restart == [f"{module.__name__}.Model: it is built by the metaclass "
                                    f"{module.__name__}.Registry (a Django model, an enum, an ABC ...), "
                                    "which patching in place would bypass"]


DJANGO_MODEL = """
import django
from django.conf import settings

settings.configure(INSTALLED_APPS=[], DATABASES={})
django.setup()

from django.db import models


class Shop(models.Model):
    name = models.CharField(max_length=20)

    class Meta:
        app_label = "shops"

    def label(self):
        return "old " + self.name
"""


def test_a_django_model_is_refused_but_a_method_body_edit_is_patched(tmp_path: Path) -> None:
    """In a child interpreter: Django's settings and app registry are once per process."""
    pytest.importorskip("django")
    (tmp_path / "shops_models.py").write_text(DJANGO_MODEL)
    script = f"""
import sys, pathlib
sys.path.insert(0, {str(tmp_path)!r})
import shops_models as m
from wsgi_reload.hot import reload_module, remember_source
remember_source(m)
path = pathlib.Path(m.__file__)
shop, Shop = m.Shop(name="a"), m.Shop
path.write_text(path.read_text().replace('"old "', '"new "'))
report = reload_module(m)
assert report.needs_restart == [] and report.whole_module is None, report
assert shop.label() == "new a" and m.Shop is Shop
city = "max_length=20)\\n    city = models.CharField(max_length=9)"
path.write_text(path.read_text().replace("max_length=20)", city))
report = reload_module(m)
assert m.Shop is Shop and not hasattr(Shop, "city"), report
assert report.needs_restart == ["shops_models.Shop: it is built by the metaclass django.db.models.base.ModelBase "
                                "(a Django model, an enum, an ABC ...), which patching in place would bypass"], report
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_reader_never_sees_a_half_built_module(load: object) -> None:
    """10,000 calls from another thread during 50 reloads that change bodies and constants, add
    and remove names, and every fifth of which fails at import time."""
    def version(n: int) -> str:
        extra = f"EXTRA_{n} = {n}\n" if n % 2 else ""
        broken = "raise RuntimeError('import time')\n" if n % 5 == 0 else ""
        return (f"COUNT = [0]\nVERSION = {n}\n{extra}\n\ndef helper():\n    return VERSION + {n}\n\n\n"
                f"def api():\n    COUNT[0] += 1\n    return helper()\n\n\nLIMIT = {n * 10}\n{broken}")

    module = load(version(1))  # type: ignore[operator]
    api, count = module.api, module.COUNT
    errors: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                api()
                module.api()
                version, limit = module.VERSION, module.LIMIT  # no call in between: one instant
                assert limit == 10 * version, (version, limit)
                calls[0] += 1
            except BaseException as exc:  # noqa: BLE001 - any error fails the test
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    reloads = failed = 0
    try:
        while reloads < 50 or calls[0] < 10_000:
            reloads += 1
            rewrite(module, version(reloads + 1))
            report = reload_module(module)
            assert report.whole_module is None, report
            failed += report.error is not None
            time.sleep(0.001)
    finally:
        stop.set()
        reader.join()
    assert errors == [] and calls[0] >= 10_000 and reloads >= 50 and failed >= 10
    assert module.COUNT is count and count[0] >= 2 * calls[0]  # one counter all along: state kept


# --- patches to running workers (gunicorn's patch mode) ---------------------------------------

from wsgi_reload._hot.judge import judge  # noqa: E402

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
    (("X = 1", "X = 2"), True, ""),
    (("b=2", "b=3"), True, ""),
    (("def f(a, b=2):\n    return a + b", "def half(a):\n    return a / 2\n\ndef f(a, b=2):\n    return half(a) + b"),
     True, ""),
    (("X = 1", "X = 2\nLIMIT = 10"), True, ""),
    (("X = 1\n", "X = 2\nY = X + 1\n"), True, ""),
    (("X = 1\n", "X = 1\nY = X + 1\n"), True, ""),
    (("class C:", "Y = X * 10\n\nclass C:"), True, ""),
    (("    y = 1\n    def inner():\n        return y", "    y = 1\n    z = 2\n    def inner():\n        return y + z"),
     False, "outer.<locals>.inner now closes over ('y', 'z'), not ('y',)"),
])
def test_judge_accepts_what_can_run_statement_by_statement(edit: tuple[str, str], patchable: bool,
                                                            reason: str) -> None:
    verdict = judge(PATCH_BASE, PATCH_BASE.replace(*edit), "x.py")
    assert verdict.patchable is patchable
    assert verdict.reason == reason


@pytest.mark.parametrize("old, new, ran_again", [
    ("X = 1\nY = X + 1\n", "X = 2\nY = X + 1\n", "line 2 runs again: it was computed from X, which changed above it"),
    ("def make():\n    return 1\n\nmade = make()\n", "def make():\n    return 2\n\nmade = make()\n",
     "line 4 runs again: it calls make while the module loads, and that changed"),
    ("def deco(f):\n    return f\n\n@deco\ndef g():\n    pass\n",
     "def deco(f):\n    f.seen = 1\n    return f\n\n@deco\ndef g():\n    pass\n",
     "line 6 runs again: it calls deco while the module loads, and that changed"),
    ("class Thing:\n    @staticmethod\n    def create():\n        return 1\n\nmade = Thing.create()\n",
     "class Thing:\n    @staticmethod\n    def create():\n        return 2\n\nmade = Thing.create()\n",
     "line 6 runs again: it calls Thing while the module loads, and that changed"),
])
def test_judge_patches_what_runs_again_with_what_changed(old: str, new: str, ran_again: str) -> None:
    verdict = judge(old, new, "x.py")
    assert verdict.patchable
    assert statements.plan(old, new, "x.py").ran_again == (ran_again,)


@pytest.mark.parametrize("old, new, reason", [
    ("def a():\n    pass\n\nb = a\n", "b = a\n", "line 1 uses a, which is gone"),
    ("LIMIT = 1\n", "LIMIT = 2\nNEW = 3\n\nclass C:\n    size = NEW\n",
     "line 4 reads NEW from a nested scope while it runs, and that changes in the same save"),
    ("X = 1\n", "X = 1\ndel X\n", "line 2: a changed delete statement"),
    ("LIMIT = 1\n", "LIMIT = 2\nSQUARES = [n * LIMIT for n in range(3)]\n",
     "line 2 reads LIMIT from a nested scope while it runs, and that changes in the same save"),
])
def test_judge_refuses_what_only_the_whole_module_can_do(old: str, new: str, reason: str) -> None:
    verdict = judge(old, new, "x.py")
    assert verdict == Verdict(False, reason)


def test_a_comprehension_variable_is_not_a_module_name() -> None:
    from wsgi_reload._hot.statements import plan

    changed = plan("i = 'kept'\nsquares = [i * i for i in range(3)]\n",
                   "i = 'kept'\nsquares = [j * j for j in range(3)]\n")
    assert changed.changed == ("squares",) and changed.removed == () and changed.added == ()


def test_a_patch_runs_no_unchanged_module_code(load: object) -> None:
    module = load(PATCH_BASE + "\nCALLS = []\nCALLS.append(1)\n")  # type: ignore[operator]
    f, instance, calls = module.f, module.C(), module.CALLS
    old = Path(module.__file__).read_text()
    new = old.replace("return a + b", "return a * b").replace("return 1\n", "return 11\n")
    report = reload_source(module, old, new, module.__file__)
    assert f(3) == 6 and instance.m() == 11
    assert module.CALLS is calls and calls == [1]  # the module body did not run again
    assert f"{module.__name__}.f" in report.patched and f"{module.__name__}.C.m" in report.patched
    assert report.whole_module is None


def test_a_worker_that_cannot_take_a_patch_makes_the_master_fall_back(load: object, tmp_path: Path) -> None:
    import json

    from wsgi_reload._hot.transport import PATCH_FILE, PatchApplier, PatchPublisher

    old = "class Meta(type):\n    pass\n\nclass Model(metaclass=Meta):\n    size = 1\n"
    module = load(old)  # type: ignore[operator]
    shared = tmp_path / "records"
    shared.mkdir()
    publisher = PatchPublisher(str(shared), str(tmp_path))
    reasons: list[str] = []
    applier = PatchApplier(str(shared))
    new = old.replace("size = 1", "size = 2")
    (shared / PATCH_FILE).write_text(json.dumps({"generation": 1, "files": {module.__file__: {"loaded": old,
                                                                                             "latest": new}}}))
    publisher.watch_for_failures(reasons.append, seconds=5)
    applier.maybe_apply()
    deadline = time.monotonic() + 5
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(reasons) == 1 and f"{module.__name__}.Model: it is built by the metaclass" in reasons[0]
    assert module.Model.size == 1  # the worker kept its old class as it was


def test_a_save_before_the_source_is_recorded_does_not_become_the_baseline(load: object) -> None:
    """Saved between the import and remember_source: what is on disk is not what runs, so it is
    not recorded, and the next reload runs the whole module instead of trusting it."""
    module = load("def f():\n    return 'imported'\n\nVALUE = f()\n")  # type: ignore[operator]
    rewrite(module, "def f():\n    return 'saved before watching'\n\nVALUE = f()\n")
    remember_source(module)
    rewrite(module, "def f():\n    return 'reloaded'\n\nVALUE = f()\n")
    report = reload_module(module)
    assert report.whole_module is not None and "not recorded" in report.whole_module
    assert module.VALUE == "reloaded"


def test_patch_mode_takes_both_versions_from_the_verified_code_not_the_disk(load: object, tmp_path: Path) -> None:
    """The master's baseline and the new source come from the server's verified generation: a
    save after the check (or before the master first read the file) is never the patch."""
    from wsgi_reload._hot.transport import PATCH_FILE, PatchPublisher

    old = "def text():\n    return 'v1'\n"
    module = load(old)  # type: ignore[operator]
    path = str(module.__file__)
    verified = {path: old.encode()}
    shared = tmp_path / "records"
    shared.mkdir()
    publisher = PatchPublisher(str(shared), str(tmp_path), source_of=verified.get)
    Path(path).write_text("def text():\n    return 'saved, not checked'\n")
    publisher.remember({path: None})
    verified[path] = b"def text():\n    return 'v2'\n"  # what passed the check
    assert publisher.publish([Change(path, "modified")]) is None
    patch = json.loads((shared / PATCH_FILE).read_text())
    assert patch["files"][path] == {"loaded": old, "latest": "def text():\n    return 'v2'\n"}


def test_lines_added_above_an_unchanged_function_move_its_line_numbers(load: object) -> None:
    import inspect
    import traceback

    module = load("def helper():\n    return 'h'\n\n\ndef fails():\n    raise ValueError('here')\n")  # type: ignore[operator]
    held = module.fails
    rewrite(module, "# a comment\n# and another\n\n\ndef helper():\n    return 'h2'\n\n\n"
                    "def fails():\n    raise ValueError('here')\n")
    report = reload_module(module)
    assert report.ok
    assert held.__code__.co_firstlineno == 9
    assert inspect.getsourcelines(held)[1] == 9
    try:
        held()
    except ValueError as exc:
        assert traceback.extract_tb(exc.__traceback__)[-1].lineno == 10


def test_super_works_on_old_instances_and_on_those_the_module_made_while_it_ran(load: object) -> None:
    """A method that starts using zero-argument super() while the whole module runs again: the
    old class gets it with a cell holding the old class, and the new class, whose instance the
    module made at load time, keeps its own."""
    source = "class Base:\n    def name(self):\n        return 'b'\n\n\nclass Child(Base):\n{body}\n\nchild = Child()\n"
    module = load(source.format(body="    def name(self):\n        return 'c'\n"))  # type: ignore[operator]
    old_child = module.child
    rewrite(module, source.format(body="    def name(self):\n        return super().name() + '!'\n"))
    reload_module(module)
    assert old_child.name() == "b!"
    assert module.child.name() == "b!"


def test_a_mixed_edit_runs_only_what_changed_and_keeps_module_state(load: object) -> None:
    """A changed method body, an added method that uses super() in a subclass, and a new
    module-level ``C.extra = _extra``: the module does not run whole, its state survives, and
    an instance made before the edit runs all of the new code."""
    source = ("class Base:\n    def hello(self):\n        return 'base'\n\n\nclass C(Base):\n    def hello(self):\n"
              "        return 'c'\n\n\nSTATE = {'n': 0}\n")
    module = load(source)  # type: ignore[operator]
    module.STATE["n"] = 5
    instance = module.C()
    rewrite(module, source.replace("return 'base'", "return 'base2'").replace(
        "        return 'c'\n", "        return 'c'\n\n    def both(self):\n"
        "        return super().hello() + '+' + self.extra()\n") + "\n\ndef _extra(self):\n    return 'extra'\n\n\n"
        "C.extra = _extra\n")
    report = reload_module(module)
    assert report.ok and report.whole_module is None
    assert instance.both() == "base2+extra"
    assert module.STATE == {"n": 5}


def test_functions_whose_closures_call_each_other_are_patched(load: object) -> None:
    """A factory's two functions that call each other through their closures: patching one
    reaches the other and back, once each."""
    source = ("def make(n):\n    def even(k):\n        return k == 0 or odd(k - 1)\n\n    def odd(k):\n"
              "        return k != 0 and even(k - 1)\n\n    return even, odd, n\n\n\nEVEN, ODD, N = make({n})\n")
    module = load(source.format(n=1))  # type: ignore[operator]
    even = module.EVEN
    rewrite(module, source.format(n=2).replace("return k == 0 or", "return k == 0 or k == -7 or"))
    report = reload_module(module)
    assert report.error is None
    assert even(4) is True and module.N == 2
