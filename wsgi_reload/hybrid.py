"""gunicorn's patch mode: body-only edits go into the running workers, anything else reloads.

The master keeps the source of the app's files as the workers loaded them. When a checked
batch only changed function bodies (:func:`wsgi_reload.patch.judge`), it publishes a patch
generation next to the worker manifests; each worker applies it in ``pre_request``, before
the next request it serves, and reports a function it could not patch, which makes the
master fall back to a graceful reload.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from .patch import apply, judge, module_for
from .scanner import Change

log = logging.getLogger("wsgi_reload.hybrid")

PATCH_FILE = "patch.json"
FAILED_SUFFIX = ".needs-restart"


class PatchPublisher:
    """Master side: decides whether a batch can be patched, and publishes it."""

    def __init__(self, manifest_dir: str, app_dir: str) -> None:
        self.manifest_dir = manifest_dir
        self.app_dir = app_dir.rstrip(os.sep) + os.sep
        self.sources: dict[str, bytes] = {}
        self.patched: dict[str, bytes] = {}
        self.generation = 0

    def remember(self, files: Mapping[str, int | None]) -> Mapping[str, int | None]:
        """A scanner source filter: keep the source of each app file the first time it is seen."""
        for path in files:
            if path.endswith(".py") and path not in self.sources and path.startswith(self.app_dir) \
                    and "site-packages" not in path:
                try:
                    with open(path, "rb") as f:
                        self.sources[path] = f.read()
                except OSError:
                    pass
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
            try:
                with open(change.path, "rb") as f:
                    new = f.read()
            except OSError as exc:
                return f"{change.path} cannot be read: {exc}"
            if new == old:
                return f"the version of {change.path} the workers run was not seen"
            verdict = judge(old, new, change.path)
            if not verdict.patchable:
                return f"{change.path}: {verdict.reason}"
            new_sources[change.path] = new
        self.generation += 1
        # Cumulative, so a worker that skipped a generation catches up; and exactly the source
        # that was judged and checked, never a later save.
        self.patched.update(new_sources)
        files = {path: source.decode("latin-1") for path, source in self.patched.items()}
        body = {"generation": self.generation, "files": files}
        path = os.path.join(self.manifest_dir, PATCH_FILE)
        temporary = f"{path}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(body, f)
        os.replace(temporary, path)
        self.sources.update(new_sources)
        return None

    def reset(self, batch: Sequence[Change]) -> None:
        """Before a reload: the new workers import from disk, so no patch applies to them."""
        self.patched.clear()
        self.generation += 1
        try:
            os.unlink(os.path.join(self.manifest_dir, PATCH_FILE))
        except OSError:
            pass
        for change in batch:
            # The new workers import what the check just passed; read it now, because the next
            # save can land before the scanner sees their manifests, and would then pass for
            # the version they run.
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
                        failed = os.path.join(self.manifest_dir, name)
                        try:
                            with open(failed, encoding="utf-8") as f:
                                reason = f.read()
                            os.unlink(failed)
                        except OSError:
                            continue
                        on_failure(reason)
                        return
                time.sleep(0.1)

        threading.Thread(target=run, name="wsgi_reload-patch-failures", daemon=True).start()


class PatchApplier:
    """Worker side: applies a newer patch generation before the next request."""

    def __init__(self, manifest_dir: str) -> None:
        self.manifest_dir = manifest_dir
        self.path = os.path.join(manifest_dir, PATCH_FILE)
        self.generation = 0
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def maybe_apply(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_mtime_ns, st.st_size) == self._seen:
            return
        with self._lock:
            try:
                with open(self.path, encoding="utf-8") as f:
                    patch = json.load(f)
            except (OSError, ValueError):
                return
            self._seen = (st.st_mtime_ns, st.st_size)
            if patch["generation"] <= self.generation:
                return
            self.generation = patch["generation"]
            for path, text in patch["files"].items():
                self._apply_file(path, text.encode("latin-1"))

    def _apply_file(self, path: str, source: bytes) -> None:
        module = module_for(path)
        if module is None:
            return  # not loaded here: this worker imports the file when it needs it
        try:
            patched = apply(module, source, path)
        except (SyntaxError, ValueError) as exc:
            reason = f"worker {os.getpid()}: {exc}"
            log.warning("wsgi_reload: cannot patch in place: %s", reason)
            with open(os.path.join(self.manifest_dir, f"{os.getpid()}{FAILED_SUFFIX}"), "w", encoding="utf-8") as f:
                f.write(reason)
            return
        log.debug("wsgi_reload: worker %d patched %s", os.getpid(), ", ".join(patched))
