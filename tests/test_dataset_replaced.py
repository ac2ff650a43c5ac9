"""A dataset written over another (`--overwrite`) while a run or a profile reads it: what is read
next would be the new dataset's rows under the old one's plan and counts, so the reader stops."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from embshard.cluster.sweep_report import dataset_sha256
from embshard.datasets import profile
from embshard.datasets.profile import write_profile
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.synth import synthesize
from embshard.errors import DataError
from embshard.typed_config import to_dict


def test_each_written_dataset_has_its_own_id(tmp_path) -> None:
    first = synthesize(tmp_path / "d", rows=200)
    second = synthesize(tmp_path / "d", rows=200, overwrite=True)
    assert first.id and second.id and first.id != second.id
    assert DatasetSpec.load(tmp_path / "d").id == second.id
    # The same data written twice is one dataset to the sweep's merge: the id names a writing of it.
    assert dataset_sha256(to_dict(first)) == dataset_sha256(to_dict(second))


def read_after_replacing(data: Path, reader: ParquetBatchReader) -> None:
    """Read an epoch, write another dataset over `data`, then read the next epoch."""
    assert sum(1 for _ in reader) > 0
    synthesize(data, rows=2000, seed=7, overwrite=True)
    reader.set_epoch(1)
    next(iter(reader))


def test_a_reader_stops_at_a_dataset_replaced_under_it(tmp_path) -> None:
    # The reader reopens part files by path every epoch: later epochs of a run read the new rows.
    data = tmp_path / "d"
    synthesize(data, rows=2000)
    with pytest.raises(DataError, match=rf"^{data}: the dataset was replaced while split train \(epoch 1\) read it; "
                                        r"stopped before reading any of the new one"):
        read_after_replacing(data, ParquetBatchReader(data, "train", 64, prefetch=1))


def test_a_reader_stops_at_a_part_file_replaced_under_it(tmp_path) -> None:
    # A tool that writes parts first and dataset.json last (rsync of one part, a copy of another
    # dataset's part over one of these): the run trained on the other rows without a word.
    import shutil

    data, other = tmp_path / "d", tmp_path / "other"
    synthesize(data, rows=2000)
    synthesize(other, rows=2000, seed=7)
    reader = ParquetBatchReader(data, "train", 64, prefetch=1)
    assert sum(1 for _ in reader) > 0
    part = data / "train" / "part-00000.parquet"
    shutil.copy(other / "train" / "part-00000.parquet", tmp_path / "part.parquet")
    os.replace(tmp_path / "part.parquet", part)
    reader.set_epoch(1)
    with pytest.raises(DataError, match=rf"^{part}: replaced while split train \(epoch 1\) read the dataset \(its "
                                        r"footer is not the one read when the run started\); stopped before "
                                        r"reading it"):
        next(iter(reader))


def test_a_run_whose_dataset_is_replaced_is_advised_a_run_of_its_own(tmp_path) -> None:
    # It advised "run again on the dataset there now", which the run's plan (of the old one) refused.
    from embshard.cluster.launch import plan_for_training
    from embshard.config import DataConfig, JobConfig
    from embshard.planner.pipeline import PlanBundle
    from embshard.trainer.loop import make_reader

    data = tmp_path / "d"
    synthesize(data, rows=2000)
    cfg = JobConfig(output_dir=str(tmp_path / "run"), data=DataConfig(path=str(data), batch_size=64))
    plan_for_training(cfg)
    reader = make_reader(cfg, PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer), "train", 0, 1)
    with pytest.raises(DataError, match=r"stopped before reading any of the new one: to train on the dataset there "
                                        r"now, start a run of its own \(another output_dir"):
        read_after_replacing(data, reader)


def test_a_profile_of_a_dataset_replaced_meanwhile_is_not_written(tmp_path, monkeypatch) -> None:
    # Its counts mixed both datasets' rows, and went into the new one's profile/.
    data = tmp_path / "d"
    synthesize(data, rows=2000)
    verify_split = profile.verify_split

    def replaced_after_listing(*args, **kwargs):
        parts = verify_split(*args, **kwargs)
        monkeypatch.undo()  # the synth below profiles its own dataset as usual
        synthesize(data, rows=2000, seed=7, overwrite=True)
        return parts

    monkeypatch.setattr(profile, "verify_split", replaced_after_listing)
    with pytest.raises(DataError, match="the dataset was replaced while its profile read it"):
        write_profile(data)
    monkeypatch.undo()
    written_by_synth = (data / "profile" / "profile.json").read_text()
    assert write_profile(data) and (data / "profile" / "profile.json").read_text() == written_by_synth


def test_a_plan_of_another_writing_of_the_data_is_refused_before_training(tmp_path, capsys) -> None:
    # The id check of a reader covers what it read since it started; a dataset written again
    # between the plan and the workers' start (or a resume) trained under the old plan's counts.
    from embshard.cluster.cli import main

    data = tmp_path / "d"
    synthesize(data, rows=2000, max_cardinality=100)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\nembeddings:\n  dim: 8\ncluster:\n  workers: 1\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    assert main(["plan", str(cfg), "--out", str(tmp_path / "p" / "plan.json")]) == 0
    synthesize(data, rows=2000, max_cardinality=100, overwrite=True)  # the same arguments: another writing
    capsys.readouterr()
    assert main(["train", str(cfg), "--set", f"sharding.plan_file={tmp_path / 'p' / 'plan.json'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(
        rf"embshard: error: {data}: not the dataset sharding.plan_file .*plan.json was made from \(dataset id "
        r"\w{8}, the plan's \w{8}: another dataset, or this one written again since\); plan and train it into a "
        r"new output_dir", err[0]), err


def test_an_empty_folder_of_the_user_s_keeps_its_mode_and_is_filled_not_replaced(tmp_path) -> None:
    # An empty --out was renamed over: a private folder (0700) came back world-readable (0755),
    # a group's setgid folder lost its group; the same for the folder --overwrite replaced.
    out = tmp_path / "private"
    out.mkdir()
    out.chmod(0o700)
    inode = out.stat().st_ino
    spec = synthesize(out, rows=500)
    assert out.stat().st_ino == inode and out.stat().st_mode & 0o7777 == 0o700
    assert DatasetSpec.load(out).id == spec.id and not list(tmp_path.glob(".*"))
    synthesize(out, rows=500, seed=3, overwrite=True)
    assert out.stat().st_mode & 0o7777 == 0o700
    synthesize(tmp_path / "fresh", rows=500)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "fresh").iterdir())


def test_a_mount_point_is_filled_in_place_its_earlier_dataset_moved_out_first(tmp_path, monkeypatch) -> None:
    # `docker run -v host:/out ... --out /out`: the conversion ran whole, then failed at the rename
    # ("Device or resource busy"), with --overwrite too. No rename replaces a mount point.
    import os

    from embshard.datasets import outdir

    out = tmp_path / "mnt"
    first = synthesize(out, rows=500)
    mounted = os.path.ismount
    monkeypatch.setattr(outdir.os.path, "ismount", lambda p: os.fspath(p) == os.fspath(out) or mounted(p))
    renamed = []
    rename = outdir.Path.rename

    def no_rename_of_the_mount(self, target):
        assert os.fspath(self) != os.fspath(out) and os.fspath(target) != os.fspath(out), "renamed the mount point"
        renamed.append(self.name)
        return rename(self, target)

    monkeypatch.setattr(outdir.Path, "rename", no_rename_of_the_mount)
    second = synthesize(out, rows=500, seed=3, overwrite=True)
    assert DatasetSpec.load(out).id == second.id != first.id
    assert renamed.index("dataset.json") < renamed.index("train")  # the old marker went first
    assert renamed[-1] == "dataset.json"  # and the new one came last
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")] and not list(tmp_path.glob(".*"))
    assert sum(1 for _ in ParquetBatchReader(out, "train", 50, prefetch=1)) == 8


def test_a_folder_holding_only_an_interrupted_write_says_so(tmp_path) -> None:
    # Filled in place, a killed write leaves its hidden staging folder inside: the folder looked
    # empty and was refused as "not empty" with nothing named.
    out = tmp_path / "d"
    left = out / ".d.partial-999999999-abcd1234"
    left.mkdir(parents=True)
    with pytest.raises(DataError, match=rf"^{out}: holds only {left.name}, what a write to it left \(interrupted, "
                                        rf"or still running\); once none runs, delete it \(rm -r {left}\)"):
        synthesize(out, rows=500)
    assert left.is_dir()


def test_a_failed_write_removes_the_folders_it_made_and_a_dotdot_out_is_refused_first(tmp_path) -> None:
    # `--out new/a/b/ds` of a conversion that wrote nothing left new/a/b behind; `--out d/new/..`
    # passed as a folder to create, then was refused as d (not empty) after the whole conversion.
    from embshard.datasets.convert import convert

    (tmp_path / "keep").mkdir()
    one = tmp_path / "keep" / "one.txt"
    one.write_text("\t".join(["1", *["2"] * 13, *["a1b2c3d4"] * 26]) + "\n")
    with pytest.raises(DataError, match="0 train rows"):
        convert("criteo", one, tmp_path / "keep" / "new" / "a" / "ds")
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "keep", one]
    with pytest.raises(DataError, match=rf"^{tmp_path}/keep/new/\.\.: goes up \('\.\.'\) from {tmp_path}/keep/new, "
                                        r"which does not exist; name the folder without '\.\.'$"):
        synthesize(tmp_path / "keep" / "new" / "..", rows=500)
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "keep", one]


def test_an_empty_folder_it_may_not_write_in_is_replaced_beside_and_one_in_a_read_only_parent_filled(
        tmp_path, monkeypatch) -> None:
    # Filled in place, an empty --out of another owner was refused (its staging folder could not
    # be made inside); and the parent's permission was still required where a fill needs none
    # (`docker run --user ... -v host:/out`, / not writable).
    from embshard.datasets import outdir

    theirs, mine, parent = tmp_path / "theirs", tmp_path / "ro" / "mine", tmp_path / "ro"
    theirs.mkdir()
    mine.mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(outdir.os, "access", lambda p, mode: Path(p) not in (theirs, parent) and access(p, mode))
    assert outdir.make_staging(theirs).parent == tmp_path  # beside it, renamed over as before
    synthesize(mine, rows=500)
    assert DatasetSpec.load(mine).rows["train"] > 0


def test_a_replace_cut_short_inside_its_folder_is_named_and_nothing_is_advised_away(tmp_path) -> None:
    # A fill in place killed midway left the old dataset's entries hidden in `.NAME.old-*`, the
    # new one's in `.NAME.partial-*`, and no dataset.json: refused, even with --overwrite, as
    # "holds no dataset.json", unnamed.
    out = tmp_path / "d"
    synthesize(out, rows=500)
    old, new = out / ".d.old-999999999-abcd1234", out / ".d.partial-999999999-abcd1234"
    old.mkdir()
    new.mkdir()
    for entry in ("dataset.json", "train"):
        (out / entry).rename(old / entry)
    (new / "dataset.json").write_text("{}")
    with pytest.raises(DataError, match=rf"^{out}: a replace of it was cut short, nothing deleted: {old.name} holds "
                                        rf"entries of the dataset it held before, moved aside, {new.name} entries of "
                                        rf"the new one not yet moved in; move the entries of the one to keep"):
        synthesize(out, rows=500, overwrite=True)
    # Killed as it deleted what it had moved aside: the new one whole in place.
    new.rename(tmp_path / "elsewhere")
    for entry in list(old.iterdir()):
        entry.rename(out / entry.name)
    with pytest.raises(DataError, match=rf"^{out}: holds {old.name}, what it held before a replace whose clean-up "
                                        rf"was cut short; delete it"):
        synthesize(out, rows=500, overwrite=True)
    old.rmdir()
    # A user's own folder of a name alike is not taken for one: refused as any foreign entry is.
    (out / ".d.old-photos").mkdir()
    with pytest.raises(DataError, match=r"holds '\.d\.old-photos', which no dataset holds"):
        synthesize(out, rows=500, overwrite=True)


def test_a_relative_out_is_filled_in_place_and_the_current_folder_inside_one_is_refused(
        tmp_path, monkeypatch) -> None:
    # A relative empty --out: its own staging folder, absolute, was taken for a leftover in the
    # relative listing ("holds only .e1.partial-..."), after the whole write. And filled in place,
    # a folder holding the shell's current one had that folder moved aside and deleted.
    from embshard.datasets import outdir

    monkeypatch.chdir(tmp_path)
    Path("e1").mkdir()
    synthesize(Path("e1"), rows=500)
    assert DatasetSpec.load(tmp_path / "e1").rows["train"] > 0
    mounted = os.path.ismount
    monkeypatch.setattr(outdir.os.path, "ismount", lambda p: Path(p).absolute() == tmp_path / "e1" or mounted(p))
    monkeypatch.chdir(tmp_path / "e1" / "train")
    with pytest.raises(DataError, match=r"e1: holds the current directory"):
        synthesize(tmp_path / "e1", rows=500, overwrite=True)
    monkeypatch.chdir(tmp_path / "e1")  # the folder itself stays: filled in place from within
    synthesize(Path("."), rows=500, overwrite=True)
    assert DatasetSpec.load(tmp_path / "e1").rows["train"] > 0


def test_a_profile_is_staged_beside_its_folder_never_inside(tmp_path) -> None:
    # Staged inside an empty profile/, a killed profile left a folder no dataset holds there:
    # `data profile` and `synth --overwrite` were both refused for good.
    from embshard.datasets.outdir import make_staging

    (tmp_path / "profile").mkdir()
    assert make_staging(tmp_path / "profile", in_place=False).parent == tmp_path


def test_overwrite_gives_the_new_folder_the_old_one_s_group_when_not_its_owner(tmp_path, monkeypatch) -> None:
    # One chown call for owner and group: refused for the owner, it gave the group nothing either.
    from embshard.datasets import outdir

    out = tmp_path / "d"
    synthesize(out, rows=500)
    calls = []

    def chown(path, uid, gid):
        calls.append((uid, gid))
        if uid != -1:
            raise PermissionError("not the owner")

    monkeypatch.setattr(outdir.os, "chown", chown)
    synthesize(out, rows=500, overwrite=True)
    gid = out.stat().st_gid
    assert calls == [(out.stat().st_uid, gid), (-1, gid)]
