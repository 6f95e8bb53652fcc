"""The per-run host directory: input staged read-only, outputs collected under caps.

Layout on the host (``<root>/wasmbox-<pid>-...``)::

    task/             guest /task          (read-only to the guest)
    task/input.json   guest /task/input.json
    task/output/      guest /task/output   (the only writable place)
    stdout, stderr    the captured streams (host-only, beside task/)

The concerns live in their own modules, re-exported here: naming, reclaim and removal of
owned directories (`_owned`), input encoding and nesting caps (`_staging`), reading back
streams and outputs under caps (`_outputs`), deny patterns (`_filters`).
"""

from __future__ import annotations

import os
from pathlib import Path

from wasmbox import _outputs
from wasmbox._config import HostConfig
from wasmbox._filters import REDACTED, filter_bytes, filter_stream, redact, redact_text
from wasmbox._outputs import RESULT_FILE, RUNNING, Collected, Streams, flood_limit
from wasmbox._owned import (
    clear_shallow,
    make_owned_dir,
    reclaim_owned,
    remove_owned,
    remove_tree,
)
from wasmbox._staging import encode_input, json_depth, json_too_deep
from wasmbox.lifecycle import Closeable
from wasmbox.policy import Plan

__all__ = [
    "PREFIX", "REDACTED", "RESULT_FILE", "RUNNING", "Collected", "Streams", "Workspace",
    "encode_input", "filter_bytes", "filter_stream", "flood_limit", "json_depth",
    "json_too_deep", "reclaim_stale", "redact", "redact_text", "remove_tree", "workspace_root",
]

PREFIX = "wasmbox-"


def workspace_root() -> Path:
    """Where workspaces live now, per the environment (see `HostConfig`)."""
    return HostConfig.from_env().workspace_root


def reclaim_stale(root: Path | None = None) -> list[str]:
    """Remove workspaces whose owning process is gone; returns their paths. Never raises."""
    return reclaim_owned(root or workspace_root(), PREFIX)


class Workspace(Closeable):
    """A fresh directory per run; `close()` removes it whatever the guest left inside.

    `data` is the already encoded input (`encode_input`), when the caller checked it early.
    """

    def __init__(self, plan: Plan, root: Path | None = None, *, data: bytes | None = None) -> None:
        if data is None:
            data = encode_input(plan)
        self.plan = plan
        self.input_bytes = data  # what input.json holds (a tier may pass it on, not re-read)
        self._listed: list[str] | None = None  # what `collect` found in the output dir
        # Plain strings, not Paths: pathlib costs tens of microseconds per run here.
        self.path = make_owned_dir(str(root or workspace_root()), PREFIX)
        try:
            self.task_dir = self.path + "/task"
            self.output_dir = self.task_dir + "/output"
            self.input_path = self.task_dir + "/input.json"
            # Host-only files (captured stdio) sit beside task/, never inside it.
            self.stdout_path = self.path + "/stdout"
            self.stderr_path = self.path + "/stderr"
            os.mkdir(self.task_dir)
            os.mkdir(self.output_dir)
            fd = os.open(self.input_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except BaseException:
            remove_owned(self.path, PREFIX)
            raise

    def _release(self) -> None:
        # The layout is ours and known: remove it by name, listing only the guest's output
        # directory. `rmdir` only removes an empty directory, so anything unexpected (a
        # tier's own files, a deep or locked output tree) leaves a step failing, and the
        # thorough removal takes over.
        try:
            for name in (self.stdout_path, self.stderr_path, self.input_path):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    continue  # a tier that captured no stream here
            if self._listed is None:
                clear_shallow(self.output_dir, 2)
            else:  # collect() saw only these files; rmdir below proves nothing else is left
                for name in self._listed:
                    os.unlink(f"{self.output_dir}/{name}")
            os.rmdir(self.output_dir)
            os.rmdir(self.task_dir)
            os.rmdir(self.path)
        except Exception:
            remove_owned(self.path, PREFIX)

    def output_bytes(self) -> int:
        """Bytes in /task/output now (a monitoring sample, not a cap check)."""
        return _outputs.output_bytes(self.output_dir, self.plan.output.max_depth)

    def stream_sizes(self) -> tuple[int, int]:
        """Bytes the guest has written to stdout and stderr so far."""
        return _outputs.file_size(self.stdout_path), _outputs.file_size(self.stderr_path)

    def read_stream(self, path: str, cap: int) -> tuple[bytes, bool]:
        """At most `cap` bytes of a captured stream, and whether there was more."""
        return _outputs.read_stream(path, cap)

    def read_streams(self) -> Streams:
        """Both captured streams, each cut at the plan's cap: read once, by the sandbox."""
        stdout, stdout_truncated = _outputs.read_stream(self.stdout_path, self.plan.stdout_bytes)
        stderr, stderr_truncated = _outputs.read_stream(self.stderr_path, self.plan.stderr_bytes)
        return Streams(stdout, stderr, stdout_truncated, stderr_truncated)

    def over_cap(self) -> str | None:
        """A cheap check while the guest runs: the reason if its writes already break a cap
        (see `_outputs.over_cap`)."""
        return _outputs.over_cap(self.plan, self.output_dir, self.stream_sizes())

    def collect(self) -> Collected:
        """Read /task/output under the plan's caps, filters and output schema."""
        self._ensure_open()
        collected = _outputs.collect(self.plan, self.output_dir)
        self._listed = collected.listed
        return collected
