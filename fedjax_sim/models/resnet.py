"""A small ResNet with GroupNorm for CIFAR-sized inputs.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the CIFAR ResNet
family: a 3x3 stem and three stages of 16 / 32 / 64 channels). Batch normalization is
replaced by group normalization (Wu & He, ECCV 2018), as Hsieh et al. ("The Non-IID Data
Quagmire of Decentralized Machine Learning", ICML 2020) recommend for non-IID federated
training: it holds no running statistics, so the model is a pure function of its
parameters. With one basic block per stage this is ResNet-8.

:func:`resnet_bn` is the same network with batch normalization in the paper's (and
PyTorch's) placement, for FedBN (Li et al., ICLR 2021) and the other algorithms that train
batch-normalized models.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.models.base import Model
from fedjax_sim.models.cnn import BN_EPSILON, BN_MOMENTUM
from fedjax_sim.models.layers import (
    DEFAULT_INIT,
    Conv,
    avg_pool_2x2,
    batch_norm,
    check_init,
    check_model_args,
    dense,
    linen_bn_model,
    linen_model,
    resolve_conv_impl,
)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and an identity (or 1x1 projection) shortcut.

    Attributes:
      features: output channels.
      conv_impl: ``"xla"``, ``"im2col"`` or ``"winograd"``.
      groups: GroupNorm groups; must divide ``features``.
      param_init: convolution initialization scheme, ``"flax"`` or ``"torch"``.
    """

    features: int
    conv_impl: str = "xla"
    groups: int = 4
    param_init: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block.

        Args:
          x: (B, H, W, Cin).

        Returns:
          (B, H, W, features).
        """
        y = Conv(self.features, (3, 3), impl=self.conv_impl, use_bias=False,
                 param_init=self.param_init, name="conv1")(x)
        y = nn.relu(nn.GroupNorm(num_groups=self.groups, name="norm1")(y))
        y = Conv(self.features, (3, 3), impl=self.conv_impl, use_bias=False,
                 param_init=self.param_init, name="conv2")(y)
        y = nn.GroupNorm(num_groups=self.groups, name="norm2")(y)
        if x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), impl=self.conv_impl, use_bias=False,
                     param_init=self.param_init, name="proj")(x)
            x = nn.GroupNorm(num_groups=self.groups, name="proj_norm")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """stem -> stage1 -> (pool, stage2) -> (pool, stage3) -> ... -> global mean -> head.

    Downsampling is a 2x2 average pool in front of every stage but the first; it keeps
    every convolution stride 1, so the im2col path applies throughout.

    Attributes:
      num_classes: number of logits.
      stages: channels of each stage.
      blocks_per_stage: basic blocks in each stage.
      conv_impl: ``"xla"``, ``"im2col"`` or ``"winograd"``.
      groups: GroupNorm groups.
      param_init: parameter initialization scheme, ``"flax"`` or ``"torch"``; GroupNorm
        starts at scale 1, bias 0 under both.
    """

    num_classes: int
    stages: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 1
    conv_impl: str = "xla"
    groups: int = 4
    param_init: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Computes logits.

        Args:
          x: (B, H, W, C).

        Returns:
          (B, num_classes) logits.
        """
        x = jnp.asarray(x, jnp.float32)
        x = Conv(self.stages[0], (3, 3), impl=self.conv_impl, use_bias=False,
                 param_init=self.param_init, name="stem")(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups, name="stem_norm")(x))
        for s, features in enumerate(self.stages):
            if s > 0:
                x = avg_pool_2x2(x)
            for b in range(self.blocks_per_stage):
                block = BasicBlock(
                    features,
                    conv_impl=self.conv_impl,
                    groups=self.groups,
                    param_init=self.param_init,
                    name=f"stage{s + 1}_block{b + 1}",
                )
                x = block(x)
        x = x.mean(axis=(1, 2))
        return dense(self.num_classes, x.shape[-1], init=self.param_init, name="head")(x)


def resnet(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    conv_impl: str = "auto",
    stages: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    groups: int = 4,
    init: str = DEFAULT_INIT,
) -> Model:
    """A CIFAR-style ResNet with GroupNorm; ResNet-8 by default.

    Meant for 32x32x3 and fine on 28x28x1 or 8x8x1: the input needs at least
    ``2 ** (len(stages) - 1)`` pixels a side (4 for three stages).

    Args:
      input_shape: (H, W, C).
      num_classes: number of logits, at least 2.
      conv_impl: ``"auto"``, ``"xla"``, ``"im2col"`` or ``"winograd"``, resolved once here.
      stages: channels of each stage; each must be divisible by ``groups``.
      blocks_per_stage: basic blocks per stage (1: ResNet-8, 3: ResNet-20).
      groups: GroupNorm groups.
      init: parameter initialization, ``"flax"`` (LeCun normal, zero biases) or
        ``"torch"`` (PyTorch's nn.Conv2d / nn.Linear defaults); GroupNorm scale 1, bias 0.

    Returns:
      The model; top-level parameters ``stem``, ``stem_norm``, ``stage{s}_block{b}`` and
      ``head``.

    Raises:
      ValueError: on a bad shape, a too small input, channels not divisible by groups, or
        an unknown ``init``.
    """
    shape, stages = _check_resnet_args(input_shape, num_classes, stages, blocks_per_stage,
                                       model="resnet")
    if any(c % groups for c in stages):
        raise ValueError(f"resnet: stage channels {stages} must be divisible by groups={groups}")
    module = ResNet(
        num_classes=int(num_classes),
        stages=stages,
        blocks_per_stage=int(blocks_per_stage),
        conv_impl=resolve_conv_impl(conv_impl),
        groups=int(groups),
        param_init=check_init(init),
    )
    return linen_model(module, name="resnet", input_shape=shape, num_classes=int(num_classes))


def _check_resnet_args(
    input_shape: Sequence[int], num_classes: int, stages: Sequence[int],
    blocks_per_stage: int, *, model: str,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The checks :func:`resnet` and :func:`resnet_bn` share.

    Returns:
      ``input_shape`` and ``stages`` as tuples of ints.

    Raises:
      ValueError: on a bad shape or class count, no stage or block, or an input smaller
        than ``2 ** (len(stages) - 1)`` pixels a side.
    """
    shape = check_model_args(input_shape, num_classes, model=model, rank=3)
    stages = tuple(int(c) for c in stages)
    if not stages or blocks_per_stage < 1:
        raise ValueError(f"{model}: needs at least one stage and one block per stage")
    min_side = 2 ** (len(stages) - 1)
    if min(shape[:2]) < min_side:
        raise ValueError(f"{model}: input_shape {shape} needs H, W >= {min_side}")
    return shape, stages


# The stem's BN layer in :class:`ResNetBN`.
_STEM_BN = "stem_bn"


def _bn_blocks(stages: tuple[int, ...], blocks_per_stage: int):
    """The basic blocks of :class:`ResNetBN` in forward order, as (name, features,
    downsample, project): ``downsample`` where a 2x2 pool comes first (the first block of
    every stage but the first), ``project`` where the channels change and the shortcut
    needs a 1x1 convolution. One source for the module and for the factory's list of BN
    layers, so the two cannot disagree."""
    channels = stages[0]  # the stem's output
    for s, features in enumerate(stages):
        for b in range(blocks_per_stage):
            yield (f"stage{s + 1}_block{b + 1}", features, s > 0 and b == 0,
                   channels != features)
            channels = features


def _bn_block_norms(name: str, project: bool) -> tuple[str, ...]:
    """The BN layers of one basic block of :class:`ResNetBN`, in forward order (bn1, bn2
    and, where the shortcut projects, proj_bn)."""
    return (f"{name}_bn1", f"{name}_bn2") + ((f"{name}_proj_bn",) if project else ())


class ResNetBN(nn.Module):
    """:class:`ResNet` with batch normalization in place of every GroupNorm.

    PyTorch's placement (torchvision's BasicBlock): conv -> BN -> ReLU, conv -> BN, the
    shortcut's 1x1 projection conv -> BN, then the sum's ReLU. Every layer is a top-level
    parameter entry (``stage{s}_block{b}_conv1``, ``..._bn1``, ...) rather than part of a
    block submodule: FedBN keeps top-level entries on the clients, so each BN layer must
    be one.

    Attributes:
      as :class:`ResNet` but ``groups``, and
      momentum: weight of the old running statistics in their moving average.
      epsilon: added to the variance.
    """

    num_classes: int
    stages: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 1
    conv_impl: str = "xla"
    param_init: str = DEFAULT_INIT
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 mask: jax.Array | None = None) -> jax.Array:
        """Computes logits.

        Args:
          x: (B, H, W, C).
          train: normalize with the batch's statistics over the rows where ``mask``
            holds (and update the running ones) rather than with the running ones.
          mask: (B,) bool, the rows that count for the batch statistics.

        Returns:
          (B, num_classes) logits.
        """

        def conv_bn(h, features, kernel, conv_name, bn_name):
            # Bias-free, as BN's shift follows.
            h = Conv(features, kernel, impl=self.conv_impl, use_bias=False,
                     param_init=self.param_init, name=conv_name)(h)
            return batch_norm(h, train=train, mask=mask, momentum=self.momentum,
                              epsilon=self.epsilon, name=bn_name)

        x = jnp.asarray(x, jnp.float32)
        x = nn.relu(conv_bn(x, self.stages[0], (3, 3), "stem", _STEM_BN))
        for name, features, downsample, project in _bn_blocks(self.stages,
                                                               self.blocks_per_stage):
            if downsample:
                x = avg_pool_2x2(x)
            bn1, bn2, *proj_bn = _bn_block_norms(name, project)
            y = nn.relu(conv_bn(x, features, (3, 3), f"{name}_conv1", bn1))
            y = conv_bn(y, features, (3, 3), f"{name}_conv2", bn2)
            if project:
                x = conv_bn(x, features, (1, 1), f"{name}_proj", *proj_bn)
            x = nn.relu(x + y)
        x = x.mean(axis=(1, 2))
        return dense(self.num_classes, x.shape[-1], init=self.param_init, name="head")(x)


def resnet_bn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    conv_impl: str = "auto",
    stages: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    init: str = DEFAULT_INIT,
    momentum: float = BN_MOMENTUM,
) -> Model:
    """:func:`resnet` with batch normalization; ResNet-8 by default.

    The running statistics are parameters like any other leaf, under
    ``params["batch_stats"]`` (one ``{"mean", "var"}`` per BN layer), as in
    :func:`~fedjax_sim.models.cnn.cnn_bn`: ``Model.apply`` normalizes with them
    (evaluation), ``Model.train`` with the batch's statistics over its real rows.

    Args:
      input_shape, num_classes, conv_impl, stages, blocks_per_stage: as in :func:`resnet`.
      init: as in :func:`resnet`; BN scale 1, bias 0 under both.
      momentum: weight of the old running statistics, in [0, 1) (0.9 is PyTorch's
        ``momentum=0.1``).

    Returns:
      The model; top-level parameters ``stem``, ``stem_bn``, then for each block
      ``stage{s}_block{b}_conv1``, ``_bn1``, ``_conv2``, ``_bn2`` (and ``_proj``,
      ``_proj_bn`` where the channels change), ``head`` and ``batch_stats``;
      ``norm_layers`` the BN layers (``stem_bn`` and each block's), in forward order.

    Raises:
      ValueError: as :func:`resnet`, an unknown ``init``, or a momentum outside [0, 1).
    """
    shape, stages = _check_resnet_args(input_shape, num_classes, stages, blocks_per_stage,
                                       model="resnet_bn")
    if not 0 <= momentum < 1:
        raise ValueError(f"resnet_bn: momentum must be in [0, 1), got {momentum!r}")
    blocks_per_stage = int(blocks_per_stage)
    module = ResNetBN(
        num_classes=int(num_classes),
        stages=stages,
        blocks_per_stage=blocks_per_stage,
        conv_impl=resolve_conv_impl(conv_impl),
        param_init=check_init(init),
        momentum=float(momentum),
    )
    block_norms = (norm for name, _, _, project in _bn_blocks(stages, blocks_per_stage)
                   for norm in _bn_block_norms(name, project))
    norm_layers = (_STEM_BN, *block_norms)
    return linen_bn_model(module, name="resnet_bn", input_shape=shape,
                          num_classes=int(num_classes), norm_layers=norm_layers)
