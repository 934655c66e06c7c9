"""Acting as a second user, for the security tests: a child process that drops to ``nobody``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence

import pytest

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second user needs root (os.setuid to nobody)")

_PRELUDE = f"""
import os
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
assert os.geteuid() == {NOBODY}
"""


def run_as_nobody(code: str, *, background: bool = False,
                  imports: Sequence[str] = ()) -> subprocess.Popen[str] | subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python child that first calls ``os.setuid`` to nobody.

    Only modules the interpreter has loaded at start are sure to import: nobody may not be
    able to read the standard library of root's Python (``os`` is always there).

    :param imports: standard modules to import before the ``setuid``, for ``code`` to use.
    """
    before = "".join(f"import {name}\n" for name in imports)
    argv = [sys.executable, "-c", before + _PRELUDE + textwrap.dedent(code)]
    if background:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


@contextlib.contextmanager
def shared_tmp() -> Iterator[str]:
    """A new world-writable sticky directory like /tmp, where both users can create names."""
    path = tempfile.mkdtemp(prefix="wsgi-reload-test-shared-", dir="/tmp")
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
