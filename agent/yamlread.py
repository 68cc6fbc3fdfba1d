"""The one YAML reader of the agent: ``agent.yaml`` and ``job.yaml`` both go through it.

What it guarantees, for either file:

* **bounds** before anything is built: at most :data:`MAX_BYTES` of UTF-8 text, nesting
  at most :data:`MAX_DEPTH` deep, at most :data:`MAX_NODES` values once ``*aliases`` are
  expanded (alias bombs), no alias inside the value it names;
* **friendly messages** for the usual mistakes (tabs, indentation, unclosed quotes), with
  file, line and column, and the scanner's own words kept in brackets;
* **duplicate keys refused** with both line numbers (plain PyYAML keeps the last one
  silently: a second ``drops:`` block made the first vanish);
* **no YAML 1.1 surprises** (:class:`Loader`): only ``true``/``false`` are booleans, so
  ``on``, ``off``, ``yes``, ``no``, ``y``, ``n`` stay the words written (a key ``on:`` is
  ``"on"``); numbers are decimal only, so ``010`` is ten, not eight, and ``2:30`` is the
  text ``"2:30"``, not 150 (sexagesimal); dates stay text. Commands that want a boolean
  accept ``yes``/``no``/``on``/``off`` explicitly (:func:`as_flag`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError

#: a settings file larger than this is refused unread (a job is a few lines; 256 KiB lists
#: ~10,000 files: longer lists are what globs are for)
MAX_BYTES = 256 << 10
#: deepest nesting of lists and mappings accepted (a job needs 4: variants.v.inputs.x: [...])
MAX_DEPTH = 32
#: most values a file may hold once its ``*aliases`` are expanded (alias bombs stop here)
MAX_NODES = 100_000

_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_NULL = "tag:yaml.org,2002:null"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"

#: words a boolean setting accepts besides true/false (YAML 1.1's, but only where a
#: boolean is expected, so that they never turn a text or a key into a boolean)
TRUE_WORDS = frozenset({"true", "yes", "on"})
FALSE_WORDS = frozenset({"false", "no", "off"})


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars: nothing is guessed behind the user's back."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # implicit ints are decimal digits only (see the resolver): 010 is ten, as written
        value = str(self.construct_scalar(node))
        try:
            return int(value, 10)
        except ValueError:  # an explicit !!int 0x1F keeps YAML's own reading
            return int(super().construct_yaml_int(node))


# Rebuild the implicit resolvers: keep null, merge (<<), value (=) and str; replace bool,
# int and float by their YAML 1.2 core forms; drop timestamps (dates stay text).
Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in rules if tag not in (_BOOL, _INT, _FLOAT, _TIMESTAMP)]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                             list("tTfF"))  # fmt: skip
Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9]+[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
Loader.add_constructor(_INT, Loader.construct_yaml_int)


def constructor() -> yaml.constructor.SafeConstructor:
    """A constructor that builds values the way :class:`Loader` reads them (for callers that
    walk the node tree themselves, e.g. to keep pipeline inputs as raw text)."""
    return Loader("")


# --------------------------------------------------------------------------- messages

_HINTS: tuple[tuple[str, str], ...] = (
    ("found character '\\t'", "tabs cannot indent YAML; use spaces"),
    (
        "mapping values are not allowed",
        "a ':' appears where YAML does not expect one; "
        "check the indentation, or put the value in quotes",
    ),
    ("could not find expected ':'", "a line is missing ':' after its key, or is indented wrongly"),
    ("found undefined alias", "an '*alias' refers to an '&anchor' that is not defined (a "
     "pattern such as *.nii must be in quotes: '*.nii')"),
    ("while scanning an alias", "a value starting with '*' is read as an alias: put a pattern "
     "in quotes, e.g. '*.nii.gz'"),
    ("while scanning an anchor", "a value starting with '&' must be in quotes"),
    ("that cannot start any token", "a value starting with '@', '%' or '`' must be in quotes"),
    ("expected ',' or ']'", "a '[' list is not closed with ']'"),
    ("expected ',' or '}'", "a '{' mapping is not closed with '}'"),
    ("found unexpected end of stream", "a quote or bracket is not closed"),
    ("found unknown escape character", "a backslash inside double quotes; use single quotes"),
    ("did not find expected key", "the indentation is inconsistent"),
    ("expected <block end>", "the indentation is inconsistent"),
)


def yaml_problem(path: Path | str, err: yaml.YAMLError) -> ConfigError:
    """A :class:`ConfigError` saying where the YAML is broken and how to fix it."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    cmark = getattr(err, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    said = f"{problem} {context or ''}"
    hint = next((h for key, h in _HINTS if key in said), None)
    words = f"{problem}" + (f" ({context})" if context else "")
    if cmark is not None and (mark is None or cmark.line != mark.line):
        # the construct that is broken often starts earlier than where YAML noticed
        words += f"; it starts on line {cmark.line + 1}"
        if hint:
            hint += f" (it starts on line {cmark.line + 1})"
    msg = f"{where}: this is not valid YAML: {hint or words}"
    if hint:
        msg += f" [YAML says: {words}]"
    return ConfigError(msg, detail=str(err))


# --------------------------------------------------------------------------- bounds


def read_text(path: Path, kind: str = "job file") -> str:
    """The text of ``path``, refusing one above :data:`MAX_BYTES` without reading it all."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such {kind}") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {kind}: {err.strerror}", str(err)) from err
    except ValueError as err:  # a NUL in the path
        raise ConfigError(f"{path!r}: not a usable file name ({err})") from err
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            f"{path}: the {kind} is larger than {MAX_BYTES // 1024} KiB; a {kind} holds "
            "settings, not data (use globs such as '*.nii' for long file lists)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: the file is not UTF-8 text; save it as UTF-8", str(err)) from err


def _line(ev: yaml.Event) -> int:
    return ev.start_mark.line + 1 if ev.start_mark is not None else 0


def check_shape(path: Path | str, text: str, kind: str = "job file") -> None:
    """Refuse, from the event stream (no tree built), a document too deep or whose aliases
    expand beyond :data:`MAX_NODES` values, or that refers to itself."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        # libyaml, when present, reads the events 20 times faster; on a syntax error the
        # pure-Python reader reads it again, for the wording the hints know
        try:
            _walk_events(path, text, fast, kind)
            return
        except yaml.YAMLError:
            pass
    try:
        _walk_events(path, text, yaml.SafeLoader, kind)
    except yaml.YAMLError as err:
        raise yaml_problem(path, err) from err


def _walk_events(path: Path | str, text: str, loader: Any, kind: str) -> None:
    sizes: dict[str, int] = {}
    open_: list[tuple[str | None, int]] = []  # collections being read: (anchor, count at start)
    total = 0
    for ev in yaml.parse(text, Loader=loader):
        if isinstance(ev, yaml.AliasEvent):
            if any(anchor == ev.anchor for anchor, _ in open_):
                raise ConfigError(
                    f"{path}, line {_line(ev)}: '*{ev.anchor}' refers to the "
                    f"value that contains it; a {kind} cannot refer to itself"
                )
            total += sizes.get(str(ev.anchor), 1)
        elif isinstance(ev, yaml.ScalarEvent):
            total += 1
            if ev.anchor:
                sizes[ev.anchor] = 1
        elif isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            total += 1
            open_.append((ev.anchor, total))
            if len(open_) > MAX_DEPTH:
                raise ConfigError(
                    f"{path}, line {_line(ev)}: lists and mappings are nested "
                    f"more than {MAX_DEPTH} deep; a {kind} needs a few levels at most"
                )
        elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, start = open_.pop()
            if anchor:
                sizes[anchor] = total - start + 1
        if total > MAX_NODES:
            raise ConfigError(
                f"{path}, line {_line(ev)}: the {kind} holds more than "
                f"{MAX_NODES:,} values once its '*aliases' are expanded (an alias bomb?); "
                "write the values out, or use fewer aliases"
            )


# --------------------------------------------------------------------------- reading


def compose_text(text: str, source: Path | str, kind: str = "job file") -> yaml.Node | None:
    """The node tree of ``text`` read by :class:`Loader`, after the bounds are checked."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(f"{source}: the {kind} is larger than {MAX_BYTES // 1024} KiB")
    check_shape(source, text, kind)
    try:
        return yaml.compose(text, Loader=Loader)
    except yaml.YAMLError as err:
        raise yaml_problem(source, err) from err


def compose(path: Path, kind: str = "job file") -> yaml.Node | None:
    """:func:`compose_text` of a file, read within :data:`MAX_BYTES`."""
    return compose_text(read_text(path, kind), path, kind)


def duplicate_keys(node: yaml.Node, source: Path | str) -> list[str]:
    """One message per key set twice in the same mapping (keys merged in with ``<<`` may be
    overridden: that is what merging is for)."""
    problems: list[str] = []
    seen_nodes: set[int] = set()

    def visit(n: yaml.Node, prefix: str) -> None:
        if id(n) in seen_nodes:  # an alias: its duplicates were reported where it is defined
            return
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict[str, int] = {}
            for knode, vnode in n.value:
                if isinstance(knode, yaml.ScalarNode) and knode.value != "<<":
                    line = knode.start_mark.line + 1
                    name = f"{prefix}.{knode.value}" if prefix else knode.value
                    if knode.value in first:
                        problems.append(
                            f"{source}, line {line}: '{name}' is set twice "
                            f"(first on line {first[knode.value]}); keep one"
                        )
                    else:
                        first[knode.value] = line
                    visit(vnode, name)
                else:
                    visit(vnode, prefix)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                visit(item, f"{prefix}[{i}]")

    visit(node, "")
    return problems


def load_text(text: str, source: Path | str, kind: str = "configuration file") -> Any:
    """Plain data from ``text``: bounded, duplicate keys refused (all listed at once)."""
    root = compose_text(text, source, kind)
    if root is None:
        return None
    problems = duplicate_keys(root, source)
    if problems:
        raise ConfigError(
            problems[0] if len(problems) == 1
            else f"the {kind} has problems:" + "".join(f"\n  - {p}" for p in problems)
        )
    try:
        data = constructor().construct_document(root)
    except yaml.YAMLError as err:  # constructor errors (a bad explicit tag, ...)
        raise yaml_problem(source, err) from err
    bad = nul_keys(data)
    if bad:
        raise ConfigError(
            f"{source}: '{bad[0]}' contains a NUL character (\\0), which no file name or setting "
            "may hold; remove it"
        )
    return data


def nul_keys(value: Any, prefix: str = "") -> list[str]:
    """Where (key paths) a text, key or value, holds a NUL character."""
    if isinstance(value, str):
        return [prefix or "(the document)"] if "\0" in value else []
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            found += [name.replace("\0", "\\0")] if "\0" in str(k) else nul_keys(v, name)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += nul_keys(v, f"{prefix}[{i}]")
    return found


def load(path: Path, kind: str = "configuration file") -> Any:
    """:func:`load_text` of a file."""
    return load_text(read_text(path, kind), path, kind)


def as_flag(value: Any) -> bool | None:
    """A boolean setting from what was written: true/false, or yes/no/on/off (any case);
    None when it is neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    return None


def text_hint(value: Any) -> str:
    """What to add to a 'must be text' message: quote a value YAML read as something else."""
    if isinstance(value, (bool, int, float)):
        return f"; YAML reads {value!r} as a {type(value).__name__}: put it in quotes"
    return ""


__all__ = [
    "MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "Loader", "as_flag", "check_shape", "compose",
    "compose_text", "constructor", "duplicate_keys", "load", "load_text", "read_text",
    "text_hint", "yaml_problem",
]  # fmt: skip
