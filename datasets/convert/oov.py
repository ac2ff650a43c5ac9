"""The converter's OOV report: per split and feature, the share of ids that are the OOV id.

A high share in valid/test is cold start (the model cannot use that feature there); a feature
whose train split never uses the OOV id leaves that row untrained, so every unseen valid/test
value meets an embedding that never received a gradient.
"""

from __future__ import annotations

from embshard.datasets.schema import OOV_ID, SPLITS, DatasetSpec


def oov_report(spec: DatasetSpec) -> str:
    lines = [f"OOV share (id {OOV_ID}: unseen in train, rarer than min_count, or missing):"]
    for split in SPLITS:
        shares = spec.oov_share.get(split, {})
        if shares:
            lines.append(f"  {split}: " + ", ".join(f"{f} {_percent(s)}" for f, s in shares.items()))
    train = spec.oov_share.get("train", {})
    for feature in spec.sparse_names:
        later = max(spec.oov_share.get(s, {}).get(feature, 0.0) for s in SPLITS[1:])
        if train.get(feature, 0.0) == 0.0 and later > 0.0:
            lines.append(f"warning: {feature}: no train row uses the OOV id {OOV_ID}, so its embedding "
                         f"never trains, yet {_percent(later)} of valid/test ids are OOV; raise --min-count or "
                         f"choose another --split")
    return "\n".join(lines)


def _percent(share: float) -> str:
    # A few OOV rows must not read as none: they decide whether the OOV row trains at all.
    return "<0.1%" if 0.0 < share < 0.0005 else f"{share:.1%}"
