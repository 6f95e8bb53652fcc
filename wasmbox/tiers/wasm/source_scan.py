"""Which modules a task's Python source imports, found without parsing it on the host.

The source is hostile. `ast.parse` recurses on nesting (``1+1+...`` a hundred thousand times,
``not not ...``) and raises RecursionError or MemoryError in the host process, so the scan
reads *tokens* instead: the pure-Python tokenizer is a flat loop, with no recursion and no
nesting limit. ``import`` is a hard keyword, so a statement-initial ``import`` or ``from``
token is an import statement wherever it appears. The scan is bounded in size and time, and
any failure of it means "no opinion": the task then runs where it was sent and the guest's
own compiler reports whatever is wrong with the source, as a task outcome.
"""

from __future__ import annotations

import io
import time
import tokenize

MAX_SCAN_CHARS = 1 << 20
MAX_SCAN_SECONDS = 1.0
_CHECK_EVERY = 4096
# Tokens after which a new simple statement starts.
_STATEMENT_STARTS = frozenset({tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT})
_SKIPPED = frozenset({tokenize.NL, tokenize.COMMENT, tokenize.ENCODING})


def imported_modules(source: str) -> frozenset[str] | None:
    """Top-level names of the modules `source` imports statically, or None if unknown.

    None when the source is over `MAX_SCAN_CHARS`, the scan takes over `MAX_SCAN_SECONDS`,
    or the tokenizer fails in any way; never raises.
    """
    if len(source) > MAX_SCAN_CHARS:
        return None
    try:
        return _scan(source, time.monotonic() + MAX_SCAN_SECONDS)
    except Exception:  # tokenize errors, MemoryError, anything: the scan has no opinion
        return None


def _scan(source: str, give_up_at: float) -> frozenset[str] | None:
    wanted: set[str] = set()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    at_start = True  # the next significant token begins a statement
    state = ""  # "import": reading `import a.b as c, d`; "from": reading `from a.b`
    expect_name = False
    for count, tok in enumerate(tokens):
        if count % _CHECK_EVERY == 0 and time.monotonic() > give_up_at:
            return None
        if tok.type in _SKIPPED:
            continue
        starts = at_start
        at_start = tok.type in _STATEMENT_STARTS or tok.string in (";", ":")
        if tok.type == tokenize.NAME and starts and tok.string in ("import", "from"):
            state, expect_name = tok.string, True
            continue
        if not state:
            continue
        if tok.type == tokenize.NAME and expect_name:
            if tok.string != "import":  # `from . import x` is relative: nothing to add
                wanted.add(tok.string)
            expect_name = False
            if state == "from":
                state = ""  # only the module after `from` matters
            continue
        if state == "import" and tok.string == ",":
            expect_name = True
        elif state == "import" and tok.type == tokenize.NAME and tok.string == "as":
            expect_name = False  # the alias is not a module
        elif state == "from" or tok.type in _STATEMENT_STARTS or tok.string == ";":
            state, expect_name = "", False  # `from .` (relative) or end of the statement
    return frozenset(wanted)
