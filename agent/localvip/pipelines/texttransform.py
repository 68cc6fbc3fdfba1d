"""TextTransform/1.0: line-by-line text transform into a .tgz; fails on a first line 'FAIL'."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tgz import write_tgz  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("--mode", default="upper")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--scale", type=float)
    p.add_argument("--number-lines", action="store_true")
    p.add_argument("--output", required=True)
    a = p.parse_args()
    with open(a.input, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if lines and lines[0].strip() == "FAIL":
        print("TextTransform: the input file's first line is FAIL: failing on purpose", file=sys.stderr)
        return 3
    if a.mode == "fail":
        print("TextTransform: mode 'fail' requested: failing on purpose", file=sys.stderr)
        return 3
    if a.mode not in ("upper", "lower", "reverse", "identity"):
        print(f"TextTransform: unknown mode {a.mode!r}", file=sys.stderr)
        return 2
    out = []
    for n, line in enumerate(lines, 1):
        if a.scale is not None:
            try:
                line = repr(float(line) * a.scale)
            except ValueError:
                pass
        line = {"upper": line.upper(), "lower": line.lower(), "reverse": line[::-1]}.get(a.mode, line)
        out.append(f"{n}: {line}" if a.number_lines else line)
    text = "\n".join(out * max(a.repeat, 1)) + "\n"
    params = {"mode": a.mode, "repeat": a.repeat, "scale": a.scale, "number_lines": a.number_lines,
              "input": os.path.basename(a.input), "lines": len(lines)}
    write_tgz(a.output, {"transformed.txt": text.encode(), "params.json": json.dumps(params).encode()})
    print(f"TextTransform: {len(lines)} lines, mode {a.mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
