"""gunicorn's patch mode: edits that can go into the running workers do, anything else reloads.

The master keeps the source of the app's files as the workers loaded them. When a checked
batch can be applied statement by statement (:func:`wsgi_reload._hot.judge.judge`: changed
function bodies, new helpers and constants, where no unchanged statement depends on them),
it publishes a patch generation next to the worker records, with the source each worker
started from and the new one; each worker applies it in ``pre_request``, before the next
request it serves (:func:`wsgi_reload.hot.reload_source`), and reports what it could not
apply, which makes the master fall back to a graceful reload.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._core.scanner import Change
from .._server import runtime
from ..hot import reload_source
from .judge import judge, module_for

log = logging.getLogger("wsgi_reload.patch")

PATCH_FILE = "patch.json"
FAILED_SUFFIX = ".needs-restart"


class PatchPublisher:
    """Master side: decides whether a batch can be patched, and publishes it."""

    def __init__(self, manifest_dir: str, app_dir: str,
                 source_of: Callable[[str], bytes | None] | None = None) -> None:
        """:param source_of: the bytes of a file as the workers run it (the server's verified
            generation), or None while unknown; without it, the file as it is on disk."""
        self.source_of = source_of or _read_disk
        self.manifest_dir = manifest_dir
        self.app_dir = app_dir.rstrip(os.sep) + os.sep
        self.sources: dict[str, bytes] = {}
        self.loaded: dict[str, bytes] = {}
        """The source the workers imported, of each file patched since they started."""
        self.patched: dict[str, bytes] = {}
        self.generation = 0

    def remember(self, files: Mapping[str, int | None]) -> Mapping[str, int | None]:
        """A scanner source filter: keep the source of each app file the first time it is seen."""
        for path in files:
            if path.endswith(".py") and path not in self.sources and path.startswith(self.app_dir) \
                    and "site-packages" not in path:
                source = self.source_of(path)
                if source is not None:
                    self.sources[path] = source
        return files

    def publish(self, batch: Sequence[Change]) -> str | None:
        """Publish a patch for ``batch``; returns why it cannot be patched, or None when published."""
        new_sources = {}
        for change in batch:
            if change.kind != "modified":
                return f"{change.path} was {change.kind}"
            if not change.path.endswith(".py"):
                return f"{change.path} is not Python"
            old = self.sources.get(change.path)
            if old is None:
                return f"{change.path} is not an app file seen before the change"
            new = self.source_of(change.path)  # the checked bytes, never a later save
            if new is None:
                return f"{change.path} is not in the checked code"
            if new == old:
                return f"the version of {change.path} the workers run was not seen"
            verdict = judge(old, new, change.path)
            if not verdict.patchable:
                return f"{change.path}: {verdict.reason}"
            new_sources[change.path] = new
        self.generation += 1
        # Cumulative, so a worker that skipped a generation catches up; and exactly the source
        # that was judged and checked, never a later save.
        for path in new_sources:
            self.loaded.setdefault(path, self.sources[path])
        self.patched.update(new_sources)
        files = {path: {"loaded": self.loaded[path].decode("latin-1"), "latest": source.decode("latin-1")}
                 for path, source in self.patched.items()}
        runtime.write_record(self.manifest_dir, PATCH_FILE, {"generation": self.generation, "files": files})
        self.sources.update(new_sources)
        return None

    def reset(self, batch: Sequence[Change]) -> None:
        """Before a reload: the new workers import from disk, so no patch applies to them."""
        self.patched.clear()
        self.loaded.clear()
        self.generation += 1
        try:
            os.unlink(os.path.join(self.manifest_dir, PATCH_FILE))
        except OSError:
            pass
        for change in batch:
            # The new workers import what the check just passed: that is their baseline.
            self.sources.pop(change.path, None)
            self.remember({change.path: None})

    def watch_for_failures(self, on_failure: Callable[[str], object], seconds: float = 30.0) -> None:
        """Call ``on_failure(reason)`` once if a worker reports it could not apply the patch."""
        generation = self.generation

        def run() -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and generation == self.generation:
                for name in os.listdir(self.manifest_dir):
                    if name.endswith(FAILED_SUFFIX):
                        data = runtime.read_bytes(self.manifest_dir, name, limit=64 * 1024)
                        try:
                            os.unlink(os.path.join(self.manifest_dir, name))
                        except OSError:
                            continue
                        if data is not None:
                            on_failure(data.decode("utf-8", "replace"))
                            return
                time.sleep(0.1)

        threading.Thread(target=run, name="wsgi_reload-patch-failures", daemon=True).start()


class PatchApplier:
    """Worker side: applies a newer patch generation before the next request.

    A worker forked after a patch was published imports the patched files from disk: the
    generation published then is its starting point, not a patch to apply.
    """

    def __init__(self, manifest_dir: str) -> None:
        self.manifest_dir = manifest_dir
        self.path = os.path.join(manifest_dir, PATCH_FILE)
        self.generation = 0
        self.running: dict[str, bytes] = {}
        """The source this worker runs, of each file a patch named."""
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()
        patch = self._read()
        if patch is not None:
            self.generation = patch["generation"]
            self.running = {path: f["latest"].encode("latin-1") for path, f in patch["files"].items()}

    def _read(self) -> dict[str, Any] | None:
        patch = runtime.read_record(self.manifest_dir, PATCH_FILE)
        if patch is None or not isinstance(patch.get("generation"), int) or not isinstance(patch.get("files"), dict):
            return None
        return patch

    def maybe_apply(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_mtime_ns, st.st_size) == self._seen:
            return
        with self._lock:
            patch = self._read()
            if patch is None:
                return
            self._seen = (st.st_mtime_ns, st.st_size)
            if patch["generation"] <= self.generation:
                return
            self.generation = patch["generation"]
            for path, versions in patch["files"].items():
                latest = versions["latest"].encode("latin-1")
                running = self.running.get(path, versions["loaded"].encode("latin-1"))
                if running != latest:
                    self._apply_file(path, running, latest)

    def _apply_file(self, path: str, running: bytes, latest: bytes) -> None:
        module = module_for(path)
        if module is None:
            self.running[path] = latest
            return  # not loaded here: this worker imports the file when it needs it
        report = reload_source(module, running, latest, path, whole_module=False)
        problems = [report.error] if report.error else []
        problems += [f"only the whole module can take it: {report.whole_module}"] if report.whole_module else []
        problems += report.needs_restart
        if problems:
            reason = f"worker {os.getpid()}: {'; '.join(problems)}"
            log.warning("wsgi_reload: cannot patch in place: %s", reason)
            runtime.write_atomic(self.manifest_dir, f"{os.getpid()}{FAILED_SUFFIX}", reason.encode())
            return
        self.running[path] = latest
        log.debug("wsgi_reload: worker %d patched %s", os.getpid(), ", ".join(report.patched + report.changed))


def _read_disk(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
