"""Synthetic Criteo-shaped data: layout, caps, skew, a learnable label, determinism."""

from __future__ import annotations

import argparse
import os
import re
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import held_elsewhere, writer_refused

from embshard.datasets.cli import register
from embshard.datasets.outdir import check_output
from embshard.datasets.profile import load_profile
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.synth import CRITEO_CARDINALITIES, hidden_model, synthesize
from embshard.datasets.writer import ROW_GROUP_ROWS
from embshard.errors import DataError

ROWS = 20_000
CAP = 5_000


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney AUC (ties are negligible for continuous scores)."""
    ranks = np.empty(len(score))
    ranks[np.argsort(score)] = np.arange(1, len(score) + 1)
    pos = label > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, rows=ROWS, seed=0, max_cardinality=CAP)
    return out


def test_layout_and_shapes(synth_dir: Path) -> None:
    spec = DatasetSpec.load(synth_dir)
    assert spec.rows == {"train": 16_000, "valid": 2_000, "test": 2_000}
    assert spec.dense == [f"I{i}" for i in range(1, 14)]
    assert spec.sparse_names == [f"C{i}" for i in range(1, 27)]
    assert [f.cardinality for f in spec.sparse] == [min(c, CAP) for c in CRITEO_CARDINALITIES]
    train = pq.ParquetFile(synth_dir / "train" / "part-00000.parquet")
    assert train.schema_arrow.equals(spec.arrow_schema())
    assert train.metadata.row_group(0).num_rows == ROW_GROUP_ROWS


def test_ids_in_range_and_zipf_skewed_but_not_sorted(synth_dir: Path) -> None:
    spec = DatasetSpec.load(synth_dir)
    table = pq.read_table(synth_dir / "train")
    for f in spec.sparse:
        ids = table[f.name].to_numpy()
        assert ids.min() >= 0 and ids.max() < f.cardinality
    dense = np.column_stack([table[d].to_numpy() for d in spec.dense])
    assert np.isfinite(dense).all() and dense.min() >= 0
    counts = np.bincount(table["C3"].to_numpy(), minlength=CAP)
    top = np.sort(counts)[::-1]
    assert top[: CAP // 100].sum() / counts.sum() > 0.4  # top 1% of ids hold a large share
    # The permutation hides the ranking: the most frequent ids are not the smallest ones.
    assert not np.array_equal(np.argsort(-counts, kind="stable")[:10], np.arange(10))


def test_labels_follow_the_hidden_model(synth_dir: Path) -> None:
    spec = DatasetSpec.load(synth_dir)
    table = pq.read_table(synth_dir / "train")
    label = table["label"].to_numpy()
    assert 0.2 < label.mean() < 0.3
    logit = hidden_model(0, CAP).logit_of_table(table, spec)
    assert auc(logit, label) > 0.7


def test_deterministic_per_seed(synth_dir: Path, tmp_path: Path) -> None:
    again = synthesize(tmp_path / "again", rows=ROWS, seed=0, max_cardinality=CAP)
    other = synthesize(tmp_path / "other", rows=ROWS, seed=1, max_cardinality=CAP)
    assert replace(again, id="") == replace(DatasetSpec.load(synth_dir), id="")  # the id names a writing
    first = pq.read_table(synth_dir / "valid")
    assert pq.read_table(tmp_path / "again" / "valid").equals(first)
    assert not pq.read_table(tmp_path / "other" / "valid").equals(first)
    assert other.rows == again.rows


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="rows"):
        synthesize(tmp_path, rows=3)
    with pytest.raises(DataError, match="max_cardinality"):
        synthesize(tmp_path, rows=100, max_cardinality=1)


def test_cli_synth_writes_dataset_and_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path), "--rows", "1000", "--seed", "4",
                              "--max-cardinality", "50"])
    assert args.func(args) == 0
    assert "train 800" in capsys.readouterr().out
    assert max(f.cardinality for f in DatasetSpec.load(tmp_path).sparse) == 50
    assert load_profile(tmp_path).counts("C3").sum() == 800
    args = parser.parse_args(["data", "profile", str(tmp_path)])
    assert args.func(args) == 0


def test_synth_refuses_to_replace_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "d"
    first = synthesize(out, rows=100, seed=0, max_cardinality=20)
    assert load_profile(out).counts("C1").sum() == 80  # the profile comes with the dataset
    with pytest.raises(DataError, match=r"d: not empty; pass --overwrite"):
        synthesize(out, rows=200, seed=1, max_cardinality=20)
    assert DatasetSpec.load(out) == first
    second = synthesize(out, rows=200, seed=1, max_cardinality=20, overwrite=True)
    assert DatasetSpec.load(out) == second and second.rows["train"] == 160
    assert load_profile(out).counts("C1").sum() == 160
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_cli_synth_overwrite(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    argv = ["data", "synth", "--out", str(tmp_path / "d"), "--rows", "100", "--max-cardinality", "20"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    with pytest.raises(DataError, match="--overwrite"):
        args.func(args)
    args = parser.parse_args([*argv, "--seed", "3", "--overwrite"])
    assert args.func(args) == 0
    assert "seed=3" in DatasetSpec.load(tmp_path / "d").source


def test_synth_into_a_symlink_or_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    synthesize(real, rows=100, max_cardinality=20)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(DataError, match=r"link: a symbolic link; give the folder it points to"):
        synthesize(link, rows=100, max_cardinality=20, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"file: exists and is not a directory"):
        synthesize(tmp_path / "file", rows=100, max_cardinality=20, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "real"]


def test_synth_into_the_current_directory_fills_it_when_empty_and_never_renames_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty folder is filled in place (it stays); a dataset there would be swapped away by a
    # rename, leaving this shell in a deleted folder: refused.
    monkeypatch.chdir(tmp_path)
    synthesize(Path("."), rows=100, max_cardinality=20)
    assert DatasetSpec.load(tmp_path).rows["train"] > 0 and not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))
    with pytest.raises(DataError, match=r"holds the current directory"):
        synthesize(Path("."), rows=100, max_cardinality=20, overwrite=True)


def test_failed_swap_puts_the_old_dataset_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "d"
    first = synthesize(out, rows=100, seed=0, max_cardinality=20)
    rename = Path.rename

    def fail_on_staging(self: Path, target: Path) -> Path:
        if ".partial-" in self.name:  # the new dataset's rename into place
            raise OSError("disk gone")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", fail_on_staging)
    with pytest.raises(OSError, match="disk gone"):
        synthesize(out, rows=200, seed=1, max_cardinality=20, overwrite=True)
    assert DatasetSpec.load(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("name", ["d", "d" * 250])
def test_a_staging_folder_a_killed_writer_left_is_named(tmp_path: Path, capsys, name: str) -> None:
    # kill -9 during a synth left .NAME.partial-PID-* (214 MB in the audit) there for good, unsaid.
    import subprocess
    import sys

    from embshard.datasets.storage import sibling_prefix

    out = tmp_path / name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    left = tmp_path / f"{sibling_prefix(out, 'partial')}{dead}-0badc0de"
    left.mkdir()
    synthesize(out, rows=200)
    err = capsys.readouterr().err
    assert (f"warning: {left}: left by an interrupted write to {out} (its process {dead} is not "
            "running on this host)") in err
    assert left.is_dir()  # said, not deleted: it may be a writer's on another host


def test_a_name_as_long_as_the_file_system_takes_is_written_and_replaced(tmp_path: Path) -> None:
    # A 250-byte --out was refused: "File name too long", of the hidden staging name beside it.
    for name in ("d" * 255, "é" * 127):
        out = tmp_path / name
        synthesize(out, rows=100, seed=0, max_cardinality=20)
        replaced = synthesize(out, rows=200, seed=1, max_cardinality=20, overwrite=True)
        assert DatasetSpec.load(out) == replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d" * 255, "é" * 127])


def test_a_stop_during_a_replace_waits_for_it_to_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        python_ctrl_c: None) -> None:
    # SIGTERM while `synth --overwrite` removed the old dataset said "interrupted" of a dataset
    # already in place, and left half of the old one behind, unsaid.
    import os
    import signal

    from embshard.datasets import outdir
    from embshard.errors import Interrupted

    out = tmp_path / "d"
    synthesize(out, rows=100, seed=0, max_cardinality=20)
    rmtree = outdir.shutil.rmtree

    def stopped_removal(path, *args, **kwargs):
        if Path(path).name.startswith(".d.") and Path(path).exists():  # the old dataset's removal
            os.kill(os.getpid(), signal.SIGINT)  # what the CLI makes of a SIGTERM too
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outdir.shutil, "rmtree", stopped_removal)
    with pytest.raises(Interrupted, match=rf"^stopped once {out} was written whole$"):
        synthesize(out, rows=200, seed=1, max_cardinality=20, overwrite=True)
    assert sum(DatasetSpec.load(out).rows.values()) == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    # A stop during the swap itself waits for it too.
    monkeypatch.setattr(outdir.shutil, "rmtree", rmtree)
    exchange = outdir._exchange

    def stopped_swap(a, b):
        os.kill(os.getpid(), signal.SIGINT)
        return exchange(a, b)

    monkeypatch.setattr(outdir, "_exchange", stopped_swap)
    with pytest.raises(Interrupted, match=rf"^stopped once {out} was written whole$"):
        synthesize(out, rows=300, seed=1, max_cardinality=20, overwrite=True)
    assert sum(DatasetSpec.load(out).rows.values()) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    # And one as a new --out is renamed into place: it said "interrupted" of a dataset in place.
    new = tmp_path / "new"
    rename = Path.rename

    def stopped_rename(staging: Path, target: Path) -> Path:
        if target == new:  # not its profile's, inside the staging folder
            os.kill(os.getpid(), signal.SIGINT)
        return rename(staging, target)

    monkeypatch.setattr(Path, "rename", stopped_rename)
    with pytest.raises(Interrupted, match=rf"^stopped once {new} was written whole$"):
        synthesize(new, rows=100, seed=1, max_cardinality=20)
    assert sum(DatasetSpec.load(new).rows.values()) == 100


@pytest.mark.parametrize("out_there", [True, False])
def test_what_a_killed_replace_left_of_the_old_folder_is_named(tmp_path: Path, capsys, out_there: bool) -> None:
    # kill -9 between the two renames of a replace left --out missing and the old folder hidden as
    # .NAME.old-PID-*, which no later run mentioned. (The swap is now one step where Linux has it.)
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    out, old = tmp_path / "d", tmp_path / f".d.old-{dead}-0badc0de"
    old.mkdir()
    if out_there:
        synthesize(out, rows=100, max_cardinality=20)
    capsys.readouterr()
    synthesize(out, rows=200, max_cardinality=20, overwrite=True)
    err = capsys.readouterr().err
    if out_there:
        assert (f"warning: {old}: what {out} held before it was replaced (the removal by process {dead} was "
                f"interrupted); delete it once {out} is checked") in err
    else:
        assert (f"warning: {old}: what {out} held before an interrupted replace, and {out} is missing; move it back "
                f"(mv {old} {out})") in err
    assert old.is_dir()


def test_a_reader_of_a_folder_a_killed_replace_left_missing_names_where_it_went(tmp_path: Path) -> None:
    # A writer warned of it; a reader (`train`, `export`'s loader) said "dataset directory not
    # found" of a dataset hidden beside the path it was given.
    import subprocess
    import sys

    from embshard.trainer.export import ExportError, read_manifest

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for name, read, error, missing in (("d", DatasetSpec.load, DataError, "dataset directory not found"),
                                       ("e", read_manifest, ExportError, "not found")):
        out, old = tmp_path / name, tmp_path / f".{name}.old-{dead}-0badc0de"
        with pytest.raises(error, match=rf"^{re.escape(str(out))}: {missing}$"):
            read(out)  # nothing beside it
        old.mkdir()
        said = f"{out}: {missing}; {old.name} beside it holds what it held before a replace of it was killed halfway"
        with pytest.raises(error, match=re.escape(f"{said}: move it back (mv {old} {out})")):
            read(out)


def test_rows_the_disk_cannot_hold_are_refused_before_it_fills(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`synth --rows 100000000000000000000` wrote until the disk was full. Now the rest is measured
    against the free space once a part file's worth is written. The free space is the only thing
    faked: 2 MiB free, where 200,000 rows of about 120 bytes need about 23 MiB."""
    from embshard.datasets import writer
    from embshard.errors import EnvironmentProblem

    monkeypatch.setattr(writer, "PART_ROWS", 4 * ROW_GROUP_ROWS)
    real = writer.shutil.disk_usage
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: real(p)._replace(free=2 * 2**20))
    with pytest.raises(EnvironmentProblem, match=r"200,000 rows need about .*MiB .*has 2\.0 MiB free; nothing written"):
        synthesize(tmp_path / "out", rows=200_000, seed=0, max_cardinality=CAP)
    assert not list(tmp_path.iterdir())  # no dataset, no staging folder left

    monkeypatch.setattr(writer.shutil, "disk_usage", real)
    spec = synthesize(tmp_path / "out", rows=200_000, seed=0, max_cardinality=CAP)
    assert sum(spec.rows.values()) == 200_000


def test_a_users_file_anywhere_inside_a_dataset_keeps_it_from_being_replaced(tmp_path: Path) -> None:
    # Only the folder's top level was looked at: --overwrite and `data profile` deleted these.
    from embshard.datasets.profile import write_profile

    out = tmp_path / "d"
    first = synthesize(out, rows=100, seed=0, max_cardinality=20)
    for mine in (out / "train" / "my_notes.txt", out / "profile" / "mystuff" / "a.csv"):
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("precious")
        inside = "/".join(mine.relative_to(out).parts[:2])
        with pytest.raises(DataError, match=rf"holds '{inside}', which no dataset holds.*; refusing to replace it"):
            synthesize(out, rows=200, seed=1, max_cardinality=20, overwrite=True)
        assert mine.read_text() == "precious" and DatasetSpec.load(out) == first
    (out / "train" / "my_notes.txt").unlink()
    with pytest.raises(DataError, match=r"profile: holds 'mystuff', which no profile holds; refusing to replace it"):
        write_profile(out)
    assert (out / "profile" / "mystuff" / "a.csv").read_text() == "precious"


def test_an_out_ending_in_dot_dot_is_refused_naming_the_folder(tmp_path: Path) -> None:
    # `d/train/..` was refused as "inside the dataset d" (or as holding a lock file of no dataset's).
    first = synthesize(tmp_path / "d", rows=100, seed=0, max_cardinality=20)
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'd' / 'train' / '..'))}: ends in '\.\.'; "
                                        rf"name the folder itself \({re.escape(str(tmp_path / 'd'))}\)$"):
        synthesize(tmp_path / "d" / "train" / "..", rows=200, seed=1, max_cardinality=20, overwrite=True)
    assert DatasetSpec.load(tmp_path / "d") == first
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == ["part-00000.parquet"]


def test_a_link_into_a_dataset_does_not_put_another_dataset_inside_it(tmp_path: Path) -> None:
    # `--out link/x` with link -> d/train wrote a dataset into d/train, which the next
    # `synth --out d --overwrite` deleted.
    synthesize(tmp_path / "d", rows=100, seed=0, max_cardinality=20)
    (tmp_path / "link").symlink_to(tmp_path / "d" / "train")
    with pytest.raises(DataError, match=r"inside the dataset .*/d, which holds its own files alone"):
        synthesize(tmp_path / "link" / "x", rows=100, seed=0, max_cardinality=20)
    assert not (tmp_path / "d" / "train" / "x").exists()


@pytest.mark.parametrize("earlier", ["a dataset", "an empty folder"])
def test_a_second_writer_of_one_out_is_refused_while_the_first_writes(tmp_path: Path, monkeypatch, earlier) -> None:
    # Two `data synth --overwrite` into one --out at once both said they wrote it, and it held the
    # last one's. An empty --out is filled in place: the second writer took the first's staging
    # folder inside it for a user's file ("holds no dataset.json").
    import embshard.datasets.writer as writer

    out = tmp_path / "d"
    first = synthesize(out, rows=100, seed=0, max_cardinality=20) if earlier == "a dataset" else out.mkdir()
    refusals = []
    profile = writer.counted_profile

    def second_writer_meanwhile(staging: Path) -> None:  # the first writer's last step before it publishes
        with pytest.raises(DataError) as refused:
            synthesize(out, rows=300, seed=2, max_cardinality=20, overwrite=True)
        refusals.append(str(refused.value))
        profile(staging)

    monkeypatch.setattr(writer, "counted_profile", second_writer_meanwhile)
    second = synthesize(out, rows=200, seed=1, max_cardinality=20, overwrite=True)
    assert len(refusals) == 1 and re.fullmatch(
        rf"{re.escape(str(out))}: another embshard process is writing it \(pid {os.getpid()} on "
        rf"{re.escape(socket.gethostname())} since [-\d]+ [:\d]+: .+\); wait for it to end, or write elsewhere",
        refusals[0]), refusals
    assert DatasetSpec.load(out) == second != first
    monkeypatch.undo()
    synthesize(out, rows=300, seed=2, max_cardinality=20, overwrite=True)  # once the first has ended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no lock file left beside it


def test_another_process_writing_the_out_is_said_before_the_work(tmp_path: Path) -> None:
    out = tmp_path / "d"
    first = synthesize(out, rows=100, seed=0, max_cardinality=20)
    with held_elsewhere(f"writer_lock(Path({str(out)!r}))") as writing:
        with pytest.raises(DataError, match=rf"^{re.escape(str(out))}: another embshard process is writing it "
                                            rf"\(pid {writing} .*\); wait for it to end"):
            check_output(out, overwrite=True)
        with pytest.raises(DataError, match=rf"another embshard process is writing it \(pid {writing} "):
            synthesize(out, rows=200, seed=1, max_cardinality=20, overwrite=True)
    assert DatasetSpec.load(out) == first


def test_a_profile_lock_a_killed_profile_left_keeps_the_dataset_replaceable(tmp_path: Path) -> None:
    out = tmp_path / "d"
    synthesize(out, rows=100, seed=0, max_cardinality=20)
    (out / ".profile.lock").write_text("{}")  # `data profile` killed with SIGKILL
    replaced = synthesize(out, rows=200, seed=1, max_cardinality=20, overwrite=True)
    assert DatasetSpec.load(out) == replaced


def test_a_profile_another_process_writes_is_refused_before_its_counting(tmp_path: Path, monkeypatch) -> None:
    # Two `data profile` at once: the second counted every row group, then was refused.
    import embshard.datasets.profile as profile

    out = tmp_path / "d"
    synthesize(out, rows=100, seed=0, max_cardinality=20)
    monkeypatch.setattr(profile, "make_staging", lambda *a, **k: pytest.fail("counted and staged"))
    with held_elsewhere(f"writer_lock(Path({str(out / 'profile')!r}))") as writing:
        with pytest.raises(DataError, match=rf"profile: another embshard process is writing it \(pid {writing} "):
            profile.write_profile(out)


def test_a_profile_holds_its_folder_while_it_counts(tmp_path: Path, monkeypatch) -> None:
    # Locked only once counted: a second `data profile` that started meanwhile passed its check.
    import embshard.datasets.profile as profile

    out, refused = tmp_path / "d", []
    synthesize(out, rows=100, seed=0, max_cardinality=20)
    verified = profile.verify_split

    def another_writer_meanwhile(*args: object, **kwargs: object) -> object:
        refused.append(writer_refused(out / "profile"))
        return verified(*args, **kwargs)

    monkeypatch.setattr(profile, "verify_split", another_writer_meanwhile)
    profile.write_profile(out)
    assert refused == [True] and not (out / ".profile.lock").exists()


def test_a_check_of_out_waits_out_another_check_of_it(tmp_path: Path) -> None:
    # Every rank of a live model's export checks --out at once; each check holds the writer's
    # lock for a moment, and a rank that came upon another's was refused ("another embshard
    # process is writing it"), now and then.
    import threading

    from embshard.datasets.outdir import writer_lock

    out = tmp_path / "d"
    held = threading.Event()

    def another_check() -> None:
        with writer_lock(out):
            held.set()
            time.sleep(0.3)

    other = threading.Thread(target=another_check)
    other.start()
    held.wait(5)
    check_output(out, overwrite=False)  # waits for the other, then finds --out free
    other.join()
    assert not list(tmp_path.iterdir())  # neither left a lock file
