"""Orthanc (Debian's, an independent DICOM implementation) pushing to the DICOM node.

Orthanc's HTTP server cannot be bound to loopback only, so Orthanc and the node run in a
private network namespace (``unshare -n``: only a loopback interface, reachable by nothing
else); skipped where namespaces or Orthanc are not available.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agenthelpers import REPO
from dicomhelpers import ORTHANC, PATIENT_FILES, STUDY_SIZES, spectroscopy

HELPER = Path(__file__).with_name("dicomhelpers.py")


def in_namespace(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HELPER.parent}"}
    return subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


@pytest.fixture
def namespace() -> None:
    if not ORTHANC.exists() and os.environ.get("CI") == "true":
        pytest.fail("Orthanc is not installed (.ci/run installs Debian's orthanc)")
    if not ORTHANC.exists() or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("Orthanc, unshare or ip not installed")
    if in_namespace("true", timeout=30).returncode != 0:
        pytest.skip("no permission to create a network namespace here")


def test_orthanc_pushes_the_patient_and_a_private_sop_class(tmp_path: Path, namespace: None) -> None:
    mrs = spectroscopy(tmp_path / "in")
    done = in_namespace(sys.executable, str(HELPER), "orthanc", str(tmp_path), *map(str, PATIENT_FILES), str(mrs))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["store_status"] == 200, result
    assert result["datasets"] == sorted([*STUDY_SIZES, 1]), result
    assert result["counters"]["objects"] == 18 and result["counters"]["associations"] >= 1
    assert "1.3.12.2.1107.5.9.1" in result["sop_classes"]
