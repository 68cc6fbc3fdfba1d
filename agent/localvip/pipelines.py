"""Boutiques descriptors: loading, VIP pipeline JSON, command lines, output paths.

A pipeline's identifier is ``<name>/<tool-version>``. Built-in descriptors live
in ``agent/localvip/pipelines/``; ``--pipelines DIR`` adds (or overrides) more.
Descriptors may run scripts next to them through ``"$DESCRIPTOR_DIR"`` and the
server's Python through ``"$PYTHON"`` (both set in the job environment).
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("agent.localvip")

BUILTIN_DIR = Path(__file__).with_name("pipelines")
LEGACY_DEFAULT = "$input.getDefaultValue()"


@dataclass
class Pipeline:
    identifier: str
    descriptor: dict[str, Any]
    directory: Path

    @property
    def name(self) -> str:
        return str(self.descriptor.get("name", ""))

    @property
    def version(self) -> str:
        return str(self.descriptor.get("tool-version", ""))

    @property
    def custom(self) -> dict[str, Any]:
        custom = self.descriptor.get("custom")
        return custom if isinstance(custom, dict) else {}

    def inputs(self) -> list[dict[str, Any]]:
        """Boutiques inputs VIP exposes (minus ``vip:overriddenInputs``)."""
        hidden = set(self.custom.get("vip:overriddenInputs") or [])
        return [i for i in self.descriptor.get("inputs", []) if i.get("id") not in hidden]

    def input(self, name: str) -> dict[str, Any] | None:
        for i in self.descriptor.get("inputs", []):
            if i.get("id") == name:
                return i
        return None

    def is_file_input(self, name: str) -> bool:
        spec = self.input(name)
        return spec is not None and spec.get("type") == "File"

    def allowed(self, user: str) -> bool:
        """Optional per-user restriction (``custom.localvip:allowed-users``) → 8008."""
        users = self.custom.get("localvip:allowed-users")
        return not isinstance(users, list) or user in users

    def summary(self) -> dict[str, Any]:
        return {
            "identifier": self.identifier,
            "name": self.name,
            "description": None,
            "version": self.version,
            "parameters": [],
            "canExecute": True,
        }

    def detail(self, identifier: str, *, legacy_defaults: bool = False) -> dict[str, Any]:
        params = []
        for spec in self.inputs():
            if spec.get("id") == "results-directory":
                continue
            default = spec.get("default-value")
            if legacy_defaults:
                default = LEGACY_DEFAULT if default is None else _java_str(default)
            params.append(
                {
                    "name": spec.get("id"),
                    "type": param_type(spec),
                    "isOptional": bool(spec.get("optional", False)),
                    "isReturnedValue": False,
                    "defaultValue": default,
                    "description": spec.get("description"),
                }
            )
        return {
            "identifier": identifier,
            "name": self.name,
            "description": self.descriptor.get("description"),
            "version": self.version,
            "parameters": params,
            "canExecute": True,
        }


def param_type(spec: dict[str, Any]) -> str:
    """VIP ``ParameterType.fromBoutiquesInput``."""
    if spec.get("list"):
        return "List"
    kind = spec.get("type")
    if kind == "File":
        return "File"
    if kind == "Flag":
        return "Boolean"
    if kind == "Number":
        return "Int64" if spec.get("integer") else "Double"
    return "String"


def _java_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_pipelines(extra_dir: Path | None) -> dict[str, Pipeline]:
    """Load built-ins, then ``extra_dir`` (same identifier overrides)."""
    found: dict[str, Pipeline] = {}
    for directory in (BUILTIN_DIR, extra_dir):
        if directory is None:
            continue
        for path in sorted(Path(directory).glob("*.json")):
            try:
                desc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                log.warning("localvip: skipping descriptor %s: %s", path, err)
                continue
            if not isinstance(desc, dict) or "name" not in desc or "command-line" not in desc:
                log.warning("localvip: skipping %s: not a Boutiques descriptor", path)
                continue
            ident = f"{desc['name']}/{desc.get('tool-version', '')}"
            found[ident] = Pipeline(ident, desc, path.parent.resolve())
    return found


def _strip_ext(value: str, exts: list[str]) -> str:
    for ext in exts:
        if ext and value.endswith(ext):
            return value[: -len(ext)]
    return value


def _base(value: str) -> str:
    return value.rstrip("/").rsplit("/", 1)[-1]


def build_command(pipeline: Pipeline, values: dict[str, list[str]]) -> str:
    """Fill the command line: Boutiques value-key rules; values are shell-quoted.

    ``values`` maps input id to its value(s) for this job; File values are the
    staged base names. Absent inputs and false Flags remove their value-key.
    Quoting differs from ``bosh`` (which pastes raw values) because VIP's
    allowed characters include ``&``, ``(`` and spaces.
    """
    cmd = str(pipeline.descriptor["command-line"])
    for spec in pipeline.descriptor.get("inputs", []):
        key = spec.get("value-key")
        if not key:
            continue
        vals = values.get(spec["id"])
        text = ""
        if spec.get("type") == "Flag":
            if vals and vals[0].lower() == "true":
                text = str(spec.get("command-line-flag", ""))
        elif vals:
            if spec.get("type") == "File":
                vals = [_base(v) for v in vals]
            text = " ".join(shlex.quote(v) for v in vals)
            flag = spec.get("command-line-flag")
            if flag:
                sep = spec.get("command-line-flag-separator", " ")
                text = f"{flag}{sep}{text}"
        cmd = cmd.replace(key, text)
    keys = {str(o.get("id")): o.get("value-key") for o in pipeline.descriptor.get("output-files", [])}
    for out_id, rel, _optional in output_paths(pipeline, values):
        key = keys.get(out_id)
        if key:
            cmd = cmd.replace(str(key), shlex.quote(rel))
    return cmd


def output_paths(pipeline: Pipeline, values: dict[str, list[str]]) -> list[tuple[str, str, bool]]:
    """Resolve ``output-files``: (output id, relative path, optional) for one job."""
    out: list[tuple[str, str, bool]] = []
    for spec in pipeline.descriptor.get("output-files", []):
        template = str(spec.get("path-template", ""))
        strip = list(spec.get("path-template-stripped-extensions") or [])
        for inp in pipeline.descriptor.get("inputs", []):
            key = inp.get("value-key")
            if not key or key not in template:
                continue
            vals = values.get(inp["id"]) or []
            if inp.get("type") == "File":
                vals = [_base(v) for v in vals]
            if inp.get("type") == "Flag":
                text = str(inp.get("command-line-flag", "")) if vals and vals[0] == "true" else ""
            else:
                text = " ".join(_strip_ext(v, strip) for v in vals)
            template = template.replace(key, text)
        template = template.lstrip("/")
        if template and ".." not in template.split("/"):
            out.append((str(spec.get("id")), template, bool(spec.get("optional", False))))
    return out
