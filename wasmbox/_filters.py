"""Deny patterns over everything a guest hands back: redact the matches or reject the run."""

from __future__ import annotations

import logging
import re
from typing import Any

import re2

from wasmbox.models import DenyAction, OutputPolicy

log = logging.getLogger("wasmbox")

REDACTED = b"[REDACTED]"


class Rejected(Exception):
    """An output breaks a cap or a filter; the message becomes the run's rejection reason."""


class _Matcher:
    """One deny pattern: RE2 (linear time) when it can compile it, else Python's `re`."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.engine: Any
        try:
            self.engine = re2.compile(pattern.encode(), _RE2_OPTIONS)
        except re2.error:
            log.info("deny pattern %r needs Python's re (RE2 cannot compile it)", pattern)
            self.engine = re.compile(pattern.encode())

    def search(self, data: bytes) -> bool:
        return self.engine.search(data) is not None

    def sub(self, data: bytes) -> bytes:
        result: bytes = self.engine.sub(REDACTED, data)
        return result


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def filter_bytes(data: bytes, caps: OutputPolicy, where: str) -> bytes:
    """Apply the deny patterns: redact matches, or reject naming the pattern and place."""
    for matcher in _compiled(caps.deny_patterns):
        if caps.on_deny is DenyAction.REDACT:
            data = matcher.sub(data)
        elif matcher.search(data):
            raise Rejected(f"deny pattern {matcher.pattern!r} matched in {where}")
    return data


def redact(data: bytes, caps: OutputPolicy) -> bytes:
    """Every deny-pattern match replaced by ``[REDACTED]``, whatever `on_deny` says."""
    for matcher in _compiled(caps.deny_patterns):
        data = matcher.sub(data)
    return data


def redact_text(text: str, caps: OutputPolicy) -> str:
    """`redact` for text (a reason, a decoded string); the text is unchanged if nothing matched."""
    if not caps.deny_patterns:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    clean = redact(raw, caps)
    return text if clean == raw else clean.decode("utf-8", "replace")


def filter_stream(data: bytes, caps: OutputPolicy, where: str) -> tuple[bytes, str | None]:
    """`filter_bytes` for stdout/stderr: the bytes with every match redacted (whatever
    `on_deny` says: a rejected stream is still returned), and the rejection if any."""
    if not caps.filter_streams or not caps.deny_patterns:
        return data, None
    try:
        return filter_bytes(data, caps, where), None
    except Rejected as exc:
        return redact(data, caps), str(exc)


def filter_name(rel: str, caps: OutputPolicy) -> str:
    """An output file's name (its key in `Result.files`) under the deny patterns."""
    if not caps.deny_patterns:
        return rel
    if caps.on_deny is DenyAction.REDACT:
        return redact_text(rel, caps)
    filter_bytes(rel.encode("utf-8", "surrogateescape"), caps, "an output file name")
    return rel


_PATTERN_CACHE: dict[tuple[str, ...], list[_Matcher]] = {}


def _compiled(patterns: tuple[str, ...]) -> list[_Matcher]:
    if not patterns:
        return []
    found = _PATTERN_CACHE.get(patterns)
    if found is None:
        found = [_Matcher(p) for p in patterns]
        if len(_PATTERN_CACHE) > 64:
            _PATTERN_CACHE.clear()
        _PATTERN_CACHE[patterns] = found
    return found


def filter_json(output: Any, caps: OutputPolicy, where: str) -> tuple[Any, bool]:
    """The decoded result with deny patterns applied to every string and key (so JSON
    escapes cannot hide a match); returns it and whether anything was redacted. Iterative;
    mutates `output` (freshly parsed) in place."""
    changed = False

    def clean(text: str) -> str:
        nonlocal changed
        raw = text.encode("utf-8", "surrogatepass")
        filtered = filter_bytes(raw, caps, where)
        if filtered == raw:
            return text
        changed = True
        return filtered.decode("utf-8", "replace")

    if isinstance(output, str):
        return clean(output), changed
    stack = [output] if isinstance(output, list | dict) else []
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for i, value in enumerate(node):
                if isinstance(value, str):
                    node[i] = clean(value)
                elif isinstance(value, list | dict):
                    stack.append(value)
            continue
        items = list(node.items())
        node.clear()
        for key, value in items:
            if isinstance(value, str):
                value = clean(value)
            elif isinstance(value, list | dict):
                stack.append(value)
            node[clean(key)] = value
    return output, changed
