"""``torchrun`` training (DDP, gloo on CPU): rank 0 writes, ranks stay identical, resume is exact.

The runs are real ``torchrun --standalone --nproc-per-node 2`` subprocesses on a tiny store (about
12 s each on two cores). Every checkpoint of a distributed run records a sha256 of each rank's student
and EMA weights (``ranks[r]["weights_sha256"]``), which is how the tests see the other rank's weights
without any test-only hook.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.data.roles import SplitSettings
from dinomix_cache.errors import UserError
from stage1_extract.runner import run_extraction
from stage2_train.method.iteration import DinoMixIteration, TrainState
from stage2_train.sampling.iteration_sampler import IterationSampler
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.train.distributed import Distributed, rank_share, weights_sha256
from stage2_train.train.loop import open_training_store, train
from stage2_train.train.run_folder import RunFolder
from stage2_train.train.settings import TrainSettings
from tests.tiny import tiny_settings, tiny_train

TORCHRUN = Path(sys.executable).with_name("torchrun")
RUN_FILES = {"settings.json", "store.json", "log.jsonl", "latest.pt", "best.pt", "progress.png"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not TORCHRUN.exists(),
                                reason="needs torch.distributed and torchrun")


@pytest.fixture(scope="module")
def ddp_store(phantom_dir, tmp_path_factory):
    """The tiny phantom at 32x64x64 without a test split: 1 labeled, 4 unlabeled, 1 eval case, so
    that two ranks of 2 unlabeled crops each make one step an epoch."""
    out = tmp_path_factory.mktemp("ddp") / "s.zarr"
    run_extraction(tiny_settings(phantom_dir, out, preprocess=PreprocessSettings(target_shape=(32, 64, 64)),
                                 split=SplitSettings(test_fraction=0.0)))
    return out


def small_settings(store: Path) -> TrainSettings:
    return tiny_train(store, epochs=8)


def torchrun(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "dinomix_cache", "train",
           *map(str, args), "--no-progress"]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def new_run(store: Path, out: Path, steps: int) -> subprocess.CompletedProcess:
    return torchrun("--cache", store, "--out", out, "--width", "2", "--crop", "16x32x32", "--epochs", "8",
                    "--max-steps", steps, cwd=out.parent)


def test_rank_shares_split_each_iteration_and_seeds_differ():
    labeled, unlabeled = [f"l{i}" for i in range(3)], [f"u{i}" for i in range(9)]
    drawn = []
    for rank in range(2):  # what each rank draws of an epoch: the plan, then its crops
        with torch.random.fork_rng(devices=[]):  # seeded() reseeds torch's global generator per rank
            state = TrainState.seeded(5, rank=rank, world_size=2)
        plan = IterationSampler(labeled, unlabeled, 4, 4).epoch(state.rngs["plan"])
        crops = state.rngs["labeled_crops"].integers(0, 1 << 30, 4).tolist()
        with torch.random.fork_rng(devices=[]):
            again = TrainState.seeded(5, rank=rank, world_size=2)
        assert crops == again.rngs["labeled_crops"].integers(0, 1 << 30, 4).tolist()
        drawn.append((plan, crops))
    (plan0, crops0), (plan1, crops1) = drawn
    assert plan0 == plan1 and len(plan0) == 2  # 9 unlabeled // (2 ranks x 2)
    assert crops0 != crops1  # different crops and augmentations per rank, yet reproducible
    for cases in plan0:
        shares = [rank_share(cases, r, 2, 2) for r in range(2)]
        assert [len(s[0]) for s in shares] == [2, 2] and [len(s[1]) for s in shares] == [2, 2]
        assert sorted(shares[0][1] + shares[1][1]) == sorted(cases[1])  # disjoint, together the iteration
        assert shares[0][0] + shares[1][0] == cases[0]
    covered = [u for cases in plan0 for u in cases[1]]
    assert len(set(covered)) == len(covered) == 8
    assert rank_share((["a", "b"], ["c", "d"]), 0, 2, 2) == (["a", "b"], ["c", "d"])  # one process: everything


def test_torchrun_trains_resumes_exactly_and_rank0_writes(ddp_store, tmp_path):
    run = tmp_path / "run"
    new_run(ddp_store, run, 4)
    assert {p.name for p in run.iterdir()} == RUN_FILES  # no per-rank or temporary files
    records = RunFolder(run).records()
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]  # one record a step, not a rank
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1, 2, 3]  # one step an epoch at N=2
    assert all(np.isfinite(r["total"]) and "distill" in r for r in records if r["kind"] == "step")

    ckpt = RunFolder(run).load_checkpoint("latest")
    assert ckpt["world_size"] == 2 and ckpt["state"]["step"] == 4
    ranks = ckpt["ranks"]
    assert len(ranks) == 2
    saved = weights_sha256(ckpt["networks"])
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] == saved  # student AND EMA equal on both
    assert ranks[0]["rngs"]["labeled_crops"] != ranks[1]["rngs"]["labeled_crops"]  # each rank drew its own crops
    assert ranks[0]["rngs"]["plan"] == ranks[1]["rngs"]["plan"]  # and the same plans
    assert not torch.equal(ranks[0]["gens"]["gamma"], ranks[1]["gens"]["gamma"])

    # 4 steps + resume for 2 more = 6 steps straight, bit for bit (every rank's generators restored).
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    torchrun("--resume", resumed, "--max-steps", "6", cwd=tmp_path)
    straight = tmp_path / "straight"
    new_run(ddp_store, straight, 6)
    a, b = RunFolder(resumed).load_checkpoint("latest"), RunFolder(straight).load_checkpoint("latest")
    assert b["state"]["step"] == a["state"]["step"] == 6
    assert weights_sha256(a["networks"]) == weights_sha256(b["networks"])
    assert a["ranks"][1]["weights_sha256"] == weights_sha256(a["networks"])
    assert [r["step"] for r in RunFolder(resumed).records() if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert {p.name for p in resumed.iterdir()} == RUN_FILES

    # A single process must not continue a 2-process run: the cases and draws per rank would change.
    with pytest.raises(UserError, match="trained by 2 process.*torchrun --nproc-per-node 2"):
        train(None, resume=run, max_steps=5)
    assert RunFolder(run).load_checkpoint("latest")["state"]["step"] == 4


def test_too_few_cases_for_the_processes(ddp_store):
    """The tiny store has 4 unlabeled cases: 3 ranks would need 6 a step (refused before any collective)."""
    store = open_training_store(small_settings(ddp_store))
    volumes = VolumeCache(store, store.complete_cases(), with_labels=True)
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match=r"4 unlabeled case\(s\) are too few for 3 processes .*run fewer processes"):
        DinoMixIteration(small_settings(ddp_store), store, volumes, None, cpu, Distributed(0, 3, 0, cpu))


def test_unused_heads_are_frozen_not_searched(ddp_store, tmp_path):
    """Without distillation and aux losses the projector and aux head get no gradient; DDP without
    find_unused_parameters would stop at step 2 ("Expected to have finished reduction") unless frozen."""
    out = tmp_path / "ablation"
    torchrun("--cache", ddp_store, "--out", out, "--width", "2", "--crop", "16x32x32", "--max-steps", "2",
             "--no-fkd", "--no-aux", cwd=tmp_path)
    steps = [r for r in RunFolder(out).records() if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2] and not any("distill" in r or "sup_aux" in r for r in steps)
    ranks = RunFolder(out).load_checkpoint("latest")["ranks"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
