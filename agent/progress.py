"""Transfer progress people can read: rate and ETA, log lines for the service, bars on a terminal.

:class:`ProgressTracker` is the runner's: it measures each dataset's upload or
download (bytes per second over the last seconds, time left) and says when the
journal (``STATUS.json``, ``vip-agent status``) and the service log deserve an
update. :class:`TerminalProgress` draws one ``tqdm`` bar per transfer for
``vip-agent run`` on a terminal, and a line per 10 % otherwise. :class:`Rewindable`
lets the VIP client take back the bytes of a failed attempt before it retries, so no
figure ever passes 100 %.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: rate = bytes moved over this many past seconds (a mean since the start would hide a stall)
RATE_WINDOW = 10.0
#: the journal's progress (STATUS.json, `vip-agent status`) at most this often
JOURNAL_EVERY = 1.0
#: STATUS.json rewritten at most this often during a transfer
STATUS_EVERY = 5.0
#: the service log: a line each time another LOG_EVERY_PCT % is done, or LOG_EVERY_S seconds passed
LOG_EVERY_PCT = 25
LOG_EVERY_S = 30.0


def human_size(n: float) -> str:
    """Bytes as a short human-readable size (``1.5 MB``)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def human_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def describe(kind: str, done: int, total: int, rate: float | None, eta: float | None) -> str:
    """``upload 40% (400.0 MB of 1.0 GB) at 55.0 MB/s, 11 s left``."""
    done = min(done, total) if total else done  # never "250% (525 B of 210 B)"
    pct = 100.0 * done / total if total else 100.0
    text = f"{kind} {pct:.0f}% ({human_size(done)} of {human_size(total)})"
    if rate:
        text += f" at {human_size(rate)}/s"
    if done >= total:
        return text + ", complete"
    if eta is not None:
        text += f", {human_duration(eta)} left"
    return text


class Rewindable:
    """A transfer's progress callback that can take back what a failed attempt reported.

    The client reports bytes as they move; when it sends or fetches a file again after a
    failure, :meth:`rewind` reports minus what was counted so far, so the caller's total
    (a bar, ``STATUS.json``) goes back instead of running past 100 %.
    """

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self._progress = progress
        self.count = 0

    def __call__(self, n: int) -> None:
        if self._progress is not None:
            self._progress(n)  # may raise to abandon the transfer: then n was not counted
        self.count += n

    def rewind(self) -> None:
        """Report minus everything counted (the next attempt starts from zero)."""
        if self.count:
            n, self.count = self.count, 0
            if self._progress is not None:
                self._progress(-n)

    def complete(self, size: int) -> None:
        """The file is whole (found complete on the server): count up to ``size``."""
        if self.count < size:
            self(size - self.count)


@dataclass
class _Transfer:
    total: int
    started: float
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    done: int = 0
    finished: bool = False
    last_at: float = 0.0
    journal_at: float = 0.0
    status_at: float = 0.0
    logged_at: float = 0.0
    logged_step: int = 0

    def rate(self, now: float) -> float | None:
        if not self.samples:
            return None
        t0, d0 = self.samples[0]
        if now - t0 < 0.05:
            t0, d0 = self.started, 0
        span = now - t0
        return (self.done - d0) / span if span > 0 else None


@dataclass(frozen=True)
class Update:
    """What one progress report calls for."""

    kind: str
    done: int
    total: int
    rate: float | None
    eta: float | None
    journal: bool  # write the journal's progress now
    status: bool  # rewrite STATUS.json now
    log: str | None  # a service log line, if one is due

    def as_progress(self) -> dict[str, Any]:
        """The journal's ``progress`` (STATUS.json, ``status --json``)."""
        out: dict[str, Any] = {"kind": self.kind, "done": self.done, "total": self.total}
        if self.rate is not None:
            out["rate"] = round(self.rate, 1)
        if self.eta is not None:
            out["eta"] = round(self.eta, 1)
        return out


class ProgressTracker:
    """Rate, ETA and update pacing for every running transfer (thread-safe).

    ``done`` may go back, even after it reached ``total``: a retried file is taken back
    (:class:`Rewindable`) and the same transfer goes on (the rate restarts, the total
    stays). A report from another thread overtaken by a later one is the same case, and
    the pacing keeps it out of the journal (it was just written).
    """

    #: a transfer not heard of for this long is over: the next report starts a new one
    IDLE = 600.0

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._transfers: dict[tuple[int, str], _Transfer] = {}

    def update(self, dataset_id: int, kind: str, done: int, total: int) -> Update:
        now = self._clock()
        key = (dataset_id, kind)
        with self._lock:
            t = self._transfers.get(key)
            if t is None or t.total != total or now - t.last_at > self.IDLE:  # a new transfer
                self._forget_idle(now)
                t = self._transfers[key] = _Transfer(total=total, started=now)
            elif done < t.done:  # a retry took bytes back: same transfer, the rate restarts
                t.samples.clear()
            done = max(0, min(done, total)) if total else max(0, done)
            was_finished = t.finished
            t.done, t.last_at = done, now
            t.samples.append((now, done))
            while len(t.samples) > 1 and now - t.samples[0][0] > RATE_WINDOW:
                t.samples.popleft()
            rate = t.rate(now)
            if rate is not None and rate <= 0:
                rate = None
            left = max(0, total - done)
            eta = left / rate if rate else None
            finished = t.finished = done >= total
            newly = finished and not was_finished
            journal = newly or now - t.journal_at >= JOURNAL_EVERY
            if journal:
                t.journal_at = now
            status = newly or now - t.status_at >= STATUS_EVERY
            if status:
                t.status_at = now
            step = int(100 * done / total) // LOG_EVERY_PCT if total else 0
            log_due = newly or (not finished and (
                (step > t.logged_step and now - t.logged_at >= 1.0) or now - t.logged_at >= LOG_EVERY_S
            ))  # fmt: skip
            if t.logged_at == 0.0 and not finished:
                log_due = False  # the first report starts the clock, it says nothing yet
                t.logged_at = now
            if log_due:
                t.logged_at, t.logged_step = now, max(step, t.logged_step)
            if finished:  # the closing line gives the mean rate of the whole transfer
                elapsed = now - t.started
                rate = done / elapsed if elapsed > 0 else rate
        line = describe(kind, done, total, rate, eta) if log_due else None
        return Update(kind, done, total, rate, eta, journal, status, line)

    def _forget_idle(self, now: float) -> None:
        """Drop transfers nobody reported for a while (a service runs for months)."""
        for key in [k for k, t in self._transfers.items() if now - t.last_at > self.IDLE]:
            del self._transfers[key]


def current(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record's ``progress`` if it still describes what the dataset is doing, else None.

    A transfer's figures belong to its own state (an upload's to ``uploading``, a
    download's to ``downloading``): once the dataset moved on (or ended) they are history,
    and ``STATUS.json``, ``vip-agent status`` and the page must not show them as current.
    """
    p = record.get("progress")
    if not isinstance(p, dict):
        return None
    kind, state = p.get("kind"), record.get("state")
    if kind in ("upload", "download"):
        return p if state == f"{kind}ing" else None
    if kind == "waiting":
        return p if state in ("waiting", "paused", "queued") else None
    return None if record.get("finished") else p


class TerminalProgress:
    """``vip-agent run``'s progress: one bar per transfer stage on a terminal, else a line per 10 %.

    A bar lasts until :meth:`close` (the end of the stage), not until it reads 100 %: a
    file cut at its very end is sent again after every byte was counted once. A retried
    file takes its bytes back (the bar goes back; its total stays); the rate and
    time left come from :class:`ProgressTracker` (tqdm's own would count a rewind as speed).
    ``before_bar`` is called before a bar is drawn (``run`` prints the events that led to it
    there, so they come above the bar instead of after it).
    """

    BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [RATE]"

    def __init__(self, stream: Any, before_bar: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.before_bar = before_bar
        self._bars: dict[tuple[int, str], Any] = {}
        self._tracker = ProgressTracker()
        self._steps: dict[tuple[int, str], int] = {}
        #: held while drawing; ``before_bar`` runs under it (take it to print between bars)
        self.lock = threading.RLock()

    def __call__(self, dataset_id: int, kind: str, done: int, total: int) -> None:
        key = (dataset_id, kind)
        with self.lock:
            update = self._tracker.update(dataset_id, kind, done, total)
            if self.tty:
                self._bar(key, update)
                return
            step = int(10 * update.done / total) if total else 10
            if key not in self._steps and self.before_bar is not None:
                self.before_bar()  # the events announcing the transfer come first
            if step > self._steps.get(key, -1) or update.done >= total:
                self._steps[key] = step
                print(describe(kind, update.done, total, update.rate, update.eta), file=self.stream, flush=True)
            if update.done >= total:
                self._steps.pop(key, None)

    @staticmethod
    def _postfix(update: Update) -> str:
        rate = f"{human_size(update.rate)}/s" if update.rate else "- B/s"
        if update.done >= update.total:
            return f"{rate}, done"
        eta = human_duration(update.eta) if update.eta is not None else "-"
        return f"{rate}, ETA {eta}"

    def _bar(self, key: tuple[int, str], update: Update) -> None:
        from tqdm import tqdm

        bar = self._bars.get(key)
        if bar is not None and bar.total != update.total:
            bar.close()  # another transfer of the stage (files sent again after the check)
            bar = None
        rate = self._postfix(update).replace("{", "{{").replace("}", "}}")
        if bar is None:
            if self.before_bar is not None:
                self.before_bar()
            size = shutil.get_terminal_size((80, 20))
            bar = self._bars[key] = tqdm(
                total=update.total, unit="B", unit_scale=True, unit_divisor=1000, desc=update.kind,
                file=self.stream, bar_format=self.BAR.replace("RATE", rate), mininterval=0.2, leave=True,
                # $COLUMNS/$LINES, else the terminal's size; 80x20 when it says 0 (a bare pty;
                # tqdm hides bars below a 0-line screen)
                ncols=size.columns or 80, nrows=size.lines or 20,
            )  # fmt: skip
        # the tracker's rate and time left (tqdm's would count a rewind as speed)
        bar.bar_format = self.BAR.replace("RATE", rate)
        if update.done >= bar.n:
            bar.update(update.done - bar.n)
        else:  # a retry took bytes back: redraw at once, tqdm's update() only counts up
            bar.n = bar.last_print_n = update.done
            bar.refresh()
        if update.done >= update.total:
            bar.refresh()  # 100 % shown now; the bar stays open: a file cut at its end is sent again

    def write(self, text: str) -> None:
        """A line above the bars (they are redrawn below it)."""
        with self.lock:
            if self._bars:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bars (``run`` calls it when a stage returns: its bars end with it)."""
        with self.lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
