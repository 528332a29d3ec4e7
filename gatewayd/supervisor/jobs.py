"""Background work (image builds, loads, pulls, commands, Docker calls) off the main loop.

Every job runs in its own daemon thread, so a 60-second `docker build` or a wedged Docker
engine never delays the main loop (and with it the watchdog and RPC answers), and a job
still running at shutdown never holds the process up. The main loop polls `Job.done()`;
all shared state is changed by the main thread only.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from gatewayd.clock import now_ms

log = logging.getLogger("gatewayd.supervisor")


class Job:
    _ids = itertools.count(1)

    def __init__(self, name: str):
        self.id = next(Job._ids)
        self.name = name
        self.started_ms = now_ms()
        self.finished_ms: int | None = None
        self.result: Any = None
        self.error: str | None = None
        self.progress = ""
        self._event = threading.Event()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def finish(self, result: Any = None, error: str | None = None) -> None:
        self.result = result
        self.error = error
        self.finished_ms = now_ms()
        self._event.set()

    @property
    def state(self) -> str:
        if not self.done():
            return "running"
        return "failed" if self.error is not None else "succeeded"

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.id, "name": self.name, "state": self.state,
                               "started_ms": self.started_ms}
        if self.progress:
            out["progress"] = self.progress
        if self.done():
            out["finished_ms"] = self.finished_ms
            if self.error is not None:
                out["error"] = self.error
            elif self.result is not None:
                out["result"] = self.result
        return out


class Jobs:
    """Starts jobs and remembers the most recent ones (for `job_status` and `status`)."""

    def __init__(self, keep: int = 50):
        self.keep = keep
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, name: str, fn: Callable[..., Any], *args: Any, pass_job: bool = False, **kwargs: Any) -> Job:
        """Run fn(*args, **kwargs) in a new daemon thread (with pass_job, also job=<the Job>)."""
        job = Job(name)
        if pass_job:
            kwargs["job"] = job

        def body() -> None:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported through the job
                log.debug("job %d (%s) failed:\n%s", job.id, name, traceback.format_exc().rstrip())
                job.finish(error=str(e) or type(e).__name__)
            else:
                job.finish(result=result)

        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                oldest = next(iter(self._jobs.values()))
                if not oldest.done():
                    break
                self._jobs.popitem(last=False)
        threading.Thread(target=body, name=f"job-{job.id}-{name}", daemon=True).start()
        return job

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if not j.done()]


class Future:
    """A result handed from another thread (the controller thread) to the main loop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.result: Any = None
        self.error: str | None = None

    def set(self, result: Any = None, error: str | None = None) -> None:
        self.result = result
        self.error = error
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


_FAILED: Any = object()


class Serial:
    """One worker thread running tasks in submission order; `drain()`, called by the main loop,
    hands each result to its `done` callback there (so shared state changes in one thread only).

    For disk work that may be slow (hashing a large file) or hang (a path that is not a regular
    file): the main loop never waits for it, and tasks about one file never overtake each other.
    """

    def __init__(self, name: str):
        self.name = name
        self._tasks: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Callable[[Any], None]] | None] = (
            queue.SimpleQueue())
        self._results: queue.SimpleQueue[tuple[Callable[[Any], None], Any]] = queue.SimpleQueue()
        self._outstanding = 0
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, done: Callable[[Any], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._outstanding += 1
        self._tasks.put((fn, args, done))

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            fn, args, done = task
            try:
                result = fn(*args)
            except Exception:
                log.exception("%s: task %s failed", self.name, getattr(fn, "__name__", fn))
                result = _FAILED
            self._results.put((done, result))

    def drain(self, limit: int = 1000) -> int:
        """Apply up to `limit` finished results; how many were applied."""
        n = 0
        for _ in range(limit):
            try:
                done, result = self._results.get_nowait()
            except queue.Empty:
                break
            self._outstanding -= 1
            n += 1
            if result is not _FAILED:
                done(result)
        return n

    def idle(self) -> bool:
        return self._outstanding == 0

    def stop(self) -> None:
        if self._thread is not None:
            self._tasks.put(None)
            self._thread = None  # a later submit (a start retried by the Runner) starts a new one


class Inline:
    """Runs each task at once in the caller's thread (the same interface as `Serial`)."""

    def submit(self, fn: Callable[..., Any], *args: Any, done: Callable[[Any], None]) -> None:
        done(fn(*args))

    def drain(self, limit: int = 1000) -> int:
        return 0

    def idle(self) -> bool:
        return True

    def stop(self) -> None:
        pass
