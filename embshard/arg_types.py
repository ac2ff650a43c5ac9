"""argparse types shared by every layer's command line (`embshard data` as well as the cluster's
verbs), so an argument reads and is refused alike wherever it appears."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

EMPTY_PATH = "an empty path (an unset shell variable?)"


def nonempty(text: str) -> str:
    """argparse type of a path or URI: an empty one (an unset shell variable) is refused, not read
    as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(EMPTY_PATH)
    # `--out '~/x'` (quoted, or after `=`, where the shell leaves it) was a folder named "~" here.
    return os.path.expanduser(text) if text.startswith("~") else text


def written_path(text: str) -> str:
    """argparse type of a path or URI embshard writes under: `nonempty`, and UTF-8. A name of
    other bytes (Python holds them as surrogates) was a UnicodeEncodeError traceback from the
    staging name or pyarrow's file system, after the whole conversion."""
    path = nonempty(text)
    try:
        path.encode()
    except UnicodeEncodeError:
        shown = path.encode(errors="surrogateescape").decode(errors="backslashreplace")
        raise argparse.ArgumentTypeError(f"{shown}: not valid UTF-8; embshard writes only under paths in UTF-8 "
                                         "(Parquet and object stores take no other): rename it") from None
    return path


def nonempty_name(text: str) -> str:
    """argparse type of a name: an empty one is refused, not read as the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name (an unset shell variable?)")
    return text


def nonempty_path(text: str) -> Path:
    return Path(nonempty(text))


def names_folder(text: str) -> bool:
    """Whether a path as typed names a folder by its trailing separator (`x.json/`), which Path
    drops: read as a file's name, it wrote the file `x.json`."""
    return text.endswith(("/", os.sep))


def file_path(text: str) -> Path:
    """argparse type of a file to write: one that names a folder is refused."""
    path = written_path(text)
    if names_folder(path):
        raise argparse.ArgumentTypeError(f"{text}: ends with '/', so it names a folder; name the file to write")
    return Path(path)
