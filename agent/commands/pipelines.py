"""``vip-agent pipelines [PATTERN]``: list pipelines, show one's parameters, or write a job.yaml.

PATTERN is a case-insensitive substring of the identifier or name, or a glob
(``LCModel/*``). When exactly one pipeline matches (or PATTERN is an exact
identifier), its parameters are shown like ``VipSession.show_pipeline``;
``--job-yaml`` prints a job.yaml skeleton for it instead.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.paths import DEFAULT_SERVER
from agent.settings import resolve as resolve_settings
from agent.validate import closest_pipelines, has_default

EXIT_OK, EXIT_NO_MATCH, EXIT_USAGE = 0, 2, 2
PLACEHOLDER = "REPLACE_ME"
WIDTH = 78


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "pattern",
        nargs="?",
        default=None,
        help="part of a pipeline identifier or name (case-insensitive), or a glob like 'LCModel/*'",
    )
    parser.add_argument(
        "--server", default=None,
        help="VIP portal URL (default: VIP_AGENT_SERVER, else agent.yaml's server, else "
             f"{DEFAULT_SERVER})",
    )  # fmt: skip
    parser.add_argument(
        "--config", type=Path, default=None,
        help="agent.yaml giving the server and its key_file (default: the per-user agent.yaml, "
             "when there is one)",
    )  # fmt: skip
    out = parser.add_mutually_exclusive_group()
    out.add_argument(
        "--job-yaml",
        action="store_true",
        help="print a job.yaml skeleton for the one matching pipeline",
    )
    out.add_argument("--json", action="store_true", help="print JSON (the list, or the pipeline)")


# --------------------------------------------------------------------------- pure helpers


def match_pipelines(
    pipelines: Sequence[Mapping[str, Any]], pattern: str | None
) -> list[Mapping[str, Any]]:
    """Pipelines matching ``pattern``: an exact identifier wins, then glob or substring."""
    items = sorted(pipelines, key=lambda p: str(p.get("identifier", "")).lower())
    if not pattern:
        return items
    pat = pattern.lower()
    exact = [p for p in items if str(p.get("identifier", "")).lower() == pat]
    if exact:
        same_case = [p for p in exact if p.get("identifier") == pattern]
        return same_case[:1] or exact[:1]
    magic = any(c in pattern for c in "*?[")
    found = []
    for p in items:
        fields = [str(p.get("identifier", "")).lower(), str(p.get("name", "")).lower()]
        if magic:
            hit = any(fnmatch.fnmatchcase(f, pat) for f in fields)
        else:
            hit = any(pat in f for f in fields)
        if hit:
            found.append(p)
    return found


def clean_text(text: Any) -> str:
    """Pipeline descriptions carry HTML on VIP: keep the words only."""
    s = re.sub(r"<br\s*/?>", " ", str(text or ""), flags=re.I)
    s = re.sub(r"<[^>]+>", "", s)
    s = s.replace("&nbsp;", " ").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    return " ".join(s.split())


def _default_text(param: Mapping[str, Any]) -> str | None:
    if not has_default(param):
        return None
    d = param.get("defaultValue")
    if isinstance(d, bool):
        return "true" if d else "false"
    return str(d)


def _ordered(params: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Required first, then optional; by name inside each group (VIP gives no order)."""
    return sorted(params, key=lambda p: (bool(p.get("isOptional")), str(p.get("name", ""))))


def format_listing(pipelines: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (str(p.get("identifier", "")), str(p.get("name", "")), str(p.get("version", "")))
        for p in pipelines
    ]
    head = ("IDENTIFIER", "NAME", "VERSION")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]
    return "\n".join(lines)


def format_pipeline(pipeline: Mapping[str, Any]) -> str:
    """A pipeline's description and parameters, laid out like ``VipSession.show_pipeline``."""
    ident = str(pipeline.get("identifier", ""))
    header = f"NAME: {pipeline.get('name')} | VERSION: {pipeline.get('version')}"
    width = max(WIDTH, len(header), len(ident))
    wrap = textwrap.TextWrapper(width=width, initial_indent="    ", subsequent_indent="    ")
    out = ["=" * width, ident, "=" * width, header, "-" * width, "DESCRIPTION:"]
    out += wrap.wrap(clean_text(pipeline.get("description"))) or ["    (none)"]
    out += ["-" * width, "INPUTS:"]
    params = _ordered(list(pipeline.get("parameters") or []))
    for optional in (False, True):
        group = [p for p in params if bool(p.get("isOptional")) == optional]
        label = "OPTIONAL" if optional else "REQUIRED"
        out.append(label + "." * (width - len(label)))
        if not group:
            out.append("    (none)")
        for p in group:
            out.append(f"- {p.get('name')}")
            bits = [f"[{str(p.get('type', '?')).upper()}]"]
            default = _default_text(p)
            if default is not None:
                bits.append(f"default: {default}.")
            desc = clean_text(p.get("description"))
            if desc:
                bits.append(desc)
            out += wrap.wrap(" ".join(bits))
    out.append("=" * width)
    out.append(f"A job.yaml skeleton: vip-agent pipelines {ident} --job-yaml")
    return "\n".join(out)


def _yaml_str(value: str) -> str:
    # JSON strings are valid YAML double-quoted scalars
    return json.dumps(value, ensure_ascii=False)


def _comment(text: str, indent: str) -> list[str]:
    return (
        textwrap.wrap(
            text, width=88, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   "
        )
        or []
    )


_HOW = {
    "File": 'a file in the dataset, a pattern like "*.txt" (one job per file), or /vip/Home/...',
    "Boolean": '"true" or "false"',
    "Int64": "a whole number",
    "Double": "a number",
    "List": "a YAML list; all values go to one job",
    "String": "text",
}


def _example(params: list[Mapping[str, Any]]) -> str:
    """A parameter worth varying in the variants example: an optional one if any."""
    optional = [p for p in params if p.get("isOptional")]
    return str((optional or params)[0].get("name"))


def job_yaml_skeleton(pipeline: Mapping[str, Any]) -> str:
    """A job.yaml for ``pipeline``: required inputs set (or REPLACE_ME), optional ones commented out."""
    ident = str(pipeline.get("identifier", ""))
    lines = [
        f"# job.yaml for {ident} ({pipeline.get('name')} {pipeline.get('version')}),",
        f"# written by `vip-agent pipelines {ident} --job-yaml`. Keys: docs/job-yaml.md.",
    ]
    desc = clean_text(pipeline.get("description"))
    if desc:
        lines += _comment(desc, "")
    lines += [
        f"pipeline: {_yaml_str(ident)}",
        "# name: subject-042          # default: the dataset folder's name",
        "inputs:",
    ]
    params = [
        p
        for p in _ordered(list(pipeline.get("parameters") or []))
        if p.get("name") != "results-directory"
    ]
    if not params:
        lines.append("  {}")
    for p in params:
        name = str(p.get("name"))
        ptype = str(p.get("type") or "String")
        optional = bool(p.get("isOptional"))
        default = _default_text(p)
        head = f"{name} ({ptype}, {'optional' if optional else 'required'}"
        head += f", default {default})" if default is not None else ")"
        d = clean_text(p.get("description"))
        lines += _comment(head + (f": {d}" if d else ""), "  ")
        lines += _comment(f"value: {_HOW.get(ptype, 'text')}", "  ")
        if optional:
            lines.append(f"  # {name}: {_yaml_str(default if default is not None else '')}")
        elif default is not None:
            lines.append(f"  {name}: {_yaml_str(default)}")
        else:
            lines.append(f"  {name}: {_yaml_str(PLACEHOLDER)}")
    lines += [
        "runs: 1                       # identical executions of each variant",
        "# variants:                   # several parameter sets sharing one upload; only these run",
        "#   fast: {inputs: {" + (f"{_example(params)}: ..." if params else "") + "}}",
        "# output_dir: ../results      # relative to the drop folder; default: the agent's output folder",
        "extract: true                 # unpack result archives into a folder named after each",
        "cleanup: true                 # delete inputs and outputs on VIP once mirrored",
        '# expect: ["*.txt"]           # files that must be present before the dataset starts',
        "# vip_root: /vip/Home/vip-agent",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command


def _api_key(server: str, key_file: Path | None) -> str:
    from agent.credentials import find_api_key

    return find_api_key(server, key_file=key_file).key


def main(args: argparse.Namespace) -> int:
    from agent.backend import open_backend
    from agent.vip.errors import NotFoundError

    settings = resolve_settings(config=args.config, server=args.server)
    server = settings.require_server()
    with open_backend(server, _api_key(server, settings.key_file), retries=2) as backend:
        client = backend.client
        listing = client.pipelines()
        matches = match_pipelines(listing, args.pattern)
        pattern = args.pattern or ""
        if not matches and "/" in pattern and not any(c in pattern for c in "*?["):
            # an identifier VIP hides from the list (whitelisted versions) may still resolve
            try:
                matches = [client.pipeline(pattern)]
            except NotFoundError:
                matches = []
        if not matches:
            near = closest_pipelines(pattern, listing)
            hint = f" Closest: {', '.join(near)}." if near else ""
            print(
                f"no pipeline matches {pattern!r} on {server}.{hint} Run `vip-agent pipelines` to "
                "list them all; your account may need to join the pipeline's group",
                file=sys.stderr,
            )
            return EXIT_NO_MATCH
        if len(matches) > 1:
            if args.job_yaml:
                print(
                    f"{len(matches)} pipelines match {pattern!r}; give one identifier:\n"
                    + format_listing(matches),
                    file=sys.stderr,
                )
                return EXIT_USAGE
            if args.json:
                keys = ("identifier", "name", "version")
                print(json.dumps([{k: p.get(k) for k in keys} for p in matches], indent=2))
            else:
                print(format_listing(matches))
            return EXIT_OK
        one = matches[0]
        detail = one if one.get("parameters") else client.pipeline(str(one["identifier"]))
    if args.job_yaml:
        sys.stdout.write(job_yaml_skeleton(detail))
    elif args.json:
        print(json.dumps(detail, indent=2))
    else:
        print(format_pipeline(detail))
    return EXIT_OK
