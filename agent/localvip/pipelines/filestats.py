"""FileStats/1.0: statistics of one file, written as report.json + report.txt in a .tgz."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tgz import write_tgz  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("--words", action="store_true")
    p.add_argument("--label")
    p.add_argument("--output", required=True)
    a = p.parse_args()
    sha, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 - a checksum, not security
    size = lines = nonempty = words = 0
    last = b""
    with open(a.input, "rb") as f:
        for line in f:
            sha.update(line)
            md5.update(line)
            size += len(line)
            lines += 1
            if line.strip():
                nonempty += 1
            if a.words:
                words += len(line.split())
            last = line
    if last and not last.endswith(b"\n"):
        pass  # a last line without newline still counts as a line
    report = {
        "file": os.path.basename(a.input),
        "size": size,
        "bytes": size,
        "sha256": sha.hexdigest(),
        "md5": md5.hexdigest(),
        "lines": lines,
        "nonempty_lines": nonempty,
    }
    if a.words:
        report["words"] = words
    if a.label:
        report["label"] = a.label
    text = "".join(f"{k}: {v}\n" for k, v in report.items())
    write_tgz(a.output, {"report.json": json.dumps(report, indent=2).encode(), "report.txt": text.encode()})
    print(f"FileStats: {report['file']} {size} bytes, {lines} lines, sha256 {report['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
