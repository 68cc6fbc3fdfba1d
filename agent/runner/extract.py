"""Stage ``extract``: result archives become folders of the same name (as VipSession does),
atomically (see :mod:`agent.extract`); an unsafe or corrupt archive is kept as is."""

from __future__ import annotations

from pathlib import Path

from agent.errors import AgentError
from agent.extract import has_archive_name, safe_extract
from agent.journal import Dataset, Stage
from agent.runner.common import Advance, Context, Interrupted, Next
from agent.runner.settings import settings_of


def step(ctx: Context, ds: Dataset) -> Next:
    settings = settings_of(ds)
    for o in ctx.journal.outputs(ds.id):
        if not o.downloaded or o.extracted:
            continue
        local = Path(o.local)
        if not has_archive_name(local):
            continue  # safe_extract is idempotent: a folder here is a finished extraction
        if ctx.stop_event.is_set():
            raise Interrupted("stopping before extraction")
        try:
            folder = safe_extract(local, max_ratio=settings.extract_max_ratio,
                                  max_member_ratio=settings.extract_max_member_ratio)
        except AgentError as err:
            ctx.journal.update_output(ds.id, o.remote, extracted=-1)
            ctx.journal.event(ds.id, f"{local.name}: {err.message}", level="error")
            continue
        ctx.journal.update_output(ds.id, o.remote, extracted=1, extracted_to=str(folder))
    return Advance(Stage.CLEANUP, "result archives extracted")
