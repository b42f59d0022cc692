"""Max pooling whose gradient is fast on XLA:CPU.

JAX differentiates `lax.reduce_window(max)` through XLA's select-and-scatter,
which XLA:CPU lowers to a variadic reduce-window carrying four s32 index
arrays, index iotas and a scatter: slow for the ResNet stem's 3x3/2 pool
(benchmarks/train_step.md).

`max_pool` has the same forward (the same `reduce_window`) and the same
gradient, written with elementwise ops, contiguous slices and one interleave:

- forward under differentiation: the maximum (equal to reduce_window's) and the index of the first
  window tap that holds it (row-major order, the tap select-and-scatter
  picks: it keeps the current element unless a later one is strictly
  greater), computed from the s x s phases of the padded input (the input
  reshaped to `[N, Hq, s, Wq, s, C]`, so every tap is a contiguous slice);
- backward: `conv.col2im` of `dy` masked per tap (for each output phase
  (p, q) the sum of the shifted taps (i, j) with i % s == p and j % s == q,
  the s*s phase planes interleaved by one stack + reshape), padding cut off.

Ties route the gradient to the first maximal tap, as XLA does (after a ReLU
ties at 0 are common), so gradients are equal up to float summation order
where windows overlap. Eval (no differentiation) runs the plain reduce_window.
"""

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from har_jax.models.cpu_kernels import conv as conv_lib


def _window_pads(padding):
  return ((0, 0),) + tuple(tuple(p) for p in padding) + ((0, 0),)


def _reduce_window_max(x, window, strides, padding):
  return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1,) + window + (1,),
                           (1,) + strides + (1,), _window_pads(padding))


def _phases(x, hq, wq, strides, padding):
  """`[N, H, W, C]` -> `[N, Hq, sh, Wq, sw, C]` padded with -inf (bitcast reshape)."""
  (sh, sw), (pt, pl) = strides, (padding[0][0], padding[1][0])
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (pt, hq * sh - h - pt), (pl, wq * sw - w - pl), (0, 0)),
               constant_values=-jnp.inf)
  return xp.reshape(n, hq, sh, wq, sw, c)


def _tap(xr, i, j, ho, wo, strides):
  """Window tap (i, j) for every output position: `[N, Ho, Wo, C]`."""
  sh, sw = strides
  return xr[:, i // sh:i // sh + ho, i % sh, j // sw:j // sw + wo, j % sw]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return _reduce_window_max(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
  out_shape = jax.eval_shape(
      functools.partial(_reduce_window_max, window=window, strides=strides, padding=padding),
      x).shape
  hq, wq = conv_lib.phase_grid(x.shape[1:3], out_shape[1:3], window, strides, padding)
  xr = _phases(x, hq, wq, strides, padding)
  ho, wo = out_shape[1:3]
  kh, kw = window
  index_dtype = jnp.int8 if kh * kw <= 127 else jnp.int32

  def first_and_max(xr):
    first, best = jnp.zeros((xr.shape[0], ho, wo, xr.shape[-1]), index_dtype), None
    for k in range(kh * kw):
      tap = _tap(xr, k // kw, k % kw, ho, wo, strides)
      if best is not None:
        first = jnp.where(tap > best, jnp.asarray(k, index_dtype), first)
      best = tap if best is None else jnp.maximum(best, tap)
    return first, best

  # Computed per chunk of images in a loop, so that `first` is materialised:
  # as plain elementwise ops XLA fuses it into the backward loop, which then
  # re-evaluates it for every tap (~4x slower).
  chunk = conv_lib.batch_chunk(x.shape[0], xr[0].size * x.dtype.itemsize)
  first, best = lax.map(first_and_max, conv_lib.in_chunks(xr, chunk))
  return best.reshape(out_shape), (first.reshape(out_shape), x.shape)


def _max_pool_bwd(window, strides, padding, residuals, dy):
  first, x_shape = residuals
  kw = window[1]
  grid = conv_lib.phase_grid(x_shape[1:3], dy.shape[1:3], window, strides, padding)
  zero = jnp.zeros((), dy.dtype)
  dxp = conv_lib.col2im(lambda i, j: jnp.where(first == i * kw + j, dy, zero), window, strides,
                        grid)
  (pt, pl), (h, w) = (padding[0][0], padding[1][0]), x_shape[1:3]
  return (dxp[:, pt:pt + h, pl:pl + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jnp.ndarray, window_shape: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]]) -> jnp.ndarray:
  """`nn.max_pool` for `[N, H, W, C]` with explicit padding, fast gradient (module doc).

  Args:
    x: `[N, H, W, C]` floating point.
    window_shape: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)), non-negative; padded positions
      hold -inf, as in nn.max_pool.
  """
  if x.ndim != 4 or len(window_shape) != 2 or len(strides) != 2 or isinstance(padding, str):
    raise ValueError('max_pool takes [N, H, W, C] input, 2D window and strides and explicit '
                     f'padding; got x.shape={x.shape}, window_shape={window_shape}, '
                     f'strides={strides}, padding={padding!r}')
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    raise ValueError(f'max_pool padding must be non-negative; got {padding}')
  return _max_pool(x, tuple(window_shape), tuple(strides), padding)


def max_pool_fn(impl: str) -> Callable:
  """The max-pool function for a resolved conv_impl: nn.max_pool for 'xla',
  max_pool for 'cpu' (the CPU-fast custom gradients)."""
  return {'xla': nn.max_pool, 'cpu': max_pool}[impl]
