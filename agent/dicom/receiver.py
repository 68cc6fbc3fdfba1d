"""The DICOM network side: a pynetdicom Storage SCP (C-STORE, C-ECHO) with an allow-list.

It accepts every standard storage SOP class plus the configured private ones, in
every transfer syntax pynetdicom knows, and hands each object to a ``sink``
(:meth:`agent.dicom.node.DicomNode.receive`) that answers the status to return and what to
do once it is sent.
It also keeps which studies each open association carries, the half of the
completeness rule that no quiet time can see.

pynetdicom negotiates each association; its data phase (C-STORE, C-ECHO) is served by
:mod:`agent.dicom.dataphase` on the association's socket (about 4x pynetdicom's own rate,
see there), with pynetdicom's handlers kept for the case its internals change.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid, uid_to_service_class  # type: ignore[attr-defined]

from agent.dicom import dataphase
from agent.dicom.config import DicomConfig
from agent.dicom.spool import HEADER_TAGS, header

log = logging.getLogger("vip_agent.dicom")

SUCCESS = 0x0000
#: Refused: Out of Resources (PS3.4 C.4.2.1.4): the sender keeps the object and may retry
OUT_OF_RESOURCES = 0xA700
#: Error: Cannot Understand
CANNOT_UNDERSTAND = 0xC000
#: pynetdicom accepts the first of OUR transfer syntaxes the sender proposes: list the
#: encapsulated (compressed) ones first, so that an object arrives as the sender holds it
#: instead of asking the sender to decompress (which dcmtk cannot do for RLE, for one)
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED] + [
    ts for ts in _UNCOMPRESSED if ts in ALL_TRANSFER_SYNTAXES
]
#: a title no caller can have (AE titles are at most 16 characters): "reject everybody"
_NOBODY = "\x01"


@dataclass(frozen=True)
class Incoming:
    """One C-STORE request, as the sink sees it."""

    data: bytes
    study_uid: str
    series_uid: str
    sop_uid: str
    #: its routing values (agent.dicom.spool.header), read after the answer, off the sender's clock
    header: Callable[[], dict[str, Any]]
    calling_ae: str
    called_ae: str
    peer: str


@dataclass
class Counters:
    """What ``status``, the page and ``/metrics`` show of the network side."""

    associations: int = 0
    rejected: int = 0
    echoes: int = 0
    objects: int = 0
    bytes: int = 0
    duplicates: int = 0
    refusals: int = 0
    late: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, n in amounts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class _GuardedAE(AE):
    """An AE whose calling-AE check also knows the caller's address.

    pynetdicom checks ``require_calling_aet`` inside the association's own thread while
    negotiating, so the property can look at that association's peer: a caller not on
    the allow-list gets A-ASSOCIATE-RJ "calling AE title not recognised".
    """

    allow_check: Callable[[str | None], list[str]] | None = None

    @property
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        requestor = getattr(assoc, "requestor", None)
        host = getattr(requestor, "address", None) if requestor is not None else None
        if self.allow_check is None:
            return []
        return self.allow_check(host)

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        pass  # decided per association by allow_check


class _QuickCopyContext(PresentationContext):
    """pynetdicom deep-copies the server's presentation contexts for every association:
    170 storage classes x 45 transfer syntaxes took 72 ms per association (before its
    A-ASSOCIATE-AC). A context's values are immutable UIDs: copying its lists is enough."""

    def __deepcopy__(self, memo: dict[int, Any]) -> PresentationContext:
        new = copy.copy(self)
        new._transfer_syntax = list(self._transfer_syntax)
        return new


class Receiver:
    """The Storage SCP server; ``start()`` returns the bound port."""

    def __init__(self, config: DicomConfig, sink: Callable[[Incoming], tuple[int, Callable[[], None] | None]],
                 counters: Counters | None = None, on_release: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.config = config
        self.sink = sink
        #: called before an association's release is answered (the node indexes what it got)
        self.on_release = on_release
        self.counters = counters or Counters()
        self._server: Any = None
        self._lock = threading.Lock()
        #: association (id) -> studies it carried so far
        self._open: dict[int, set[str]] = {}
        self.port: int | None = None
        #: serve the data phase with agent.dicom.dataphase (False: pynetdicom's reactor)
        self.fast = True
        self._stopping = threading.Event()
        self._sessions: set[dataphase.Session] = set()

    # -- allow-list --------------------------------------------------------------------
    def _titles_for(self, host: str | None) -> list[str]:
        """``require_calling_aet`` for a caller at ``host``: [] admits any title."""
        allow = self.config.allow
        if not allow:
            return []  # loopback only (the configuration refuses anything else)
        if host is not None and host.startswith("::ffff:"):  # IPv4 caller on a dual-stack socket
            host = host[len("::ffff:"):]
        entries = [a for a in allow if a.host is None or a.host == host]
        if not entries:
            return [_NOBODY]
        if any(a.ae is None for a in entries):
            return []
        return sorted({a.ae for a in entries if a.ae is not None})

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> int:
        ae = _GuardedAE(ae_title=self.config.ae_title)
        ae.allow_check = self._titles_for
        ae.require_called_aet = True
        # large PDUs: far fewer Python round trips per object than the 16 KiB default
        ae.maximum_pdu_size = 1 << 20
        ae.maximum_associations = 64
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        for uid in self.config.private_sop_classes:
            if uid_to_service_class(uid) is not StorageServiceClass:
                # without it pynetdicom has no C-STORE service for the UID and aborts (#1006)
                register_uid(uid, "PrivateStorage" + uid.replace(".", "_"), StorageServiceClass)
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        contexts = ae.supported_contexts
        for context in contexts:
            context.__class__ = _QuickCopyContext
        self._stopping.clear()
        self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                       evt_handlers=handlers, contexts=contexts)  # fmt: skip
        self.port = int(self._server.server_address[1])
        log.info("DICOM node %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)
        return self.port

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:  # a sender in the middle of an association sees it end now
            if session.sock is not None:
                with contextlib.suppress(OSError):
                    session.sock.shutdown(socket.SHUT_RDWR)
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self._lock:
            self._open.clear()

    # -- what completeness needs ------------------------------------------------------
    def open_studies(self) -> set[str]:
        """Studies carried by an association still open."""
        with self._lock:
            out: set[str] = set()
            for studies in self._open.values():
                out |= studies
            return out

    def open_associations(self) -> int:
        with self._lock:
            return len(self._open)

    # -- handlers ----------------------------------------------------------------------
    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self._open[id(event.assoc)] = set()
        self.counters.add(associations=1)
        log.info("association from %s (%s) accepted", event.assoc.requestor.ae_title,
                 event.assoc.requestor.address)  # fmt: skip

    def _on_rejected(self, event: Any) -> None:
        self.counters.add(rejected=1)
        log.warning("association from %s (%s) rejected: not on the allow-list", event.assoc.requestor.ae_title,
                    event.assoc.requestor.address)  # fmt: skip

    def _on_closed(self, event: Any) -> None:
        with self._lock:
            self._open.pop(id(event.assoc), None)

    def _on_echo(self, event: Any) -> int:
        self.counters.add(echoes=1)
        return SUCCESS

    def _on_requested(self, event: Any) -> None:
        if self.fast and not dataphase.take_over(event.assoc, self._serve):
            log.warning("pynetdicom is not the version this agent knows: its own (slower) data phase serves")

    def _serve(self, assoc: Any) -> None:
        """The association's reactor (its own thread) once pynetdicom has accepted it."""
        session = dataphase.Session(assoc, self._store, lambda _assoc: self._on_echo(None), self._stopping,
                                    assoc.network_timeout, HEADER_TAGS, on_release=self.on_release)  # fmt: skip
        with self._lock:
            self._sessions.add(session)
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.discard(session)
                self._open.pop(id(assoc), None)
            assoc.is_established = False
            assoc.is_released = session.outcome == "released"
            assoc.is_aborted = session.outcome != "released"

    def _on_store(self, event: Any) -> int:
        """C-STORE through pynetdicom's own data phase (when :mod:`dataphase` cannot serve)."""

        def uids() -> tuple[str, str, str]:
            ds = event.dataset
            return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)

        status, followup = self._store(event.assoc, event.encoded_dataset(include_meta=True), uids,
                                       lambda: header(event.dataset))  # fmt: skip
        if followup is not None:  # pynetdicom answers after this returns: indexed first, as a whole
            followup()
            if self.on_release is not None:
                self.on_release()
        return status

    def _store(self, assoc: Any, data: bytes, uids: Callable[[], tuple[str, str, str]],
               info: Callable[[], dict[str, Any]]) -> tuple[int, Callable[[], None] | None]:  # fmt: skip
        try:
            study, series, sop = uids()
        except Exception as err:  # a malformed object must not end the association
            log.warning("object from %s not understood: %s", assoc.requestor.ae_title, err)
            return CANNOT_UNDERSTAND, None
        with self._lock:
            # noted before it is written: the study is "carried" from its first byte on
            self._open.setdefault(id(assoc), set()).add(study)
        try:
            return self.sink(Incoming(data, study, series, sop, info, str(assoc.requestor.ae_title).strip(),
                                      str(assoc.acceptor.ae_title).strip(), str(assoc.requestor.address)))  # fmt: skip
        except Exception:  # the sender keeps the object; we say why in the log
            log.exception("could not store object %s", sop)
            self.counters.add(refusals=1)
            return OUT_OF_RESOURCES, None
