"""``python -m wasmbox`` is the ``wasmbox`` command."""

import sys

from wasmbox.cli import main

sys.exit(main())
