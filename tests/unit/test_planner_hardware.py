"""Hardware descriptions (planner/hardware.py): the shipped nodes, the measured CPU, bad input."""

from __future__ import annotations

import dataclasses

import pytest

from longtrain.config_checks import ConfigError
from longtrain.planner.hardware import GB, GIB, KNOWN, TB, hardware, meminfo


@pytest.mark.parametrize("name", ["a800_80g", "a100_80g", "h100_80g", "h200_141g"])
def test_known_nodes_are_complete_and_positive(name):
    hw = hardware(name)
    assert hw.name == name and hw.gpus_per_node == 8
    for field in dataclasses.fields(hw):
        if field.name != "name":
            assert getattr(hw, field.name) > 0, field.name
    assert hw.host_bytes == 2 * TB  # the reference nodes' 2 TB of DRAM
    assert 0 < hw.usable_device_bytes < hw.device_bytes


def test_datasheet_numbers():
    assert KNOWN["h200_141g"].device_bytes == 141 * GB
    assert KNOWN["h100_80g"].device_bytes == KNOWN["a800_80g"].device_bytes == 80 * GIB
    assert KNOWN["h100_80g"].flops == KNOWN["h200_141g"].flops == 989e12
    assert KNOWN["a100_80g"].flops == KNOWN["a800_80g"].flops == 312e12
    # the A800 is the A100 with NVLink capped at 400 GB/s (both directions)
    assert KNOWN["a800_80g"].nvlink_bps < KNOWN["a100_80g"].nvlink_bps < KNOWN["h100_80g"].nvlink_bps
    assert KNOWN["a100_80g"].device_to_host_bps < KNOWN["h100_80g"].device_to_host_bps  # PCIe 4 vs 5


def test_gpus_per_node_override():
    assert hardware("h100_80g", gpus_per_node=4).gpus_per_node == 4
    with pytest.raises(ConfigError, match="gpus per node must be >= 1"):
        hardware("h100_80g", gpus_per_node=0)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        hardware("tpu_v5")
    message = str(err.value)
    assert "\n" not in message and "tpu_v5" in message
    for name in ("a800_80g", "a100_80g", "h100_80g", "h200_141g", "cpu"):
        assert name in message


@pytest.mark.parametrize("field", ["device_bytes", "host_bytes", "flops", "device_to_host_bps"])
def test_budgets_must_be_positive(field):
    with pytest.raises(ConfigError, match=f"{field} must be > 0"):
        dataclasses.replace(KNOWN["h100_80g"], **{field: 0})


def test_cpu_is_measured():
    hw = hardware("cpu")
    total = meminfo()["MemTotal"]
    assert hw.gpus_per_node == 1 and hw.reserved_bytes == 0
    assert 0 < hw.device_bytes == hw.host_bytes <= total
    assert hw.device_to_host_bps > 1e8  # any machine copies faster than 100 MB/s
    assert hw.flops > 1e8
