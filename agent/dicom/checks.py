"""``vip-agent doctor``'s checks of the DICOM node (standard library only: doctor stays fast)."""

from __future__ import annotations

import errno
import importlib.util
import shutil
import socket
from pathlib import Path

from agent.dicom.config import DicomConfig
from agent.dicom.status import dicom_dir, pending_studies, read_status
from agent.journal import JOURNAL_NAME
from agent.procs import pid_alive

OK, WARN, FAIL = "OK", "WARN", "FAIL"
Finding = tuple[str, str, str]  # (status, title, how to fix)


def _alive(pid: object) -> bool:
    return isinstance(pid, int) and pid_alive(pid)


def _port(config: DicomConfig, state: Path) -> Finding:
    where = f"{config.host}:{config.port}"
    node = read_status(state)
    if node and node.get("listening") and _alive(node.get("pid")):
        return OK, f"DICOM node {config.ae_title} listening on {node.get('host')}:{node.get('port')} (pid {node['pid']})", ""
    if config.port == 0:
        return OK, f"DICOM node {config.ae_title}: a free port is chosen at start (written to {state}/dicom-port)", ""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((config.host, config.port))
        except OSError as err:
            if err.errno == errno.EACCES:
                return FAIL, f"DICOM port {where}: needs privileges (ports below 1024)", \
                    "use a port such as 11112 (configure it on the scanner) or grant CAP_NET_BIND_SERVICE"
            return FAIL, f"DICOM port {where}: cannot listen ({err.strerror})", \
                "another program (a PACS, storescp, another agent) uses it: stop it or choose another port"
    return OK, f"DICOM node {config.ae_title} can listen on {where}", ""


def check_dicom(config: DicomConfig | None, state: Path) -> list[Finding]:
    """Every finding about the ``dicom:`` block (none when it is absent)."""
    if config is None:
        return []
    out: list[Finding] = []
    missing = [m for m in ("pynetdicom", "pydicom", "dicognito") if importlib.util.find_spec(m) is None]
    if missing:
        out.append((FAIL, f"DICOM node: {', '.join(missing)} not installed", "pip install 'vip-agent[dicom]'"))
    out.append(_port(config, state))
    if config.loopback:
        out.append((OK, "DICOM allow-list: loopback only (senders on this machine)", ""))
    else:
        out.append((OK, f"DICOM allow-list: {len(config.allow)} entr{'y' if len(config.allow) == 1 else 'ies'} "
                        f"(other callers are rejected)", ""))  # fmt: skip
    if not config.routes:
        out.append((WARN, "DICOM routes: none; every study stays in the spool",
                    "add routes: [{match: {...}, drop: FOLDER}] (docs/dicom.md)"))  # fmt: skip
    if any(r.convert == "nifti" for r in config.routes):
        if importlib.util.find_spec("dcm2niix") is None and shutil.which("dcm2niix") is None:
            out.append((FAIL, "convert: nifti: dcm2niix not installed", "pip install 'vip-agent[dicom]'"))
    spool = config.spool or dicom_dir(state) / "spool"
    probe = spool
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < config.disk_low:
        out.append((WARN, f"DICOM spool {spool}: {free / 1e9:.1f} GB free, below disk_low "
                          f"({config.disk_low / 1e9:.1f} GB): objects are refused", "free space or lower disk_low"))  # fmt: skip
    else:
        out.append((OK, f"DICOM spool {spool}: {free / 1e9:.1f} GB free", ""))
    stuck = [s for s in pending_studies(state / JOURNAL_NAME) if s["state"] != "pending"]
    if stuck:
        out.append((WARN, f"DICOM: {len(stuck)} stud{'y' if len(stuck) == 1 else 'ies'} kept in the spool "
                          "(unrouted or refused)", "see `vip-agent dicom status`"))  # fmt: skip
    return out
