"""Generated edit sequences: random edits of functions, methods, decorators and constants,
each reloaded in place and checked against a fresh import of the same source (the idea of
jurigged's ``test_generated``; the generator is our own)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_hot_snippets import fresh, outcome

from wsgi_reload.hot import reload_source

TEMPLATE = '''
import functools

FACTOR = {factor}


def plus(n):
    def deco(fn):
        {wraps}
        def wrapper(*args):
            return fn(*args) + n
        return wrapper
    return deco


def helper(x):
    return x * FACTOR + {helper_add}


@plus({deco_n})
def decorated(x):
    return helper(x) + {decorated_add}


class Base:
    def value(self):
        return {base_value}


class Thing(Base):
    LIMIT = {limit}

    def value(self):
        return {thing_body}

    @property
    def doubled(self):
        return self.value() * 2

    @classmethod
    def make(cls):
        return cls()


def total():
    return decorated(3) + Thing().doubled + Thing.make().value() + Thing.LIMIT
'''
PROBES = ["helper(2)", "decorated(5)", "Thing().value()", "Thing().doubled", "Thing.make().value()", "total()",
          "FACTOR", "Thing.LIMIT"]
THING_BODIES = ["super().value() + 1", "self.LIMIT", "Base.value(self) * 3", "7", "super().value() + self.LIMIT"]


def random_edit(rng: random.Random, fields: dict[str, object]) -> dict[str, object]:
    fields = dict(fields)
    key = rng.choice(["factor", "wraps", "helper_add", "deco_n", "decorated_add", "base_value", "limit", "thing_body"])
    if key == "wraps":
        fields[key] = "" if fields[key] else "@functools.wraps(fn)"
    elif key == "thing_body":
        fields[key] = rng.choice(THING_BODIES)
    else:
        fields[key] = rng.randint(0, 50)
    return fields


@pytest.mark.parametrize("seed", range(25))
def test_a_random_edit_sequence_behaves_as_a_fresh_import_at_every_step(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    fields: dict[str, object] = {"factor": 2, "wraps": "", "helper_add": 1, "deco_n": 1, "decorated_add": 0,
                                 "base_value": 10, "limit": 5, "thing_body": "super().value() + 1"}
    source = TEMPLATE.format(**fields)
    module = fresh(source, tmp_path)
    for step in range(10):
        fields = random_edit(rng, fields)
        new = TEMPLATE.format(**fields)
        held = dict(vars(module))
        report = reload_source(module, source, new, f"step{step}.py")
        source = new
        assert report.error is None
        expected = fresh(new, tmp_path)
        if not report.ok:
            # Saying so is allowed; running other code while saying "patched" is not.
            assert report.needs_restart
            module = fresh(new, tmp_path)  # what a restart gives
            continue
        for probe in PROBES:
            right = outcome(probe, vars(expected))
            assert outcome(probe, vars(module)) == right, (step, probe, fields, report)
            if probe != "FACTOR":  # a copy of a constant (from mod import FACTOR) keeps its value, by design
                assert outcome(probe, held) == right, (step, probe, fields, report, "held")
