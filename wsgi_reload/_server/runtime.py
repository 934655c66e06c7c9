"""The one private directory per server where the library keeps its files.

Nothing the library writes has a predictable name in a shared directory: on hosts with
``fs.protected_symlinks=0`` another user could pre-create, lock or symlink such a name.
Each server gets a directory of mode 0700 with a random name (under ``$XDG_RUNTIME_DIR``
where that is private, else the system temp directory); it is removed at a clean stop.

Processes forked from the server's master find it in two ways: the master exports it in
``_WSGI_RELOAD_RUNTIME`` (inherited by its children and by a re-executed master), or, when
the master runs none of our code (Django under gunicorn with no config, uWSGI
``--lazy-apps``), every worker derives the same name from a secret that all processes
forked from one interpreter share and no other process can read: the interpreter's hash
randomization key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

RUNTIME_ENV = "_WSGI_RELOAD_RUNTIME"
"""Names the server's runtime directory for its children. The leading underscore keeps it
out of the ``WSGI_RELOAD_*`` settings."""

PREFIX = "wsgi-reload-"


class RuntimeDirError(RuntimeError):
    """No private runtime directory can be had; the message says why and what to do."""


def base_directory() -> str:
    """``$XDG_RUNTIME_DIR`` when it is a private directory of this user, else the temp directory."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and is_private_dir(xdg):
        return xdg
    return tempfile.gettempdir()


def is_private_dir(path: str) -> bool:
    """A real directory (not a symlink) owned by this user that no one else can enter or write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def create() -> str:
    """A new private directory with a random name (``mkdtemp``: mode 0700, created exclusively)."""
    return tempfile.mkdtemp(prefix=PREFIX, dir=base_directory())


created: str | None = None
"""The runtime directory this process made for itself as a server's master, if it did."""


def for_server(master_pid: int) -> str:
    """The runtime directory of the server whose master is ``master_pid``, created if needed.

    In the master: the exported directory, or a new one that is then exported. In a process
    forked from it: the exported directory, or else the one derived from the shared secret.
    Raises :class:`RuntimeDirError` when no private directory can be had.
    """
    exported = os.environ.get(RUNTIME_ENV)
    if exported and is_private_dir(exported):
        return exported
    if os.getpid() == master_pid:
        global created
        path = created = create()
        os.environ[RUNTIME_ENV] = path
        return path
    return shared_by_siblings(f"master:{master_pid}")


def shared_by_siblings(scope: str) -> str:
    """A private directory every process forked from this interpreter finds under the same name.

    The name comes from ``hash()``, keyed by the interpreter's random hash secret, which a
    fork inherits and another user cannot read; 128 bits of it make the name unguessable.
    """
    seed = os.environ.get("PYTHONHASHSEED", "random")
    if not sys.flags.hash_randomization or seed not in ("", "random"):
        raise RuntimeDirError(
            f"PYTHONHASHSEED={seed} makes hash() predictable, so the workers cannot agree on a private "
            "directory; unset PYTHONHASHSEED, or use the gunicorn config / uwsgi --import without --lazy-apps"
        )
    mask = (1 << 64) - 1
    token = "".join(f"{hash(('wsgi_reload', scope, n)) & mask:016x}" for n in (1, 2))
    path = os.path.join(base_directory(), PREFIX + token)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    if not is_private_dir(path):
        raise RuntimeDirError(f"{path} exists but is not a private directory of this user; not using it")
    return path


def restore(path: str) -> bool:
    """Make the runtime directory again if it was removed (a temp-file cleaner, a person); True
    when it had gone. Raises :class:`RuntimeDirError` when the path is taken by something that is
    not a private directory of ours."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not is_private_dir(path):
            raise RuntimeDirError(f"{path} was replaced by something that is not a private directory of this "
                                  "user; not using it") from None
        return False
    return True


def open_dir(path: str) -> int:
    """A descriptor on the directory ``path`` itself, never through a symlink (OSError otherwise)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


_held: dict[str, int] = {}


def hold_against_cleaners(path: str) -> bool:
    """Hold a shared ``flock`` on the directory for as long as this process lives (again after it
    was made anew): age-based cleaners such as systemd-tmpfiles skip a directory locked that way
    (see CPython issue 81831). False where it cannot be had."""
    try:
        fd = open_dir(path)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    previous = _held.pop(path, None)
    if previous is not None:
        os.close(previous)
    _held[path] = fd
    return True


def write_atomic(directory: str, name: str, data: bytes) -> None:
    """Replace ``directory/name`` with ``data`` in one step, never following a symlink."""
    final = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


MAX_RECORD_BYTES = 64 * 1024 * 1024
"""A record larger than this is not one of ours (a generation of 20,000 files is about 4 MB)."""


def write_record(directory: str, name: str, record: Mapping[str, Any]) -> None:
    """Write one JSON record (a worker's record, a generation, a patch), atomically."""
    write_atomic(directory, name, json.dumps(record).encode())


def read_bytes(directory: str, name: str, limit: int = MAX_RECORD_BYTES) -> bytes | None:
    """The contents of ``directory/name``; None when it is not there or not a regular file of at
    most ``limit`` bytes. It never follows a symlink, and never blocks on a FIFO planted there."""
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
                return None
            data = f.read(limit + 1)
        except OSError:
            return None
    return data if len(data) <= limit else None


def read_record(directory: str, name: str) -> dict[str, Any] | None:
    """One JSON record written by :func:`write_record`; None when it is missing or not one."""
    data = read_bytes(directory, name)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


REPORTED_PREFIX = "reported-"


def first_report(directory: str, key: str) -> bool:
    """True for the first process of the server to report ``key`` (an error, say): what one
    process has logged, the others need not."""
    name = REPORTED_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        os.close(os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def open_lock(directory: str, name: str) -> int:
    """A file descriptor on ``directory/name`` to ``flock``, created 0600 without following links."""
    # Read-only: flock needs no more, and closing a descriptor opened for writing is an
    # IN_CLOSE_WRITE event, which would wake the watcher each time a worker looks for it.
    return os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def remove(path: str | None) -> None:
    """Remove a runtime directory and everything in it (a clean stop)."""
    if path and is_private_dir(path):
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(RUNTIME_ENV) == path:
            del os.environ[RUNTIME_ENV]
