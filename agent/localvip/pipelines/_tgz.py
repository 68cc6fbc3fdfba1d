"""Helper shared by the built-in tools: write files into a .tgz."""

from __future__ import annotations

import io
import os
import tarfile
import time


def write_tgz(path: str, members: dict[str, bytes]) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
