"""Encoder convolutions: XLA's, or one whose weight gradient is fast on CPU.

XLA:CPU runs forward and input-gradient convolutions near its matmul speed,
but weight-gradient convolutions at 1-10 GFLOP/s (issue 7). `PatchesConv` is
`nn.Conv` (same parameters, same forward) with a custom VJP whose weight
gradient is a sum of per-tap matmuls,

  dW[i, j] = sum_{n, h, w} x_pad[n, s*h + i, s*w + j, :]^T dy[n, h, w, :],

one `[C, M] x [M, O]` matmul per kernel tap (i, j) over small chunks of the
batch (M = chunk * Ho * Wo rows), so the shifted copies of x (the im2col
patches, one tap at a time) stay in cache. The input gradient is XLA's.

`conv_impl` selects the module: 'xla' (`nn.Conv`), 'patches' (`PatchesConv`)
or 'auto' ('patches' on the CPU backend, 'xla' on GPU/TPU, where nothing has
been measured to need it).
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'patches')

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Rows of x per weight-gradient matmul chunk: chunk * Ho * Wo <= this. About
# 1-3 MiB of float32 shifted input per tap, which stays in the L2/L3 cache.
_CHUNK_ROWS = 8192


def resolve_conv_impl(impl: str, backend: Optional[str] = None) -> str:
  """'auto' -> 'patches' on the 'cpu' backend, else 'xla'; others unchanged.

  Args:
    impl: one of CONV_IMPLS.
    backend: a JAX platform name ('cpu', 'gpu', 'tpu', ...); None -> the
      default backend.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'Unknown conv_impl {impl!r}; valid: {CONV_IMPLS}')
  if impl != 'auto':
    return impl
  backend = backend or jax.default_backend()
  return 'patches' if backend == 'cpu' else 'xla'


def conv_module(impl: str, backend: Optional[str] = None) -> type:
  """The module class (nn.Conv signature) for `impl`; see resolve_conv_impl."""
  return {'xla': nn.Conv, 'patches': PatchesConv}[resolve_conv_impl(impl, backend)]


def _xla_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def _batch_chunk(n: int, rows_per_image: int) -> int:
  """The largest divisor of n with divisor * rows_per_image <= _CHUNK_ROWS (>= 1)."""
  best = 1
  for d in range(1, n + 1):
    if n % d == 0 and d * rows_per_image <= _CHUNK_ROWS:
      best = d
  return best


def _taps_weight_grad(xp: jnp.ndarray, dy: jnp.ndarray, kernel_hw: Sequence[int],
                      strides: Sequence[int]) -> jnp.ndarray:
  """`[n, Hp, Wp, C]` padded input, `[n, Ho, Wo, O]` -> `[kh, kw, C, O]` float32."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  _, ho, wo, out = dy.shape
  d = dy.reshape(-1, out)
  grads = []
  for i in range(kh):
    for j in range(kw):
      tap = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
      grads.append(lax.dot_general(tap.reshape(-1, xp.shape[-1]), d,
                                   (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32))
  return jnp.stack(grads).reshape(kh, kw, xp.shape[-1], out)


def weight_grad(x: jnp.ndarray, dy: jnp.ndarray, kernel_hw: Sequence[int],
                strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jnp.ndarray:
  """The gradient of an NHWC/HWIO convolution with respect to its kernel.

  Args:
    x: `[N, H, W, C]` input.
    dy: `[N, Ho, Wo, O]` gradient of the output.
    kernel_hw: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)), non-negative.

  Returns:
    `[kh, kw, C, O]` in x.dtype, accumulated in float32.
  """
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  n, ho, wo = dy.shape[:3]
  chunk = _batch_chunk(n, ho * wo)
  grad_fn = functools.partial(_taps_weight_grad, kernel_hw=kernel_hw, strides=strides)
  if chunk == n:
    return grad_fn(xp, dy).astype(x.dtype)
  xs = xp.reshape((n // chunk, chunk) + xp.shape[1:])
  dys = dy.reshape((n // chunk, chunk) + dy.shape[1:])
  init = jnp.zeros(tuple(kernel_hw) + (x.shape[-1], dy.shape[-1]), jnp.float32)
  total, _ = lax.scan(lambda acc, xy: (acc + grad_fn(*xy), None), init, (xs, dys))
  return total.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _patches_conv(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision)


def _patches_conv_fwd(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision), (x, w)


def _patches_conv_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, precision), x)
  dx, = input_vjp(dy)
  return dx, weight_grad(x, dy, w.shape[:2], strides, padding)


_patches_conv.defvjp(_patches_conv_fwd, _patches_conv_bwd)


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want


def patches_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                 rhs_dilation=None, dimension_numbers=None,
                                 feature_group_count=1, batch_group_count=1,
                                 precision=None, preferred_element_type=None) -> jnp.ndarray:
  """`lax.conv_general_dilated` with the fast weight gradient where it applies.

  Applies to 2D NHWC/HWIO convolutions without dilation or groups (all the
  encoders' convolutions); anything else goes to lax.conv_general_dilated.
  """
  plain = (lhs.ndim == 4 and dimension_numbers is not None
           and _is_nhwc(lhs, rhs, dimension_numbers)
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None)
  if plain and isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  if plain:
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if not plain or any(p < 0 for pair in padding for p in pair):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  return _patches_conv(lhs, rhs, tuple(window_strides), padding, precision)


class PatchesConv(nn.Conv):
  """`nn.Conv` whose kernel gradient is computed as patches x matmul (see module doc).

  Parameters, forward values and input gradients equal nn.Conv's.
  """
  conv_general_dilated: Any = patches_conv_general_dilated
