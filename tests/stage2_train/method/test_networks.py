"""The DINO-Mix student networks: VNet shapes and structure, dropout, heads, projector, EMA teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stage2_train.method.ema import EmaTeacher
from stage2_train.method.networks import (
    DinoMixStudent,
    Projector,
    StudentOutput,
    VNet,
    count_parameters,
)

NUM_CLASSES = 14


def _batch(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _model(seed: int = 0, **kwargs) -> VNet:
    torch.manual_seed(seed)
    return VNet(**{"num_classes": NUM_CLASSES, "width": 4, **kwargs})


# --------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    ("shape", "train"),
    [((2, 1, 32, 64, 64), True), ((1, 1, 16, 32, 48), False), ((2, 1, 48, 16, 32), True)],
)
def test_output_shapes(shape, train):
    model = _model().train(train)
    out = model(_batch(shape))
    b, _, d, h, w = shape
    assert isinstance(out, StudentOutput)
    assert out.logits.shape == (b, NUM_CLASSES, d, h, w)
    assert out.aux_logits.shape == (b, NUM_CLASSES, d, h, w)
    assert out.deep.shape == (b, 16 * 4, d // 16, h // 16, w // 16)
    assert out.projected is None


def test_deep_map_of_a_training_crop_is_4x8x8():
    # The paper's 64×128×128 crop: x5 at stride 16 is 4×8×8 (width 2 keeps this fast on a CPU).
    model = _model(width=2).eval()
    with torch.no_grad():
        out = model(_batch((1, 1, 64, 128, 128)))
    assert out.deep.shape == (1, 32, 4, 8, 8)
    assert out.logits.shape == (1, NUM_CLASSES, 64, 128, 128)


@pytest.mark.parametrize("shape", [(1, 1, 24, 64, 64), (1, 1, 32, 64, 40), (1, 1, 0, 32, 32), (1, 1, 8, 32, 32)])
def test_sides_not_multiple_of_16_raise(shape):
    with pytest.raises(ValueError, match="multiple of 16"):
        _model().eval()(torch.zeros(shape))


def test_wrong_rank_or_channels_raise():
    model = _model().eval()
    with pytest.raises(ValueError, match="5-D"):
        model(torch.zeros(1, 32, 32, 32))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.zeros(1, 2, 32, 32, 32))


# ------------------------------------------------------------------------------------ parameter count
def _conv(c_in: int, c_out: int, k: int) -> int:
    """Conv3d / ConvTranspose3d with bias: k³·c_in·c_out weights + c_out biases."""
    return k**3 * c_in * c_out + c_out


def _conv_bn(c_in: int, c_out: int, k: int) -> int:
    return _conv(c_in, c_out, k) + 2 * c_out  # BatchNorm3d: weight and bias


def _vnet_parameters(in_channels: int, num_classes: int, w: int, heads: int) -> int:
    """Analytic count for the DHC VNet as described in docs/protocol.md ("The VNet")."""
    enc = _conv_bn(in_channels, w, 3)  # block one: 1 conv
    enc += _conv_bn(w, 2 * w, 2) + 2 * _conv_bn(2 * w, 2 * w, 3)
    enc += _conv_bn(2 * w, 4 * w, 2) + 3 * _conv_bn(4 * w, 4 * w, 3)
    enc += _conv_bn(4 * w, 8 * w, 2) + 3 * _conv_bn(8 * w, 8 * w, 3)
    enc += _conv_bn(8 * w, 16 * w, 2) + 3 * _conv_bn(16 * w, 16 * w, 3)
    # Additive skips: each block after an up-conv has as many input channels as the up-conv outputs.
    dec = _conv_bn(16 * w, 8 * w, 2) + 3 * _conv_bn(8 * w, 8 * w, 3)
    dec += _conv_bn(8 * w, 4 * w, 2) + 3 * _conv_bn(4 * w, 4 * w, 3)
    dec += _conv_bn(4 * w, 2 * w, 2) + 2 * _conv_bn(2 * w, 2 * w, 3)
    dec += _conv_bn(2 * w, w, 2) + 1 * _conv_bn(w, w, 3)
    return enc + dec + heads * _conv(w, num_classes, 1)


def test_parameter_count_width_32_matches_analytic_formula():
    with torch.device("meta"):  # no 150 MB allocation; shapes are all that is counted
        model = VNet(in_channels=1, num_classes=NUM_CLASSES, width=32)
        student = DinoMixStudent(NUM_CLASSES, teacher_channels=384, width=32)
    one_head = _vnet_parameters(1, NUM_CLASSES, 32, heads=1)
    assert round(one_head / 1e6, 1) == 37.8  # docs/protocol.md, "The VNet": the peers' VNet (one head)
    assert count_parameters(model) == _vnet_parameters(1, NUM_CLASSES, 32, heads=2)
    assert count_parameters(model) - one_head == _conv(32, NUM_CLASSES, 1)  # the aux head only
    assert count_parameters(student) == count_parameters(model) + _conv(512, 384, 1)


def test_parameter_count_small_width_and_trainable_only():
    model = _model(width=4)
    assert count_parameters(model) == _vnet_parameters(1, NUM_CLASSES, 4, heads=2)
    model.aux_head.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == _vnet_parameters(1, NUM_CLASSES, 4, heads=1)


# ---------------------------------------------------------------------------------------- structure
def test_skips_are_additive():
    model = _model(width=4)
    w = 4
    ups = [model.up4, model.up3, model.up2, model.up1]
    decs = [model.dec4, model.dec3, model.dec2, model.dec1]
    for up, dec, skip_channels in zip(ups, decs, (8 * w, 4 * w, 2 * w, w), strict=True):
        assert up[0].out_channels == skip_channels  # matches x4, x3, x2, x1
        assert dec[0].in_channels == skip_channels  # concatenation would need twice as many
    assert [len(d) // 3 for d in decs] == [3, 3, 2, 1]
    assert [len(e) // 3 for e in (model.enc1, model.enc2, model.enc3, model.enc4, model.enc5)] == [1, 2, 3, 3, 3]

    # The first up-conv's output has exactly x4's shape, so it can be added to it.
    seen = {}
    model.up4.register_forward_hook(lambda m, i, o: seen.__setitem__("up4", o.shape))
    model.enc4.register_forward_hook(lambda m, i, o: seen.__setitem__("x4", o.shape))
    model.eval()(_batch((1, 1, 16, 32, 32)))
    assert seen["up4"] == seen["x4"] == (1, 8 * w, 2, 4, 4)


def test_initialisation():
    model = _model(width=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # Kaiming normal, fan-in, ReLU gain: std = sqrt(2 / fan_in); for enc5's convs fan_in = 27·64.
    weight = model.enc5[0].weight
    assert weight.std().item() == pytest.approx((2 / (27 * 64)) ** 0.5, rel=0.05)


def test_heads_are_separate_parameters():
    model = _model()
    assert model.main_head.weight is not model.aux_head.weight
    assert model.main_head.weight.data_ptr() != model.aux_head.weight.data_ptr()
    main_ids = {id(p) for p in model.main_head.parameters()}
    assert main_ids.isdisjoint(id(p) for p in model.aux_head.parameters())
    assert not torch.equal(model.main_head.weight, model.aux_head.weight)

    model.eval()(_batch((1, 1, 16, 32, 32))).logits.sum().backward()
    assert model.main_head.weight.grad is not None
    assert model.aux_head.weight.grad is None  # the main loss does not reach the aux head


# ------------------------------------------------------------------------------------------ dropout
def test_dropout_only_in_training_mode():
    model = _model(dropout=True)
    x = _batch((2, 1, 16, 32, 32))
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.aux_logits, b.aux_logits)

    model.train()
    torch.manual_seed(1)
    c = model(x)
    torch.manual_seed(2)
    d = model(x)
    assert not torch.allclose(c.logits, d.logits)
    torch.manual_seed(1)
    assert torch.equal(model(x).logits, c.logits)  # same seed, same masks
    assert torch.equal(c.deep, d.deep)  # x5 is returned before dropout


def test_no_dropout_train_forward_is_deterministic():
    model = _model(dropout=False).train()
    x = _batch((2, 1, 16, 32, 32))
    torch.manual_seed(1)
    c = model(x)
    torch.manual_seed(2)
    assert torch.equal(model(x).logits, c.logits)


# ---------------------------------------------------------------------------------------- projector
@pytest.mark.parametrize("hidden", [None, 24])
def test_projector_shapes(hidden):
    projector = Projector(64, 48, hidden=hidden)
    assert projector(_batch((2, 64, 2, 4, 4))).shape == (2, 48, 2, 4, 4)
    n_layers = sum(isinstance(m, nn.Conv3d) for m in projector.modules())
    assert n_layers == (1 if hidden is None else 2)


@pytest.mark.parametrize("hidden", [None, 16])
def test_student_forward_shapes(hidden):
    torch.manual_seed(0)
    student = DinoMixStudent(NUM_CLASSES, teacher_channels=48, width=4, projector_hidden=hidden).train()
    out = student(_batch((2, 1, 32, 64, 64)))
    assert out.logits.shape == out.aux_logits.shape == (2, NUM_CLASSES, 32, 64, 64)
    assert out.deep.shape == (2, 64, 2, 4, 4)
    assert out.projected is not None and out.projected.shape == (2, 48, 2, 4, 4)


def test_invalid_sizes_raise():
    with pytest.raises(ValueError):
        VNet(width=0)
    with pytest.raises(ValueError):
        Projector(64, 0)


def test_backward_reaches_first_encoder_conv():
    torch.manual_seed(0)
    student = DinoMixStudent(NUM_CLASSES, teacher_channels=48, width=4).train()
    out = student(_batch((2, 1, 16, 32, 32)))
    (out.logits.mean() + out.projected.pow(2).mean()).backward()
    first = student.vnet.enc1[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert student.projector.net.weight.grad.abs().sum() > 0

    # The distillation term alone trains the encoder and projector but not the decoder.
    student.zero_grad(set_to_none=True)
    student(_batch((2, 1, 16, 32, 32))).projected.pow(2).mean().backward()
    assert student.vnet.enc1[0].weight.grad.abs().sum() > 0
    assert student.vnet.dec1[0].weight.grad is None


# ---------------------------------------------------------------------------------------------- EMA
def _train_step(model: nn.Module, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(_batch((2, 1, 16, 32, 32), seed=seed)).logits.mean().backward()
    opt.step()


def test_ema_update_formula_and_buffers():
    student = _model()
    ema = EmaTeacher(student)
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    _train_step(student, seed=3)

    ema.update(student, decay=0.99)
    params = dict(student.named_parameters())
    for name, p in ema.module.named_parameters():
        # Reference in float64: float32 arithmetic itself is only good to about 6e-8 relative.
        expected = 0.99 * old[name].double() + 0.01 * params[name].detach().double()
        torch.testing.assert_close(p.double(), expected, atol=1e-7, rtol=1e-7, msg=name)
        assert not p.requires_grad and p.grad is None
    student_buffers = dict(student.named_buffers())
    changed = 0
    for name, b in ema.module.named_buffers():
        assert torch.equal(b, student_buffers[name]), name
        changed += not torch.equal(b, old[name])
    assert changed > 0  # the train step did move the BN statistics
    # The copy shares no storage with the student.
    assert student.enc1[0].weight.data_ptr() != ema.module.enc1[0].weight.data_ptr()


def test_ema_stays_in_eval_and_is_deterministic():
    student = _model()
    ema_a, ema_b = EmaTeacher(student), EmaTeacher(student)
    student.train()
    assert not ema_a.module.training
    for seed in range(2):
        _train_step(student, seed=seed)
        ema_a.update(student)
        ema_b.update(student)
    for (name, a), b in zip(ema_a.state_dict().items(), ema_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = _batch((1, 1, 16, 32, 32))
    out1, out2 = ema_a(x), ema_a(x)
    assert torch.equal(out1.logits, out2.logits)  # eval mode: dropout off
    assert not out1.logits.requires_grad
    assert all(not p.requires_grad for p in ema_a.module.parameters())


def test_ema_decay_bounds_and_extremes():
    student = _model()
    ema = EmaTeacher(student)
    _train_step(student, seed=0)
    with pytest.raises(ValueError):
        ema.update(student, decay=1.5)
    ema.update(student, decay=0.0)  # decay 0 copies the student
    for a, b in zip(ema.module.parameters(), student.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="names differ"):
        ema.update(_model(width=2).aux_head)


def test_ema_state_dict_round_trip(tmp_path):
    student = DinoMixStudent(NUM_CLASSES, teacher_channels=16, width=4)
    ema = EmaTeacher(student)
    _train_step(student, seed=0)
    ema.update(student)
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)

    restored = EmaTeacher(DinoMixStudent(NUM_CLASSES, teacher_channels=16, width=4))
    restored.load_state_dict(torch.load(path, weights_only=True))
    for (name, a), b in zip(ema.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not restored.module.training
    assert all(not p.requires_grad for p in restored.module.parameters())
    x = _batch((1, 1, 16, 32, 32))
    assert torch.equal(ema(x).projected, restored(x).projected)


# ---------------------------------------------------------------------------------------- normalisation
def test_instance_normalisation_normalises_each_crop_on_its_own():
    net = _model(normalization="instance", dropout=False)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert sum(isinstance(m, nn.InstanceNorm3d) for m in net.modules()) == sum(
        isinstance(m, nn.BatchNorm3d) for m in _model(dropout=False).modules())
    a, b = _batch((1, 1, 16, 32, 32), seed=1), _batch((1, 1, 16, 32, 32), seed=2) * 3
    with torch.no_grad():
        net.train()
        together = net(torch.cat([a, b])).logits
        net.eval()
        alone = torch.cat([net(a).logits, net(b).logits])
    # no running statistics: a crop's output does not depend on its batch or on train/eval mode (up to the
    # convolutions' batch-size-dependent float32 summation order)
    torch.testing.assert_close(together, alone, rtol=0, atol=2e-3)
    assert not list(net.buffers())


def test_batch_normalisation_depends_on_the_batch_in_training_mode():
    net = _model(dropout=False)
    a, b = _batch((1, 1, 16, 32, 32), seed=1), _batch((1, 1, 16, 32, 32), seed=2) * 3
    with torch.no_grad():
        net.train()
        together = net(torch.cat([a, b])).logits[:1]
        alone = net(a).logits
    assert (together - alone).abs().max() > 1e-2


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalization 'group'"):
        VNet(normalization="group")
