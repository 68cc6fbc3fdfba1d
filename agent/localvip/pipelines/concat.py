"""ConcatFiles/1.0: concatenate files in order into <name>.tgz (member concatenated.txt)."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tgz import write_tgz  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output", required=True)
    p.add_argument("files", nargs="+")
    a = p.parse_args()
    data = b""
    for name in a.files:
        with open(name, "rb") as f:
            data += f.read()
    listing = "".join(os.path.basename(n) + "\n" for n in a.files).encode()
    write_tgz(a.output, {"concatenated.txt": data, "files.txt": listing})
    print(f"ConcatFiles: {len(a.files)} files, {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
