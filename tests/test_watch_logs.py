"""Service logging: one line per event, JSON on request, API keys never written."""

from __future__ import annotations

import io
import json
import logging

from agent.logs import get_logger, setup_logging

KEY = "s3cr3t-api-key-value"


def test_text_one_line_and_redacted() -> None:
    stream = io.StringIO()
    redact = setup_logging("text", stream=stream)
    redact.add(KEY)
    log = get_logger("test")
    log.info("using key %s for %s", KEY, "http://x")
    log.warning("header apikey: %s\nsecond line", "other-token-123")
    try:
        raise RuntimeError(f"failed with {KEY}")
    except RuntimeError:
        log.exception("boom")
    out = stream.getvalue()
    lines = out.splitlines()
    assert len(lines) == 3, out  # multi-line messages and tracebacks stay on one line
    assert KEY not in out and "other-token-123" not in out
    assert "using key *** for http://x" in lines[0] and "WARNING" in lines[1]
    assert "RuntimeError: failed with ***" in lines[2]


def test_json_format() -> None:
    stream = io.StringIO()
    redact = setup_logging("json", stream=stream, level=logging.DEBUG)
    redact.add(KEY)
    get_logger("watch").info("dataset %s done", "s1", extra={"dataset": "s1", "note": KEY})
    doc = json.loads(stream.getvalue())
    assert doc["message"] == "dataset s1 done" and doc["level"] == "info"
    assert doc["logger"] == "vip_agent.watch" and doc["dataset"] == "s1" and doc["note"] == "***"
