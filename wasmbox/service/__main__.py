"""``python -m wasmbox.service``: the same as ``wasmbox serve``."""

import sys

from wasmbox.service import main

sys.exit(main())
