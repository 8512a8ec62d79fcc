"""The DS-CNN: depthwise-separable CNN of ARM's ML-KWS-for-MCU, in sizes S, M and L."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kws.features import NUM_FRAMES, NUM_MFCC


@dataclass
class Block:
    """One depthwise-separable block: 3x3 depthwise conv, then a 1x1 conv to ``filters``."""

    filters: int
    stride: tuple[int, int] = (1, 1)

    def __post_init__(self):
        self.stride = tuple(self.stride)


@dataclass
class ModelConfig:
    """A DS-CNN topology; ``ModelConfig.preset("s")`` is ARM's DS-CNN-S."""

    size: str = "s"
    first_filters: int = 64
    first_kernel: tuple[int, int] = (10, 4)
    first_stride: tuple[int, int] = (2, 2)
    blocks: list[Block] = field(default_factory=lambda: [Block(64) for _ in range(4)])
    dropout: float = 0.2  # after the first conv, as MLPerf Tiny's reference
    final_dropout: float = 0.4  # before pooling
    # BatchNorm's moving averages trail the weights by ~1/(1 - momentum) steps. Keras' 0.99
    # left validation at chance for the first 3 epochs (90 steps each); 0.9 tracks within one.
    batchnorm_momentum: float = 0.9
    # False swaps each depthwise + pointwise pair for one full 3x3 convolution: the standard
    # CNN of the same layout, which bench/architectures.py compares against.
    separable: bool = True

    def __post_init__(self):
        self.first_kernel = tuple(self.first_kernel)
        self.first_stride = tuple(self.first_stride)
        self.blocks = [b if isinstance(b, Block) else Block(**b) for b in self.blocks]

    @classmethod
    def preset(cls, size: str) -> ModelConfig:
        size = size.lower()
        if size == "s":
            return cls()
        if size == "m":
            return cls("m", 172, (10, 4), (2, 1), [Block(172, (2, 2))] + [Block(172)] * 3)
        if size == "l":
            return cls("l", 276, (10, 4), (2, 1), [Block(276, (2, 2))] + [Block(276)] * 4)
        raise ValueError(f"unknown model size {size!r}: choose s, m or l")

    def to_dict(self) -> dict:
        return asdict(self)


def load_keras():
    """The keras module, TensorFlow loaded without its C++ start-up notices (oneDNN, no CUDA
    drivers, CPU features): TF_CPP_MIN_LOG_LEVEL does not reach them, and they say nothing a
    user can act on. Called where a command first needs TensorFlow; an import that fails shows
    what it printed."""
    import sys

    from kws.runtime import quiet_stderr

    if "keras" in sys.modules:
        return sys.modules["keras"]
    failure = None
    with quiet_stderr() as log:
        try:
            import keras
        except Exception as error:
            failure = error
            log.seek(0)
            printed = log.read().decode(errors="replace")
    if failure is not None:
        sys.stderr.write(printed)
        raise failure
    return keras


def build(config: ModelConfig, num_labels: int):
    """Keras DS-CNN (or its standard-conv twin): (NUM_FRAMES, NUM_MFCC) features -> softmax."""
    import keras
    from keras import layers

    def batch_norm():
        return layers.BatchNormalization(momentum=config.batchnorm_momentum)

    inputs = keras.Input(shape=(NUM_FRAMES, NUM_MFCC), name="mfcc")
    x = layers.Reshape((NUM_FRAMES, NUM_MFCC, 1))(inputs)
    x = layers.Conv2D(
        config.first_filters,
        config.first_kernel,
        strides=config.first_stride,
        padding="same",
        use_bias=False,
    )(x)
    x = batch_norm()(x)
    x = layers.ReLU()(x)
    x = layers.Dropout(config.dropout)(x)
    for block in config.blocks:
        if config.separable:
            x = layers.DepthwiseConv2D(3, strides=block.stride, padding="same", use_bias=False)(x)
            x = batch_norm()(x)
            x = layers.ReLU()(x)
            x = layers.Conv2D(block.filters, 1, use_bias=False)(x)
        else:
            x = layers.Conv2D(block.filters, 3, strides=block.stride, padding="same", use_bias=False)(x)
        x = batch_norm()(x)
        x = layers.ReLU()(x)
    x = layers.Dropout(config.final_dropout)(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_labels, activation="softmax", name="scores")(x)
    return keras.Model(inputs, outputs, name=f"{'ds_' if config.separable else ''}cnn_{config.size}")


def count_macs(model) -> int:
    """Multiply-accumulates of one inference (convolutions and dense layers; BatchNorm folds away)."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)):
            _, out_h, out_w, out_c = layer.output.shape
            kh, kw = layer.kernel_size
            if isinstance(layer, layers.DepthwiseConv2D):
                total += out_h * out_w * kh * kw * out_c
            else:
                total += out_h * out_w * kh * kw * layer.input.shape[-1] * out_c
        elif isinstance(layer, layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return int(total)
