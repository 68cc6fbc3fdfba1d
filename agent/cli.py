"""Command-line entry point: ``vip-agent <command>``.

Each command lives in its own module exposing ``configure(parser)`` and
``main(args) -> int``; modules are imported only when their command runs, so
``vip-agent status`` stays fast and one command's import error never breaks
another.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import sys
from collections.abc import Sequence

from agent import __version__
from agent.credentials import seal_secrets
from agent.errors import AgentError, ConfigError

#: command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("agent.commands.demo", "run the example datasets end to end on an embedded local VIP"),
    "run": ("agent.commands.run", "take one dataset from job.yaml to mirrored outputs"),
    "watch": ("agent.commands.watch", "watch drop folders and run every complete dataset"),
    "status": ("agent.commands.status", "show where every dataset stands"),
    "retry": ("agent.commands.retry", "run a failed or cancelled dataset again"),
    "cancel": ("agent.commands.cancel", "stop a dataset: kill its execution, clean the server"),
    "pause": ("agent.commands.pause", "hold the agent, a drop folder or a dataset until resumed"),
    "resume": ("agent.commands.resume", "lift a pause (--all: every pause)"),
    "rerun": (
        "agent.commands.rerun",
        "run a finished dataset (even a done one) again as a new attempt",
    ),
    "logs": ("agent.commands.logs", "print the saved stdout/stderr of a dataset's executions"),
    "check": ("agent.commands.check", "compare finished datasets' mirrored outputs with the journal"),
    "pipelines": ("agent.commands.pipelines", "list pipelines, or show one's parameters"),
    "login": ("agent.commands.login", "check an API key and store it in the OS keyring"),
    "logout": ("agent.commands.logout", "remove the stored API key"),
    "init": ("agent.commands.init", "write a first agent.yaml, create its folders, check with doctor"),
    "doctor": ("agent.commands.doctor", "check configuration, folders, server and key"),
    "dicom": ("agent.commands.dicom", "the DICOM node: explain routing of files, show pending studies"),
    "install-service": ("agent.commands.install_service", "write a systemd unit or launchd plist"),
    "local-server": ("agent.localvip.cli", "serve a VIP-compatible REST API locally"),
}


#: exit status of an error the agent did not expect (a bug): EX_SOFTWARE of sysexits.h
EXIT_UNEXPECTED = 70


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vip-agent",
        description="Run VIP pipelines unattended on datasets dropped in a folder.",
    )
    parser.add_argument("--version", action="version", version=f"vip-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            module = importlib.import_module(module_name)
            module.configure(p)
            p.set_defaults(_module=module, _subparser=p)
    return parser


def _near(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_command(parser: argparse.ArgumentParser, word: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"vip-agent: unknown command {word!r}{_near(word, list(COMMANDS))}; commands: "
          f"{', '.join(COMMANDS)} (`vip-agent --help` says what each does)", file=sys.stderr)  # fmt: skip
    return 2


def _unknown_arguments(sub: argparse.ArgumentParser, extras: list[str]) -> int:
    """The command's own usage and a did-you-mean for a mistyped option (``status --jsno``)."""
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    hints = [f"{x}{_near(x.split('=')[0], options) if x.startswith('--') else ''}" for x in extras]
    try:
        sub.error(f"unrecognized arguments: {' '.join(hints)}")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 2
    return 2  # pragma: no cover - error() always exits


def _unexpected(err: BaseException) -> int:
    """One line for an error no code path expected (a bug), never a traceback, never the key."""
    from agent.credentials import environ, redact

    text = redact(f"{type(err).__name__}: {err}", *(v for k, v in environ().items() if "KEY" in k))
    print(f"vip-agent: unexpected error: {' '.join(text.split())[:500]} (this is a bug; please "
          "report it with the command you ran. VIP_AGENT_DEBUG=1 shows where it happened)",
          file=sys.stderr)  # fmt: skip
    if os.environ.get("VIP_AGENT_DEBUG"):
        import traceback

        traceback.print_exception(err, file=sys.stderr)
    return EXIT_UNEXPECTED


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the program itself (not a caller passing arguments, e.g. a test)
        seal_secrets()  # no child process, of any kind, can inherit the API key from here on
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a closed pipe shows up here, not at exit where it cannot be caught
        return code
    except BrokenPipeError:  # one place for every command (and --help)
        return _closed_pipe()
    except KeyboardInterrupt:  # before a command ran (loading it, reading the arguments)
        return 130
    except Exception as err:  # noqa: BLE001 - e.g. a command module that fails to import
        return _unexpected(err)


def _run(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    if command is not None and command not in COMMANDS and argv.index(command) == 0:
        return _unknown_command(parser, command)
    try:
        args, extras = parser.parse_known_args(argv)
        if extras and getattr(args, "_subparser", None) is not None:
            return _unknown_arguments(args._subparser, extras)
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as done:  # --help, --version, usage errors
        sys.stdout.flush()
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.main(args) or 0)
    except AgentError as err:
        print(f"vip-agent: {err}", file=sys.stderr)
        # a configuration error's detail is the key its message already names ("file")
        if err.detail and not isinstance(err, ConfigError) and err.detail not in err.message:
            print(f"  detail: {err.detail}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except (BrokenPipeError, SystemExit):
        raise  # main() handles a closed pipe; a command may exit on purpose
    except Exception as err:  # noqa: BLE001 - the last net: one line and an exit code
        return _unexpected(err)


def _closed_pipe() -> int:
    """The reader went away (``vip-agent status | head -1``): stop quietly, as Unix tools do.

    Python would flush stdout again at exit and print a traceback about it, so
    stdout is pointed at /dev/null first. The exit status is that of a process
    ended by SIGPIPE (128 + 13).
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 141


if __name__ == "__main__":
    raise SystemExit(main())
