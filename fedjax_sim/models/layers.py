"""Convolution and pooling layers with a CPU-friendly im2col path.

On XLA:CPU, ``lax.conv_general_dilated`` trains small CNNs an order of magnitude slower
than one large matmul does, and the backward pass of ``nn.max_pool``
(select-and-scatter) is slow too. This module offers:

* :func:`conv2d`: a stride-1 NHWC/HWIO convolution, either through ``lax.conv``
  (``impl="xla"``) or as im2col (``impl="im2col"``): shifted slices of the padded input
  concatenated on the channel axis, then matmuls (all ``kh * kw`` offsets and one matmul
  for few input channels; the ``kw`` horizontal offsets and ``kh`` matmuls otherwise).
  Both give the same values and gradients. The im2col gradient is written by hand
  (:func:`_im2col_conv`): the patch gradient is folded back in one fusion, and the
  kernel gradient runs as the matmul orientation XLA:CPU is fast at. ``impl="winograd"``
  runs layers with 8 or more input channels and kernel sides 2 to 5 as Winograd
  F(2x2, kh x kw) (:mod:`fedjax_sim.models.winograd`), with 2-3x fewer FLOPs, and the
  others as im2col.
* :func:`max_pool_2x2` and :func:`avg_pool_2x2`: 2x2, stride-2 pools written as a
  reshape followed by a reduction.
* :class:`Conv`: a ``flax.linen`` module over :func:`conv2d` with the parameter names and
  initializers of ``nn.Conv``.
* :func:`layer_inits`: the initializers of a dense or convolutional layer under either
  parameter initialization scheme (:data:`INITS`): flax's defaults or PyTorch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim.models import winograd
from fedjax_sim.models.base import Model, Params

CONV_IMPLS = ("auto", "xla", "im2col", "winograd")
PADDINGS = ("VALID", "SAME")

# Parameter initialization schemes. "flax": LeCun-normal kernels, zero biases (the flax
# defaults). "torch": PyTorch's nn.Linear / nn.Conv2d defaults, kaiming_uniform(a=sqrt(5))
# kernels and uniform biases, both U(-1/sqrt(fan_in), 1/sqrt(fan_in)); published PFL
# results come from PyTorch, and FedAvg's early rounds depend strongly on the scheme.
# Normalization layers start at scale 1, bias 0 under both. The default is "torch", so that
# a run starts where the PyTorch code behind published tables starts.
INITS = ("flax", "torch")
DEFAULT_INIT = "torch"


def check_init(init: str) -> str:
    """Validates a parameter initialization scheme name.

    Args:
      init: ``"flax"`` or ``"torch"``.

    Returns:
      ``init``.

    Raises:
      ValueError: naming ``init`` and the allowed values.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    return init


def torch_uniform(fan_in: int) -> nn.initializers.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for Linear / Conv2d weights and
    biases (kaiming_uniform with a=sqrt(5) has gain sqrt(1/3), bound gain*sqrt(3/fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def layer_inits(init: str, fan_in: int) -> dict:
    """Keyword arguments ``kernel_init`` / ``bias_init`` for a dense or convolutional layer.

    Args:
      init: ``"flax"`` (an empty dict: the layer keeps its own defaults, LeCun normal and
        zeros) or ``"torch"``.
      fan_in: inputs per output unit (``in_features``; ``kh * kw * Cin`` for a convolution).

    Returns:
      The keyword arguments.

    Raises:
      ValueError: on an unknown ``init``.
    """
    if check_init(init) == "flax":
        return {}
    return {"kernel_init": torch_uniform(fan_in), "bias_init": torch_uniform(fan_in)}


def dense(features: int, fan_in: int, *, init: str = DEFAULT_INIT, name: str) -> nn.Dense:
    """``nn.Dense(features)`` initialized by scheme ``init`` for ``fan_in`` inputs."""
    return nn.Dense(features, name=name, **layer_inits(init, fan_in))


def resolve_conv_impl(impl: str) -> str:
    """Turns a convolution implementation name into a concrete one.

    Args:
      impl: ``"auto"``, ``"xla"``, ``"im2col"`` or ``"winograd"``. ``"auto"`` picks
        ``"winograd"`` on the CPU backend (where it and im2col are much faster than XLA's
        convolution inside the client loop) and ``"xla"`` on GPU / TPU (where cuDNN and
        the TPU convolution units win).

    Returns:
      ``"xla"``, ``"im2col"`` or ``"winograd"``.

    Raises:
      ValueError: on an unknown name.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; valid: {', '.join(CONV_IMPLS)}")
    if impl == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "xla"
    return impl


def _check_padding(padding: str) -> str:
    padding = padding.upper()
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; valid: {', '.join(PADDINGS)}")
    return padding


def _same_pads(k: int) -> tuple[int, int]:
    # XLA's SAME for stride 1: k - 1 in total, the odd one at the end.
    lo = (k - 1) // 2
    return lo, k - 1 - lo


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    padding: str = "VALID",
    impl: str = "xla",
) -> jax.Array:
    """Stride-1 2-D convolution (cross-correlation, as in ``lax.conv``).

    Args:
      x: input, (B, H, W, Cin) (NHWC).
      kernel: (kh, kw, Cin, Cout) (HWIO).
      bias: optional (Cout,), added to every output position.
      padding: ``"VALID"`` (output (H - kh + 1, W - kw + 1)) or ``"SAME"`` (output (H, W)).
      impl: ``"xla"`` for ``lax.conv_general_dilated``, ``"im2col"`` for shifted slices and
        matmuls, ``"winograd"`` for Winograd F(2x2, kh x kw) where
        :func:`uses_winograd` holds and im2col elsewhere, or ``"auto"`` (see
        :func:`resolve_conv_impl`).

    Returns:
      (B, H', W', Cout).
    """
    impl = resolve_conv_impl(impl)
    padding = _check_padding(padding)
    kh, kw, cin, _ = kernel.shape
    if x.ndim != 4 or x.shape[-1] != cin:
        raise ValueError(f"expected x of shape (B, H, W, {cin}), got {x.shape}")
    if impl == "xla":
        y = lax.conv_general_dilated(
            x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    else:
        if padding == "SAME":
            x = jnp.pad(x, ((0, 0), _same_pads(kh), _same_pads(kw), (0, 0)))
        _, h, w, _ = x.shape
        if h < kh or w < kw:
            raise ValueError(f"kernel {kh}x{kw} larger than the padded input {h}x{w}")
        y = winograd.winograd_conv(x, kernel) if (
            impl == "winograd" and uses_winograd(kernel.shape)) else _im2col_conv(x, kernel)
    if bias is not None:
        y = y + bias
    return y


# Patch widths from which the kernel gradient is computed as (dY^T P)^T rather than
# P^T dY: XLA:CPU runs a matmul whose left operand is contracted over its leading axis at
# about half speed when that operand is the large patch matrix (conv2 of the FedAvg CNN,
# width 800: 2.3 ms against 4.2 ms on one core); for narrow patches (the first layer,
# width 25) the direct form is the faster one.
_WIDE_PATCHES = 128

# Input channels from which impl="winograd" runs a layer as Winograd: below it the batched
# matmuls, contracted over the input channels, are too shallow to run near peak (the
# FedAvg CNN's first layer has one input channel).
_WINOGRAD_CHANNELS = 8


def uses_winograd(kernel_shape: Sequence[int]) -> bool:
    """Whether ``impl="winograd"`` runs a layer with this HWIO kernel shape as Winograd."""
    kh, kw, cin, _ = kernel_shape
    return cin >= _WINOGRAD_CHANNELS and all(2 <= k <= winograd.MAX_KERNEL for k in (kh, kw))


# Input channels from which a convolution keeps only row patches (see _patch_rows).
# Below it the full patch matrix is small and one deep matmul is the faster form.
_ROW_PATCH_CHANNELS = 8


def _patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """(B, H, W, C) -> (B, H', W', kh * kw * C), channel layout (i, j, c) row-major: the
    order of ``kernel.reshape(kh * kw * C, Cout)``."""
    _, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    if kh == 1 and kw == 1:
        return x
    # Two passes, horizontal offsets then vertical ones: a single concatenation of all
    # kh * kw slices writes C floats at a time, which for one input channel is an
    # element-wise scatter (the FedAvg CNN's conv1 patches: 1.6 against 0.6 ms).
    rows = jnp.concatenate([x[:, :, j : j + wo, :] for j in range(kw)], axis=-1)
    return jnp.concatenate([rows[:, i : i + ho] for i in range(kh)], axis=-1)


def _fold_patches(d_patches: jax.Array, kh: int, kw: int, h: int, w: int) -> jax.Array:
    """The transpose of :func:`_patches`: sums each patch entry back onto the input
    position it was read from. (B, H', W', kh * kw * C) -> (B, h, w, C)."""
    b, ho, wo, width = d_patches.shape
    c = width // (kh * kw)
    per_offset = d_patches.reshape(b, ho, wo, kh * kw, c)
    # One sum of zero-padded slices: XLA fuses it into a single pass over the output.
    return sum(
        jnp.pad(per_offset[:, :, :, i * kw + j, :],
                ((0, 0), (i, h - ho - i), (j, w - wo - j), (0, 0)))
        for i in range(kh)
        for j in range(kw)
    )


def _kernel_grad(dy2: jax.Array, p2: jax.Array) -> jax.Array:
    """``p2.T @ dy2`` ((N, width), (N, Cout) -> (width, Cout)) in the faster orientation."""
    if p2.shape[1] >= _WIDE_PATCHES:
        # The barrier keeps XLA from folding the transpose back into the slow orientation.
        return lax.optimization_barrier(dy2.T @ p2).T
    return p2.T @ dy2


@jax.custom_vjp
def _im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID stride-1 convolution of an already padded ``x`` as matmuls of patches."""
    return _im2col_forward(x, kernel)[0]


def _patch_rows(kernel: jax.Array) -> int:
    """Kernel rows one patch covers: all of them for few input channels, else one.

    With one, patches hold only the kw horizontal offsets, (B, H, W', kw * Cin), and the
    kh vertical offsets become kh matmuls over row slices of them, summed. That patch
    matrix is kh times smaller than the full one, whose construction and gradient fold
    cost more than its matmuls on XLA:CPU (the FedAvg CNN's conv2: 6.5 MB per 32-image
    batch; the cnn training step is 5-8% faster with row patches).
    """
    kh, _, cin, _ = kernel.shape
    return kh if cin < _ROW_PATCH_CHANNELS else 1


def _im2col_forward(x, kernel):
    kh, kw, _, cout = kernel.shape
    rows = _patch_rows(kernel)
    patches = _patches(x, rows, kw)
    b, _, wo, width = patches.shape
    ho = x.shape[1] - kh + 1
    group_kernels = kernel.reshape(kh // rows, width, cout)
    y = sum(patches[:, g * rows : g * rows + ho].reshape(b * ho * wo, width) @ group_kernel
            for g, group_kernel in enumerate(group_kernels))
    return y.reshape(b, ho, wo, cout), (patches, kernel, x.shape[1:3])


def _im2col_backward(residuals, dy):
    patches, kernel, (h, w) = residuals
    kh, kw, _, cout = kernel.shape
    rows = _patch_rows(kernel)
    b, patch_h, wo, width = patches.shape
    ho = h - kh + 1
    group_kernels = kernel.reshape(kh // rows, width, cout)
    dy2 = dy.reshape(-1, cout)
    d_kernel = jnp.stack([
        _kernel_grad(dy2, patches[:, g * rows : g * rows + ho].reshape(-1, width))
        for g in range(kh // rows)
    ])
    d_patches = sum(
        jnp.pad((dy2 @ group_kernel.T).reshape(b, ho, wo, width),
                ((0, 0), (g * rows, patch_h - ho - g * rows), (0, 0), (0, 0)))
        for g, group_kernel in enumerate(group_kernels)
    )
    return _fold_patches(d_patches, rows, kw, h, w), d_kernel.reshape(kernel.shape)


_im2col_conv.defvjp(_im2col_forward, _im2col_backward)


def _crop_even(x: jax.Array) -> jax.Array:
    # Drop a trailing odd row / column, as a VALID 2x2 window with stride 2 does.
    _, h, w, _ = x.shape
    return x[:, : h - h % 2, : w - w % 2, :]


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool with stride 2 and VALID padding, as ``nn.max_pool(x, (2, 2), (2, 2))``.

    Args:
      x: (B, H, W, C); an odd trailing row or column is dropped.

    Returns:
      (B, H // 2, W // 2, C).
    """
    x = _crop_even(x)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pool with stride 2 and VALID padding, as ``nn.avg_pool(x, (2, 2), (2, 2))``.

    Args:
      x: (B, H, W, C); an odd trailing row or column is dropped.

    Returns:
      (B, H // 2, W // 2, C).
    """
    x = _crop_even(x)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Conv(nn.Module):
    """Stride-1 2-D convolution with ``nn.Conv``'s parameters: ``kernel`` (HWIO) and ``bias``.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      padding: ``"VALID"`` or ``"SAME"``.
      impl: ``"xla"``, ``"im2col"`` or ``"auto"`` (see :func:`resolve_conv_impl`).
      use_bias: whether to add a bias.
      kernel_init: initializer of the kernel (LeCun normal, as in ``nn.Conv``); it is
        called with the matrix shape (kh * kw * Cin, Cout), whose fan-in and fan-out equal
        those of the HWIO shape, and its result is reshaped to HWIO.
      bias_init: initializer of the bias (zeros).
      param_init: ``"flax"`` (``kernel_init`` and ``bias_init``) or ``"torch"`` (both
        U(+-1/sqrt(kh * kw * Cin)), as ``nn.Conv2d``; overrides the two initializers).
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    padding: str = "SAME"
    impl: str = "auto"
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    param_init: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the convolution.

        Args:
          x: (B, H, W, Cin).

        Returns:
          (B, H', W', features).
        """
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        inits = {"kernel_init": self.kernel_init, "bias_init": self.bias_init}
        inits.update(layer_inits(self.param_init, kh * kw * cin))

        def kernel_init(key, shape, dtype):
            # Same values and fan-in as drawing the 4-D shape, but XLA:CPU compiles the
            # random-bit generator for a 4-D shape several times slower than for a matrix.
            matrix = inits["kernel_init"](key, (kh * kw * cin, self.features), dtype)
            return matrix.reshape(shape)

        kernel = self.param("kernel", kernel_init, (kh, kw, cin, self.features), jnp.float32)
        bias = (
            self.param("bias", inits["bias_init"], (self.features,), jnp.float32)
            if self.use_bias
            else None
        )
        return conv2d(x, kernel, bias, padding=self.padding, impl=self.impl)


def check_model_args(
    input_shape: Sequence[int], num_classes: int, *, model: str, rank: int | None = None
) -> tuple[int, ...]:
    """Validates the arguments every model factory takes.

    Args:
      input_shape: one example's shape, without the batch axis.
      num_classes: number of logits; at least 2.
      model: the model's name, for error messages.
      rank: required length of ``input_shape``, or ``None`` for any length >= 1.

    Returns:
      ``input_shape`` as a tuple of ints.

    Raises:
      ValueError: on a bad shape or class count.
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"{model}: input_shape must be non-empty and positive, got {shape}")
    if rank is not None and len(shape) != rank:
        raise ValueError(
            f"{model}: input_shape must have rank {rank} (H, W, C), got {shape}; "
            "use 'mlp' for flat or 1-D inputs"
        )
    if int(num_classes) < 2:
        raise ValueError(f"{model}: num_classes must be >= 2, got {num_classes}")
    return shape


def linen_model(
    module: nn.Module,
    *,
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    head: tuple[str, ...] = ("head",),
) -> Model:
    """Wraps a ``flax.linen`` classifier as a :class:`~fedjax_sim.models.base.Model`.

    The parameters are the module's ``"params"`` collection without that wrapper: a plain
    dict keyed by top-level submodule name. The module must hold no other collection
    (no batch statistics), so that ``apply`` is a pure function of the parameters.

    Args:
      module: maps (B, *input_shape) to (B, num_classes) logits.
      name: registry name.
      input_shape: one example's shape.
      num_classes: number of logits.
      head: top-level parameter names that form the classifier head.

    Returns:
      The model.
    """

    @jax.jit
    def init_fn(key: jax.Array) -> Params:
        variables = module.init(key, jnp.zeros((1, *input_shape), jnp.float32))
        extra = set(variables) - {"params"}
        if extra:
            raise ValueError(f"{name}: unsupported variable collections {sorted(extra)}")
        return variables["params"]

    def apply_fn(params: Params, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, x)

    # Flax adds each submodule's parameters when the forward pass first calls it, so the
    # key order of the unjitted init's result is the forward order (jit's output sorts it).
    layers: list[str] = []

    def record_order(key):
        layers.extend(module.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"])
        return 0

    jax.eval_shape(record_order, jax.random.key(0))

    return Model(
        name=name,
        input_shape=input_shape,
        num_classes=num_classes,
        head=head,
        init_fn=init_fn,
        apply_fn=apply_fn,
        layers=tuple(layers),
    )


# The top-level parameter entry that holds a batch-normalized model's running statistics.
BATCH_STATS = "batch_stats"


def batch_norm(x: jax.Array, *, train: bool, mask: jax.Array | None, momentum: float,
               epsilon: float, name: str) -> jax.Array:
    """``nn.BatchNorm`` over every axis but the last, inside a compact module.

    Args:
      x: (B, ..., C).
      train: normalize with the statistics of the batch's rows where ``mask`` holds, and
        update the running ones; otherwise normalize with the running statistics.
      mask: (B,) bool, the rows that count (padding: False); ``None`` for all.
      momentum: weight of the old running statistics in their moving average.
      epsilon: added to the variance.
      name: the layer's parameter name.

    Returns:
      x normalized, scaled and shifted, (B, ..., C).
    """
    if mask is not None:
        mask = jnp.broadcast_to(mask.reshape(mask.shape[0], *([1] * (x.ndim - 1))), x.shape)
    # Two-pass variance: E[(x - mean)^2] rather than E[x^2] - mean^2.
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                        use_fast_variance=False, name=name)(x, mask=mask)


def linen_bn_model(
    module: nn.Module,
    *,
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    norm_layers: tuple[str, ...],
    head: tuple[str, ...] = ("head",),
) -> Model:
    """Wraps a ``flax.linen`` classifier with batch normalization as a
    :class:`~fedjax_sim.models.base.Model`.

    The module is called as ``module(x, train=..., mask=...)`` (``mask``: (B,) bool rows
    that count for the batch statistics) and holds the collections ``"params"`` and
    ``"batch_stats"``. The model's parameters are one plain dict: the ``"params"``
    collection's top-level entries and, beside them, :data:`BATCH_STATS` with the running
    statistics (``Model.state_names``).

    Args:
      module: maps (B, *input_shape) to (B, num_classes) logits.
      name: registry name.
      input_shape: one example's shape.
      num_classes: number of logits.
      norm_layers: top-level names of its normalization layers.
      head: top-level parameter names that form the classifier head.

    Returns:
      The model, with ``train_fn`` and ``state_names == (BATCH_STATS,)``.
    """
    dummy = jnp.zeros((1, *input_shape), jnp.float32)

    @jax.jit
    def init_fn(key: jax.Array) -> Params:
        variables = module.init(key, dummy)
        extra = set(variables) - {"params", BATCH_STATS}
        if extra:
            raise ValueError(f"{name}: unsupported variable collections {sorted(extra)}")
        return {**variables["params"], BATCH_STATS: variables[BATCH_STATS]}

    def variables(params: Params) -> dict:
        trainable = {k: v for k, v in params.items() if k != BATCH_STATS}
        return {"params": trainable, BATCH_STATS: params[BATCH_STATS]}

    def apply_fn(params: Params, x: jax.Array) -> jax.Array:
        return module.apply(variables(params), x)

    def train_fn(params: Params, x: jax.Array, weights: jax.Array):
        logits, updated = module.apply(variables(params), x, train=True, mask=weights > 0,
                                       mutable=[BATCH_STATS])
        return logits, {BATCH_STATS: updated[BATCH_STATS]}

    layers: list[str] = []

    def record_order(key):
        layers.extend(module.init(key, dummy)["params"])
        return 0

    jax.eval_shape(record_order, jax.random.key(0))
    return Model(name=name, input_shape=input_shape, num_classes=num_classes, head=head,
                 init_fn=init_fn, apply_fn=apply_fn, layers=tuple(layers), train_fn=train_fn,
                 state_names=(BATCH_STATS,), norm_layers=tuple(norm_layers))
