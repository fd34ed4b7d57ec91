"""Serving a student: requests answered as they arrive, joining the forward passes already running.

A plain batch decode takes the requests that queued while it was busy and decodes them to the end before it takes
more: rows that end early leave the passes smaller and smaller, and a request arriving meanwhile waits for the
slowest row of the batch before its first pass. Here the caller (Triton's ``execute``) only hands requests over;
one thread keeps a ``decode.LiveBatch`` running, a new request's rows join at the next forward pass, and each
request is answered the moment its last row ends (continuous batching). Answers are those of
``StudentGenerator.answer``: a row's tokens do not depend on which rows share its passes.

Models the packed forward does not support are served batch by batch (``FastDecoder.decode`` on what is waiting).

The scheduler's thread also loads the model: every torch call of the process then comes from one thread. Torch's
OpenMP runtime keeps a pool of worker threads per calling thread; with a second pool (a model loaded and warmed
up on one thread, served from another) the workers stop spinning between parallel regions and a single answer
measured 134 ms against 86 ms on one thread (2 cores).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.student_runtime.decode import LiveBatch, Row
from services.student_runtime.generator import Answer, Prepared, StudentGenerator
from services.student_runtime.prompt import PromptError

log = logging.getLogger(__name__)

Done = Callable[[list[Answer]], None]


@dataclass
class Job:
    """One request: its rows' answers, filled in as they end."""

    done: Done
    answers: list[Answer | None]
    prepared: dict[int, Prepared] = field(default_factory=dict)
    waiting: int = 0


class SchedulerClosed(RuntimeError):
    """The scheduler no longer takes requests (its model is being unloaded)."""


class Scheduler:
    """Loads a student with ``load`` on its own thread (which then serves it), then answers what is submitted;
    ``load``'s exception is raised here."""

    g: StudentGenerator
    live: LiveBatch | None

    def __init__(
        self,
        load: Callable[[], StudentGenerator],
        capacity: int,
        name: str = "student",
        report: Callable[[str], None] | None = None,
        load_timeout_s: float = 600.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"{name}: the scheduler's capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.name = name
        self.report = report or log.error
        self.inbox: queue.SimpleQueue[tuple[Job, list[Row]] | None] = queue.SimpleQueue()
        self.pending: deque[tuple[Job, Row]] = deque()  # rows waiting for a slot
        self.owner: dict[int, tuple[Job, Row]] = {}  # id(row) -> its request and itself, while decoded
        self.passes = 0
        self._closed = False
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load,), name=f"{name}-scheduler", daemon=True)
        self._thread.start()
        if not self._loaded.wait(load_timeout_s):
            self._closed = True
            raise TimeoutError(f"{name}: the model did not load in {load_timeout_s:.0f} s")
        if self._load_error is not None:
            raise self._load_error

    # Caller side --------------------------------------------------------------------------------------------
    def submit(self, raws: list[str], done: Done, max_new_tokens: int | None = None) -> None:
        """Answer ``raws`` (PROMPT strings); ``done`` is called once, from the scheduler's thread, with one
        ``Answer`` per PROMPT (a bad one carries its error, the others are answered)."""
        if self._closed:
            raise SchedulerClosed(f"{self.name}: the model is unloading and takes no more requests")
        job = Job(done=done, answers=[None] * len(raws))
        rows: list[Row] = []
        for index, raw in enumerate(raws):
            try:  # tokenising here, on the caller's thread, keeps it out of the decode loop
                prep = self.g.prepare(raw)
            except PromptError as exc:
                job.answers[index] = Answer(error=str(exc))
                continue
            job.prepared[index] = prep
            rows.append(self.g.start_row(index, prep, max_new_tokens))
        job.waiting = len(rows)
        self.inbox.put((job, rows))

    def close(self, timeout_s: float = 60.0) -> bool:
        """Take no more requests, answer those taken, stop; False if they were not all answered in time."""
        self._closed = True
        self.inbox.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # Scheduler thread ---------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self.pending or self.owner)

    def _take(self, block: bool) -> bool:
        """Move submitted requests to the waiting rows; False once ``close`` was called."""
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                return True
            if item is None:
                return False
            job, rows = item
            if not rows:
                self._finish(job)
            self.pending.extend((job, row) for row in rows)
            block = False

    def _run(self, load: Callable[[], StudentGenerator]) -> None:
        try:
            self.g = load()
            self.live = LiveBatch(self.g.fast, self.capacity) if self.g.fast.packed is not None else None
        except BaseException as exc:  # raised by the constructor, on the caller's thread
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        open_ = True
        while open_ or self._busy():
            if open_:
                open_ = self._take(block=not self._busy())
            if not self._busy():
                continue
            self.g.threads.update()  # the cores the rest of the machine leaves free now
            try:
                for row in self._step():
                    self._ended(row)
            except Exception as exc:  # the model stays up: the rows being decoded get the error
                reason = f"{type(exc).__name__}: {exc}"
                self.report(f"{self.name}: a forward pass failed: {reason}")
                if self.live is not None:  # fresh buffers: the failed pass may have left them in any state
                    self.live = LiveBatch(self.g.fast, self.capacity)
                for _, row in list(self.owner.values()):
                    self._ended(row, reason)

    def _step(self) -> list[Row]:
        """One forward pass (a whole batch's decode for models without the packed forward); the rows that
        ended."""
        if self.live is None:
            rows = []
            while self.pending and len(rows) < self.capacity:
                job, row = self.pending.popleft()
                self.owner[id(row)] = (job, row)
                rows.append(row)
            self.g.fast.decode(rows)
            self.passes += max(r.passes for r in rows)
            return rows
        while self.pending and self.live.free:
            job, row = self.pending.popleft()
            self.owner[id(row)] = (job, row)
            self.live.admit(row)
        self.passes += 1
        return self.live.step()

    def _ended(self, row: Row, error: str | None = None) -> None:
        job, _ = self.owner.pop(id(row))
        job.answers[row.index] = Answer(error=error) if error else self.g.finish_row(job.prepared[row.index], row)
        job.waiting -= 1
        if job.waiting == 0:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        answers = [a if a is not None else Answer(error="not answered") for a in job.answers]
        try:
            job.done(answers)
        except Exception as exc:  # a failed response must not stop the other requests
            self.report(f"{self.name}: sending a response failed: {type(exc).__name__}: {exc}")
