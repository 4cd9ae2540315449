"""The built-in synthetic cohort and everything that travels with it: the generator (cohort.py) and the
config its models train with (config.yaml, package data).

Why a package: `mmdx demo` must run from an installed wheel, where the repository's folders do not
exist, so the demo's config ships inside the package and is found through importlib.resources.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
from importlib.resources import as_file, files
from pathlib import Path

from .cohort import LAB, PHRASE, RECORD_COLUMNS, TRUTH_COLUMNS, make_cohort

__all__ = ["LAB", "PHRASE", "RECORD_COLUMNS", "TRUTH_COLUMNS", "config_path", "make_cohort"]

_extracted = contextlib.ExitStack()  # holds a copy on disk where the package is not (a zip import)
atexit.register(_extracted.close)


@functools.cache
def config_path() -> Path:
    """config.yaml as a file on disk: the package's own file when installed as files (the usual case),
    else a temporary copy that lasts until the process exits. load_config and the records' own paths
    need a real path, not a resource handle."""
    return _extracted.enter_context(as_file(files(__name__) / "config.yaml"))
