"""`embshard config --reference`: print the config reference (every key, type, default, doc)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "config", help="print the job config reference (docs/config.md)",
        description="Print every config key with its type, default and meaning as Markdown, "
                    "generated from the config dataclasses and their field comments.")
    p.add_argument("--reference", action="store_true", required=True,
                   help="print the Markdown reference (redirect it to docs/config.md)")
    p.set_defaults(func=_reference)


def _reference(args: argparse.Namespace) -> int:
    from embshard.config import JobConfig
    from embshard.config_reference import build_reference

    print(build_reference(JobConfig).markdown(), end="")
    return 0
