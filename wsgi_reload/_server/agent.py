"""The one worker-side agent: everything a process that serves the app does for its watcher.

Each server binding (gunicorn's hooks, the uWSGI module, Django's app) creates one
:class:`WorkerAgent` in each worker and calls it from its own hooks; only the agent writes
the worker's record in the runtime directory, keeps the server's watcher process running,
applies patches (gunicorn ``mode=patch``) and waits when verified code cannot load here.

The record (:class:`wsgi_reload._server.records.RecordWriter`) says which files the worker runs,
from which generation, and whether its app loaded: "loaded" means the app imported (and, with
``ready_path``, answered) in this process, and nothing else does.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._core.files import describe_error
from . import genimport
from .generations import RETRY_SECONDS, await_verdict, store_of, wait_for_newer
from .launch import keep_watcher_running, wait_for_news
from .records import RecordWriter, WorkerRecords
from .signals import alive

if TYPE_CHECKING:
    from .._hot.transport import PatchApplier

log = logging.getLogger("wsgi_reload.agent")


class WorkerAgent:
    """A worker's side of the channel to its server's watcher.

    :param directory: the server's private runtime directory.
    :param loaded_at_ns: when this process began loading the app (a module file newer than
        this changed after the worker loaded it).
    :param start_watcher: starts the server's watcher process unless one runs; True if it did.
    :param app_loaded: whether the app loaded here (True, False, or None while unknown); the
        agent's own verdict (:meth:`cannot_serve`) wins over it.
    :param patch: apply published patches before each request (gunicorn ``mode=patch``).
    """

    def __init__(self, directory: str, loaded_at_ns: int, *, start_watcher: Callable[[], bool] | None = None,
                 app_loaded: Callable[[], bool | None] = lambda: None, patch: bool = False) -> None:
        self.directory = directory
        self.loaded_at_ns = loaded_at_ns
        self.start_watcher = start_watcher
        self._app_loaded = app_loaded
        self.failed = False
        """This worker said it cannot serve the code it loaded."""
        self.patterns: list[str] = []
        """Extra globs this worker's app watches (Django's templates and catalogs)."""
        self.patches: PatchApplier | None = None
        if patch:
            # Only in patch mode: the patching code (ast and all) is no part of a worker's boot.
            from .._hot.transport import PatchApplier

            self.patches = PatchApplier(directory)
        self._record: RecordWriter | None = None

    # --- the record ----------------------------------------------------------------------

    @property
    def record(self) -> RecordWriter:
        """This process's record (a process forked from the one that made the agent gets its own)."""
        if self._record is None or self._record.path != os.path.join(self.directory, f"{os.getpid()}.json"):
            self._record = RecordWriter(self.directory, self.loaded_at_ns, app_loaded=self.app_loaded)
        self._record.patterns = self.patterns
        return self._record

    def app_loaded(self) -> bool | None:
        return False if self.failed else self._app_loaded()

    def publish(self) -> None:
        """Write this worker's record now (the first one after its app loaded is its proof)."""
        self.record.publish()

    def after_request(self) -> None:
        """Publish again if the request imported more modules (views load lazily)."""
        try:
            self.record.publish_if_grown()
        except Exception:
            log.exception("wsgi_reload: publishing this worker's modules failed")

    def republish_if_missing(self) -> None:
        """Publish again if the runtime directory lost the record (it was removed and made again)."""
        if self._record is not None:
            self._record.publish_if_missing()

    def remove_record(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.record.path)

    # --- the watcher ---------------------------------------------------------------------

    def keep_watcher_running(self) -> None:
        """Start the server's watcher again whenever it stops (a thread, once per process)."""
        if self.start_watcher is not None:
            keep_watcher_running(self.directory, self.start_watcher, self.republish_if_missing)

    def before_request(self) -> None:
        """In patch mode: apply a newer published patch before serving."""
        if self.patches is not None:
            self.patches.maybe_apply()

    # --- code under check ----------------------------------------------------------------

    def may_serve(self, timeout: float, *, heartbeat: Callable[[], object] | None = None,
                  alive: Callable[[], bool] = lambda: True, prove: Callable[[], object] | None = None) -> bool:
        """Before this worker serves: whether it may serve the code it imported. A worker that
        imported the generation under check (started by a swap beside the check, or by the
        master meanwhile) holds here until the verdict; False: it must exit, unserved, and a
        worker that loads the running code takes its place.

        :param timeout: hold at most this long (the check's own timeout, and then some).
        :param heartbeat: called meanwhile (a gunicorn worker tells its master it is alive).
        :param alive: False once the worker is told to stop.
        :param prove: in a worker that holds, what else the check would load before the verdict
            (Django's URLconf); an exception means the import did not succeed here.
        """
        finder = genimport.installed()
        if finder is None or not finder.trial:
            return True  # verified code: a newer generation published since makes it no less so
        generation = finder.generation
        self.keep_watcher_running()  # its keeper hears the verdict for it (connected before the record says it holds)
        # Said in the record, with the files it took: the watcher can take a real worker's
        # import for the verdict, rather than import the app a second time in its check.
        try:
            if prove is not None:
                prove()
            loaded = True
        except Exception as exc:
            log.debug("wsgi_reload: worker %d cannot load generation %s, under check: %s", os.getpid(), generation,
                      describe_error(exc))
            loaded = False
        with contextlib.suppress(OSError):
            self.record.publish(held=loaded)
        if await_verdict(store_of(self.directory), generation, timeout, heartbeat=heartbeat, alive=alive,
                         wait=wait_for_news):
            finder.trial = False  # verified now
            return True
        self.remove_record()
        log.debug("wsgi_reload: worker %d imported generation %s, which is not to be served (the check refused "
                  "it, or a newer one came); it exits unserved", os.getpid(), generation)
        return False

    def superseded(self) -> bool:
        """Whether this worker loaded verified code that is no longer the newest: a newer
        generation was published while it imported. Asked after the worker's record is
        written: either the watcher's swap, which reads the records after it publishes, counts
        this worker among those to replace, or this worker sees the newer generation here and
        exits unserved. So no worker that was booting when a swap began serves older code after it."""
        finder = genimport.installed()
        if finder is None or finder.trial or finder.generation is None:
            return False
        current = store_of(self.directory).current_id()
        return current is not None and current != finder.generation

    def unverified(self) -> bool:
        """Whether this worker imported code that has not passed the check (under check still,
        or refused): its failure is the check's to report, and no error of the worker's."""
        finder = genimport.installed()
        return finder is not None and finder.trial and store_of(self.directory).current_id() != finder.generation

    # --- code that cannot serve here -----------------------------------------------------

    def cannot_serve(self, exc: BaseException) -> None:
        """Say in this worker's record that it cannot serve the code it loaded, and why: a
        replacement waiting for it ends at once, and with none serving the watcher checks."""
        self.failed = True
        self.record.failure = describe_error(exc)
        with contextlib.suppress(OSError):
            self.publish()

    def others_serve(self) -> bool:
        """Whether another live worker of the server has its app loaded."""
        workers = WorkerRecords(self.directory, accept=lambda pid: pid != os.getpid() and alive(pid))
        workers()
        return bool(workers.serving)

    def wait_for_newer_code(self, exc: BaseException, *, quiet: bool = False,
                            heartbeat: Callable[[], object] | None = None) -> None:
        """Verified code did not load here (the environment's fault: a database down at import):
        say so, and wait :data:`RETRY_SECONDS`, or until newer code passes the check. The caller
        then exits with 1, and the server starts another worker.

        :param quiet: log at debug level (the watcher already says what is broken).
        :param heartbeat: called meanwhile (a gunicorn worker tells its master it is alive).
        """
        finder = genimport.installed()
        generation = None if finder is None else finder.generation
        store = store_of(self.directory)
        if self.unverified():
            # Code under check (or refused since) failed here: the check says what is wrong. Wait
            # for its verdict only; the worker that replaces this one loads whatever then runs.
            log.debug("wsgi_reload: worker %d cannot load generation %s, which was not verified (%s)", os.getpid(),
                      generation, describe_error(exc))
            await_verdict(store, generation, RETRY_SECONDS, heartbeat=heartbeat, wait=wait_for_news)
            return
        log.log(logging.DEBUG if quiet else logging.ERROR,
                "wsgi_reload: worker %d cannot load the app from verified code (generation %s: %s); the other "
                "workers serve on, and another worker tries again in %g s or once newer code passes the check",
                os.getpid(), generation, describe_error(exc), RETRY_SECONDS)
        wait_for_newer(store, generation, RETRY_SECONDS, heartbeat=heartbeat)
