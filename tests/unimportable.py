"""A handler module whose import raises, as a module with a bug at its top level does: a
config naming it is refused (tests/test_reload.py), never the daemon's end."""

from __future__ import annotations

raise RuntimeError("this module fails at import")
