"""Sleep/1.0: sleep, then write a one-line report (or exit with --exit-code)."""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("seconds", type=float)
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--output", required=True)
    a = p.parse_args()
    print(f"Sleep: sleeping {a.seconds} s", flush=True)
    time.sleep(max(a.seconds, 0.0))
    if a.exit_code:
        print(f"Sleep: exiting with code {a.exit_code} as asked", file=sys.stderr)
        return a.exit_code
    with open(a.output, "w", encoding="utf-8") as f:
        f.write(f"slept {a.seconds} seconds\n")
    print("Sleep: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
