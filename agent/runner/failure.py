"""Why an execution failed, in the job's own words: the last lines of its stderr.

When a dataset ends ``failed`` because an execution failed on the platform, its error (the
journal's ``datasets.error``, which ``ERROR.txt``, ``vip-agent status NAME``, the alerts and
the status page all show) carries, after the one-line reason, a block::

    job 3 (execution workflow-XYZ) stderr, last lines:
      ERROR: cannot read the header of input.nii

built from the logs the mirror stage saved (``logs/<variant>-r<n>/``), or asked of the
platform when they are missing. The block is bounded (:data:`EXCERPT_LINES` non-empty
lines, :data:`EXCERPT_BYTES` bytes, each line at most :data:`LINE_CHARS` characters), free
of terminal control sequences, and scrubbed of the API key (``agent.errors.scrub``) before it
reaches the journal.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.backend.errors import VipError
from agent.backend.port import Engine
from agent.errors import one_line, scrub
from agent.journal import Execution

#: at most this many of the last non-empty lines of a job's stderr
EXCERPT_LINES = 10
#: ... and at most this many bytes of them (UTF-8), the most recent kept
EXCERPT_BYTES = 2048
#: a longer line (a progress bar, a dump) is cut to this many characters
LINE_CHARS = 300
#: at most this many failed executions of a dataset are quoted (40 failed runs of one
#: dataset would otherwise make an error of 80 KiB); the others name their logs only
MAX_QUOTED = 3
#: how a block starts: the one marker the surfaces look for (``headline``)
HEADING_END = "stderr, last lines:"
#: a line's indentation inside the block
INDENT = "  "

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|[\x00-\x08\x0b-\x1f\x7f]")

Redact = Callable[[str], str]


def redactor(backend: object, secrets: Iterable[str] = ()) -> Redact:
    """What removes the API key from a text: the backend's client's own rule when it has a
    key (``VipClient.redact``), and ``agent.errors.scrub`` of any other ``secrets``."""
    client = getattr(backend, "client", None)
    own = getattr(client, "redact", None)
    extra = [s for s in secrets if s]

    def redact(text: str) -> str:
        if callable(own):
            text = str(own(text))
        for secret in extra:
            text = scrub(text, secret)
        return text

    return redact


def last_lines(text: str) -> list[str]:
    """The last meaningful lines of a log, bounded: no blank lines, no control sequences,
    no ``(not available: ...)`` placeholder the mirror writes when a log cannot be read."""
    lines = []
    for raw in text.splitlines():
        line = _CONTROL.sub("", raw.replace("\r", "")).rstrip()
        if not line.strip() or line.startswith("(not available:"):
            continue
        if len(line) > LINE_CHARS:
            line = line[: LINE_CHARS - 1] + "…"
        lines.append(line)
    lines = lines[-EXCERPT_LINES:]
    while lines and len("\n".join(lines).encode()) > EXCERPT_BYTES:
        lines.pop(0)
    return lines


def _job_files(folder: Path, jobs: list[str]) -> list[tuple[str | None, Path]]:
    """(job, its saved stderr file) in the order to look at them."""
    if jobs:
        return [(j, folder / f"job{j}.stderr.txt") for j in jobs]
    found = sorted(folder.glob("job*.stderr.txt"), key=lambda p: (len(p.name), p.name))
    pairs: list[tuple[str | None, Path]] = [
        (p.name.removeprefix("job").removesuffix(".stderr.txt"), p) for p in found
    ]
    return [*pairs, (None, folder / "stderr.txt")]


def stderr_excerpt(
    folder: Path, e: Execution, failed_jobs: list[str], *, engine: Engine | None = None,
    redact: Redact = lambda text: text,
) -> str | None:
    """The block for execution ``e`` (heading, then its indented lines), or None when no job
    wrote anything to stderr. ``folder`` holds its saved logs; a job whose log is not there
    is asked of ``engine`` (when given)."""
    candidates = _job_files(folder, failed_jobs)
    shown: tuple[str | None, list[str]] | None = None
    others = 0
    for job, path in candidates:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = _ask(engine, e, job)
        lines = last_lines(redact(text))
        if not lines:
            continue
        if shown is None:
            shown = (job, lines)
        else:
            others += 1
    if shown is None:
        return None
    job, lines = shown
    where = f"execution {e.vip_id}"
    head = f"job {job} ({where}) {HEADING_END}" if job is not None else f"{where} {HEADING_END}"
    block = [head, *(INDENT + line for line in lines)]
    if others:
        block.append(f"{INDENT}({others} other failed job(s) wrote to stderr: see the logs)")
    return "\n".join(block)


def _ask(engine: Engine | None, e: Execution, job: str | None) -> str:
    if engine is None or not e.vip_id:
        return ""
    try:
        return engine.log(e.vip_id, "stderr", job)
    except VipError:
        return ""


def headline(error: str | None) -> str:
    """An error without its stderr blocks' lines but their last one, on one line: for a
    table's column and a log line (``... ; stderr: ERROR: cannot read the header``)."""
    if not error or HEADING_END not in error:
        return one_line(error)
    out: list[str] = []
    block: list[str] = []

    def close() -> None:
        if block:
            out.append(f"stderr: {block[-1].strip()}")
            block.clear()

    inside = False
    for line in error.splitlines():
        if line.rstrip().endswith(HEADING_END):
            close()
            inside = True
            continue
        if inside and line.startswith(INDENT):
            if not line.strip().startswith("(") or not line.strip().endswith("see the logs)"):
                block.append(line)
            continue
        close()
        inside = False
        if line.strip():
            out.append(line.strip())
    close()
    return "; ".join(out)
