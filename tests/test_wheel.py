"""The wheel alone is enough: build it, install it in a fresh venv, run `demo` and `init` far from the checkout.

Speed: the dependencies (watchdog, requests, ...) are not downloaded again into the
fresh venv: a .pth file lends it this interpreter's site-packages (a
``--system-site-packages``-style trick). That folder holds the checkout only as an
editable install, whose hook a .pth-added folder does not run, and the test checks
``agent`` is imported from the fresh venv: the code and data used are the wheel's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from agenthelpers import REPO

from agent.localvip import LocalVip

SKIP = shutil.ignore_patterns(
    ".git", ".venv", ".ci-venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", "vip-agent-demo", "vip_outputs",
)  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps . -w DIR`` on a copy of the checkout (the build writes into its tree)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=SKIP)
    dist = root / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(dist)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (found,) = dist.glob("vip_agent-*.whl")
    return found


def test_wheel_carries_examples_and_docs_identical(wheel: Path) -> None:
    """examples/ and docs/ are the only hand-kept copies: the packaged ones equal them byte for byte."""
    with zipfile.ZipFile(wheel) as zf:
        packed = {n: zf.read(n) for n in zf.namelist() if n.startswith("agent/_bundled/")}
    for name in ("examples", "docs"):
        expected = {
            f"agent/_bundled/{name}/{p.relative_to(REPO / name).as_posix()}": p.read_bytes()
            for p in (REPO / name).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
        }
        got = {k: v for k, v in packed.items() if k.startswith(f"agent/_bundled/{name}/")}
        assert got.keys() == expected.keys(), name
        assert all(got[k] == expected[k] for k in expected), name
    assert "agent/_bundled/examples/drop/job.yaml" in packed


def fresh_venv(root: Path, wheel: Path) -> Path:
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


def test_demo_and_init_from_the_wheel_in_a_fresh_venv(tmp_path: Path, wheel: Path) -> None:
    venv = fresh_venv(tmp_path, wheel)
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VIP_", "XDG_", "PYTHON")) and k not in ("STATE_DIRECTORY", "CONFIGURATION_DIRECTORY")}  # fmt: skip
    env.update(HOME=str(home), PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")
    exe = str(venv / "bin" / "vip-agent")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import agent; print(agent.__file__)"],
                           capture_output=True, text=True, env=env, cwd=elsewhere, check=True)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    demo = subprocess.run([exe, "demo"], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=180)
    assert demo.returncode == 0, demo.stderr
    outputs = Path(demo.stdout.strip().splitlines()[-1])
    assert outputs.is_dir() and outputs.is_relative_to(elsewhere)
    extracted = [p for p in outputs.rglob("*.tgz") if p.is_dir()]
    assert extracted and all(any(p.iterdir()) for p in extracted)
    assert (home / ".local" / "state" / "vip-agent" / "journal.sqlite3").is_file()  # the per-user state

    with LocalVip(tmp_path / "server") as server:
        init = subprocess.run(
            [exe, "init", "--non-interactive", "--server", server.url, "--drop", "drop", "--output", "results"],
            capture_output=True, text=True, env={**env, "VIP_API_KEY": server.api_key}, cwd=elsewhere,
            timeout=120,
        )  # fmt: skip
    assert init.returncode == 0, init.stdout + init.stderr
    config = home / ".config" / "vip-agent" / "agent.yaml"
    assert config.is_file() and (elsewhere / "drop").is_dir() and (elsewhere / "results").is_dir()
    assert "doctor:" in init.stdout and not [line for line in init.stdout.splitlines() if line.startswith("FAIL")]
    assert server.api_key not in init.stdout + init.stderr + config.read_text()

    # the rest of the README's path, still from the wheel: the service file, then status
    unit_dir = tmp_path / "units"
    unit = subprocess.run([exe, "install-service", "--user", "--output-dir", str(unit_dir)],
                          capture_output=True, text=True, env=env, cwd=elsewhere, timeout=60)  # fmt: skip
    assert unit.returncode == 0, unit.stderr
    text = (unit_dir / "vip-agent.service").read_text()
    assert f"{exe} watch --config {config}" in text
    status = subprocess.run([exe, "status"], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=60)
    assert status.returncode == 0 and "done" in status.stdout  # the demo's datasets, from the per-user journal
