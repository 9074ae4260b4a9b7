"""Sliding-window inference and loading a run's student."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dinomix_cache.errors import UserError
from stage2_train.evaluate.inference import InferenceSettings, load_run_model, sliding_window_probabilities
from stage2_train.train.loop import train
from tests.tiny import tiny_train


class IntensityOracle(torch.nn.Module):
    """Logits that make class ``round(4 · intensity)`` certain; counts windows and records their corners."""

    def __init__(self) -> None:
        super().__init__()
        self.windows = 0

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        self.windows += x.shape[0]
        labels = torch.round(x[:, 0] * 4).long()
        return SimpleNamespace(logits=torch.nn.functional.one_hot(labels, 5).permute(0, 4, 1, 2, 3).float() * 20)


def test_windows_follow_the_peers_protocol_and_average_exactly():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (80, 160, 160))
    net = IntensityOracle()
    probs = sliding_window_probabilities(net, label / 4.0, (64, 128, 128), (16, 32, 32), 3, torch.device("cpu"))
    assert probs.shape == (5, 80, 160, 160)
    assert np.array_equal(probs.argmax(0).numpy(), label)
    assert torch.allclose(probs.sum(0), torch.ones(()))
    # ceil((L - P) / stride) + 1 windows per axis: 2 × 2 × 2
    assert net.windows == 8
    net.windows = 0
    sliding_window_probabilities(net, label / 4.0, (32, 64, 64), (16, 32, 32), 4, torch.device("cpu"))
    assert net.windows == 4 * 4 * 4
    net.windows = 0
    sliding_window_probabilities(net, label[:, :150] / 4.0, (48, 64, 64), (16, 32, 32), 4, torch.device("cpu"))
    # z: stride 16 for a 48 window (a rounded-down 15 would give 4); rows: last window clamped to the border
    assert net.windows == 3 * 4 * 4


def test_too_small_or_not_3d_is_refused():
    net = IntensityOracle()
    with pytest.raises(UserError, match="smaller than the inference window"):
        sliding_window_probabilities(net, np.zeros((40, 160, 160)), (64, 128, 128), (16, 32, 32), 1,
                                     torch.device("cpu"))
    with pytest.raises(UserError, match="D, H, W"):
        sliding_window_probabilities(net, np.zeros((160, 160)), (64, 128, 128), (16, 32, 32), 1,
                                     torch.device("cpu"))


def test_load_run_model_segments_like_the_trained_student(wide_store, tmp_path):
    store = wide_store
    settings = tiny_train(store, tmp_path / "run", epochs=2, checkpoint_every=100)
    with pytest.raises(UserError, match="not a run folder"):
        load_run_model(tmp_path / "run")
    run = train(settings, max_steps=2)
    (run / "best.pt").unlink(missing_ok=True)
    (run / "latest.pt").rename(run / "kept.pt")
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_run_model(run)
    (run / "kept.pt").rename(run / "latest.pt")
    model = load_run_model(run)  # best falls back to latest
    assert model.checkpoint == "latest" and model.step == 2 and model.num_classes == 14
    assert model.preprocess.target_shape == (32, 64, 64)
    image = np.random.default_rng(1).random((32, 64, 64), dtype=np.float32)
    labels = model.segment(image, InferenceSettings(stride=(16, 32, 32)))
    assert labels.shape == image.shape and labels.dtype == np.uint8
    with torch.inference_mode():
        logits = model.network(torch.from_numpy(image[None, None, :16, :32, :32])).logits[0]
    direct = logits.argmax(0).numpy()
    # A corner covered by one window only is that window's argmax, wherever the argmax is decided: an
    # untrained network's logits are near ties in places, which the run's precision (bf16 where the CPU
    # has it) may break either way.
    top2 = logits.topk(2, dim=0).values
    decided = ((top2[0] - top2[1]) > 0.1).numpy()
    assert decided.mean() > 0.2
    assert np.array_equal(labels[:16, :32, :32][decided], direct[decided])
