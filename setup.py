"""Build hook: ``examples/`` and ``docs/`` travel inside the package as ``agent/_bundled/``.

``examples/`` and ``docs/`` stay the only hand-kept copies (the user-facing source
of truth); every wheel build copies them in, so an installed vip-agent (``demo``,
``init``) works outside a source checkout. tests/test_wheel.py checks the wheel's
copy is identical. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BUNDLED = ("examples", "docs")


class BuildWithBundledData(build_py):
    """``build_py`` plus a copy of examples/ and docs/ into ``agent/_bundled/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout itself
        target = Path(self.build_lib) / "agent" / "_bundled"
        if target.exists():
            shutil.rmtree(target)
        for name in BUNDLED:
            source = HERE / name
            if source.is_dir():
                shutil.copytree(source, target / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildWithBundledData})
