"""The DS-CNN: ARM's topologies, output shapes, parameter and MAC counts."""

import subprocess
import sys

import numpy as np
import pytest

from kws.features import NUM_FRAMES, NUM_MFCC
from kws.model import Block, ModelConfig, build, count_macs


@pytest.mark.parametrize(
    "size,labels,params,macs",
    [
        # MACs as ARM's table: DS-CNN S 5.4 M ops, M 22.2 M... (2 ops per MAC; we count convs and dense only)
        ("s", 12, 24_332, 2_656_768),
        ("m", 10, 139_330, 9_816_040),
        ("l", 10, 419_254, 28_327_260),
    ],
)
def test_presets_have_arms_size(size, labels, params, macs):
    model = build(ModelConfig.preset(size), labels)
    assert model.count_params() == params
    assert count_macs(model) == macs
    out = model(np.zeros((3, NUM_FRAMES, NUM_MFCC), np.float32))
    assert out.shape == (3, labels)
    np.testing.assert_allclose(np.asarray(out).sum(axis=1), 1.0, rtol=1e-5)


def test_ds_cnn_s_layout_is_first_conv_then_four_separable_blocks():
    model = build(ModelConfig.preset("s"), 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("DepthwiseConv2D") == 4
    assert kinds.count("Conv2D") == 5  # the first 10x4 conv and four 1x1 pointwise convs
    assert kinds.count("BatchNormalization") == 9 and kinds.count("ReLU") == 9
    first = next(layer for layer in model.layers if type(layer).__name__ == "Conv2D")
    assert first.kernel_size == (10, 4) and first.strides == (2, 2) and first.filters == 64


def test_config_round_trips_through_a_dict():
    config = ModelConfig.preset("m")
    again = ModelConfig(**config.to_dict())
    assert again == config and again.blocks[0] == Block(172, (2, 2))


def test_unknown_size_is_refused():
    with pytest.raises(ValueError, match="choose s, m or l"):
        ModelConfig.preset("xl")


def test_standard_conv_twin_replaces_each_separable_pair_with_a_full_conv():
    model = build(ModelConfig(separable=False), 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert "DepthwiseConv2D" not in kinds and kinds.count("Conv2D") == 5
    assert model.count_params() == 151_946 and count_macs(model) == 18_752_640


def test_tensorflow_loads_without_its_start_up_notices():
    # A fresh interpreter: this one may have loaded TensorFlow for other tests.
    script = "from kws.model import load_keras; print(load_keras().__name__)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "keras\n", "")
