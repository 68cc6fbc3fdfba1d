"""The structural check of a job file: its YAML read with positions, every key and type
checked, every problem said at once with file and line (docs/job-yaml.md).

:mod:`agent.jobfile` merges the checked documents into a ``JobSpec``; checks that need the
pipeline description live in :mod:`agent.validate`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from agent import yamlread
from agent.errors import ConfigError

#: top-level keys and what they hold (for messages)
KEYS: dict[str, str] = {
    "pipeline": "the VIP pipeline identifier, e.g. LCModel/0.2",
    "name": "a name for the dataset's executions",
    "inputs": "a mapping of pipeline input name to value",
    "runs": "how many identical executions to launch (an integer, at least 1)",
    "variants": "a mapping of variant name to {inputs: {...}}",
    "output_dir": "the folder where outputs are mirrored",
    "extract": "true or false",
    "cleanup": "true or false",
    "expect": "a list of file patterns the dataset must contain before it starts",
    "vip_root": "the VIP folder under which the agent works, e.g. /vip/Home/vip-agent",
}
VARIANT_KEYS: frozenset[str] = frozenset({"inputs"})

VARIANT_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Doc:
    """One parsed YAML file: plain data plus the line of every key."""

    path: Path
    data: dict[str, Any]
    lines: dict[tuple[str, ...], int]

    def where(self, *keypath: str) -> str:
        line = None
        for n in range(len(keypath), -1, -1):
            line = self.lines.get(tuple(keypath[:n]))
            if line is not None:
                break
        return f"{self.path}, line {line}" if line else str(self.path)


def _text(node: yaml.Node, constructor: yaml.constructor.SafeConstructor, raw: bool) -> Any:
    """Plain data from a node; ``raw`` keeps scalars as written (None for null)."""
    if isinstance(node, yaml.MappingNode):
        constructor.flatten_mapping(node)
        return {_text(k, constructor, False): _text(v, constructor, raw) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_text(v, constructor, raw) for v in node.value]
    if raw and isinstance(node, yaml.ScalarNode):
        if node.tag == "tag:yaml.org,2002:null":
            return None
        return node.value
    return constructor.construct_object(node, deep=True)


def parse(path: Path) -> Doc:
    """Read one job file into plain data and key lines, or raise ConfigError."""
    root = yamlread.compose(path, "job file")
    if root is None:
        raise ConfigError(
            f"{path}: the job file is empty; it needs at least 'pipeline' and 'inputs'"
        )
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(
            f"{path}, line {root.start_mark.line + 1}: a job file must be a mapping of keys "
            "(pipeline:, inputs:, ...), not a list or a single value"
        )
    constructor = yamlread.constructor()
    lines: dict[tuple[str, ...], int] = {}
    problems: list[str] = []

    def walk(node: yaml.MappingNode, prefix: tuple[str, ...], raw_children: bool) -> dict[str, Any]:
        # keys written here may override keys merged in with '<<: *anchor'
        explicit = {id(k) for k, _ in node.value}
        constructor.flatten_mapping(node)
        out: dict[str, Any] = {}
        merged: set[str] = set()
        for knode, vnode in node.value:
            line = knode.start_mark.line + 1
            if raw_children and isinstance(knode, yaml.ScalarNode):
                key: Any = knode.value  # input names as written ('on', '1')
            else:
                key = constructor.construct_object(knode, deep=True)
            if not isinstance(key, str):
                problems.append(f"{path}, line {line}: the key {key!r} must be text")
                continue
            if key in out and key not in merged:
                problems.append(
                    f"{path}, line {line}: '{'.'.join(prefix + (key,))}' is set twice "
                    f"(first on line {lines[prefix + (key,)]}); keep one"
                )
                continue
            merged.discard(key)
            if id(knode) not in explicit:
                merged.add(key)
            lines[prefix + (key,)] = line
            here = prefix + (key,)
            # inputs hold raw text; variants.<v>.inputs too; everything else is typed YAML
            if isinstance(vnode, yaml.MappingNode) and (
                here in (("variants",),) or (len(here) == 2 and here[0] == "variants")
            ):
                out[key] = walk(vnode, here, False)
            elif here == ("inputs",) or (
                len(here) == 3 and here[0] == "variants" and here[2] == "inputs"
            ):
                if isinstance(vnode, yaml.MappingNode):
                    out[key] = walk(vnode, here, True)
                else:
                    out[key] = _text(vnode, constructor, False)
            else:
                out[key] = _text(vnode, constructor, raw_children)
        return out

    try:
        data = walk(root, (), False)
    except yaml.YAMLError as err:  # constructor errors (bad timestamps, ...)
        raise yamlread.yaml_problem(path, err) from err
    if problems:
        raise ConfigError("\n".join(problems) if len(problems) == 1 else listing(problems))
    return Doc(path, data, lines)


def listing(problems: list[str]) -> str:
    return "the job file has problems:" + "".join(f"\n  - {p}" for p in problems)


# --------------------------------------------------------------------------- checks


def _nul_texts(value: Any, keypath: tuple[str, ...]) -> Iterable[tuple[str, ...]]:
    """Key paths of every text (key or value) holding a NUL character."""
    if isinstance(value, str):
        if "\0" in value:
            yield keypath
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and "\0" in k:
                yield (*keypath, k)
            else:
                yield from _nul_texts(v, (*keypath, str(k)))
    elif isinstance(value, list):
        for v in value:
            yield from _nul_texts(v, keypath)


def check_doc(doc: Doc, problems: list[str], keyed: list[tuple[Doc, str, str]]) -> None:
    """Shape checks on one file (before merging), so messages can name file and line.

    ``problems`` get what stops the job from being read (pipeline, inputs, variants, NUL);
    ``keyed`` gets (file, key, message) for a problem of one of the job's own keys: the job
    can still be read without that key, and its inputs checked, so that every problem is
    reported at once (docs/job-yaml.md).
    """
    d = doc.data

    def soft(key: str, message: str) -> None:
        keyed.append((doc, key, message))

    bad = sorted(set(_nul_texts(d, ())))
    for keypath in bad:
        shown = ".".join(keypath).replace("\0", "\\0")
        problems.append(
            f"{doc.where(*keypath)}: '{shown}' contains a NUL character (\\0), which no file "
            "name or VIP value may hold; remove it"
        )
    if bad:
        return  # the other checks would stumble on the same texts
    for key in d:
        if key not in KEYS:
            near = _near(key, KEYS)
            soft(
                key,
                f"{doc.where(key)}: unknown key '{key}'"
                + (f" (did you mean '{near}'?)" if near else "")
                + f"; allowed keys: {', '.join(KEYS)}"
            )
    for key in ("pipeline", "name", "output_dir", "vip_root"):
        if key in d and d[key] is not None and not isinstance(d[key], str):
            message = f"{doc.where(key)}: '{key}' must be text ({KEYS[key]})" + yamlread.text_hint(d[key])
            if key == "pipeline":
                problems.append(message)
            else:
                soft(key, message)
    if isinstance(d.get("pipeline"), str) and "/" not in d["pipeline"]:
        problems.append(
            f"{doc.where('pipeline')}: pipeline '{d['pipeline']}' must be NAME/VERSION, e.g. LCModel/0.2 "
            "(run 'vip-agent pipelines' to list them)"
        )
    name = d.get("name")
    if isinstance(name, str) and (
        not name.strip() or "/" in name or "\\" in name or name.startswith(".")
    ):
        soft("name", f"{doc.where('name')}: name '{name}' cannot be empty, contain slashes or start with '.'")
    if "runs" in d and d["runs"] is not None:
        r = d["runs"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            soft("runs", f"{doc.where('runs')}: runs must be a whole number of at least 1, not {r!r}")
    for key in ("extract", "cleanup"):
        if key in d and d[key] is not None:
            flag = yamlread.as_flag(d[key])  # yes/no/on/off are accepted where a flag is meant
            if flag is None:
                soft(key, f"{doc.where(key)}: '{key}' must be true or false, not {d[key]!r}")
            else:
                d[key] = flag
    if "inputs" in d and d["inputs"] is not None:
        _check_inputs(doc, d["inputs"], ("inputs",), problems)
    if "variants" in d and d["variants"] is not None:
        v = d["variants"]
        if not isinstance(v, dict):
            problems.append(f"{doc.where('variants')}: 'variants' must be {KEYS['variants']}")
        else:
            for vname, body in v.items():
                where = doc.where("variants", vname)
                if not VARIANT_NAME_RE.fullmatch(vname):
                    problems.append(
                        f"{where}: variant name '{vname}' may only use letters, digits, '-' and '_'"
                    )
                if body is None:
                    continue  # removes a template variant
                if not isinstance(body, dict):
                    problems.append(
                        f"{where}: variant '{vname}' must be a mapping like {{inputs: {{...}}}}"
                    )
                    continue
                for k in body:
                    if k not in VARIANT_KEYS:
                        problems.append(
                            f"{doc.where('variants', vname, k)}: unknown key '{k}' in variant '{vname}'; "
                            "a variant may only set 'inputs'"
                        )
                if body.get("inputs") is not None:
                    _check_inputs(doc, body["inputs"], ("variants", vname, "inputs"), problems)
    if "expect" in d and d["expect"] is not None:
        e = d["expect"]
        if isinstance(e, str):
            e = [e]
        if not isinstance(e, list) or not all(isinstance(x, str) and x for x in e):
            soft("expect", f"{doc.where('expect')}: 'expect' must be {KEYS['expect']}")
        else:
            for pat in e:
                if pat.startswith("/") or ".." in PurePosixPath(pat).parts:
                    soft("expect", f"{doc.where('expect')}: expect pattern '{pat}' must be relative to "
                                   "the dataset folder and stay inside it")  # fmt: skip
    root = d.get("vip_root")
    if isinstance(root, str):
        r = root.rstrip("/")
        if not (r.startswith("/vip/") and r.count("/") >= 3) or ".." in r.split("/"):
            soft("vip_root", f"{doc.where('vip_root')}: vip_root '{root}' must be a folder below a VIP "
                             "root, e.g. /vip/Home/vip-agent")  # fmt: skip


def _check_inputs(doc: Doc, inputs: Any, keypath: tuple[str, ...], problems: list[str]) -> None:
    if not isinstance(inputs, dict):
        problems.append(f"{doc.where(*keypath)}: '{'.'.join(keypath)}' must be {KEYS['inputs']}")
        return
    for name, value in inputs.items():
        if isinstance(value, dict):
            problems.append(
                f"{doc.where(*keypath, name)}: input '{name}' has a nested mapping; an input value is "
                "text or a list of texts"
            )
        elif isinstance(value, list):
            bad = [x for x in value if not isinstance(x, str)]
            if bad:
                problems.append(
                    f"{doc.where(*keypath, name)}: input '{name}' is a list whose items must be single "
                    "values (no nested lists, mappings or empty items)"
                )
            elif not value:
                problems.append(f"{doc.where(*keypath, name)}: input '{name}' is an empty list")


def _near(word: str, choices: Mapping[str, Any] | list[str]) -> str | None:
    import difflib

    got = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return got[0] if got else None
