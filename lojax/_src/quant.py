"""Quantized base kernels (QLoRA): NF4 with optional double quantization, int8.

A quantized kernel is a :class:`QuantizedArray`, a pytree node that sits in
``LoraParams.base`` at the kernel's place. Its children are the stored
arrays, so ``jax.jit``, ``jax.device_put`` and checkpointing see only the
compact representation; lojax dequantizes it inside the jitted step, where
XLA fuses the dequantization into the consumer when it can.

Schemes (the kernel keeps its own Flax layout; a stacked kernel is quantized
layer by layer, so no block crosses two layers):

* ``"nf4"``: the per-layer kernel is cut (row-major) into blocks of 64
  values. Each block stores its absmax as a float32 scale and each value as
  the index of the nearest of the 16 NormalFloat-4 levels (quantiles of a
  standard normal, normalised to [-1, 1], with an exact zero) of
  ``value / absmax``; two 4-bit codes are packed per ``uint8`` (the even
  element in the low nibble). 4.5 bits per value. When the kernel's last
  axis is a multiple of 64, each block is a run along that axis and the
  stored arrays keep the kernel's other axes (codes ``[..., last/64, 32]``,
  scales ``[..., last/64]``), so they shard like the kernel, along any of its
  axes (a split of the last one in multiples of 64 values). Otherwise the
  kernel is flattened and padded to whole blocks (codes ``[blocks, 32]``).
* ``"nf4-dq"``: as ``"nf4"``, with the block scales quantized again
  (double quantization): their mean is subtracted and the centred scales are
  stored as int8 in blocks of 256, each block with its own float32 absmax.
  About 4.13 bits per value.
* ``"int8"``: symmetric absmax quantization per output channel: for each
  output feature, ``scale = absmax over the input axes / 127`` and
  ``code = round(value / scale)``. About 8 bits per value.

Quantization runs on the host with NumPy (no XLA compilation per kernel
shape); dequantization is written once for NumPy and ``jax.numpy``.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import model

METHODS = ("nf4", "nf4-dq", "int8")
BLOCK = 64          # values per NF4 block
SCALE_BLOCK = 256   # NF4 block scales per double-quantization block


def _nf4_levels() -> np.ndarray:
  """The 16 NF4 levels: normal quantiles, 8 positive, 7 negative and 0.

  Both halves use quantiles of N(0, 1) between probability 1/2 and ``delta``,
  the average of the probabilities ``1 - 1/(2*15)`` and ``1 - 1/(2*16)`` (so
  the extreme quantile stays finite); each half is scaled so that its
  extreme is exactly +-1.
  """
  nd = statistics.NormalDist()
  delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
  pos = [nd.inv_cdf(p) for p in np.linspace(delta, 0.5, 9)[:-1]]
  neg = [-nd.inv_cdf(p) for p in np.linspace(delta, 0.5, 8)[:-1]]
  levels = np.sort(np.array(pos + [0.0] + neg))
  return (levels / np.abs(levels).max()).astype(np.float32)


NF4_LEVELS = _nf4_levels()
# Largest distance from a value in [-1, 1] to its nearest NF4 level.
NF4_MAX_ERROR = float(np.max(np.diff(NF4_LEVELS.astype(np.float64)))) / 2


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray(model.EncodedArray):
  """A quantized kernel: stored arrays (children) plus static layout (aux).

  Attributes:
    method: ``"nf4"``, ``"nf4-dq"`` or ``"int8"``.
    shape: shape of the kernel it stands for.
    dtype: dtype it dequantizes to by default (the original kernel's).
    stacked: whether axis 0 is a stacked layer axis (quantized per layer).
    in_axes: the per-layer input axes it was quantized with (``None``: the
      default, all axes but the last).
    data: ``{name: array}``; NF4: ``codes`` ``[L?, *blocks, 32] uint8`` and
      ``scales`` ``[L?, *blocks] float32``, where ``blocks`` is the kernel's
      shape with its last axis divided by 64 (or one flat, padded count of
      blocks when 64 does not divide it); with ``"nf4-dq"``: ``scales``
      ``[L?, scale blocks, 256] int8`` over the row-major block scales,
      ``scales_absmax`` ``[L?, scale blocks] float32`` and ``scales_mean``
      ``[L?] float32``;
      int8: ``codes`` (the kernel's shape, int8) and ``scales`` (float32,
      size 1 on the input axes).

    gather: ``None``, or ``((name, (stored, gathered)), ...)``: for stored
      arrays, the ``NamedSharding`` they are stored with and the one
      dequantization all-gathers them to first, inside ``jax.jit`` (set by
      :func:`lojax.shard` from ``lojax.lora_shardings(...,
      gather_codes_over=...)``): FSDP moves the codes, not the decoded kernel.

  Use :func:`quantize` to make one and :func:`dequantize` to read it.
  """

  in_axes = None   # for arrays pickled before the attribute existed
  gather = None

  def __init__(self, data: dict[str, Any], *, method: str, shape: Sequence[int], dtype: Any,
               stacked: bool = False, in_axes: Sequence[int] | None = None, gather=None):
    self.data = dict(data)
    self.method = method
    self.shape = tuple(shape)
    self.dtype = np.dtype(dtype)
    self.stacked = bool(stacked)
    self.in_axes = None if in_axes is None else tuple(int(a) for a in in_axes)
    self.gather = None if gather is None else tuple(sorted(dict(gather).items()))

  def tree_flatten_with_keys(self):
    names = tuple(sorted(self.data))
    children = tuple((jax.tree_util.GetAttrKey(n), self.data[n]) for n in names)
    return children, (names, self.method, self.shape, self.dtype, self.stacked, self.in_axes,
                      self.gather)

  @classmethod
  def tree_unflatten(cls, aux, children):
    names, method, shape, dtype, stacked, in_axes, gather = aux
    return cls(dict(zip(names, children)), method=method, shape=shape, dtype=dtype,
               stacked=stacked, in_axes=in_axes, gather=gather)

  def with_gather(self, gather) -> "QuantizedArray":
    """This array with ``gather`` (see the class docstring; ``None`` removes it)."""
    return QuantizedArray(self.data, method=self.method, shape=self.shape, dtype=self.dtype,
                          stacked=self.stacked, in_axes=self.in_axes, gather=gather)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored (codes and scales)."""
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
               for x in self.data.values())

  def stored_specs(self, kernel_spec):
    """int8 codes are sharded like the kernel, its scales likewise but not on the input
    axes (size 1 there). NF4 codes and scales kept in the kernel's axes (its last one in
    blocks) are sharded like the kernel; flat NF4 blocks, and NF4-dq's quantized scales
    (row-major over the blocks), follow the kernel's first per-layer axis (a split of it
    is a contiguous run of blocks); ``scales_mean`` keeps the layer axis only."""
    entries = list(kernel_spec) + [None] * (len(self.shape) - len(kernel_spec))
    lead, per = entries[:int(self.stacked)], entries[int(self.stacked):]
    if self.method == "int8":
      in_axes = set(self.in_axes if self.in_axes is not None else range(len(per) - 1))
      specs = {"codes": entries,
               "scales": lead + [None if i in in_axes else e for i, e in enumerate(per)]}
    else:
      rows = per[:1] if per else [None]
      shaped = _in_kernel_axes(self.data["codes"], self.shape, len(lead))

      def spec(n, x):
        if n == "scales_mean":
          return []
        if shaped and n in ("codes", "scales") and not (n == "scales" and
                                                          self.method == "nf4-dq"):
          return lead + per + [None] * (np.ndim(x) - len(entries))
        return lead + rows + [None] * (np.ndim(x) - len(lead) - 1)

      specs = {n: spec(n, x) for n, x in self.data.items()}
    return QuantizedArray(specs, method=self.method, shape=self.shape, dtype=self.dtype,
                          stacked=self.stacked, in_axes=self.in_axes)

  def layer(self) -> "QuantizedArray":
    """This stacked array with its stored arrays holding one layer, as that layer's array
    (every stored array of a stacked kernel has the layer axis first)."""
    if not self.stacked:
      raise ValueError("Only a stacked QuantizedArray has layers.")
    drop = lambda s: jax.sharding.NamedSharding(  # noqa: E731  (a scan's slice: no layer axis)
        s.mesh, jax.sharding.PartitionSpec(*tuple(s.spec)[1:]))
    gather = None if self.gather is None else tuple(
        (n, (drop(a), drop(b))) for n, (a, b) in self.gather)
    return QuantizedArray(self.data, method=self.method, shape=self.shape[1:], dtype=self.dtype,
                          stacked=False, in_axes=self.in_axes, gather=gather)

  def dequantize(self, dtype: Any = None):
    """The kernel as a ``jax.numpy`` array (see :func:`dequantize`)."""
    return dequantize(self, dtype)

  decode = dequantize

  def encode_like(self, x: Any) -> "QuantizedArray":
    """``x`` quantized with this array's method and layout (on the host).

    When ``x`` is this array's own kernel up to rounding (within 1e-3 of its
    largest value: far below one quantization step, far above float32 and
    bfloat16 rounding), this array itself is returned: re-quantizing a
    dequantized kernel is not exact for ``"nf4-dq"`` (its scales are
    quantized too). So is a re-quantization that gives the same codes.

    Raises:
      ValueError: ``x`` is traced (quantization runs on the host) or has
        another shape.
    """
    if isinstance(x, jax.core.Tracer):
      raise ValueError("A quantized kernel is re-quantized on the host: call lojax.unmerge "
                       "outside jax.jit when the base is quantized.")
    if tuple(np.shape(x)) != self.shape:
      raise ValueError(f"Cannot store an array of shape {tuple(np.shape(x))} like a "
                       f"QuantizedArray of shape {self.shape}.")
    x = np.asarray(jax.device_get(x), np.float32)
    own = np.asarray(self.dequantize(np.float32))
    if np.max(np.abs(x - own), initial=0.0) <= 1e-3 * np.max(np.abs(own), initial=0.0):
      return self
    q = quantize(x, self.method, in_axes=self.in_axes, stacked=self.stacked)
    if all(np.array_equal(np.asarray(q.data[k]), np.asarray(v)) for k, v in self.data.items()):
      return self
    return QuantizedArray(q.data, method=self.method, shape=self.shape, dtype=self.dtype,
                          stacked=self.stacked, in_axes=self.in_axes, gather=self.gather)

  def __repr__(self):
    return (f"QuantizedArray({self.method}, shape={self.shape}, dtype={self.dtype.name}, "
            f"{self.nbytes} bytes)")


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a :class:`QuantizedArray` (an ``is_leaf`` for tree walks)."""
  return isinstance(x, QuantizedArray)


def check_method(method):
  if method not in METHODS:
    raise ValueError(f"`quantize` must be one of {list(METHODS)} (or None); got {method!r}.")


def quantize(x: Any, method: str, /, *, in_axes: Sequence[int] | None = None,
             stacked: bool = False) -> QuantizedArray:
  """Quantizes a kernel (on the host, with NumPy).

  Args:
    x: the kernel, a float array in its own layout.
    method: ``"nf4"``, ``"nf4-dq"`` or ``"int8"``.
    in_axes: the kernel's input axes (per layer, i.e. not counting a stacked
      layer axis); required for ``"int8"`` (scales are per output channel).
      Default: all axes but the last.
    stacked: whether axis 0 of ``x`` is a stacked layer axis.

  Returns:
    A :class:`QuantizedArray` whose arrays are ``jax.numpy`` arrays.

  >>> import numpy as np
  >>> q = quantize(np.ones((128, 8), np.float32), "nf4")
  >>> q.data["codes"].shape, q.data["codes"].dtype.name   # 8 columns: flat blocks
  ((16, 32), 'uint8')
  >>> quantize(np.ones((8, 128), np.float32), "nf4").data["codes"].shape   # 2 per row
  (8, 2, 32)
  >>> float(abs(np.asarray(dequantize(q)) - 1).max())
  0.0
  """
  check_method(method)
  dtype = x.dtype if hasattr(x, "dtype") else np.float32
  data = quantize_np(np.asarray(x, np.float32), method, in_axes=in_axes, stacked=stacked)
  return QuantizedArray({k: jax.device_put(v) for k, v in data.items()}, method=method,
                        shape=np.shape(x), dtype=dtype, stacked=stacked, in_axes=in_axes)


def quantize_np(x: np.ndarray, method: str, *, in_axes=None, stacked=False) -> dict:
  """The stored arrays of ``quantize(x, method)``, as NumPy arrays."""
  lead = 1 if stacked else 0
  if method == "int8":
    axes = tuple(range(x.ndim - lead - 1)) if in_axes is None else tuple(in_axes)
    absmax = np.max(np.abs(x), axis=tuple(a + lead for a in axes), keepdims=True)
    scales = (absmax / 127).astype(np.float32)
    safe = np.where(scales > 0, scales, 1)
    codes = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return {"codes": codes, "scales": scales}
  per = x.shape[lead:]
  if len(per) > 1 and per[-1] % BLOCK == 0:   # blocks along the last axis, in the kernel's axes
    rows = x.reshape(x.shape[:-1] + (per[-1] // BLOCK, BLOCK))
  else:                                       # flat, padded to whole blocks
    rows = x.reshape(x.shape[:lead] + (-1,))
    n = rows.shape[-1]
    pad = -(-n // BLOCK) * BLOCK - n
    if pad:
      rows = np.pad(rows, [(0, 0)] * lead + [(0, pad)])
    rows = rows.reshape(rows.shape[:lead] + (-1, BLOCK))
  blocks = math.prod(rows.shape[lead:-1])
  scales = np.max(np.abs(rows), axis=-1).astype(np.float32)
  safe = np.where(scales > 0, scales, 1)[..., None]
  mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
  idx = np.searchsorted(mids, rows / safe).astype(np.uint8)
  codes = idx[..., 0::2] | (idx[..., 1::2] << 4)
  out = {"codes": codes.astype(np.uint8), "scales": scales}
  if method == "nf4-dq":
    flat = scales.reshape(scales.shape[:lead] + (-1,))
    mean = flat.mean(axis=-1).astype(np.float32)
    centred = flat - mean[..., None]
    sblocks = -(-blocks // SCALE_BLOCK)
    centred = np.pad(centred, [(0, 0)] * lead + [(0, sblocks * SCALE_BLOCK - blocks)])
    centred = centred.reshape(centred.shape[:lead] + (sblocks, SCALE_BLOCK))
    s_absmax = np.max(np.abs(centred), axis=-1).astype(np.float32)
    s_safe = np.where(s_absmax > 0, s_absmax, 1)[..., None]
    out["scales"] = np.clip(np.rint(centred / s_safe * 127), -127, 127).astype(np.int8)
    out["scales_absmax"] = s_absmax
    out["scales_mean"] = mean
  return out


def _in_kernel_axes(codes, shape, lead: int) -> bool:
  """Whether NF4 ``codes`` keep the kernel's axes (``[..., last/64, 32]``), not flat blocks."""
  return np.ndim(codes) == len(shape) + 1 and len(shape) - lead > 1


def _dequantize(xp, data: dict, method: str, shape, stacked: bool):
  """Dequantization written once for ``xp`` = numpy or jax.numpy (float32)."""
  codes = data["codes"]
  if method == "int8":
    return codes.astype(np.float32) * data["scales"]
  lead = 1 if stacked else 0
  scales = data["scales"]
  if method == "nf4-dq":
    blocks = math.prod(codes.shape[lead:-1])
    s = scales.astype(np.float32) * (data["scales_absmax"][..., None] / 127)
    s = s.reshape(s.shape[:-2] + (-1,))[..., :blocks] + data["scales_mean"][..., None]
    scales = s.reshape(codes.shape[:-1])
  idx = xp.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[:-1] + (BLOCK,))
  vals = xp.asarray(NF4_LEVELS)[idx.astype(np.int32)] * scales[..., None]
  if _in_kernel_axes(codes, shape, lead):
    return vals.reshape(shape)
  vals = vals.reshape(vals.shape[:lead] + (-1,))
  per_layer = math.prod(shape[lead:])
  return vals[..., :per_layer].reshape(shape)


def dequantize(x: Any, dtype: Any = None):
  """The float kernel that a :class:`QuantizedArray` stands for (jit-able; on concrete
  arrays, one compiled program per layout).

  Args:
    x: a :class:`QuantizedArray` (other values are returned unchanged).
    dtype: result dtype; default: the original kernel's dtype.

  Returns:
    A ``jax.numpy`` array of ``x.shape``.

  >>> import numpy as np
  >>> q = quantize(np.array([[127.0, -254.0], [-63.0, 128.0]], np.float32), "int8")
  >>> np.asarray(q.data["codes"]).tolist(), np.asarray(q.data["scales"]).tolist()
  ([[127, -127], [-63, 64]], [[1.0, 2.0]])
  >>> np.asarray(dequantize(q)).tolist()
  [[127.0, -254.0], [-63.0, 128.0]]
  """
  if not is_quantized(x):
    return x
  data = x.data
  dtype = np.dtype(x.dtype if dtype is None else dtype)
  if not any(isinstance(v, jax.core.Tracer) for v in data.values()):
    # concrete arrays: one compiled program per layout, not one per op
    return _decoded(data, x.method, tuple(x.shape), bool(x.stacked), dtype)
  if x.gather is not None:
    gather = dict(x.gather)   # FSDP: gather the stored arrays, then decode the whole kernel
    data = {k: _all_gather(v, *gather[k]) if k in gather else v for k, v in data.items()}
  return _dequantize(jnp, data, x.method, x.shape, x.stacked).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _decoded(data, method, shape, stacked, dtype):
  return _dequantize(jnp, data, method, shape, stacked).astype(dtype)


def _all_gather(v, stored, gathered):
  """``v`` (sharded as ``stored``) all-gathered to ``gathered``, which drops mesh axes from
  its entries: an explicit per-array collective (``shard_map``), so the gather happens
  where the array is decoded, e.g. one layer's codes inside a scan, rather than wherever
  sharding propagation would place it. An axis whose kept mesh axes are not the leading
  ones of its entry is left as stored."""
  ndim = np.ndim(v)
  pad = lambda spec: [tuple(e) if isinstance(e, tuple) else () if e is None else (e,)  # noqa
                      for e in list(spec) + [None] * (ndim - len(spec))]
  ins, outs = pad(stored.spec), pad(gathered.spec)
  moves, kept = [], []
  for axis, (a, b) in enumerate(zip(ins, outs)):
    if a[:len(b)] == b:
      kept.append(b)
      if a[len(b):]:
        moves.append((axis, a[len(b):]))
    else:
      kept.append(a)
  if not moves:
    return v
  spec = lambda entries: jax.sharding.PartitionSpec(  # noqa: E731
      *[None if not e else e[0] if len(e) == 1 else e for e in entries])

  def local(x):
    for axis, names in moves:
      x = jax.lax.all_gather(x, names[0] if len(names) == 1 else names, axis=axis, tiled=True)
    return x

  return jax.shard_map(local, mesh=stored.mesh, in_specs=spec(ins), out_specs=spec(kept),
                       check_vma=False)(v)


def dequantize_np(x: QuantizedArray) -> np.ndarray:
  """Like :func:`dequantize`, on the host (float32 NumPy)."""
  data = {k: np.asarray(v) for k, v in x.data.items()}
  return _dequantize(np, data, x.method, x.shape, x.stacked)


def fake_quantize_np(x: np.ndarray, method: str, *, in_axes=None, stacked=False) -> np.ndarray:
  """``dequantize(quantize(x))`` on the host (float32 NumPy)."""
  data = quantize_np(np.asarray(x, np.float32), method, in_axes=in_axes, stacked=stacked)
  return _dequantize(np, data, method, np.shape(x), stacked)
