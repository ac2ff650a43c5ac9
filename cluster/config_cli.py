"""`embshard config --reference | --json-schema`: the job config's keys, generated from the config
dataclasses (docs/config.md; the JSON Schema that editors and the Helm chart validate against)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "config", help="print the job config reference (docs/config.md) or its JSON Schema",
        description="Print every config key with its type, default and meaning as Markdown, or the "
                    "config's JSON Schema, generated from the config dataclasses and their field comments.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--reference", action="store_true",
                      help="print the Markdown reference (redirect it to docs/config.md)")
    what.add_argument("--json-schema", action="store_true",
                      help="print the JSON Schema of a job config (types, choices, unknown keys; for an "
                           "editor's YAML support; the Helm chart's `config` value embeds it)")
    p.set_defaults(func=_print)


def _print(args: argparse.Namespace) -> int:
    import json

    from embshard.config import JobConfig
    from embshard.config_reference import build_reference
    from embshard.typed_config import json_schema

    if args.json_schema:
        print(json.dumps(json_schema(JobConfig), indent=2))
    else:
        print(build_reference(JobConfig).markdown(), end="")
    return 0
