"""``convert: nifti``: dcm2niix (the PyPI wheel's binary) per series, NIfTI + JSON out.

dcm2niix runs on the already de-identified objects, with ``-ba y`` (anonymised
BIDS sidecars); only ``.nii.gz``, ``.json``, ``.bval`` and ``.bvec`` are kept. A
failure is a dataset error carrying dcm2niix's own message.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import dcm2niix

from agent.errors import AgentError

KEPT_SUFFIXES = (".nii.gz", ".json", ".bval", ".bvec")


class ConversionError(AgentError):
    """dcm2niix could not convert a series."""


def binary() -> str:
    """The dcm2niix program: the wheel's, else one on PATH."""
    if Path(dcm2niix.bin).is_file():
        return str(dcm2niix.bin)
    found = shutil.which("dcm2niix")
    if found is None:
        raise ConversionError("dcm2niix is not installed (pip install dcm2niix)")
    return found


def convert_series(series_dir: Path, out_dir: Path, stem: str, timeout: float = 600) -> list[Path]:
    """Convert the DICOM files in ``series_dir``; the kept outputs, moved into ``out_dir``."""
    with tempfile.TemporaryDirectory(prefix=".dcm2niix-", dir=out_dir) as tmp:
        argv = [binary(), "-b", "y", "-ba", "y", "-z", "y", "-f", stem, "-o", tmp, str(series_dir)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ConversionError(f"dcm2niix could not run on {stem}", detail=str(err)) from None
        produced = sorted(p for p in Path(tmp).iterdir() if p.name.endswith(KEPT_SUFFIXES))
        if done.returncode != 0 or not any(p.name.endswith(".nii.gz") for p in produced):
            lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
            message = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no output")
            raise ConversionError(f"dcm2niix could not convert {stem}: {message.strip()}",
                                  detail=f"exit status {done.returncode}")  # fmt: skip
        out = []
        for p in produced:
            target = out_dir / p.name
            p.replace(target)
            out.append(target)
        return out
