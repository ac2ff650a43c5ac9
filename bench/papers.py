"""AutoDim and PEP in their papers' settings on the Criteo sample: alpha over time and the widths
chosen; PEP's non-zeros over time and the test AUC of the lottery retrain at each target.

    nice -n 19 .venv/bin/python bench/papers.py [--only autodim|pep] [--set key=value ...]
        [--data DIR --label NAME]

`--data` runs the same on another converted dataset (the results go to
bench/results/papers-<method>-<label>/); on planted data (`embshard data synth --planted`)
AutoDim's report adds each field's planted rank and the share of fields whose chosen width is
within one candidate step of it.

The settings are configs/papers/autodim-criteo.yaml and pep-criteo.yaml (bench/PAPERS.md compares
them with the papers and PKU-DAIR/Hetu); `--set` overrides them as on the command line. The sample
is converted once (bench/quality.py's cache); everything runs in one process (a one-rank gloo
group), through the same `run_worker` as `embshard search autodim` / `prune pep` / `train`:

  autodim: the search (softmax(alpha) every autodim.history_every steps), a retrain on its
           decisions and a uniform run at the largest candidate, both with test AUC;
  pep:     the prune run (the non-zero count every pep.count_every steps), the lottery-ticket
           retrain of every target reached and a uniform run at the base dim, with test AUC.

Writes bench/results/papers-autodim-criteo/{autodim.json,alpha.png,alpha_history.jsonl} and
bench/results/papers-pep-criteo/{pep.json,nonzeros.png,nonzero_history.jsonl}; run folders go under
bench/results/cache/papers/<time>/ (not committed). Ends with one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, bench_main, init_single_process_group, results_folder, train_here, write_atomic, write_json
from quality import prepare_dataset

from embshard.cluster.pep_cli import same_mask_as
from embshard.cluster.sweep_report import PlantedTruth, within_one_step
from embshard.config import JobConfig, load_job_config
from embshard.datasets.schema import DatasetSpec
from embshard.trainer.history import read_history

ROOT = Path(__file__).resolve().parents[1]
# Each invocation trains into folders of its own: a prune run counts targets already on disk as
# reached, so a folder of an earlier invocation would be taken for this one's.
RUNS = CACHE / "papers" / time.strftime("%Y%m%d-%H%M%S")
DATA_ROOT = ROOT.parent / "shared" / "data"
# A field's alpha has settled from the first record after which its argmax is the final one and no
# weight is further from its final value than this share of how far the final weights moved from
# equal ones (a field whose weights never moved has not settled: it has not decided).
SETTLED_SHARE = 0.1


def job(name: str, overrides: list[str], data: Path, out: Path, epochs: int | None = None) -> JobConfig:
    """The paper config with `overrides`, on `data`, into `out`; `epochs` for a retrain."""
    cfg = load_job_config(ROOT / "configs" / "papers" / f"{name}.yaml", overrides)
    train = replace(cfg.train, progress=False, epochs=cfg.train.epochs if epochs is None else epochs)
    return replace(cfg, output_dir=str(out), data=replace(cfg.data, path=str(data)), train=train)


def moved(probs: list[float]) -> float:
    """How far softmax(alpha) is from equal weights (largest absolute difference)."""
    return max(abs(p - 1 / len(probs)) for p in probs)


def settled_step(records: list[dict[str, Any]], field: str) -> int:
    """The first recorded step from which this field has settled (see SETTLED_SHARE)."""
    final = records[-1]["alpha"][field]
    best = max(range(len(final)), key=final.__getitem__)
    tolerance = SETTLED_SHARE * moved(final)
    step = records[-1]["step"]
    for r in reversed(records):
        probs = r["alpha"][field]
        if max(range(len(probs)), key=probs.__getitem__) != best or \
                max(abs(a - b) for a, b in zip(probs, final, strict=True)) > tolerance:
            break
        step = r["step"]
    return step


def plot_alpha(records: list[dict[str, Any]], dims: dict[str, int], label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = list(records[0]["alpha"])
    candidates = records[0]["candidates"]
    cols = 6
    rows = math.ceil(len(fields) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), sharex=True, sharey=True)
    steps = [r["step"] for r in records]
    for ax, field in zip(axes.flat, fields, strict=False):
        for i, d in enumerate(candidates):
            ax.plot(steps, [r["alpha"][field][i] for r in records], label=f"d={d}", lw=1)
        ax.set_title(f"{field}: chose {dims[field]}", fontsize=9)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(fields):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("model step")
    fig.supylabel("softmax(alpha)")
    fig.suptitle(f"AutoDim on {label}: each field's weight on each candidate width")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def autodim(overrides: list[str], data: Path, label: str, retrain_epochs: int, out: Path) -> dict[str, Any]:
    runs = RUNS / "autodim"
    search_cfg = job("autodim-criteo", overrides, data, runs / "search")
    searched = train_here(search_cfg, "autodim")[1]
    records = read_history(Path(searched["alpha_history"]))
    retrain_cfg = job("autodim-criteo", overrides, data, runs / "retrain", retrain_epochs)
    retrain_cfg = replace(retrain_cfg, embeddings=replace(retrain_cfg.embeddings, policy="decisions",
                                                          decisions=searched["decisions"]))
    retrained = train_here(retrain_cfg, "decisions")[1]
    uniform = train_here(job("autodim-criteo", overrides, data, runs / "uniform", retrain_epochs), "uniform")[1]

    settled = {f: settled_step(records, f) for f in searched["dims"]}
    steps = searched["steps"]
    out.mkdir(parents=True, exist_ok=True)
    plot_alpha(records, searched["dims"], label, out / "alpha.png")
    assert search_cfg.autodim is not None
    result = {
        "bench": "papers-autodim",
        "dataset": label,
        "config": "configs/papers/autodim-criteo.yaml",
        "overrides": overrides,
        "candidates": search_cfg.autodim.candidates,
        "steps": steps,
        "alpha_steps": searched["alpha_steps"],
        "tau_final": searched["tau_final"],
        "history_every": search_cfg.autodim.history_every,
        "dims": searched["dims"],
        "alpha_final": records[-1]["alpha"],
        "settled_share": SETTLED_SHARE,
        "settled_step": settled,
        "moved_from_equal": {f: round(moved(p), 4) for f, p in records[-1]["alpha"].items()},
        "settled_by_three_quarters": sorted(f for f, s in settled.items() if s <= 0.75 * steps),
        "search_valid_auc": searched["valid_auc"],
        "retrain_epochs": retrain_epochs,
        "retrain_test_auc": retrained.get("test_auc"),
        "uniform_test_auc": uniform.get("test_auc"),
        "paper_table4": "not compared: Criteo's fields are anonymous (C1-C26); see bench/PAPERS.md",
        **planted_fields(data, searched["dims"], search_cfg.autodim.candidates),
    }
    write_json(out / "autodim.json", result)
    write_lines(out / "alpha_history.jsonl",
                [{**r, "alpha": {f: [round(x, 4) for x in ps] for f, ps in r["alpha"].items()}} for r in records])
    return result


def planted_fields(data: Path, dims: dict[str, int], candidates: list[int]) -> dict[str, Any]:
    """On planted data: each field's planted rank and the share of fields AutoDim gave a width
    within one candidate step of it (the sweep report's measure); else nothing."""
    planted = DatasetSpec.load(data).planted
    if not planted:
        return {}
    ranks = PlantedTruth.of_dataset(planted).ranks
    return {"planted_rank": ranks, "within_one_step": within_one_step(dims, ranks, candidates),
            "bayes_test_auc": planted["bayes_auc"]["test"]}


def plot_pep(records: list[dict[str, Any]], reached: dict[str, Any], aucs: dict[str, float | None],
             uniform_auc: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([0] + [r["step"] for r in records], [1.0] + [r["kept_fraction"] for r in records], lw=1)
    for target, hit in reached.items():
        left.axhline(float(target), color="grey", lw=0.5, ls=":")
        left.plot([hit["step"]], [hit["nonzero"] / records[0]["dense"]], "o", color="C1")
    left.set_yscale("log")
    left.set_xlabel("model step")
    left.set_ylabel("non-zero share of the embedding (log)")
    left.set_title("PEP prune run: non-zeros over time (dots: targets written)")
    kept = [(float(t), a) for t, a in aucs.items() if a is not None]
    if kept:
        right.plot([k for k, _ in kept], [a for _, a in kept], "o-", label="lottery retrain at target")
        right.set_xscale("log")
    else:
        right.text(0.5, 0.5, "no target reached", ha="center", transform=right.transAxes)
    if uniform_auc is not None:
        right.axhline(uniform_auc, color="grey", ls="--", label="uniform (dense)")
    right.set_xlabel("kept share of the embedding parameters (log)")
    right.set_ylabel("test AUC")
    right.legend()
    right.set_title("test AUC at each target")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pep(overrides: list[str], data: Path, label: str, retrain_epochs: int, out: Path) -> dict[str, Any]:
    from embshard.trainer.pep import NONZERO_HISTORY_FILE

    runs = RUNS / "pep"
    prune_cfg = job("pep-criteo", overrides, data, runs / "prune")
    pruned = train_here(prune_cfg, "pep")[1]
    records = read_history(prune_cfg.pep_dir / NONZERO_HISTORY_FILE)
    reached = pruned["pep"]["reached"]
    # Targets one count passed share its mask: the widest is retrained for all of them.
    same_as = {t: wider for t, (wider, _) in same_mask_as(reached).items()}
    retrains: dict[str, dict[str, Any]] = {}
    for target in sorted(set(reached) - set(same_as), key=float, reverse=True):
        cfg = job("pep-criteo", overrides, data, runs / f"lottery-{target}", retrain_epochs)
        assert cfg.pep is not None
        cfg = replace(cfg, pep=replace(cfg.pep, retrain_target=float(target), retrain_from=str(prune_cfg.pep_dir)))
        retrains[target] = train_here(cfg, "pep_lottery")[1]
    uniform = train_here(job("pep-criteo", overrides, data, runs / "uniform", retrain_epochs), "uniform")[1]

    aucs = {t: retrains[same_as.get(t, t)].get("test_auc") for t in reached}
    out.mkdir(parents=True, exist_ok=True)
    plot_pep(records, reached, aucs, uniform.get("test_auc"), out / "nonzeros.png")
    assert prune_cfg.pep is not None
    result = {
        "bench": "papers-pep",
        "dataset": label,
        "config": "configs/papers/pep-criteo.yaml",
        "overrides": overrides,
        "targets": prune_cfg.pep.targets,
        "reached": {t: {"step": h["step"], "nonzero": h["nonzero"]} for t, h in reached.items()},
        "missed": pruned["pep"]["missed"],
        "prune_steps": pruned["steps"],
        "prune_valid_auc": pruned["valid_auc"],
        "retrain_epochs": retrain_epochs,
        "lottery_test_auc": aucs,
        "same_mask_as": same_as,  # target -> the wider target whose retrain it shares
        "uniform_test_auc": uniform.get("test_auc"),
    }
    write_json(out / "pep.json", result)
    write_lines(out / "nonzero_history.jsonl",
                [{k: r[k] for k in ("step", "nonzero", "kept_fraction")} for r in records])
    return result


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """A run's history beside the report, one compact record per line."""
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n"
                                                          for r in records)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["autodim", "pep"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of both configs, e.g. train.epochs=5")
    p.add_argument("--retrain-epochs", type=int, default=2,
                   help="epochs of every retrain and uniform run (bench/QUALITY.md's 2: the sample is small)")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--data", type=Path, help="a converted dataset to run on instead of the Criteo sample")
    p.add_argument("--label", default="criteo", help="names the results folder (default: criteo)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run of this label")
    args = p.parse_args()
    if args.data is not None and args.label == "criteo":
        p.error("--data needs a --label of its own, so the Criteo results are not overwritten")
    files = {"autodim": ["autodim.json", "alpha_history.jsonl"], "pep": ["pep.json", "nonzero_history.jsonl"]}
    outs = {name: results_folder(p, f"papers-{name}-{args.label}", names, args.overwrite)
            for name, names in files.items() if args.only in (None, name)}
    warnings.filterwarnings("ignore")
    init_single_process_group()
    data = args.data or prepare_dataset("criteo-sample", args.data_root)
    for name, bench in (("autodim", autodim), ("pep", pep)):
        if name in outs:
            result = bench(args.overrides, data, args.label, args.retrain_epochs, outs[name])
            print(json.dumps({k: v for k, v in result.items() if k != "alpha_final"}))


if __name__ == "__main__":
    bench_main(main)
