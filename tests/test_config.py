"""The job config: one torch-free module, one metrics default, explicit paths between runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embshard.config import JobConfig, load_job_config
from embshard.errors import ConfigError
from embshard.typed_config import from_dict, parse_yaml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))  # papers/ too
RUNTIME = ("torch", "torchrec", "ray", "prometheus_client", "fbgemm_gpu")


def test_loading_every_config_imports_no_runtime():
    # A fresh interpreter: the test session itself has torch loaded already.
    code = (
        "import sys\n"
        "from embshard.config import load_job_config\n"
        f"for path in {[str(p) for p in CONFIGS]!r}:\n"
        "    load_job_config(path).sharding.device\n"
        f"print(sorted(m for m in {RUNTIME!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert CONFIGS and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_readme_lists_every_shipped_config():
    root = Path(__file__).parent.parent
    listed = (root / "README.md").read_text()
    unlisted = [str(p.relative_to(root)) for p in CONFIGS if f"| `{p.relative_to(root)}` |" not in listed]
    assert not unlisted, f"configs missing from README's configs table: {unlisted}"


@pytest.mark.parametrize("metrics", [None, {}, {"port_base": 0}, {"bind": "0.0.0.0"}])
def test_metrics_stay_off_unless_enabled(metrics):
    # Setting any other key under `metrics:` used to turn metrics on (two defaults disagreed).
    raw = {} if metrics is None else {"metrics": metrics}
    assert from_dict(JobConfig, raw).metrics.enabled is False
    assert from_dict(JobConfig, {"metrics": {**(metrics or {}), "enabled": True}}).metrics.enabled is True


def test_a_linger_no_clock_holds_is_refused_at_load():
    # 1e10 passed, trained the whole run, then crashed at its end ("timestamp out of range").
    from embshard.config import MetricsConfig

    with pytest.raises(ConfigError, match=r"^linger_seconds: must be from 0 to 86,400 \(a day\), got 10000000000.0$"):
        MetricsConfig(linger_seconds=1e10)
    assert MetricsConfig(linger_seconds=86_400).linger_seconds == 86_400


def test_lottery_retrain_names_the_prune_run_explicitly():
    with pytest.raises(ConfigError, match=r"^pep\.retrain_from: a lottery retrain sets both"):
        from_dict(JobConfig, {"pep": {"retrain_target": 0.5}})
    cfg = from_dict(JobConfig, {"pep": {"retrain_target": 0.5, "retrain_from": "runs/prune/pep"}})
    assert cfg.pep.retrain_from == "runs/prune/pep"


def test_pep_recipe_retrain_reads_the_prune_runs_folder():
    # configs/pep-movielens.yaml's comment gives the commands; the lottery step must point at the
    # folder the prune step writes, whatever output_dir the retrain has.
    path = Path(__file__).parent.parent / "configs" / "pep-movielens.yaml"
    prune = load_job_config(path)
    lottery_line = next(line for line in path.read_text().splitlines() if "retrain_target" in line)
    overrides = [arg for arg in lottery_line.split("--set")[1:]]
    lottery = load_job_config(path, [o.strip().rstrip("\\").strip() for o in overrides])
    assert lottery.output_dir != prune.output_dir
    assert Path(lottery.pep.retrain_from) == prune.pep_dir


def test_semi_sync_pipeline_is_refused_off_cuda():
    # TorchRec's TrainPipelineSemiSync records CUDA streams on the batch: on cpu it would fail at
    # its first step, inside every worker.
    with pytest.raises(ConfigError, match=r"^train\.pipeline: semi_sync needs sharding\.device cuda"):
        from_dict(JobConfig, {"train": {"pipeline": "semi_sync"}})
    cfg = from_dict(JobConfig, {"train": {"pipeline": "semi_sync"}, "sharding": {"device": "cuda"}})
    assert cfg.train.pipeline == "semi_sync"


def test_exponent_numbers_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; the configs read it as YAML 1.2 does."""
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  dense_lr: 1e-3\n  sparse_lr: 5E-2\n")
    cfg = load_job_config(path, ["train.dense_weight_decay=1e-4"])
    assert (cfg.train.dense_lr, cfg.train.sparse_lr, cfg.train.dense_weight_decay) == (1e-3, 5e-2, 1e-4)
    with pytest.raises(ConfigError, match="tau_decay: must be >= 0, got -2e-05"):
        load_job_config(path, ["autodim.tau_decay=-2e-5"])
    # Still strings: what only looks like a number in part.
    cfg = load_job_config(path, ["name=1e", "output_dir=run1e3"])
    assert (cfg.name, cfg.output_dir) == ("1e", "run1e3")


def test_numbers_and_booleans_are_read_as_yaml_1_2_reads_them(tmp_path):
    # YAML 1.1 (PyYAML's) read `epochs: 010` as 8 and `max_steps: 1:30` as 90 with exit 0.
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  epochs: 010\n  max_steps: 0x10\nname: off\n")
    cfg = load_job_config(path)
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.name) == (10, 16, "off")
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got '1:30' \(configs are YAML "
                                          r"1\.2, where 1:30 is text; YAML 1\.1 read it in base 60: write 90\)"):
        load_job_config(path, ["train.max_steps=1:30"])
    with pytest.raises(ConfigError, match=r"train\.progress: expected true or false, got 'no' \(configs are YAML "
                                          r"1\.2: write false\)"):
        load_job_config(path, ["train.progress=no"])
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got '1_000' \(configs are YAML "
                                          r"1\.2: write 1000\)"):
        load_job_config(path, ["train.max_steps=1_000"])


def test_a_whole_number_written_with_an_exponent_is_an_integer(tmp_path):
    # `embeddings.mde.budget_params=1e12` was "expected an integer, got 1000000000000.0".
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  max_steps: 2e3\n")
    cfg = load_job_config(path, ["data.batch_size=1.024e3"])
    assert (cfg.train.max_steps, cfg.data.batch_size) == (2000, 1024)
    with pytest.raises(ConfigError, match=r"^data\.batch_size: expected an integer, got 2\.5 \(from"):
        load_job_config(path, ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match=r"^data\.batch_size: expected an integer, got 1e\+23 \(past 2\*\*53 a number "
                                          r"written with an exponent may not be the whole number meant: write its "
                                          r"digits\)"):
        load_job_config(path, ["data.batch_size=1e23"])


def test_a_negative_seed_is_refused_before_a_worker_reads_with_it(tmp_path):
    # It crashed in every worker (numpy's default_rng) after Ray had started.
    with pytest.raises(ConfigError, match=r"^seed: must be >= 0, got -1$"):
        from_dict(JobConfig, {"seed": -1})
    # And one past 64 bits: "Overflow when unpacking long long" in every worker.
    with pytest.raises(ConfigError, match=r"^seed: must be below 2\*\*64, got 99999999999999999999999$"):
        from_dict(JobConfig, {"seed": 99999999999999999999999})
    assert from_dict(JobConfig, {"seed": 2**64 - 1}).seed == 2**64 - 1


def test_a_fused_optimizer_cpu_tables_cannot_step_is_refused_on_cpu():
    # FBGEMM's CPU mode asserts on Adam: it was a "crash" in every worker after Ray had started.
    with pytest.raises(ConfigError, match=r"^train\.sparse_optimizer: FBGEMM's fused adam runs on CUDA only; on "
                                          r"CPU use rowwise_adagrad, adagrad, sgd$"):
        from_dict(JobConfig, {"train": {"sparse_optimizer": "adam"}})
    cfg = from_dict(JobConfig, {"train": {"sparse_optimizer": "adam"}, "sharding": {"device": "cuda"}})
    assert cfg.train.sparse_optimizer == "adam"


def test_a_policy_named_as_the_method_must_be_the_policy():
    # `method: mde` under the default policy planned and trained uniform tables, exit 0.
    with pytest.raises(ConfigError, match=r"^embeddings\.method: 'mde' is a dimension policy; set policy: mde"):
        from_dict(JobConfig, {"embeddings": {"method": "mde"}})
    assert from_dict(JobConfig, {"embeddings": {"method": "mde", "policy": "mde"}}).embeddings.method == "mde"


def test_a_key_set_twice_to_two_values_is_refused(tmp_path):
    # The last one was kept without a word.
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"^--set train\.epochs given twice \('train\.epochs=1', then "
                                          r"' train\.epochs=3'\); give it once$"):
        load_job_config(path, ["train.epochs=1", "train.log_every=5", " train.epochs=3"])
    assert load_job_config(path, ["train.epochs=3", "train.epochs= 3"]).train.epochs == 3  # one value
    # A section after a key inside it replaced that key, and the file's others, without a word.
    with pytest.raises(ConfigError, match=r"^--set train given after 'train\.epochs=3', a key inside it, which it "
                                          r"replaces; give that key in it, or after it$"):
        load_job_config(path, ["train.epochs=3", "train={log_every: 7}"])
    both = load_job_config(path, ["train={log_every: 7}", "train.epochs=3"]).train
    assert (both.log_every, both.epochs) == (7, 3)


def test_a_bad_value_from_set_is_blamed_on_the_flag(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"^model\.arch: expected a string, got \{'archs': None\} \(from --set\)$"):
        load_job_config(path, ["model.arch=archs:"])
    with pytest.raises(ConfigError, match=r"^sharding\.sharding_types: empty; list the types"):
        load_job_config(path, ["sharding.sharding_types=[]"])
    path.write_text("train:\n  epochs: two\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: train\.epochs: expected an integer"):
        load_job_config(path, ["train.log_every=5"])
    # A key the flag made up, refused at its first unknown part: it was blamed on the file.
    path.write_text("train:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"^nonexist: unknown field \(valid: .*\) \(from --set\)$"):
        load_job_config(path, ["nonexist.a.b=3"])
    # A bad element of a list the flag gave.
    with pytest.raises(ConfigError, match=r"^model\.over_arch\[0\]: expected an integer, got nan \(from --set\)$"):
        load_job_config(path, ["model.over_arch=[.nan]"])


def test_mlp_layers_no_model_can_build_are_refused_by_name():
    # 99999999999999999999 was a torch overflow traceback; 2**62 passed the plan (its dense layers
    # could not be counted) and crashed the workers.
    for width in (99999999999999999999, 2**62):
        with pytest.raises(ConfigError, match=rf"^model\.over_arch: layer widths must be 1 to 16,777,216, "
                                              rf"got \[{width}\]"):
            from_dict(JobConfig, {"model": {"over_arch": [width]}})
    with pytest.raises(ConfigError, match=r"^model\.dense_arch: at most 1,024 layers, got 100,000"):
        from_dict(JobConfig, {"model": {"dense_arch": [8] * 100_000}})
    # An arch's own options too: the plan was written with the dense layers uncounted, or planned
    # until it was killed (a cross net of 1,000,000 layers).
    from embshard.config import ModelConfig
    from embshard.trainer.models.dcn import dcn_options
    from embshard.trainer.models.two_tower import parse_options

    for options, said in (({"dcn_low_rank_dim": 2**62}, r"dcn_low_rank_dim: must be an integer from 1 to 16,777,216"),
                          ({"dcn_num_layers": 1_000_000}, r"dcn_num_layers: must be an integer from 1 to 1,024")):
        with pytest.raises(ConfigError, match=rf"^model\.options\.{said}, got"):
            dcn_options(ModelConfig(arch="dlrm_dcn", options=options))
    for options, said in (({"out_dim": 2**62}, r"out_dim: must be 1 to 16,777,216"),
                          ({"hidden": [2**62]}, r"hidden: layer widths must be 1 to 16,777,216")):
        with pytest.raises(ConfigError, match=rf"^model\.options\.{said}, got"):
            parse_options(options)


def test_a_key_given_twice_is_refused_with_both_places(tmp_path):
    # The second `embeddings:` replaced the first whole: an MDE job planned uniform, exit 0.
    path = tmp_path / "job.yaml"
    path.write_text("embeddings:\n  policy: mde\n  dim: 16\ntrain:\n  epochs: 2\nembeddings:\n  dim: 16\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:6:1: not valid YAML (key 'embeddings' given "
                                                     "twice (first on line 1))")):
        load_job_config(path)
    path.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r":3:3: not valid YAML \(key 'epochs' given twice"):
        load_job_config(path)
    # Merges may override a key, also when an anchored mapping merges another.
    path.write_text("x-lr: &lr {dense_lr: 0.01}\nx:\n  train: &t {<<: *lr, dense_lr: 0.02}\n"
                    "train: {<<: *t, epochs: 4}\n")
    assert parse_yaml(path.read_text())["x"]["train"] == {"dense_lr": 0.02}


def test_nan_and_infinity_are_no_numbers_a_config_takes(tmp_path):
    # `.inf` trained to a NaN loss and wrote NaN checkpoints with exit 0; `.nan` passed `<= 0`.
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  sparse_lr: .inf\n")
    with pytest.raises(ConfigError, match=r"train\.sparse_lr: expected a finite number, got inf"):
        load_job_config(path)
    path.write_text("train:\n  sparse_lr: 0.05\n")
    for override, shown in (("train.dense_lr=.nan", "nan"), ("embeddings.mde.alpha=-.inf", "-inf")):
        with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: expected a finite number, got {shown}"):
            load_job_config(tmp_path / "job.yaml", [override])


def test_yaml_that_does_not_parse_is_one_line_with_its_place(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError) as e:
        load_job_config(path)
    assert "\n" not in str(e.value)
    assert re.fullmatch(rf"{re.escape(str(path))}:3:1: not valid YAML \(.+\)", str(e.value))
    path.write_text("train:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"^--set 'train\.epochs=\[1,':1:4: not valid YAML \(.+\)$"):
        load_job_config(path, ["train.epochs=[1,"])
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not UTF-8 text \(invalid continuation byte at byte 9\)"):
        load_job_config(path)


def test_worker_resources_are_custom_resources_only() -> None:
    from embshard.config import ClusterConfig

    assert from_dict(ClusterConfig, {"worker_resources": {"embshard_rank": 1}}, "cluster").worker_resources == {
        "embshard_rank": 1.0}
    for resources, message in (({"CPU": 2}, "cluster.worker_resources.CPU: set cpus_per_worker"),
                               ({"GPU": 1}, "cluster.worker_resources.GPU: set cpus_per_worker, or sharding.device"),
                               ({"slot": 0}, "cluster.worker_resources.slot: must be positive, got 0")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            from_dict(ClusterConfig, {"worker_resources": resources}, "cluster")


@pytest.mark.parametrize("text, overrides, message", [
    # A TypeError traceback: the keys were sorted with the field names.
    ("1: a\nfoo: b\n", [], r"c\.yaml: <root>: key 1 \(int\): keys are names, written as text"),
    ("train: {epochs: 2, null: 1}\n", [], r"c\.yaml: train: key None \(NoneType\): keys are names"),
    # An AttributeError traceback from --set on a list.
    ("- a\n- b\n", ["train.epochs=2"], r"c\.yaml: <root>: expected a mapping of sections, got list \['a', 'b'\]"),
    # Read as every default: it planned and trained the default job's data without a word.
    ("", [], r"c\.yaml: empty; a config is a mapping of sections"),
    ("~\n", [], r"c\.yaml: empty"),
    ("false\n", [], r"c\.yaml: <root>: expected a mapping of sections, got bool False"),
    # Passed, then failed as plan.json was written (or wrote a NaN no JSON reader takes).
    ("model: {options: {s: !!set {a, b}}}\n", [], r"model\.options\.s: set values are not kept"),
    ("model: {options: {when: !!timestamp 2020-01-01}}\n", [], r"model\.options\.when: date values are not kept"),
    ("model: {options: {s: [1, .nan]}}\n", [], r"model\.options\.s\[1\]: expected a finite number, got nan"),
    # Named `device_memory_gb` alone, from deep in the planner.
    ("{}\n", ["sharding.device_memory_gb=-1"], r"^sharding\.device_memory_gb: must be a positive number of GiB up "
                                               r"to 1,048,576, got -1\.0 \(from --set\)"),
    # An OverflowError traceback from the planner's byte counts.
    ("{}\n", ["sharding.device_memory_gb=1e300"], r"^sharding\.device_memory_gb: must be .* got 1e\+300"),
    # 2**63 overflowed int64 in MDE's rounding: three lines, blaming a table.
    ("{}\n", ["embeddings.dim=9223372036854775808"], r"^embeddings\.dim: at most 16,777,216, got "
                                                     r"9,223,372,036,854,775,808"),
    ("{}\n", ["data.batch_size=99999999999999999999"], r"^data\.batch_size: at most 16,777,216 rows a worker"),
    # Trained from scratch as if no checkpoint were named.
    ("checkpoint: {resume: ''}\n", [], r"checkpoint\.resume: an empty path"),
    ("checkpoint: {resume: /x, enabled: false}\n", [], r"checkpoint\.resume: /x is not resumed while "
                                                       r"checkpoint\.enabled is false"),
    # A RecursionError traceback, and a hang: aliases are shared, so a value could hold itself, and
    # a few lines of aliases of aliases a billion values.
    ("model: {options: &a {x: *a}}\n", [], r"c\.yaml:1:25: not valid YAML \(alias \*a inside the value it names\)"),
    ("model:\n  options:\n    x0: &x0 [a, b, c, d, e, f, g, h, i, j]\n" + "".join(
        f"    x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n" for i in range(1, 8)), [],
     r"c\.yaml:8:9: not valid YAML \(over 1,000,000 values once its aliases are expanded\)"),
    ("{}\n", ["model.options={x: &a [*a]}"], r"--set 'model\.options=.*':1:9: not valid YAML \(alias \*a inside"),
    # Blamed on the file, which had no `train` at all; and a field with no name.
    ("{}\n", ["train.epochs.x=1"], r"^train\.epochs: expected an integer, got \{'x': 1\} \(from --set\)$"),
    ("{}\n", ["=1"], r"^--set '=1': expected key=value with a key such as train\.epochs$"),
    ("{}\n", [".train.epochs=1"], r"^--set '\.train\.epochs=1': expected key=value with a key such as"),
    # A tag its scalar does not read, or more digits than Python reads: the constructors' ValueError
    # and KeyError were tracebacks.
    ("embeddings:\n  dim: !!int abc\n", [], r"c\.yaml:2:8: not valid YAML \('abc' is no int\)$"),
    ("train:\n  progress: !!bool maybe\n", [], r"c\.yaml:2:13: not valid YAML \('maybe' is no bool\)$"),
    (f"seed: {'9' * 5000}\n", [], r"c\.yaml:1:7: not valid YAML \('9{20}'\.\.\. \(5,000 characters\) is no int\)$"),
    ("{}\n", ["name=!!int x"], r"^--set 'name=!!int x':1:1: not valid YAML \('x' is no int\)$"),
    ("seed: !!timestamp foo\n", [], r"c\.yaml:1:7: not valid YAML \('foo' is no timestamp\)$"),
    # Read, but too large to print ("must be below 2**64, got ..." raised Python's own ValueError)
    # or to be a float (math.isfinite's OverflowError).
    ("{}\n", [f"seed=0x{'f' * 4000}"], r"^seed: expected an integer, got one of 16000 bits \(from --set\)$"),
    ("{}\n", [f"train.sparse_lr={'9' * 400}"], r"^train\.sparse_lr: expected a finite number, got an integer of "
                                               r"1329 bits \(from --set\)$"),
    # The run's folder became the current one.
    ("output_dir: ''\n", [], r"output_dir: an empty path \(an unset shell variable\?\)"),
])
def test_a_config_that_is_no_mapping_of_fields_is_one_line(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_job_config(path, overrides)


def test_an_empty_config_takes_its_settings_from_set(tmp_path):
    (tmp_path / "c.yaml").write_text("# all from the command line\n")
    assert load_job_config(tmp_path / "c.yaml", ["data.path=/x"]).data.path == "/x"


def test_a_config_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: a directory, not a config file$"):
        load_job_config(tmp_path)


def test_a_path_that_starts_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    # `output_dir: ~/runs/x` and `--out '~/d'` were folders named "~" in the working directory.
    from embshard.cluster.cli import main
    from embshard.config import PATH_FIELDS, load_job_config

    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: ~/runs/x\ndata:\n  path: ~/data\npep: {}\nautodim: {}\n")
    loaded = load_job_config(cfg, ["checkpoint.resume=~/ckpt", "sharding.plan_file=s3://b/~p"])
    assert (loaded.output_dir, loaded.data.path, loaded.checkpoint.resume) == (
        f"{home}/runs/x", f"{home}/data", f"{home}/ckpt")
    assert loaded.sharding.plan_file == "s3://b/~p"  # only a leading ~ is the home folder
    for dotted in PATH_FIELDS:  # every field named is a field of the config
        section, _, name = dotted.rpartition(".")
        assert hasattr(getattr(loaded, section) if section else loaded, name), dotted
    assert main(["data", "synth", "--out", "~/d", "--rows", "200"]) == 0
    assert (home / "d" / "dataset.json").is_file() and list(work.iterdir()) == []
    from embshard.arg_types import file_path
    from embshard.cluster.cli import build_parser

    assert file_path("~/d.json") == home / "d.json"  # `search autodim --out '~/d.json'`
    args = build_parser().parse_args(["train", "~/c.yaml", "--resume", "~/ckpt"])
    assert args.config == home / "c.yaml"


def test_every_path_a_worker_or_a_trial_reads_is_absolute(tmp_path, monkeypatch):
    # Workers got a few paths made absolute, one by one: a relative `autodim.decisions`,
    # `embeddings.decisions` or `cluster.storage` was read from where a Ray worker or a Tune
    # trial runs (a folder of its own), not from where the command ran.
    from embshard.cluster.launch import worker_config
    from embshard.config import PATH_FIELDS, load_job_config, with_paths_resolved
    from embshard.typed_config import flatten, to_dict

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("embeddings:\n  policy: decisions\npep:\n  retrain_target: 0.5\nautodim: {}\n")
    relative = [f"{dotted}=rel/{dotted}.json" for dotted in PATH_FIELDS]
    loaded = load_job_config(cfg, relative)
    for resolved in (with_paths_resolved(loaded), worker_config(loaded)):
        paths = {k: v for k, v in flatten(to_dict(resolved)).items() if k in PATH_FIELDS}
        assert sorted(paths) == sorted(PATH_FIELDS)
        assert all(os.path.isabs(v) for v in paths.values()), paths
    assert with_paths_resolved(loaded).embeddings.decisions == str(tmp_path / "rel" / "embeddings.decisions.json")
    remote_sets = ["checkpoint.dir=s3://b/ck", "data.path=file:///d"]
    remote = load_job_config(cfg, [*(r for r in relative if r.split("=")[0] not in ("checkpoint.dir", "data.path")),
                                   *remote_sets])
    assert (with_paths_resolved(remote).checkpoint.dir, with_paths_resolved(remote).data.path) == ("s3://b/ck", "/d")


def test_set_twice_compares_values_as_written(tmp_path):
    # `==` took true for 1, and a NaN given twice for two values.
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"^--set train\.progress given twice"):
        load_job_config(path, ["train.progress=1", "train.progress=true"])
    assert load_job_config(path, ["train.dense_lr=0.5", "train.dense_lr=5e-1"]).train.dense_lr == 0.5
