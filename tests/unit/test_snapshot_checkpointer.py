"""The snapshot checkpointer's parts: a state flattened to tensors + JSON and back (no pickle), the
RNG states, the checkpoint.* config keys, and training on without an agent."""

from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest
import torch

from longtrain.checkpoint import CheckpointConfig
from longtrain.checkpoint.agent import AgentClient, AgentError
from longtrain.checkpoint.flat import flatten, unflatten
from longtrain.checkpoint.snapshot import SnapshotCheckpointer, rng_state, set_rng_state
from longtrain.config_checks import ConfigError
from longtrain.trainer.compose import compose
from longtrain.trainer.train import build_checkpointer, train


def test_flatten_round_trips_through_json():
    state = {
        "model": {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, dtype=torch.float64)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "foreach": None, "params": [0]}],
        },
        "odd": [math.inf, -0.0, 1 / 3, True, "x", (1, (2, None))],
    }
    tensors, tree = flatten(state, "")
    assert set(tensors) == {"/model/w", "/model/b", "/optimizer/state/0/step", "/optimizer/state/0/exp_avg"}
    back = unflatten(json.loads(json.dumps(tree)), tensors)  # what a slot's table holds
    assert back["optimizer"]["state"].keys() == {0}  # int keys stay ints
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert back["odd"] == state["odd"] and math.copysign(1, back["odd"][1]) == -1
    assert back["optimizer"]["param_groups"][0]["eps"] == 1e-8
    for name in ("w", "b"):
        assert torch.equal(back["model"][name], state["model"][name])
    with pytest.raises(TypeError, match="/model/f is a object"):
        flatten({"model": {"f": object()}}, "")


def test_rng_states_round_trip():
    state = flatten(rng_state(), "rng")
    draws = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)  # moved on
    set_rng_state(unflatten(json.loads(json.dumps(state[1])), state[0]))
    assert (
        torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"snapshot_every": 2, "agents": False}, "checkpoint.snapshot_every=2 needs checkpoint.agents=true"),
        ({"snapshot_every": -1}, "checkpoint.snapshot_every"),
        (
            {"snapshot_every": 2, "enabled": False},
            "set checkpoint.snapshot_every=null or checkpoint.enabled=true",
        ),
        ({"ec": "rs:4"}, "checkpoint.ec must be none, xor or rs:k+m"),
        ({"ec": "rs:0+1"}, "checkpoint.ec=rs:0+1 needs k >= 1"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CheckpointConfig(**overrides)


def test_config_defaults_and_sharded_refusal(tmp_path):
    cfg = CheckpointConfig(snapshot_every=0, ec="rs:4+2")
    assert cfg.snapshot_every is None and cfg.agents and CheckpointConfig().ec == "xor"
    with pytest.raises(ConfigError, match="parallel.shard=fsdp: snapshots of sharded states"):
        compose("tiny_cpu", ["checkpoint.snapshot_every=2", "parallel.shard=fsdp", f"output_dir={tmp_path}"])


FAST = ["train.seq_len=64", "data.micro_batch_size=1", "train.grad_accum=1", "logging.progress=false"]


def test_without_an_agent_training_goes_on_with_disk_checkpoints(tmp_path, monkeypatch, capsys):
    def no_agent(*args, **kwargs):
        raise AgentError("the snapshot agent of rank 0 exited at start (status 1)")

    monkeypatch.setattr(AgentClient, "start", no_agent)
    out = tmp_path / "run"
    overrides = [*FAST, "model.num_layers=1", "logging.peak_flops=1e12", "optim.warmup_steps=1"]
    cfg = compose(
        "tiny_cpu",
        [
            *overrides,
            "train.steps=3",
            "train.log_every=1",
            "checkpoint.every=100",
            "checkpoint.snapshot_every=1",
            f"output_dir={out}",
        ],
    )
    logged = train(cfg)
    assert [r["step"] for r in logged] == [1, 2, 3]
    said = [line for line in capsys.readouterr().err.splitlines() if "snapshot agent" in line]
    assert said == [
        "longtrain: rank 0: no snapshot agent (the snapshot agent of rank 0 exited at start (status 1)); "
        "continuing with disk checkpoints only"
    ]
    assert (out / "checkpoints" / "step-000003" / "manifest.json").is_file()


def test_build_checkpointer_picks_snapshots_only_when_asked(tmp_path, monkeypatch):
    import longtrain.trainer.train as train_module
    from longtrain.parallel import Mesh

    monkeypatch.setattr(train_module, "architecture", lambda model: {})
    mesh = Mesh(rank=0, world_size=1, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    sharding = type("Sharding", (), {"sharded": False, "optimizer": None})()
    for every, snapshots in (("null", False), ("2", True)):
        cfg = compose("tiny_cpu", [f"checkpoint.snapshot_every={every}", f"output_dir={tmp_path}"])
        made = build_checkpointer(cfg, mesh, None, sharding)  # type: ignore[arg-type]
        assert isinstance(made, SnapshotCheckpointer) == snapshots
        made.close()


def test_an_rs_code_that_does_not_span_the_ranks_is_one_line_before_launch(tmp_path, capsys):
    from longtrain.trainer.cli import main

    args = ["train", "tiny_cpu", "--nproc", "3", "checkpoint.snapshot_every=2", f"output_dir={tmp_path}"]
    assert main([*args, "checkpoint.ec=rs:4+2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "longtrain: error: checkpoint.ec=rs:4+2 spreads 6 shards over as many ranks, this run has 3; "
        "set checkpoint.ec to rs:1+2, xor or none"
    ]
    CheckpointConfig(snapshot_every=2, ec="rs:2+1").check_ranks(3)  # spans them: fine
    CheckpointConfig(ec="rs:4+2").check_ranks(3)  # no snapshots: the code is not used
