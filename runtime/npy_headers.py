"""One thread at a time through numpy's `.npy` header parser.

numpy reads an array's header with `ast.literal_eval`. CPython 3.11 before 3.11.8 keeps the
depth of the AST under construction in one counter per interpreter (gh-106905, fixed by
python/cpython#113035): two threads parsing at once, when a garbage collection in one lets
the other run, fail with "SystemError: AST constructor recursion depth mismatch". Bundles
loading side by side (each reads its golden sample) met it, as could a device's npz requests
beside a model load; Raspberry Pi OS 12 ships 3.11.2. edgerun's own readers of `.npy` data
take this lock around the read.
"""

from __future__ import annotations

import threading

#: Held while edgerun reads `.npy` members (their headers are parsed as they are read).
LOCK = threading.RLock()
