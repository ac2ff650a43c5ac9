"""Which files a click-log conversion reads: files and folders given on the command line, in order.

A folder stands for its non-hidden files (each a regular file) in name order with the numbers in names compared
as numbers (`day_2` before `day_10`: Criteo's and Avazu's day files in time order), so a time split
over several files stays a split by time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from embshard.errors import DataError


def resolve_inputs(sources: Sequence[Path], what: str) -> list[Path]:
    """The files to read, in order; `what` names the format in errors (e.g. "criteo")."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            found = sorted((p for p in src.iterdir() if not p.name.startswith(".")), key=_name_order)
            odd = next((p for p in found if not p.is_file()), None)
            if odd is not None:
                # Left out, a day of a time-ordered log went missing from the data without a word.
                raise DataError(f"{odd}: in the input folder, not a regular file (a broken link, a folder or a "
                                f"pipe): its rows would be left out; remove it, or name the {what} input files to read")
            if not found:
                raise DataError(f"{src}: a folder without {what} input files")
            files.extend(found)
        elif src.is_file():
            files.append(src)
        elif src.exists():  # /dev/null, a pipe: read through once to count lines, they cannot be read again
            raise DataError(f"{src}: not a regular file; give a {what} input file")
        else:
            raise DataError(f"{src}: {what} input file not found")
    seen: set[tuple[int, int]] = set()
    for path in files:
        # By inode, not name: a symbolic or hard link to a file is the same file.
        st = path.stat()
        if (st.st_dev, st.st_ino) in seen:
            # Reading a file twice would put every row of it in the data twice.
            raise DataError(f"{path}: given more than once (directly, through its folder or a link)")
        seen.add((st.st_dev, st.st_ino))
    return files


def _name_order(path: Path) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """Plain name order put `day_10` between `day_1` and `day_2`: the test split of Criteo's days
    0-11 was days 8 and 9, earlier than two days of its train split. (`day_01` and `day_1` tie on
    their numbers, and go in name order.)"""
    parts = re.split(r"(\d+)", path.name)
    return tuple((0, int(part)) if part.isdecimal() else (1, part) for part in parts), path.name


def describe(files: Sequence[Path]) -> str:
    """One input in an error or a dataset's source line."""
    return str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
