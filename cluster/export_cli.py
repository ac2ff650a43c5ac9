"""`embshard export CHECKPOINT --out DIR`: the compact serving model of a checkpoint."""

from __future__ import annotations

import argparse

from embshard.arg_types import written_path


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export", help="write the serving model of a checkpoint (MLET tables collapsed)",
        description="Load a checkpoint (a step-NNNNNN folder, or a checkpoint directory: its newest "
                    "good step) in one process and write the serving model: collapsed tables, "
                    "dense weights, id remaps, the dataset's vocabularies (raw value of each id) and "
                    "a manifest. Load it with "
                    "embshard.trainer.export.load_serving(DIR).")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint folder or directory (or an object-store URI, s3://bucket/prefix)")
    p.add_argument("--out", type=written_path, required=True, metavar="DIR",
                   help="folder to write the serving model to (or an object-store URI); written beside "
                        "it and put in place once complete")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (only an export, and only once the new one is complete)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from embshard.datasets.outdir import written_whole_by_its_end
    from embshard.trainer.export import (  # torch/TorchRec load only for this verb
        export_serving,
        read_manifest,
    )

    out = export_serving(args.checkpoint, args.out, overwrite=args.overwrite)
    assert out is not None  # a checkpoint exports in this one process
    # The export is in place: a stop as its line is made was "interrupted", exit 130, of it.
    with written_whole_by_its_end(out):
        # The step, not only the folder: a checkpoint directory exports its newest good step, which
        # is not the newest one when that is damaged.
        manifest = read_manifest(out)
        # Whether raw values can go in: a synth dataset's export takes ids alone.
        values = (f"it takes raw values of {len(manifest.vocabularies)} features (vocab/)" if manifest.vocabularies
                  else "it takes the dataset's ids (the dataset keeps no raw values)")
        print(f"serving model of {manifest.source} written to {out}; {values}")
    return 0
