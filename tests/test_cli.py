"""The serve command's process settings."""

import gc

from daemon import cli


def test_serve_collects_cycles_rarely_and_never_scans_what_was_loaded() -> None:
    before = gc.get_threshold()
    try:
        cli._tune_gc()
        assert gc.get_threshold() == (cli.GC_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 1000  # the modules imported so far, at least
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
