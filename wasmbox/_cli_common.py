"""Internal: what every ``wasmbox`` subcommand shares — exit codes and the usage error.

See `wasmbox.cli` for what each exit code means.
"""

from __future__ import annotations

EXIT_OK, EXIT_GUEST_FAULT, EXIT_USAGE, EXIT_HOST_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """The command line itself is wrong (exit 2)."""
