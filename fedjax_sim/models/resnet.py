"""A small ResNet with GroupNorm for CIFAR-sized inputs.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the CIFAR ResNet
family: a 3x3 stem and three stages of 16 / 32 / 64 channels). Batch normalization is
replaced by group normalization (Wu & He, ECCV 2018), as Hsieh et al. ("The Non-IID Data
Quagmire of Decentralized Machine Learning", ICML 2020) recommend for non-IID federated
training: it holds no running statistics, so the model is a pure function of its
parameters. With one basic block per stage this is ResNet-8.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.models.base import Model
from fedjax_sim.models.layers import (
    DEFAULT_INIT,
    Conv,
    avg_pool_2x2,
    check_init,
    check_model_args,
    dense,
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
    shape = check_model_args(input_shape, num_classes, model="resnet", rank=3)
    stages = tuple(int(c) for c in stages)
    if not stages or blocks_per_stage < 1:
        raise ValueError("resnet: needs at least one stage and one block per stage")
    if any(c % groups for c in stages):
        raise ValueError(f"resnet: stage channels {stages} must be divisible by groups={groups}")
    min_side = 2 ** (len(stages) - 1)
    if min(shape[:2]) < min_side:
        raise ValueError(f"resnet: input_shape {shape} needs H, W >= {min_side}")
    module = ResNet(
        num_classes=int(num_classes),
        stages=stages,
        blocks_per_stage=int(blocks_per_stage),
        conv_impl=resolve_conv_impl(conv_impl),
        groups=int(groups),
        param_init=check_init(init),
    )
    return linen_model(module, name="resnet", input_shape=shape, num_classes=int(num_classes))
