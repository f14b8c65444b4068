"""Contract tests for the split architectures: every registered arch, every valid split, preflight."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeveil.training import archs
from edgeveil.training.archs import PreflightError

BATCH, NUM_CLASSES = 4, 10
ARCH_NAMES = list(archs.ARCHS)


def _inputs(name: str) -> list[tuple[int, int]]:
    """(in_channels, image_size) each arch is tested on."""
    return [(1, 28), (1, 8), (3, 32)] if name == "smallcnn" else [(3, 32)]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


CASES = [(name, c, size, split)
         for name in ARCH_NAMES for c, size in _inputs(name) for split in archs.valid_splits(name)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- registry ----------------------------------------------------------------------------------

def test_registry_lists_every_arch_with_a_description():
    listed = dict(archs.names())
    assert list(listed) == ARCH_NAMES
    assert {"smallcnn", "resnet18", "mobilenetv2", "vgg11_bn"} <= set(listed)
    assert all(isinstance(d, str) and d.strip() for d in listed.values())


def test_register_refuses_a_duplicate_and_a_malformed_target():
    with pytest.raises(ValueError, match="already registered"):
        archs.register("smallcnn", "edgeveil.training.archs.smallcnn:build")
    with pytest.raises(ValueError, match="module:builder"):
        archs.register("brand_new_arch", "no_colon_here")
    assert "brand_new_arch" not in archs.ARCHS


def test_register_then_create_uses_the_new_arch(monkeypatch):
    monkeypatch.setitem(archs.ARCHS, "smallcnn_copy", archs.ARCHS["smallcnn"])
    model = archs.create("smallcnn_copy", in_channels=1, image_size=28, num_classes=3, width="tiny")
    assert model.feature_shape == archs.create(
        "smallcnn", in_channels=1, image_size=28, num_classes=3, width="tiny").feature_shape


def test_unknown_arch_names_the_field_and_the_known_names():
    with pytest.raises(ValueError, match=r"model\.arch .*smallcnn.*'resnet99'"):
        archs.create("resnet99", in_channels=3, image_size=32, num_classes=10)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_default_split_is_valid_and_used(name):
    split = archs.default_split(name)
    assert split in archs.valid_splits(name)
    c, size = _inputs(name)[-1]
    assert archs.create(name, in_channels=c, image_size=size, num_classes=NUM_CLASSES,
                        width="tiny").split == split


# ---- shapes, splits, gradients -----------------------------------------------------------------

@pytest.mark.parametrize("name,in_channels,image_size,split", CASES)
def test_every_split_gives_consistent_shapes(name, in_channels, image_size, split):
    model = archs.create(name, in_channels=in_channels, image_size=image_size,
                         num_classes=NUM_CLASSES, split=split, width="tiny")
    x = torch.randn(BATCH, in_channels, image_size, image_size)
    z = model.head(x)
    assert z.shape == (BATCH, *model.feature_shape)
    assert model.split == split
    assert model.tail(z).shape == (BATCH, NUM_CLASSES)
    model.head.eval()
    model.tail.eval()
    with torch.no_grad():
        assert model.tail(model.head(x[:1])).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_gradients_reach_the_first_head_conv(name):
    c, size = _inputs(name)[-1]
    model = archs.create(name, in_channels=c, image_size=size, num_classes=NUM_CLASSES, width="tiny")
    x = torch.randn(BATCH, c, size, size)
    model.tail(model.head(x)).sum().backward()
    grad = _first_conv(model.head).weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_reference_feature_shapes():
    """The shapes research/ and the prototype use at full width."""
    expected = {("smallcnn", 1, 28): (32, 14, 14), ("resnet18", 3, 32): (64, 32, 32),
                ("mobilenetv2", 3, 32): (24, 32, 32), ("vgg11_bn", 3, 32): (8, 8, 8)}
    for (name, c, size), shape in expected.items():
        model = archs.create(name, in_channels=c, image_size=size, num_classes=NUM_CLASSES)
        assert model.feature_shape == shape, name
    stem_only = archs.create("resnet18", in_channels=3, image_size=32, num_classes=10, split=0)
    assert stem_only.feature_shape == (64, 32, 32)
    assert len(list(stem_only.head.children())) == 1


def test_vgg_bottleneck_option_and_sigmoid_output():
    model = archs.create("vgg11_bn", in_channels=3, image_size=32, num_classes=10,
                         width="tiny", bottleneck=4)
    z = model.head(torch.randn(BATCH, 3, 32, 32))
    assert model.feature_shape == (4, 8, 8)
    assert z.min() >= 0 and z.max() <= 1
    plain = archs.create("vgg11_bn", in_channels=3, image_size=32, num_classes=10,
                         width="tiny", bottleneck=0)
    assert plain.feature_shape == (16, 8, 8)
    with pytest.raises(ValueError, match="bottleneck"):
        archs.create("vgg11_bn", in_channels=3, image_size=32, num_classes=10, bottleneck=-1)
    with pytest.raises(ValueError, match="unknown_option|not known"):
        archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10, unknown_option=1)


def test_full_width_smallcnn_runs_on_8x8_and_28x28():
    for size, shape in ((28, (32, 14, 14)), (8, (32, 4, 4))):
        model = archs.create("smallcnn", in_channels=1, image_size=size, num_classes=10)
        x = torch.randn(BATCH, 1, size, size)
        assert model.head(x).shape == (BATCH, *shape)
        assert model.tail(model.head(x)).shape == (BATCH, 10)


@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("image_size", [8, 16])
def test_small_grayscale_inputs_work_at_the_default_split(name, image_size):
    model = archs.create(name, in_channels=1, image_size=image_size, num_classes=3, width="tiny")
    x = torch.randn(BATCH, 1, image_size, image_size)
    assert model.tail(model.head(x)).shape == (BATCH, 3)
    assert archs.preflight(model.head, (1, image_size, image_size)) == []


def test_vgg_leaves_out_pools_that_do_not_fit():
    for size, shape in ((64, (8, 16, 16)), (16, (8, 4, 4)), (8, (8, 2, 2))):
        model = archs.create("vgg11_bn", in_channels=3, image_size=size, num_classes=10, width="tiny")
        assert model.feature_shape == shape
    deep = archs.create("vgg11_bn", in_channels=3, image_size=8, num_classes=10, split=12, width="tiny")
    assert deep.feature_shape == (8, 1, 1)
    pools = [m for m in deep.head.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3


def test_creating_does_not_touch_batchnorm_statistics():
    model = archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10)
    bn = next(m for m in model.head.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 0 and model.head.training
    archs.preflight(model.head, (1, 28, 28))
    assert int(bn.num_batches_tracked) == 0 and model.head.training


# ---- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCH_NAMES)
def test_invalid_split_names_the_field_and_range(name):
    splits = archs.valid_splits(name)
    c, size = _inputs(name)[-1]
    for bad in (splits.stop, splits.start - 1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"model\.split must be {splits.start}\.\.{splits.stop - 1} "
                                             rf"for {name}, got"):
            archs.create(name, in_channels=c, image_size=size, num_classes=10, split=bad)


@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("bad", ["huge", 0, -1.0, float("nan"), 100.0, True, None])
def test_invalid_width_names_the_field_value_and_choices(name, bad):
    c, size = _inputs(name)[-1]
    with pytest.raises(ValueError, match=r"model\.width must be 'full', 'tiny' or a number .*got"):
        archs.create(name, in_channels=c, image_size=size, num_classes=10, width=bad)


def test_invalid_inputs_are_reported_together():
    with pytest.raises(ValueError) as info:
        archs.create("smallcnn", in_channels=4, image_size=64, num_classes=1)
    message = str(info.value)
    assert "in_channels must be 1 or 3 for smallcnn, got 4" in message
    assert "image_size must be 8..32 for smallcnn, got 64" in message
    assert "num_classes" in message


def test_float_width_scales_the_channels():
    half = archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10, width=0.5)
    double = archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10, width=2)
    assert half.feature_shape == (16, 14, 14) and double.feature_shape == (64, 14, 14)


# ---- parameter counts --------------------------------------------------------------------------

def test_smallcnn_full_head_is_tiny():
    model = archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10)
    assert _params(model.head) < 10_000


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_tiny_is_much_smaller_than_full(name):
    c, size = _inputs(name)[-1]
    full = archs.create(name, in_channels=c, image_size=size, num_classes=NUM_CLASSES)
    tiny = archs.create(name, in_channels=c, image_size=size, num_classes=NUM_CLASSES, width="tiny")
    assert _params(tiny.head) * 4 < _params(full.head)
    assert _params(tiny.tail) * 8 < _params(full.tail)
    assert type(tiny.head) is type(full.head)
    assert [n for n, _ in tiny.head.named_modules()] == [n for n, _ in full.head.named_modules()]


# ---- preflight ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,in_channels,image_size,split", CASES)
def test_preflight_passes_every_registered_head(name, in_channels, image_size, split):
    model = archs.create(name, in_channels=in_channels, image_size=image_size,
                         num_classes=NUM_CLASSES, split=split, width="tiny")
    assert archs.preflight(model.head, (in_channels, image_size, image_size)) == []
    archs.check(model.head, (in_channels, image_size, image_size))


class _Block(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x)) + x


def _bad_head() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Sequential(
        _Block(nn.ReLU()), _Block(nn.GELU()), _Block(nn.SiLU()), _Block(nn.Hardswish()),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")))


@pytest.mark.parametrize("path,kind", [("head.2.1.act", "GELU"), ("head.2.2.act", "SiLU"),
                                       ("head.2.3.act", "Hardswish"), ("head.2.4", "Conv2d")])
def test_preflight_names_the_offending_layer(path, kind):
    problems = archs.preflight(_bad_head(), (3, 16, 16))
    assert any(p.startswith(f"{path}: {kind} ") for p in problems), problems
    assert any("padding_mode='reflect'" in p for p in problems)
    assert not any(p.startswith("head.2.0.") for p in problems)


def test_check_raises_listing_every_problem():
    with pytest.raises(PreflightError) as info:
        archs.check(_bad_head(), (3, 16, 16))
    assert isinstance(info.value, ValueError)
    assert len(info.value.problems) == 4
    for path in ("head.2.1.act", "head.2.2.act", "head.2.3.act", "head.2.4"):
        assert f"{path}: " in str(info.value)


def test_preflight_checks_functions_pools_and_tracing():
    class Functional(nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x).mean(dim=1, keepdim=True) + x.mean((2, 3), keepdim=True)

    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    problems = archs.preflight(Functional(), (3, 8, 8))
    assert [p.split(":")[0] for p in problems] == ["head.gelu", "head.mean"]
    pools = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d(3), nn.AdaptiveAvgPool2d(1))
    assert [p.split(":")[0] for p in archs.preflight(pools, (3, 9, 9))] == ["head.0", "head.1"]
    traced = archs.preflight(DataDependent(), (3, 8, 8))
    assert len(traced) == 1 and "torch.fx cannot trace DataDependent" in traced[0]
    wrong_input = archs.preflight(nn.Conv2d(1, 4, 3), (3, 8, 8))
    assert len(wrong_input) == 1 and "fails on a (1, 3, 8, 8) input" in wrong_input[0]
    with pytest.raises(ValueError, match="input_shape"):
        archs.preflight(nn.Identity(), (8, 8))


# ---- export friendliness -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCH_NAMES)
def test_head_and_tail_export_as_static_graphs(name):
    """torch.export is what torch.onnx uses: no data-dependent control flow in head or tail."""
    c, size = _inputs(name)[-1]
    model = archs.create(name, in_channels=c, image_size=size, num_classes=NUM_CLASSES, width="tiny")
    model.head.eval()
    model.tail.eval()
    x = torch.randn(2, c, size, size)
    with torch.no_grad():
        z = model.head(x)
        exported_head = torch.export.export(model.head, (x,))
        exported_tail = torch.export.export(model.tail, (z,))
        assert torch.allclose(exported_head.module()(x), z, atol=1e-5)
        assert torch.allclose(exported_tail.module()(z), model.tail(z), atol=1e-5)
