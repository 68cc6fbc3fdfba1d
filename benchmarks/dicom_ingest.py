"""The DICOM node: objects per second into the spool, side by side with dcmtk ``storescp``
writing the same study, and the time from a study's last object to its first upload.

    .venv/bin/python benchmarks/dicom_ingest.py [--objects 300] [--rounds 5] [--quiet 1]
        [--parallel 4] [--long-quiet 5]

A synthetic MR study of ``--objects`` objects (256x256 16-bit slices, ~130 KB each, made
from pydicom's MR_small.dcm with new UIDs) is sent by dcmtk ``storescu`` in ONE association
to each receiver in turn, ``--rounds`` times, alternating:

- ``storescp``: dcmtk's Storage SCP writing every object to a folder, as shipped (it does
  not fsync) -- the goal's reference;
- ``storescp+fsync``: the same storescp with ``fsync_on_close.c`` preloaded: each file and its
  folder fsynced before the answer, the durability vip-agent gives (like for like; needs gcc);
- ``vip-agent``: a real ``vip-agent watch`` process with a ``dicom:`` block: every object
  written to a temporary file, fsynced, renamed and its folder fsynced before the sender
  hears success (indexed in the journal right after);
- ``vip-agent-nofsync`` (diagnostic, needs gcc): the same with ``no_fsync.c`` preloaded,
  fsync a no-op -- what the receiving costs apart from durability, next to storescp as
  shipped, which has none. Never a way to run the agent.

Then one round with ``--parallel`` storescu senders at once (the study cut in as many
parts, one association each; storescp runs with ``--fork``), the way a PACS pushes.

Both dcmtk tools run with ``TCP_NODELAY=1`` in their environment: Debian's dcmtk otherwise
leaves Nagle's algorithm on and every object waits for a delayed ACK (measured here:
storescp 21 objects/s without it, 371 with it; vip-agent 70 without, 110 with).

objects/s = objects / storescu's wall time (spawn to exit). The goal is vip-agent >= 0.8x
storescp. The vip-agent rounds also run the study to an upload on a local VIP server; the
journal's "uploading" event minus storescu's exit is the hand-over latency, goal
``quiet`` + <= 1 s; one more round with ``quiet: --long-quiet`` (the time de-identifying
ahead needs) and one with ``deidentify: none``. Writes ``benchmarks/results/dicom_ingest.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
from _common import (
    PYTHON,
    LocalServer,
    child_env,
    machine,
    median,
    private_file,
    say,
    workdir,
    write_result,
)
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from agent.journal import Journal

#: dcmtk's switch for TCP_NODELAY (see the module docstring)
NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def make_study(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    base = pydicom.dcmread(str(get_testdata_file("MR_small.dcm")))
    study, series = generate_uid(), generate_uid()
    rng = os.urandom(256 * 256 * 2)
    files = []
    for i in range(n):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber, ds.SeriesNumber = i + 1, 1
        ds.Rows = ds.Columns = 256
        ds.PixelData = rng[i % 97 :] + rng[: i % 97]
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send(port: int, parts: list[list[Path]]) -> float:
    """One storescu per part, all at once, one association each; the wall time until the last exits."""
    start = time.monotonic()
    senders = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", "VIPAGENT", "127.0.0.1", str(port),
                                 *map(str, part)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=NODELAY) for part in parts]  # fmt: skip
    errors = [p.communicate(timeout=600)[1] for p in senders]
    took = time.monotonic() - start
    failed = [e for p, e in zip(senders, errors, strict=True) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-500:]}")
    return took


def cut(files: list[Path], n: int) -> list[list[Path]]:
    """``n`` parts of consecutive files (a PACS sends series side by side)."""
    size = -(-len(files) // n)
    return [files[i : i + size] for i in range(0, len(files), size)]


def build_shim(folder: Path, name: str = "fsync_on_close") -> Path | None:
    """``benchmarks/<name>.c`` compiled as a preload library (None without a C compiler)."""
    if shutil.which("gcc") is None:
        return None
    out = folder / f"{name}.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(Path(__file__).with_name(f"{name}.c")),
                    "-ldl"], check=True, capture_output=True)  # fmt: skip
    return out


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok = subprocess.run(["echoscu", "-aet", "BENCH", "-aec", "VIPAGENT", "127.0.0.1", str(port)],
                            capture_output=True, timeout=30).returncode == 0  # fmt: skip
        if ok:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers C-ECHO on port {port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def storescp_round(base: Path, parts: list[list[Path]], n: int, shim: Path | None = None) -> float:
    """storescp as shipped, or with ``shim`` preloaded (file and folder fsynced per object)."""
    out = base / "storescp-out"
    out.mkdir()
    port = free_port()
    env = {**NODELAY, "LD_PRELOAD": str(shim)} if shim is not None else NODELAY
    fork = ["--fork"] if len(parts) > 1 else []
    proc = subprocess.Popen(["storescp", "-aet", "VIPAGENT", *fork, "--output-directory", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    try:
        wait_port(port)
        took = send(port, parts)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    stored = len(list(out.iterdir()))
    if stored != n:
        raise RuntimeError(f"storescp stored {stored} of {n}")
    return n / took


def agent_round(base: Path, parts: list[list[Path]], n: int, server: LocalServer, quiet: float,
                deidentify: str, preload: Path | None = None) -> tuple[float, float]:  # fmt: skip
    drop, state, creds = base / "drop", base / "state", base / "creds"
    drop.mkdir()
    (drop / "job.yaml").write_text("pipeline: FileStats/1.0\ninputs:\n  input_file: '*.dcm'\n")
    creds.mkdir(mode=0o700)
    private_file(creds / "vip-api-key", server.api_key)
    config = base / "agent.yaml"
    config.write_text(
        f"state: {state}\n"
        f"drops:\n  - {{path: {drop}, output: {base / 'out'}, server: '{server.url}',"
        f" readiness: {{rule: marker}}}}\n"
        f"dicom:\n  listen: 127.0.0.1:0\n  quiet: {quiet}\n  disk_low: 0\n"
        f"  routes:\n    - {{drop: {drop}, deidentify: {deidentify}}}\n"
    )
    log = (base / "watch.log").open("w")
    proc = subprocess.Popen([PYTHON, "-m", "agent", "watch", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT,
                            env=child_env(CREDENTIALS_DIRECTORY=str(creds),
                                          **({"LD_PRELOAD": str(preload)} if preload else {})))  # fmt: skip
    try:
        port_file = state / "dicom-port"
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((base / "watch.log").read_text()[-2000:])
            time.sleep(0.05)
        port = int(port_file.read_text())
        wait_port(port)
        took = send(port, parts)
        last_object = time.time()
        journal = Journal.in_state_dir(state)
        upload: float | None = None
        deadline = time.monotonic() + 120
        while upload is None and time.monotonic() < deadline:
            for ds in journal.datasets():
                upload = next((ev.time for ev in journal.events(ds.id) if ev.message.startswith("uploading")), None)
            time.sleep(0.02)
        if upload is None:
            raise RuntimeError("no upload started: " + (base / "watch.log").read_text()[-2000:])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    return n / took, float(upload) - last_object


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quiet", type=float, default=1.0)
    parser.add_argument("--parallel", type=int, default=4, help="senders at once in the parallel round (0: none)")
    parser.add_argument("--long-quiet", type=float, default=5.0, help="quiet of the extra latency round (0: none)")
    args = parser.parse_args()
    rounds: list[dict[str, Any]] = []
    with workdir("dicom") as tmp:
        study = tmp / "study"
        files = make_study(study, args.objects)
        size = sum(f.stat().st_size for f in files)
        shim, no_fsync = build_shim(tmp), build_shim(tmp, "no_fsync")
        if shim is None or no_fsync is None:
            say("no gcc: storescp+fsync (like for like) and vip-agent without fsync are not measured")
        receivers = ["storescp", "vip-agent"] + (["storescp+fsync", "vip-agent-nofsync"] if shim else [])

        def one(r: int, who: str, parts: list[list[Path]], quiet: float, deidentify: str = "basic") -> None:
            base = tmp / f"{who}-{r}-{len(parts)}-{quiet:g}-{deidentify}"
            base.mkdir()
            row: dict[str, Any] = {"round": r, "receiver": who, "senders": len(parts)}
            if who.startswith("vip-agent"):
                rate, latency = agent_round(base, parts, args.objects, server, quiet, deidentify,
                                            no_fsync if who.endswith("nofsync") else None)  # fmt: skip
                row.update(objects_per_s=rate, deidentify=deidentify, quiet_s=quiet, last_object_to_upload_s=latency)
            else:
                row["objects_per_s"] = storescp_round(base, parts, args.objects, shim if who.endswith("fsync") else None)
            rounds.append(row)
            say(f"round {r} {who}: {row}")
            shutil.rmtree(base, ignore_errors=True)

        with LocalServer(tmp / "server") as server:
            for r in range(args.rounds):
                for who in receivers[r % len(receivers):] + receivers[: r % len(receivers)]:
                    one(r, who, [files], args.quiet)
            if args.parallel > 1:
                for who in [w for w in receivers if w != "vip-agent-nofsync"]:
                    one(args.rounds, who, cut(files, args.parallel), args.quiet)
            # the same hand-over without de-identification: what the profile itself costs
            one(args.rounds + 1, "vip-agent", [files], args.quiet, "none")
            if args.long_quiet > 0:  # a quiet time long enough to de-identify the study ahead
                one(args.rounds + 2, "vip-agent", [files], args.long_quiet)

    def rate(who: str, senders: int = 1) -> float:
        return median([x["objects_per_s"] for x in rounds if x["receiver"] == who and x["senders"] == senders
                       and x.get("deidentify", "basic") == "basic" and x.get("quiet_s", args.quiet) == args.quiet])

    def latency(quiet: float, deidentify: str = "basic") -> float:
        return median([x["last_object_to_upload_s"] for x in rounds if x["receiver"] == "vip-agent"
                       and x["senders"] == 1 and x["deidentify"] == deidentify and x["quiet_s"] == quiet])

    def paired(who: str, reference: str) -> float:
        """The median over rounds of who/reference measured in the same round (minutes apart at
        most): this machine's speed drifts by 2x within a run (storescp 656 then 1,369
        objects/s two rounds later), which a ratio of medians mixes in."""
        by_round: dict[int, dict[str, float]] = {}
        for x in rounds:
            if x["senders"] == 1 and x.get("deidentify", "basic") == "basic" and x.get("quiet_s", args.quiet) == args.quiet:
                by_round.setdefault(x["round"], {})[x["receiver"]] = x["objects_per_s"]
        ratios = [r[who] / r[reference] for r in by_round.values() if who in r and reference in r]
        return median(ratios) if ratios else float("nan")

    scp, agent, durable = rate("storescp"), rate("vip-agent"), rate("storescp+fsync")
    careless = rate("vip-agent-nofsync") if no_fsync is not None else float("nan")
    data: dict[str, Any] = {
        "machine": machine(),
        "objects": args.objects,
        "bytes": size,
        "quiet_s": args.quiet,
        "rounds": rounds,
        "storescp_objects_per_s": scp,
        "storescp_fsync_objects_per_s": durable,
        "agent_objects_per_s": agent,
        "ratio": agent / scp,
        "ratio_like_for_like": agent / durable,
        #: medians of the ratios within each round (see paired())
        "paired_ratio": paired("vip-agent", "storescp"),
        "paired_ratio_like_for_like": paired("vip-agent", "storescp+fsync"),
        "paired_ratio_without_durability": paired("vip-agent-nofsync", "storescp"),
        #: diagnostic: both without durability (fsync made a no-op in the agent's process)
        "agent_without_fsync_objects_per_s": careless,
        "ratio_without_durability": careless / scp,
        "goal_ratio": 0.8,
        "last_object_to_upload_s": latency(args.quiet),
        "last_object_to_upload_s_without_deid": latency(args.quiet, "none"),
        "goal_latency_s": args.quiet + 1.0,
        "dcmtk_env": "TCP_NODELAY=1",
    }
    if args.parallel > 1:
        data["parallel"] = {"senders": args.parallel, "storescp_objects_per_s": rate("storescp", args.parallel),
                            "storescp_fsync_objects_per_s": rate("storescp+fsync", args.parallel),
                            "agent_objects_per_s": rate("vip-agent", args.parallel)}  # fmt: skip
    if args.long_quiet > 0:
        data["long_quiet"] = {"quiet_s": args.long_quiet, "last_object_to_upload_s": latency(args.long_quiet),
                              "goal_latency_s": args.long_quiet + 1.0}  # fmt: skip
    path = write_result("dicom_ingest", data)
    say(f"paired within rounds (medians): vip-agent / storescp {data['paired_ratio']:.2f}, / storescp+fsync "
        f"{data['paired_ratio_like_for_like']:.2f}; without fsync (diagnostic) / storescp "
        f"{data['paired_ratio_without_durability']:.2f}")
    say(f"one association: storescp {scp:.0f} objects/s, storescp+fsync {durable:.0f}, vip-agent {agent:.0f} "
        f"({agent / scp:.2f}x storescp, goal >= 0.8; {agent / durable:.2f}x storescp+fsync); without fsync "
        f"(diagnostic) vip-agent {careless:.0f} = {careless / scp:.2f}x storescp")
    if "parallel" in data:
        p = data["parallel"]
        say(f"{args.parallel} senders: storescp {p['storescp_objects_per_s']:.0f}, storescp+fsync "
            f"{p['storescp_fsync_objects_per_s']:.0f}, vip-agent {p['agent_objects_per_s']:.0f} objects/s")
    say(f"last object -> first upload: {data['last_object_to_upload_s']:.2f} s with deidentify: basic, "
        f"{data['last_object_to_upload_s_without_deid']:.2f} s with none (quiet {args.quiet:g} s, goal <= "
        f"{args.quiet + 1:.1f} s)" + (f"; {data['long_quiet']['last_object_to_upload_s']:.2f} s with quiet "
                                      f"{args.long_quiet:g} s (goal <= {args.long_quiet + 1:.1f} s)"
                                      if "long_quiet" in data else ""))  # fmt: skip
    say(f"{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
