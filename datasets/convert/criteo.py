"""Criteo Kaggle display-ads TSV: label, I1..I13 (integer counts), C1..C26 (32-bit hex hashes).

Dense values follow DLRM: log(1 + max(x, 0)), a missing value counts as 0. Categorical hashes get
ids by train frequency (see vocab.py; missing -> unknown id 0).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embshard.datasets.convert.stream import Parsed, TextFormat, drop_invalid
from embshard.datasets.convert.text import AN_INTEGER, INTEGER, Malformed, TextChunk

LABEL = "label"
DENSE = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
_LABELS = pa.array(["0", "1"])


def parse(chunk: TextChunk, malformed: Malformed) -> Parsed:
    t = chunk.table
    ok = {LABEL: pc.is_in(t[LABEL], value_set=_LABELS)}
    ok.update({d: pc.match_substring_regex(t[d], INTEGER) for d in DENSE})
    # A missing dense value is fine (it becomes 0); a missing label is not.
    ok = {c: pc.fill_null(v, c != LABEL).to_numpy(zero_copy_only=False) for c, v in ok.items()}
    expected = {LABEL: "0 or 1", **{d: AN_INTEGER for d in DENSE}}
    chunk = drop_invalid(chunk, ok, expected, malformed)
    t = chunk.table
    dense = {}
    for d in DENSE:
        x = pc.fill_null(pc.cast(t[d], pa.int64()), 0).to_numpy()
        dense[d] = np.log1p(np.maximum(x, 0)).astype(np.float32)
    return Parsed(
        lines=chunk.lines,
        label=pc.cast(t[LABEL], pa.float32()).to_numpy(),
        dense=dense,
        categorical={c: t[c] for c in CATEGORICAL},
    )


FORMAT = TextFormat(
    name="criteo",
    description="Criteo TSV",
    columns=[LABEL, *DENSE, *CATEGORICAL],
    delimiter="\t",
    header_lines=0,
    dense=DENSE,
    categorical=CATEGORICAL,
    parse=parse,
)
