"""Data-parallel training of a tokenmix backbone on CPU (gloo), through the command the README
shows: ``torchrun --nproc_per_node=2 -m tokenmix.models.train``. Two processes under
DistributedDataParallel, and under FSDP's ``fully_shard``, each take half of the same global batch;
afterwards every rank holds the same parameters, and the loss curve equals the one-process run at
the combined batch (HorNet: LayerNorm only, so the batch split changes no statistic)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A narrow HorNet (the same code as hornet_tiny_7x7): fast enough to train for a few steps.
SMALL = json.dumps({"depths": [1, 1, 2, 1], "base_dim": 8})
ARGS = ["--model", "hornet_tiny_7x7", "--config", SMALL, "--steps", "5", "--batch", "4", "--size", "32",
        "--lr", "0.2"]


def _train(tmp_path, tag: str, nproc: int, *extra: str) -> dict:
    out = tmp_path / f"{tag}.json"
    if nproc == 1:
        cmd = [sys.executable, "-m", "tokenmix.models.train", *ARGS, *extra, "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tokenmix.models.train", *ARGS, *extra, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"), "single", 1)


def _fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_like_one(mode, single, tmp_path):
    if mode == "fsdp" and not _fsdp_available():
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard")
    res = _train(tmp_path, mode, 2, *(["--fsdp"] if mode == "fsdp" else []))
    assert res["world_size"] == 2 and res["mode"] == mode
    assert res["param_spread"] == 0.0  # every rank holds the same parameters
    losses, ref = res["losses"], single["losses"]
    assert len(losses) == len(ref) == 5
    assert losses[-1] < losses[0]  # it trains
    for got, want in zip(losses, ref):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (losses, ref)
    assert res["param_sumsq"] == pytest.approx(single["param_sumsq"], rel=1e-4)
