"""The HDP simulator: the heavy-tailed generator, static mesh vs naive vs balanced HDP, the JSON
command line and the optional plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longtrain.config_checks import ConfigError
from longtrain.parallel.simulate import heavy_tailed_lengths, parse_tokens, simulate

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "simulate_hdp.py"


def test_heavy_tailed_generator_shape():
    lengths = np.array(heavy_tailed_lengths(4096, 262144, seed=0))
    assert 0.78 <= (lengths <= 4096).mean() <= 0.82
    assert 0.009 <= (lengths >= 131072).mean() <= 0.011
    share = lengths[lengths >= 131072].sum() / lengths.sum()
    assert 0.3 <= share <= 0.5, share
    assert lengths.max() <= 262144 and lengths.min() >= 1


def test_parse_tokens():
    assert parse_tokens("256K") == 262144 and parse_tokens("1M") == 1048576 and parse_tokens("8192") == 8192
    with pytest.raises(ConfigError, match="256K"):
        parse_tokens("lots")


def test_balanced_hdp_beats_static_mesh_at_256k():
    lengths = heavy_tailed_lengths(3000, 262144, seed=0)
    res = simulate(lengths, n_ranks=256, context=262144, capacity=16384, repeats=1)
    assert res["static_cp"] == 16 and res["static_dp"] == 16
    assert res["balanced_hdp_tokens_per_s"] >= 2.0 * res["static_tokens_per_s"]
    assert res["balanced_hdp_tokens_per_s"] > res["hdp_tokens_per_s"]
    assert res["imbalance"] <= 1.10 < res["hdp_imbalance"]
    timelines = res["_timelines"]
    assert len(timelines) == 3 and all(len(t) == 256 for t in timelines.values())


def test_document_longer_than_context_is_rejected():
    with pytest.raises(ConfigError, match="--context"):
        simulate([10, 5000], n_ranks=4, context=4096, capacity=2048)


def test_cli_json_and_png(tmp_path):
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps(heavy_tailed_lengths(400, 262144, seed=3)))
    png = tmp_path / "t.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--ranks",
            "32",
            "--context",
            "256K",
            "--capacity",
            "16K",
            "--lengths",
            str(lengths),
            "--json",
            "--png",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "static_tokens_per_s",
        "hdp_tokens_per_s",
        "balanced_hdp_tokens_per_s",
        "imbalance",
        "planner_ms",
    ):
        assert isinstance(out[key], float) and out[key] > 0
    assert out["docs"] == 400
    try:
        import matplotlib  # noqa: F401

        assert png.is_file() and out["png"].startswith("wrote")
    except ImportError:
        assert not png.exists() and "skipped" in out["png"]
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--lengths", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--lengths" in bad.stdout


def test_longtrain_simulate_prints_the_issue_keys(tmp_path, capsys):
    from longtrain.trainer.cli import main

    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps(heavy_tailed_lengths(300, 65536, seed=1)))
    assert main(["simulate", "--ranks", "16", "--context", "64K", "--lengths", str(lengths), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "static_tokens_per_s",
        "hdp_tokens_per_s",
        "balanced_hdp_tokens_per_s",
        "imbalance",
        "planner_ms",
    ):
        assert out[key] > 0, key
    assert main(["simulate", "--ranks", "4", "--lengths", str(tmp_path / "missing.json")]) == 2
    assert "longtrain: error: --lengths" in capsys.readouterr().err


def test_simulate_with_a_jobs_fitted_cost_model(tmp_path, capsys):
    """--cost reads a job's hdp_cost.json: a cost model whose attention is 100x cheaper makes the
    static mesh's padding to the context cheaper relative to the balanced plan, so the simulated
    speed-ups differ; a file that is not one is refused naming the option."""
    from longtrain.parallel.cost_model import DEFAULT_COST
    from longtrain.trainer.cli import main

    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps(heavy_tailed_lengths(300, 65536, seed=1)))
    cost = tmp_path / "hdp_cost.json"
    fields = {"attn": DEFAULT_COST.attn / 100, "linear": DEFAULT_COST.linear, "fixed": 0.0, "comm": 0.0}
    cost.write_text(json.dumps({"for": {}, "cost": fields}))
    base = ["simulate", "--ranks", "16", "--context", "64K", "--lengths", str(lengths), "--json"]
    results = []
    for extra in ([], ["--cost", str(cost)]):
        assert main([*base, *extra]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    ratio = [r["balanced_hdp_tokens_per_s"] / r["static_tokens_per_s"] for r in results]
    assert ratio[0] != pytest.approx(ratio[1], rel=1e-3), ratio
    cost.write_text(json.dumps({"attn": 1.0}))
    assert main([*base, "--cost", str(cost)]) == 2
    assert "--cost" in capsys.readouterr().err
