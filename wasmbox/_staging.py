"""The task input, checked and encoded before any tier work: size, nesting and schema caps.

Nesting is measured without parsing (so without recursing), fast enough for every input.
"""

from __future__ import annotations

import itertools
import json
import operator

from wasmbox.errors import InputRejected
from wasmbox.policy import Plan
from wasmbox.validation import validate


def encode_input(plan: Plan) -> bytes:
    """The task input as JSON bytes, checked against the size cap, the nesting cap and the
    input schema (`InputRejected` otherwise)."""
    task = plan.task
    depth = plan.policy.limits.input_depth
    try:
        data = _ENCODER.encode(task.input).encode()
    except RecursionError:
        raise InputRejected(f"input nests deeper than {depth} levels "
                            "(the policy's [limits] input_depth)") from None
    except (TypeError, ValueError) as exc:
        raise InputRejected(f"input is not JSON: {exc}") from exc
    if len(data) > plan.input_bytes:
        raise InputRejected(f"input is {len(data)} bytes, over the {plan.input_bytes} cap "
                            "(the policy's [limits] input_bytes)")
    if json_too_deep(data, depth):
        raise InputRejected(f"input nests deeper than {depth} levels "
                            "(the policy's [limits] input_depth)")
    if task.input_schema is not None:
        validate(task.input_schema, task.input, what="input")
    return data


# What json.dumps(allow_nan=False, separators=(",", ":")) builds on every call; stateless.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_SQUARE = bytes.maketrans(b"{}", b"[]")
# Openers count 2, closers 0: the running sum minus the position is the nesting depth.
_STEP = bytes.maketrans(b"[]", b"\x02\x00")
_CHUNK = 1 << 16


def _brackets(data: bytes) -> bytes:
    """The structural brackets of JSON text, braces as square brackets, strings dropped.

    Escaped backslashes go first, then escaped quotes; what is left between quotes is a
    string. An unterminated string ends the text (a parser fails there).
    """
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(text.split(b'"')[::2])
    return outside.translate(_SQUARE, _NOT_BRACKET)


def json_depth(data: bytes) -> int:
    """How deep JSON text nests, found without parsing (so without recursing).

    Exact for valid JSON. For anything else never less than what a parser reaches before it
    fails: past an unbalanced closer (where a parser stops) the count may only be higher.
    """
    steps = _brackets(data).translate(_STEP)
    return max(map(operator.sub, itertools.accumulate(steps), itertools.count(1)), default=0)


def json_too_deep(data: bytes, limit: int) -> bool:
    """``json_depth(data) > limit``, fast: adjacent ``[]`` pairs are peeled off first (at C
    speed; typical JSON is gone after a few passes) and the scan stops early both ways."""
    seq = _brackets(data)
    passes = 0
    while seq and passes < limit:
        peeled = seq.replace(b"[]", b"")
        if len(peeled) == len(seq):
            break
        seq, passes = peeled, passes + 1
    # Peeling keeps the depth of what remains, and each pass lowers the maximum by at most 1.
    if passes:
        if not _exceeds(seq, limit - passes):
            return False
        if _exceeds(seq, limit):
            return True
        seq = _brackets(data)  # in between: count the original exactly
    return _exceeds(seq, limit)


def _exceeds(seq: bytes, limit: int) -> bool:
    steps = seq.translate(_STEP)
    depth = 0
    for start in range(0, len(steps), _CHUNK):
        run = list(map(operator.sub, itertools.accumulate(steps[start:start + _CHUNK],
                                                          initial=depth), itertools.count()))
        if max(run) > limit:
            return True
        if min(run) < 0:  # an unbalanced closer: a parser stops there
            return False
        depth = run[-1]
    return False
