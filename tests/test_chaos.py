"""A small run of ``benchmarks/chaos.py``: real ``vip-agent watch`` processes SIGKILLed at
random moments against a real local server with faults; nothing lost, launched twice,
changed, left on the server or left as ``*.part``. (The full runs are in benchmarks/README.md.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import chaos  # noqa: E402


def test_small_chaos_run_loses_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    faults = "error_rate=0.1,drop_rate=0.05,capacity=0.1,unknown_blip=0.1,seed=3"
    argv = ["--datasets", "3", "--kills", "3", "--max-gap", "0.8", "--timeout", "90", "--no-save"]
    code = chaos.main([*argv, "--faults", faults])
    out = capsys.readouterr().out
    assert code == 0, out
    assert '"kills": 3' in out and '"reference_outputs": 6' in out, out


def test_temporaries_of_a_killed_writer_are_swept(tmp_path: Path) -> None:
    import subprocess

    from agent import fsutil

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    target = tmp_path / "STATUS.json"
    litter = tmp_path / f".STATUS.json.{dead.stdout.strip()}-1234.tmp"  # killed mid-write
    litter.write_text("{")
    live = tmp_path / f".STATUS.json.{os.getppid()}-1.tmp"  # a writer still alive: kept
    live.write_text("{")
    fsutil.write_atomic(target, "{}")
    assert target.read_text() == "{}" and not litter.exists() and live.exists()


def test_a_download_that_keeps_timing_out_is_retried_later_not_failed(tmp_path: Path) -> None:
    """Found by the chaos run with faults: 400 8000 on every try of a download made the
    dataset fail; the file is there, so it is a transient error (the step is retried)."""
    from agent.localvip import LocalVip
    from agent.vip.client import VipClient
    from agent.vip.errors import TransientError

    with LocalVip(tmp_path / "vip") as server:
        client = VipClient(server.url, server.api_key, retries=0)
        source = tmp_path / "a.txt"
        source.write_text("hello\n")
        client.upload(source, "/vip/Home/a.txt")
        server.faults = "transfer_timeout=1.0,methods=GET,match=^/rest/path/"
        with pytest.raises(TransientError, match="a.txt"):
            client.download("/vip/Home/a.txt", tmp_path / "back.txt", expected_size=6)
        assert not (tmp_path / "back.txt").exists() and not (tmp_path / "back.txt.part").exists()
