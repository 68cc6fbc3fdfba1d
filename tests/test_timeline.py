"""Stage segments from journal events: every attempt (status NAME) and the latest one (page, metrics)."""

from __future__ import annotations

from types import SimpleNamespace

from agent.timeline import all_segments, segments


def events(*pairs: tuple[float, str | None]) -> list[SimpleNamespace]:
    return [SimpleNamespace(time=t, stage=s) for t, s in pairs]


# validate, upload, failed; retried: validate again, upload, then done
RETRIED = events(
    (0, "validate"), (1, "validate"), (2, "upload"), (3, None), (4, "failed"),
    (10, "validate"), (11, "upload"), (15, "done"),
)  # fmt: skip


def test_all_segments_keep_every_attempt_and_final_stages() -> None:
    got = [(s.stage, s.start, s.end) for s in all_segments(RETRIED)]
    assert got == [
        ("validate", 0, 2), ("upload", 2, 4), ("failed", 4, 10),
        ("validate", 10, 11), ("upload", 11, 15), ("done", 15, None),
    ]  # fmt: skip


def test_segments_are_the_latest_attempt_without_final_stages() -> None:
    got = [(s.stage, s.phase, s.start, s.end) for s in segments(RETRIED)]
    assert got == [("validate", "validate", 10, 11), ("upload", "upload", 11, 15)]
    running = segments(events((0, "validate"), (1, "monitor")))
    assert [(s.stage, s.end) for s in running] == [("validate", 1), ("monitor", None)]
