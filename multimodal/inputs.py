"""How a run's inputs are named to the output guard (multimodal.output.guard): files read in bulk (Many),
compared with the output by inode (not_read), so a hard link or a symlink is the same file.
multimodal.command_inputs names them for each command."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from multimodal.errors import UserError


class Many(NamedTuple):
    """Files a run reads in bulk, named lazily (each stat'ed once, by the guard only): e.g. every image
    a records file names. `what` says what they are in a refusal."""
    paths: Callable[[], Iterable[Path]]
    what: str


def _identities(targets: list[Path]) -> dict[tuple[int, int], str]:
    """(st_dev, st_ino) of what writing `targets` replaces (each target, and all below a folder target)
    or writes into (their folders) → how a refusal says it."""
    out: dict[tuple[int, int], str] = {}

    def add(p: Path, how: str) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            out.setdefault((st.st_dev, st.st_ino), how)

    for t in targets:
        full = Path(os.path.abspath(t))
        for parent in full.parents:
            add(parent, f"--out {t} would be written into")
        if full.is_dir():
            for p in full.rglob("*"):
                add(p, f"--out {t} holds")
        add(full, f"--out {t} is")
    return out


def not_read(targets: list[Path], many: list[Many]) -> None:
    """One stat per named file, no reading: a large records file costs one pass over its image cells."""
    if not many:
        return
    danger = _identities(targets)
    for group in many:
        seen: set[str] = set()
        for p in group.paths():
            key = os.fspath(p)
            if key in seen:
                continue
            if len(seen) > 100_000:  # a repeated path (a series in many rows) is skipped; memory stays bounded
                seen.clear()
            seen.add(key)
            try:
                st = os.stat(key)
            except (OSError, ValueError):  # missing or unreadable: not read, so not at stake
                continue
            how = danger.get((st.st_dev, st.st_ino))
            if how is not None:
                raise UserError(f"{how} {group.what}; choose another output")
