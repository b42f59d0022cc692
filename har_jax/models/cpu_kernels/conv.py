"""Encoder convolutions: XLA's, or `CpuConv`, whose forward and gradients are fast on XLA:CPU.

`CpuConv` is an `nn.Conv` (same parameters, same values to float32 rounding) computed as
follows. Measured speed-ups are in benchmarks/train_step.md.

- 3x3 / stride 1 / padding 1 float32 convolutions on maps of at least 4x4 (the ResNet blocks'):
  Winograd F(2x2, 3x3) forward (`winograd_conv`: 16 instead of 36 multiplies per 2x2 output
  tile, as 16 batched matmuls over cache-sized chunks of images) and input gradient (the
  transposed convolution is again 3x3 / stride 1 / padding 1, with the kernel flipped and its
  channels swapped); weight gradient by Winograd F(3x3, 2x2) (`winograd_weight_grad`, the
  adjoint of the forward transform: 16 batched `[C, P] x [P, O]` matmuls).
- Every other convolution: XLA's forward. Weight gradient by im2col, one matmul per chunk of
  images,

    dW[(i, j, c), o] = sum_{n, h, w} x_pad[n, s*h + i, s*w + j, c] dy[n, h, w, o],

  computed as `dy^T patches` (`[O, M] x [M, kh*kw*C]`, M = chunk * Ho * Wo) and summed over the
  chunks in a scan; a chunk's patches (~4 MiB) stay in cache between their construction and
  their matmul. Input gradient: XLA's for stride 1; `dy W^T` and col2im (`input_grad`) for
  strided convolutions.

Values agree with XLA's convolution to float32 rounding (~1e-6 relative), not bit for bit.
bfloat16 convolutions use XLA's (Winograd's transforms lose more precision in bfloat16).

`conv_impl` selects the module: 'xla' (`nn.Conv`), 'cpu' (`CpuConv`) or 'auto' ('cpu' on the
CPU backend, 'xla' on GPU/TPU). It also selects the ResNet stem's max pool (see pool.py).
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'cpu')
# 'patches' is the old name of 'cpu', still accepted: checkpoints store conv_impl in their config.
CONV_IMPL_ALIASES = {'patches': 'cpu'}

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Bytes of im2col patches per chunk of images: the patches of one chunk stay in
# the L2/L3 cache between their construction and their matmul.
_CHUNK_BYTES = 4 << 20
# Winograd convolutions: bytes of transformed tiles per chunk of images, and the smallest feature
# map (height and width) they are used for.
_WINOGRAD_CHUNK_BYTES = 8 << 20
_WINOGRAD_MIN_SIZE = 4


def resolve_conv_impl(impl: str, backend: Optional[str] = None) -> str:
  """'auto' -> 'cpu' on the 'cpu' backend, else 'xla'; 'patches' -> 'cpu'; others unchanged.

  Args:
    impl: one of CONV_IMPLS, or 'patches' (the old name of 'cpu').
    backend: a JAX platform name ('cpu', 'gpu', 'tpu', ...); None -> the
      default backend.
  """
  impl = CONV_IMPL_ALIASES.get(impl, impl)
  if impl not in CONV_IMPLS:
    raise ValueError(f'Unknown conv_impl {impl!r}; valid: {CONV_IMPLS}')
  if impl != 'auto':
    return impl
  backend = backend or jax.default_backend()
  return 'cpu' if backend == 'cpu' else 'xla'


def conv_module(impl: str, backend: Optional[str] = None) -> type:
  """The module class (nn.Conv signature) for `impl`; see resolve_conv_impl."""
  return {'xla': nn.Conv, 'cpu': CpuConv}[resolve_conv_impl(impl, backend)]


def _xla_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def batch_chunk(n: int, bytes_per_image: int, budget: Optional[int] = None) -> int:
  """The largest divisor d of n with d * bytes_per_image <= budget (default
  _CHUNK_BYTES); at least 1."""
  budget = _CHUNK_BYTES if budget is None else budget
  return max([d for d in range(1, n + 1) if n % d == 0 and d * bytes_per_image <= budget] or [1])


def _patches(xp: jnp.ndarray, kernel_hw: Sequence[int], strides: Sequence[int],
             out_hw: Sequence[int]) -> jnp.ndarray:
  """im2col: `[n, Hp, Wp, C]` padded input -> `[n * Ho * Wo, kh * kw * C]`, taps
  in (i, j, c) order, the row order of an HWIO kernel reshaped to `[kh*kw*C, O]`."""
  (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
  taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
          for i in range(kh) for j in range(kw)]
  cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return cols.reshape(-1, kh * kw * xp.shape[-1])


def _geometry(x, w_shape, strides, padding):
  """(padded x, (Ho, Wo), chunk): the chunk of images whose patches fit _CHUNK_BYTES."""
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  (kh, kw), (sh, sw) = w_shape[:2], strides
  out_hw = ((xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1)
  patch_bytes = out_hw[0] * out_hw[1] * kh * kw * x.shape[-1] * x.dtype.itemsize
  return xp, out_hw, batch_chunk(x.shape[0], patch_bytes)


def in_chunks(xp: jnp.ndarray, chunk: int) -> jnp.ndarray:
  """`[N, ...]` -> `[N // chunk, chunk, ...]` (chunk divides N), for lax.map / lax.scan."""
  return xp.reshape((xp.shape[0] // chunk, chunk) + xp.shape[1:])


def weight_grad(x: jnp.ndarray, dy: jnp.ndarray, kernel_hw: Sequence[int],
                strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jnp.ndarray:
  """The gradient of an NHWC/HWIO convolution with respect to its kernel:
  `(dy^T patches)^T`, one `[O, M] x [M, kh*kw*C]` matmul per chunk of images.

  Args:
    x: `[N, H, W, C]` input.
    dy: `[N, Ho, Wo, O]` gradient of the output.
    kernel_hw: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)), non-negative.

  Returns:
    `[kh, kw, C, O]` in x.dtype, accumulated in float32.
  """
  kernel_shape = tuple(kernel_hw) + (x.shape[-1], dy.shape[-1])
  xp, out_hw, chunk = _geometry(x, kernel_shape, strides, padding)

  def one_chunk(xc, dyc):
    # dy^T patches ([O, K], measured 5-20% faster on XLA:CPU than patches^T dy).
    cols = _patches(xc, kernel_hw, strides, out_hw)
    return lax.dot_general(dyc.reshape(-1, dy.shape[-1]), cols, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)

  if chunk == x.shape[0]:
    total = one_chunk(xp, dy)
  else:
    init = jnp.zeros((dy.shape[-1], kernel_shape[0] * kernel_shape[1] * kernel_shape[2]),
                     jnp.float32)
    total, _ = lax.scan(lambda acc, xy: (acc + one_chunk(*xy), None), init,
                        (in_chunks(xp, chunk), in_chunks(dy, chunk)))
  total = total.T
  return total.reshape(kernel_shape).astype(x.dtype)


def phase_grid(in_hw: Sequence[int], out_hw: Sequence[int], kernel_hw: Sequence[int],
               strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """(Hq, Wq): the smallest grid of strides-sized cells that covers the padded input
  and every window tap, for col2im."""
  grid = []
  for size, out, k, s, (lo, hi) in zip(in_hw, out_hw, kernel_hw, strides, padding):
    grid.append(max(-(-(size + lo + hi) // s), out + (k - 1) // s))
  return tuple(grid)


def col2im(tap_value: Callable[[int, int], jnp.ndarray], kernel_hw: Sequence[int],
           strides: Sequence[int], grid_hw: Sequence[int]) -> jnp.ndarray:
  """Adds window taps back onto the (padded) input grid.

  Args:
    tap_value: (i, j) -> `[N, Ho, Wo, C]`, what tap (i, j) of each output
      position's window contributes.
    kernel_hw: (kh, kw).
    strides: (sh, sw).
    grid_hw: (Hq, Wq) from phase_grid.

  Returns:
    `[N, Hq * sh, Wq * sw, C]` with `out[sh*h + i, sw*w + j] += tap_value(i, j)[h, w]`,
    computed per output phase (p, q) as a sum of shifted taps (contiguous pads,
    no scatter), the sh * sw phase planes interleaved by one stack + reshape.
  """
  (kh, kw), (sh, sw), (hq, wq) = kernel_hw, strides, grid_hw
  rows, zeros = [], None
  for p in range(sh):
    planes = []
    for q in range(sw):
      plane = None
      for i in range(p, kh, sh):
        for j in range(q, kw, sw):
          part = tap_value(i, j)
          a, b = i // sh, j // sw
          part = jnp.pad(part, ((0, 0), (a, hq - part.shape[1] - a),
                                (b, wq - part.shape[2] - b), (0, 0)))
          plane = part if plane is None else plane + part
      if plane is None:  # No tap lands on this phase (kernel smaller than the stride).
        if zeros is None:
          tap = tap_value(0, 0)
          zeros = jnp.zeros((tap.shape[0], hq, wq, tap.shape[-1]), tap.dtype)
        plane = zeros
      planes.append(plane)
    rows.append(jnp.stack(planes, axis=3))  # [N, Hq, Wq, sw, C]
  out = jnp.stack(rows, axis=2)  # [N, Hq, sh, Wq, sw, C]
  return out.reshape(out.shape[0], hq * sh, wq * sw, out.shape[-1])


def input_grad(dy: jnp.ndarray, w: jnp.ndarray, x_hw: Sequence[int], strides: Sequence[int],
               padding: Sequence[tuple[int, int]], precision=None) -> jnp.ndarray:
  """The gradient of an NHWC/HWIO convolution with respect to its input, as
  `dy W^T` (one matmul to per-tap values) and col2im.

  XLA:CPU computes a strided convolution's input gradient as a convolution of
  the zero-dilated dy; on small maps that runs at ~14 GFLOP/s (the synthetic
  config's last 3x3/2 conv: a third of its step). This form has no zeros.
  """
  n, ho, wo, out = dy.shape
  kh, kw, c, _ = w.shape
  per_tap = lax.dot_general(dy.reshape(-1, out), w.reshape(-1, out), (((1,), (1,)), ((), ())),
                            precision=precision).reshape(n, ho, wo, kh, kw, c)
  grid = phase_grid(x_hw, (ho, wo), (kh, kw), strides, padding)
  dxp = col2im(lambda i, j: per_tap[:, :, :, i, j], (kh, kw), strides, grid)
  (pt, pl) = padding[0][0], padding[1][0]
  return dxp[:, pt:pt + x_hw[0], pl:pl + x_hw[1]]


# Winograd F(2x2, 3x3) for 3x3 / stride 1 / padding 1 convolutions in float32 (the ResNet blocks'
# convolutions and their input gradients): each 2x2 output tile costs 16 multiplies per
# (input, output) channel pair instead of 36. The 4x4 input tiles (stride 2) are transformed
# (B^T d B), multiplied by the transformed kernel (G g G^T) as 16 batched [P, C] x [C, O]
# matmuls, and transformed back (A^T m A), one cache-sized chunk of images at a time.
# All transforms are written as sums of whole slices (no small matmuls): XLA:CPU computed the
# kernel transform as an einsum followed by a [C*O, 16] -> [16, C*O] transpose, ~30 ms for one
# 512-channel kernel.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
_WINOGRAD_A = tuple(zip(*_WINOGRAD_AT))  # dy tiles for the weight gradient: A dy A^T.
_WINOGRAD_GT = tuple(zip(*_WINOGRAD_G))  # The weight gradient from its tile sums: G^T M G.
# The flipped kernel's transform is the kernel's with tile rows/columns 0 and 3 swapped
# (G J = P G for the reversal J and the permutation P = (3, 1, 2, 0)).
_WINOGRAD_FLIP = (3, 1, 2, 0)


def _lincomb(matrix: Sequence[Sequence[float]], parts: Sequence[jnp.ndarray]) -> list:
  """`[sum_i matrix[r][i] * parts[i] for r]`, skipping zero coefficients."""
  out = []
  for row in matrix:
    total = None
    for coef, part in zip(row, parts):
      if coef == 0:
        continue
      if total is None:
        total = part if coef == 1 else coef * part
      elif coef in (1, -1):
        total = total + part if coef == 1 else total - part
      else:
        total = total + coef * part
    out.append(total)
  return out


def _sandwich(matrix: Sequence[Sequence[float]], grid: Sequence[Sequence[jnp.ndarray]]) -> list:
  """`matrix X matrix^T` for a square grid X of equal-shaped arrays: a grid of arrays."""
  cols = [_lincomb(matrix, [row[j] for row in grid]) for j in range(len(grid[0]))]
  return [_lincomb(matrix, [col[a] for col in cols]) for a in range(len(matrix))]


def _winograd_kernel(w: jnp.ndarray, flip: bool = False) -> jnp.ndarray:
  """[3, 3, C, O] -> [16, C, O]: G w G^T for every (c, o); of w flipped in space if `flip`."""
  u = _sandwich(_WINOGRAD_G, [[w[i, j] for j in range(3)] for i in range(3)])
  order = _WINOGRAD_FLIP if flip else range(4)
  return jnp.stack([u[a][b] for a in order for b in order])


def _tile_grid(h: int, w: int) -> tuple[int, int]:
  """(th, tw): the 2x2 output tiles that cover an h x w map."""
  return -(-h // 2), -(-w // 2)


def _transformed_tiles(xp: jnp.ndarray, matrix: Sequence[Sequence[float]], th: int,
                       tw: int) -> jnp.ndarray:
  """`matrix d matrix^T` of the k x k tiles d (k = len(matrix[0]), stride 2) of the padded
  `[N, Hp, Wp, C]` xp, th x tw tiles per image: `[len(matrix)^2, N * th * tw, C]`."""
  k = len(matrix[0])
  rows = _lincomb(matrix, [xp[:, a:a + 2 * th:2] for a in range(k)])
  tiles = [t for r in rows for t in _lincomb(matrix, [r[:, :, b:b + 2 * tw:2] for b in range(k)])]
  return jnp.stack(tiles).reshape(len(tiles), xp.shape[0] * th * tw, xp.shape[-1])


def _winograd_tiles(x: jnp.ndarray) -> jnp.ndarray:
  """[N, H, W, C] -> [16, N * th * tw, C]: B^T d B of the 4x4 tiles (stride 2) of x padded by 1."""
  _, h, w, _ = x.shape
  th, tw = _tile_grid(h, w)
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  return _transformed_tiles(xp, _WINOGRAD_BT, th, tw)


def _winograd_chunk(x: jnp.ndarray, u: jnp.ndarray, transposed: bool, precision) -> jnp.ndarray:
  """One chunk of winograd_conv; u is `[16, C, O]`, or `[16, O, C]` (used transposed) if
  `transposed`."""
  n, h, w, _ = x.shape
  th, tw = _tile_grid(h, w)
  out = u.shape[1] if transposed else u.shape[2]
  m = lax.dot_general(_winograd_tiles(x), u, (((2,), (2 if transposed else 1,)), ((0,), (0,))),
                      precision=precision)
  m = m.reshape(4, 4, n, th, tw, out)
  y = [jnp.stack(_lincomb(_WINOGRAD_AT, r), axis=3)  # [n, th, tw, 2, O] each.
       for r in _lincomb(_WINOGRAD_AT, m)]
  return jnp.stack(y, axis=2).reshape(n, 2 * th, 2 * tw, out)[:, :h, :w]


def winograd_conv(x: jnp.ndarray, w: jnp.ndarray, precision=None, *,
                  transpose: bool = False) -> jnp.ndarray:
  """The 3x3, stride 1, padding 1 NHWC convolution of x by w with Winograd F(2x2, 3x3).

  With `transpose`, the transposed convolution (the input gradient of the convolution by w): the
  convolution by w flipped in space with its channel axes swapped, `[3, 3, O, C]`, computed
  without materialising that kernel.
  """
  n, h, wd, c = x.shape
  out = w.shape[2] if transpose else w.shape[3]
  tiles_per_image = 16 * math.prod(_tile_grid(h, wd)) * max(c, out) * x.dtype.itemsize
  chunk = batch_chunk(n, tiles_per_image, _WINOGRAD_CHUNK_BYTES)
  u = _winograd_kernel(w, flip=transpose)
  one_chunk = functools.partial(_winograd_chunk, u=u, transposed=transpose, precision=precision)
  if chunk == n:
    return one_chunk(x)
  return lax.map(one_chunk, in_chunks(x, chunk)).reshape(n, h, wd, out)


def _winograd_dy_tiles(dy: jnp.ndarray) -> jnp.ndarray:
  """[N, H, W, O] -> [16, N * th * tw, O]: A dy A^T of the 2x2 tiles of dy padded with zeros."""
  _, h, w, _ = dy.shape
  th, tw = _tile_grid(h, w)
  dyp = jnp.pad(dy, ((0, 0), (0, 2 * th - h), (0, 2 * tw - w), (0, 0)))
  return _transformed_tiles(dyp, _WINOGRAD_A, th, tw)


def winograd_weight_grad(x: jnp.ndarray, dy: jnp.ndarray, precision=None) -> jnp.ndarray:
  """The kernel gradient `[3, 3, C, O]` of the 3x3, stride 1, padding 1 convolution of x, given
  the output gradient dy, with Winograd F(3x3, 2x2).

  Winograd's forward is y = A^T [(G g G^T) * (B^T d B)] A per tile, linear in g, so the kernel
  gradient is its adjoint summed over tiles: G^T [sum_t (B^T d_t B) * (A dy_t A^T)] G. The sum over
  tiles is 16 `[C, P] x [P, O]` matmuls (16 multiplies per tile and channel pair, im2col's 36),
  accumulated in float32 over cache-sized chunks of images.
  """
  n, h, wd, c = x.shape
  o = dy.shape[-1]
  tiles_per_image = 16 * math.prod(_tile_grid(h, wd)) * (c + o) * x.dtype.itemsize
  chunk = batch_chunk(n, tiles_per_image, _WINOGRAD_CHUNK_BYTES)

  def one_chunk(xc, dyc):
    return lax.dot_general(_winograd_tiles(xc), _winograd_dy_tiles(dyc),
                           (((1,), (1,)), ((0,), (0,))), precision=precision,
                           preferred_element_type=jnp.float32)

  if chunk == n:
    m = one_chunk(x, dy)
  else:
    m, _ = lax.scan(lambda acc, xy: (acc + one_chunk(*xy), None),
                    jnp.zeros((16, c, o), jnp.float32), (in_chunks(x, chunk), in_chunks(dy, chunk)))
  dw = _sandwich(_WINOGRAD_GT, [[m[4 * a + b] for b in range(4)] for a in range(4)])
  return jnp.stack([jnp.stack(row) for row in dw]).astype(x.dtype)


def _winograd_applies(x, w, strides, padding) -> bool:
  return (w.shape[:2] == (3, 3) and tuple(strides) == (1, 1)
          and tuple(padding) == ((1, 1), (1, 1))
          and x.dtype == jnp.float32 and w.dtype == jnp.float32
          and min(x.shape[1:3]) >= _WINOGRAD_MIN_SIZE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x, w, strides, padding, precision):
  return _forward(x, w, strides, padding, precision)


def _forward(x, w, strides, padding, precision):
  if _winograd_applies(x, w, strides, padding):
    return winograd_conv(x, w, precision)
  return _xla_conv(x, w, strides, padding, precision)


def _cpu_conv_fwd(x, w, strides, padding, precision):
  return _forward(x, w, strides, padding, precision), (x, w)


def _cpu_conv_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  if _winograd_applies(x, w, strides, padding):  # The transposed convolution is one too.
    return (winograd_conv(dy, w, precision, transpose=True),
            winograd_weight_grad(x, dy, precision))
  if tuple(strides) != (1, 1):
    dx = input_grad(dy, w, x.shape[1:3], strides, padding, precision)
  else:
    _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, precision), x)
    dx, = input_vjp(dy)
  return dx, weight_grad(x, dy, w.shape[:2], strides, padding)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want


def cpu_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
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
  return _cpu_conv(lhs, rhs, tuple(window_strides), padding, precision)


class CpuConv(nn.Conv):
  """`nn.Conv` whose kernel gradient is computed as patches x matmul (see module doc).

  Parameters equal nn.Conv's; forward values and gradients agree to float32 rounding (Winograd
  for the 3x3 / stride 1 convolutions).
  """
  conv_general_dilated: Any = cpu_conv_general_dilated
