"""Planning for several hosts: `sharding.local_world_size` reaches TorchRec's cost model."""

from __future__ import annotations

import json

import pytest
from conftest import profiled_synth

from embshard.cluster.cli import main
from embshard.config import JobConfig, ShardingConfig
from embshard.errors import ConfigError
from embshard.planner.shard_plan import plan_sharding
from embshard.planner.types import Block, DimensionPlan, TablePlan
from embshard.typed_config import from_dict


def _table(name: str, rows: int, dim: int) -> TablePlan:
    return TablePlan(name, [name], rows, [Block(0, rows, dim)])


# `big` (200M x 128 fp32, ~95 GiB) cannot sit whole on one 80 GiB rank, so its rows must be split;
# `mid` would fit anywhere, and TorchRec's cost model still picks row shards for it (both cases).
TWO_BIG = DimensionPlan(base_dim=128, tables=[_table("big", 200_000_000, 128), _table("mid", 1_000_000, 64)])


def test_eight_hosts_keep_row_shards_inside_a_host() -> None:
    one_host = ShardingConfig(device="cuda", device_memory_gb=80).topology(64)
    eight_hosts = ShardingConfig(device="cuda", device_memory_gb=80, local_world_size=8).topology(64)
    assert (one_host.hosts, eight_hosts.hosts) == (1, 8)
    assert eight_hosts.to_torchrec().local_world_size == 8

    flat = plan_sharding(TWO_BIG, one_host, batch_size=512).sharding
    hosts = plan_sharding(TWO_BIG, eight_hosts, batch_size=512).sharding
    # On one host TorchRec prices row-wise's all-to-all at intra-host bandwidth, so spreading the
    # rows over all 64 ranks is cheapest (table_row_wise on one host is the same layout at the
    # same cost, and either may win the tie). With 8 hosts that traffic would cross hosts at
    # inter-host bandwidth, so TorchRec keeps each table's row shards on the 8 ranks of one host
    # (table_row_wise) and only the pooled results leave the host.
    for name in ("big", "mid"):
        assert flat[name].sharding_type in ("row_wise", "table_row_wise") and flat[name].ranks == list(range(64))
        assert hosts[name].sharding_type == "table_row_wise"
        assert len(hosts[name].ranks) == 8 and len({r // 8 for r in hosts[name].ranks}) == 1


def test_local_world_size_must_divide_the_world_size() -> None:
    with pytest.raises(ConfigError, match=r"sharding\.local_world_size: 3 ranks per host must divide the world size 8"):
        ShardingConfig(local_world_size=3).topology(8)
    wanted = r"sharding\.local_world_size: 16 ranks per host must divide the world size 8"
    with pytest.raises(ConfigError, match=wanted):
        ShardingConfig(local_world_size=16).topology(8)
    with pytest.raises(ConfigError, match=r"^sharding\.local_world_size: must be >= 1, got 0$"):
        from_dict(JobConfig, {"sharding": {"local_world_size": 0}})
    assert ShardingConfig().topology(8).local_world_size is None  # unset: one host of 8
    # TorchRec places a rank's shards on cuda:(rank % ranks per host), and torch keeps 8 bits of
    # it: rank 128 of a host was "Invalid device string: 'cuda:-128'", a traceback.
    with pytest.raises(ConfigError, match=r"^sharding\.local_world_size is unset, so all 256 cuda ranks are "
                                          r"planned on one host: more than the 128 devices torch can number"):
        ShardingConfig(device="cuda").topology(256)
    with pytest.raises(ConfigError, match=r"^local_world_size: 256 cuda ranks on a host: more than the 128"):
        ShardingConfig(device="cuda", local_world_size=256).topology(512)
    assert ShardingConfig(device="cuda", local_world_size=8).topology(256).hosts == 32
    assert ShardingConfig(device="cuda").topology(128).hosts == 1


def test_cli_flag_and_config_key_round_trip_through_plan_json(tmp_path, capsys) -> None:
    data = profiled_synth(tmp_path / "data", rows=2000, max_cardinality=2000)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\n")
    by_flag, by_key = tmp_path / "flag.json", tmp_path / "key.json"

    assert main(["plan", str(cfg), "--world-size", "4", "--local-world-size", "2", "--out", str(by_flag)]) == 0
    assert "4 x cpu ranks on 2 host(s) of 2" in capsys.readouterr().out
    assert main(["plan", str(cfg), "--world-size", "4", "--set", "sharding.local_world_size=2",
                 "--out", str(by_key)]) == 0
    for path in (by_flag, by_key):
        assert json.loads(path.read_text())["shard_plan"]["topology"]["local_world_size"] == 2
    capsys.readouterr()

    # A wrong flag's error named the config key the user had not written (`must be >= 1` too).
    assert main(["plan", str(cfg), "--world-size", "4", "--local-world-size", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "embshard: error: --local-world-size: 3 ranks per host must divide the world size 4"
    assert main(["plan", str(cfg), "--world-size", "4", "--set", "sharding.local_world_size=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "embshard: error: sharding.local_world_size: 3 ranks per host must divide the world size 4"
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(cfg), "--local-world-size", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: argument --local-world-size: must be >= 1, got 0")
