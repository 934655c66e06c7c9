"""In-place reload against a fresh import, on snippet files.

Each family in ``tests/snippets/`` is a sequence of versions of one module,
``name:a.py``, ``name:b.py``, ... (the layout of jurigged's ``tests/snippets``; the cases are
our own). The first version is imported and then reloaded in place to each next one. After
each step every expression in that version's ``PROBES`` must give what a fresh import of the
same source gives, evaluated both through the reloaded module and through the objects the
module held before the step (references taken at import keep working); and a step whose
``OUTCOME`` is ``"restart"`` must say so. No step may report ``patched`` while other code runs.
"""

from __future__ import annotations

import importlib.util
import itertools
import types
from pathlib import Path
from typing import Any

import pytest

from wsgi_reload import hot
from wsgi_reload.hot import reload_source

SNIPPETS = Path(__file__).resolve().parent / "snippets"
FAMILIES = sorted({path.name.split(":")[0] for path in SNIPPETS.glob("*:*.py")})
_names = itertools.count()


def versions(family: str) -> list[Path]:
    return sorted(SNIPPETS.glob(f"{family}:*.py"))


def fresh(source: str, tmp_path: Path) -> types.ModuleType:
    name = f"snippet_fresh_{next(_names)}"
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Not in sys.modules: a module left there (its file gone with tmp_path) would be a changed
    # file to every later test in this process that scans sys.modules.
    spec.loader.exec_module(module)
    return module


def outcome(expression: str, namespace: dict[str, Any]) -> str:
    try:
        return repr(eval(expression, namespace))  # noqa: S307 - the snippets are ours
    except Exception as exc:  # noqa: BLE001 - an exception is an outcome to compare too
        return f"raises {type(exc).__name__}"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_step_behaves_as_a_fresh_import(family: str, tmp_path: Path) -> None:
    steps = versions(family)
    assert len(steps) >= 2
    module = fresh(steps[0].read_text(), tmp_path)
    current = steps[0].read_text()
    for step in steps[1:]:
        source = step.read_text()
        held = dict(vars(module))  # the objects references taken before this step point at
        report = reload_source(module, current, source, str(step))
        current = source
        expected = fresh(source, tmp_path)
        wanted = expected.OUTCOME
        assert report.error is None, f"{step.name}: {report.error}"
        if wanted == "restart":
            assert report.needs_restart, f"{step.name}: expected a restart, got {report}"
            continue
        assert report.ok, f"{step.name}: {report.needs_restart}"
        for expression in expected.PROBES:
            right = outcome(expression, vars(expected))
            assert outcome(expression, vars(module)) == right, f"{step.name}: {expression} (module)"
            assert outcome(expression, held) == right, f"{step.name}: {expression} (held references)"


def test_a_patch_that_would_run_other_code_is_never_reported_patched(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check behind every 'patched': with the closure left as it was (as before closures were
    carried over), the old wrapper would call the old function; the step says it needs a restart."""
    monkeypatch.setattr(hot, "_carry_closure", lambda *args: {})
    old_source = (SNIPPETS / "decorator_nowraps:b.py").read_text()
    module = fresh(old_source, tmp_path)
    report = reload_source(module, old_source, (SNIPPETS / "decorator_nowraps:c.py").read_text(), "c.py")
    assert not report.ok and not [name for name in report.patched if name.endswith(".munch")]
    assert any("closure's n is not the new value" in reason or "the fn it calls" in reason
               for reason in report.needs_restart), report.needs_restart
