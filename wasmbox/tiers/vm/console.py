"""Internal: what the host and a guest say to each other: the arming line and the exit line.

The host arms a guest with `arming_line`; the guest's framed ``WASMBOX-EXIT`` line on the
serial console is parsed by `parse_exit`, and only with the task's nonce (see `guest`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field


@dataclass
class ExitLine:
    """The guest's framed report: exit code, guard flags, cgroup metrics."""

    code: int
    flags: set[str] = field(default_factory=set)
    values: dict[str, int] = field(default_factory=dict)


def arming_line() -> bytes:
    """What arms a guest: 64 fresh random bytes (hex) for its RNG and the host's time."""
    return b"%s %d\n" % (secrets.token_hex(64).encode(), int(time.time()))


def parse_exit(line: str, nonce: str) -> ExitLine | None:
    """The exit line's code, flags and values; None unless it is framed with `nonce`."""
    words = line.split()
    if len(words) < 3 or words[1] != nonce:
        return None
    try:
        result = ExitLine(int(words[2]))
    except ValueError:
        return None
    for word in words[3:]:
        key, eq, value = word.partition("=")
        if eq and value.isdigit():
            result.values[key] = int(value)
        elif not eq:
            result.flags.add(word)
    return result

