"""The package's shape: no module reaches into another module's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "wsgi_reload"


def reaches_into_privates(source: str) -> list[str]:
    """Where ``source`` (a module of the package) uses a private name of another module of the
    package: ``from .x import _name``, ``alias._name`` or ``getattr(alias, "_name")`` for an
    alias bound by an import of the package. Private modules (``_genimport``) may be imported;
    their public names are their interface."""
    tree = ast.parse(source)
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("wsgi_reload")):
            for alias in node.names:
                if node.module is not None and _private(alias.name):
                    found.append(f"line {node.lineno}: from {'.' * node.level}{node.module} import {alias.name}")
                aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            aliases.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("wsgi_reload"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and _private(node.attr):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr") \
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                and _private(node.args[1].value):
            found.append(f"line {node.lineno}: {node.func.id}({node.args[0].id}, {node.args[1].value!r})")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names() -> None:
    found = {str(path.relative_to(PACKAGE)): hits for path in sorted(PACKAGE.rglob("*.py"))
             if (hits := reaches_into_privates(path.read_text()))}
    assert found == {}


def test_the_check_sees_each_kind_of_reach() -> None:
    source = ("from .. import gunicorn as adapter\nfrom .gate import _reported\nimport wsgi_reload._core.files\n"
              "adapter._worker.patterns = []\ngetattr(adapter, '_master', None)\nwsgi_reload._x\n"
              "import os\nos._exit\nadapter.public\n")
    assert set(reaches_into_privates(source)) == {
        "line 2: from .gate import _reported", "line 4: adapter._worker", "line 5: getattr(adapter, '_master')",
        "line 6: wsgi_reload._x"}


PUBLIC_MODULES = {"__init__.py", "gunicorn.py", "uwsgi.py", "hot.py", "cli.py", "django", "py.typed"}
"""The import paths users write (the README's and docs' own): everything else is internal."""


def test_only_the_documented_modules_are_public() -> None:
    public = {p.name for p in PACKAGE.iterdir() if not p.name.startswith(("_", ".")) or p.name == "__init__.py"}
    assert public == PUBLIC_MODULES
    django = {p.name for p in (PACKAGE / "django").iterdir() if not p.name.startswith("_") and p.suffix == ".py"}
    assert django == {"apps.py"}  # Django finds the app config there


def test_one_package_per_stage() -> None:
    """The path of a change, one package per stage: detect it (_core), check it (_check), carry it
    to the workers (_server), or patch it in place (_hot)."""
    stages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name.startswith("_") and p.name != "__pycache__"}
    assert stages == {"_core", "_check", "_server", "_hot"}


WATCHER_SIDE = ("wsgi_reload._server.watcher_process", "wsgi_reload._server.strategies", "wsgi_reload._core.watcher",
                "wsgi_reload._core.monitor", "wsgi_reload._core.gate", "wsgi_reload._core.scanner",
                "wsgi_reload._core.inotify", "wsgi_reload._hot", "wsgi_reload.hot", "wsgi_reload.django._runserver")


def test_a_worker_imports_nothing_of_the_watchers_side() -> None:
    """A new worker's boot is on the path from a save to the first request served with it: what
    the workers import (the adapters, and the Django app) leaves the scanner, the gate, the swap
    and the patching code to the watcher process."""
    worker_side = ["wsgi_reload.gunicorn", "wsgi_reload._server.uwsgi", "wsgi_reload.django.apps",
                   "wsgi_reload.django._gunicorn", "wsgi_reload.django._generation", "wsgi_reload._server.agent"]
    script = (f"import sys\nfor name in {worker_side!r}:\n    __import__(name)\n"
              f"print(sorted(m for m in sys.modules if m.startswith({WATCHER_SIDE!r})))")
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"


def test_the_packages_public_names_are_there_when_asked_for() -> None:
    """``import wsgi_reload`` loads no module of its own; each public name loads on first use."""
    script = ("import sys, wsgi_reload\nprint(sorted(m for m in sys.modules if m.startswith('wsgi_reload.')))\n"
              "print(all(getattr(wsgi_reload, name) is not None for name in wsgi_reload.__all__))\n"
              "print(set(wsgi_reload.__all__) <= set(dir(wsgi_reload)))")
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split("\n")[:3] == ["[]", "True", "True"]
