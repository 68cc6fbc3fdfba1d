"""Names VIP accepts: the file names it gives uploads, and the deterministic execution names
the runner finds its executions by after a crash."""

from __future__ import annotations

import hashlib
import re
import unicodedata

from agent.jobfile import DEFAULT_VARIANT

__all__ = ["EXEC_NAME_RE", "execution_name", "vip_safe_name", "vip_safe_path"]

#: characters VIP accepts in an execution name (AC EXEC_NAME_VALID_CHARS)
EXEC_NAME_RE = re.compile(r"[0-9A-Za-z\-_ ]+")


def vip_safe_name(name: str) -> str:
    """The name VIP gives a file uploaded as ``name`` (DataManagerUtil.getCleanFilename).

    Last path segment, trimmed like Java ``String.trim`` (control characters and
    spaces at both ends), spaces -> ``_``, accents decomposed (NFKD) and every
    non-ASCII character dropped.
    """
    name = name.rsplit("/", 1)[-1]
    i, j = 0, len(name)
    while i < j and ord(name[i]) <= 0x20:
        i += 1
    while j > i and ord(name[j - 1]) <= 0x20:
        j -= 1
    name = name[i:j].replace(" ", "_")
    name = unicodedata.normalize("NFKD", name)
    return "".join(c for c in name if ord(c) < 128)


def vip_safe_path(rel: str) -> str:
    """``vip_safe_name`` applied to each segment of a relative POSIX path."""
    return "/".join(vip_safe_name(part) for part in rel.split("/"))


def _clean_exec_part(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if ord(c) < 128)
    text = re.sub(r"[^0-9A-Za-z\-_]+", "_", text)
    return re.sub(r"_{2,}", "_", text).strip("_")


def execution_name(
    job_name: str, variant: str = DEFAULT_VARIANT, run: int = 1, fingerprint: str = ""
) -> str:
    """A deterministic execution name VIP accepts (``[0-9A-Za-z-_ ]+``).

    ``<name>_<variant>_r<run>_<hash>``: the name and variant are sanitised and
    shortened, and the hash (8 hex digits of the original name and the dataset
    fingerprint) keeps names apart when sanitising merges them or the same
    folder name comes back with new content. The same arguments always give the
    same name, so the runner can find its execution again after a crash.
    """
    base = _clean_exec_part(job_name)[:40].strip("_") or "dataset"
    var = _clean_exec_part(variant)[:20].strip("_") or DEFAULT_VARIANT
    digest = hashlib.sha256(f"{job_name}\0{fingerprint}".encode()).hexdigest()[:8]
    name = f"{base}_{var}_r{int(run)}_{digest}"
    assert EXEC_NAME_RE.fullmatch(name)
    return name
