"""Background work (image builds, loads, pulls, commands, Docker calls) off the main loop.

Every job runs in its own daemon thread, so a 60-second `docker build` or a wedged Docker
engine never delays the main loop (and with it the watchdog and RPC answers), and a job
still running at shutdown never holds the process up. The main loop polls `Job.done()`;
all shared state is changed by the main thread only.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gatewayd.supervisor")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Job:
    _ids = itertools.count(1)

    def __init__(self, name: str):
        self.id = next(Job._ids)
        self.name = name
        self.started_ms = _now_ms()
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
        self.finished_ms = _now_ms()
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
