"""The de-identification worker: a child process that prepares de-identified copies.

``python -m agent.dicom.prepworker``, started by :class:`agent.dicom.prepare.Preparer`. It
reads one JSON request per line on stdin -- ``{"id", "secret", "pseudonym", "src", "dst"}`` --
de-identifies ``src`` with the study's seed (:class:`agent.dicom.deid.StudyDeidentifier`),
writes the result to ``dst`` (not fsynced: the hand-over does that once for the whole
dataset), scans it for the object's own identifying values and answers one JSON line:
``{"id", "identity", "secondary", "sha256", "hit"}`` or ``{"id", "error"}``.

Why a process: de-identifying is ~4 ms of Python per MR slice. In the agent's process it
would hold the interpreter lock the threads answering senders need (measured: ~40 % fewer
objects/s while a study arrives), so it had to wait for the quiet time, and a 300-object
study then took longer than the quiet time to prepare. Here it runs at the lowest CPU
priority (Linux SCHED_IDLE, else nice 19) while the study arrives, on whatever the
receiving leaves idle.

The identifying values travel on the pipe between the two processes only; nothing here
writes them anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from collections import OrderedDict
from typing import Any

import pydicom

from agent.dicom import deid

#: studies whose de-identifier (dicognito's seeded state) is kept between requests
KEPT_STUDIES = 8


class Worker:
    """One request at a time; a de-identifier per study seed."""

    def __init__(self) -> None:
        self._studies: OrderedDict[str, deid.StudyDeidentifier] = OrderedDict()

    def _deidentifier(self, secret: str, pseudonym: str) -> deid.StudyDeidentifier:
        found = self._studies.pop(secret, None) or deid.StudyDeidentifier(secret, pseudonym)
        self._studies[secret] = found
        while len(self._studies) > KEPT_STUDIES:
            self._studies.popitem(last=False)
        return found

    def prepare(self, request: dict[str, Any]) -> dict[str, Any]:
        ds = pydicom.dcmread(request["src"], force=True)
        values = deid.identity_values(ds)
        secondary = deid.is_secondary_capture(ds)
        self._deidentifier(request["secret"], request["pseudonym"]).apply(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        hit = deid.scan_data("object.dcm", data, deid.identity_of([values]))
        fd = os.open(request["dst"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return {"identity": values, "secondary": secondary, "sha256": hashlib.sha256(data).hexdigest(),
                "hit": hit}  # fmt: skip


def main() -> int:
    # answering senders comes first: on Linux this process runs only on CPU time nothing else
    # wants (SCHED_IDLE); elsewhere at the lowest priority
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        with contextlib.suppress(OSError, AttributeError):
            os.nice(19)
    worker = Worker()
    out = sys.stdout
    for line in sys.stdin:
        request: dict[str, Any] = {}
        try:
            request = json.loads(line)
            answer = worker.prepare(request)
        except Exception as err:  # one object: the hand-over de-identifies it itself
            answer = {"error": f"{type(err).__name__}: {err}"}
        answer["id"] = request.get("id")
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
