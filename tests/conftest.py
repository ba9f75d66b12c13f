"""Shared test setup: offline environment, tiny HF models, the ``gpu`` marker.

Tests run with ``--import-mode=importlib``, so helpers reach test modules as fixtures
(``make_tiny_model``, ``longtrain_cmd``, ``free_port``, ``one_intra_op_thread``), not by importing
this file; model builders live in ``tests/tiny.py``, importable as ``tiny``.

The environment variables are set at import time (before any test module imports transformers,
datasets or wandb) so that in-process runs and every subprocess a test starts inherit them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.update(
    WANDB_MODE="disabled",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)

from tiny import tiny_hf_model  # noqa: E402  (tests/ is on sys.path: pyproject's pytest pythonpath)


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on 2 cores OpenMP's spinning threads
    fight the executor's copy threads and any concurrent process (measured: 5x slower under load).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def longtrain_command() -> list[str]:
    """The installed ``longtrain`` console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "longtrain"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "longtrain.trainer.cli"]


@pytest.fixture
def make_tiny_model():
    """Factory fixture: ``make_tiny_model(family, dtype=..., seed=..., **ModelConfig overrides)``."""
    return tiny_hf_model


@pytest.fixture
def longtrain_cmd() -> list[str]:
    return longtrain_command()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


FRESH_CHILD = "LONGTRAIN_TEST_FRESH_CHILD"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """``@pytest.mark.fresh_heap``: the test runs in a new interpreter. The CPU byte counter
    (offload/memory.py) reads glibc's mallinfo2, which walks every free heap chunk: late in a long
    suite the heap holds hundreds of thousands of them and a counted step takes minutes (measured:
    three such tests 553 s in the suite, 26 s alone); a fresh process has a clean heap."""
    if pyfuncitem.get_closest_marker("fresh_heap") is None or os.environ.get(FRESH_CHILD):
        return None
    root = pyfuncitem.config.rootpath
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", pyfuncitem.nodeid],
        cwd=root,
        env={**os.environ, FRESH_CHILD: "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        pytest.fail(
            f"{pyfuncitem.nodeid} failed in its fresh process:\n{out.stdout[-6000:]}{out.stderr[-2000:]}"
        )
    return True
