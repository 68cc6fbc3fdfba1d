"""What a validated dataset resolves to: its local files, each input's values, the remote
paths they get on the platform, one entry per variant (the runner's plan is built from it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.jobfile import JobSpec

__all__ = ["Item", "LocalFile", "ResolvedInput", "ResolvedJob", "ResolvedVariant"]


@dataclass(frozen=True)
class LocalFile:
    """A dataset file to upload."""

    rel: str  # POSIX path relative to the dataset root, as on disk
    path: Path  # absolute local path
    size: int
    remote_rel: str  # the same path after VIP's name sanitisation (what to PUT and pass)

    def remote(self, remote_inputs_dir: str) -> str:
        """The ``/vip/...`` value of this file once uploaded under ``remote_inputs_dir``."""
        return remote_inputs_dir.rstrip("/") + "/" + self.remote_rel


Item = str | LocalFile


@dataclass(frozen=True)
class ResolvedInput:
    """One input's concrete values; ``is_list`` when given as a list or a glob.

    ``crossed``: VIP makes one job per value (every input except List-type
    parameters, whose values all go to one job).
    """

    items: tuple[Item, ...]
    is_list: bool = False
    crossed: bool = True

    def value(self, remote_inputs_dir: str) -> str | list[str]:
        texts = [i.remote(remote_inputs_dir) if isinstance(i, LocalFile) else i for i in self.items]
        return texts if self.is_list else texts[0]


@dataclass(frozen=True)
class ResolvedVariant:
    """A variant's inputs, ready to send once the files are uploaded."""

    name: str
    inputs: Mapping[str, ResolvedInput]

    def input_values(self, remote_inputs_dir: str) -> dict[str, str | list[str]]:
        """``inputValues`` for ``POST /executions``; local files point into ``remote_inputs_dir``."""
        return {k: v.value(remote_inputs_dir) for k, v in self.inputs.items()}

    @property
    def job_count(self) -> int:
        """Jobs VIP will create for one execution (it crosses list inputs)."""
        n = 1
        for v in self.inputs.values():
            if v.is_list and v.crossed:
                n *= len(v.items)
        return n


@dataclass(frozen=True)
class ResolvedJob:
    """A job's variants with concrete values, and the local files to upload once.

    ``files`` are the relative POSIX paths of every local file any variant
    uses (sorted, each once); ``local_files`` maps them to :class:`LocalFile`.
    ``variants`` maps variant name -> :class:`ResolvedVariant`, in job order.
    """

    job: JobSpec
    variants: Mapping[str, ResolvedVariant]
    local_files: Mapping[str, LocalFile]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.local_files)

    @property
    def root(self) -> Path:
        """The folder the relative paths in ``files`` are relative to."""
        return self.job.root

    def remote_path(self, remote_inputs_dir: str, rel: str) -> str:
        """Where the local file ``rel`` goes on VIP (its name as VIP will store it)."""
        return self.local_files[rel].remote(remote_inputs_dir)

    def remote_inputs(self, variant: str, remote_inputs_dir: str) -> dict[str, str | list[str]]:
        """``inputValues`` of ``variant`` once the files are under ``remote_inputs_dir``."""
        return self.variants[variant].input_values(remote_inputs_dir)
