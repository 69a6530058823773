"""Adapter initialisation (``LoraSpec.init_lora_weights``), PEFT's numbers.

With A the input-side factor ``[in..., r]`` and B the output-side factor
``[r, out...]`` (a Flax kernel is ``[in, out]``, PEFT's weight ``[out, in]``),
s the scaling and, per layer, M the kernel as an ``[in, out]`` matrix (input
axes flattened to rows, output axes to columns; PEFT's W is M transposed):

* ``True``: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform with
  a=sqrt(5)), B = 0 — the delta is zero at init. Embedding tables swap the
  roles: A = 0, B ~ N(0, 1).
* ``"gaussian"``: A ~ N(0, (1/r)^2), B = 0 (embeddings as for ``True``).
* ``False``: A and B both random (the delta is not zero; for debugging):
  A as for ``True``, B ~ U(-1/sqrt(r), 1/sqrt(r)); embeddings: both N(0, 1).
* ``"pissa"``: M = U S Vh (SVD); A = U_r sqrt(S_r/s), B = sqrt(S_r/s) Vh_r;
  the base kernel becomes the residual M - s A B, so the model's output at
  init is unchanged. ``"pissa_niter_<K>"``: the same with a randomized SVD
  (a Gaussian sketch of r columns and K power iterations).
* ``"olora"``: W = Q R (QR of PEFT's weight, W = M^T); A = R_r^T,
  B = Q_r^T; the base kernel becomes M - s A B.
* ``"orthogonal"``: r even; Q an orthogonal r x r matrix, G1 ~ N(0, 1)
  ``[in, r/2]`` and G2 ~ N(0, 1) ``[out, r/2]``: A = G1 Q[0::2],
  B = (G2 Q[1::2])^T, so A B = 0 with A, B != 0.
* ``"loftq"`` (``loftq_config={"loftq_bits": 4 | 8, "loftq_iter": n}``):
  starting from X = M, n times: Q = deq(quant(X)), L R = the rank-r SVD
  truncation of M - Q (L = U_r sqrt(S_r), R = sqrt(S_r) Vh_r), X = M - L R.
  The base kernel is stored quantized (``quant(X)`` of the last round, NF4
  for 4 bits, int8 for 8), A = L, B = R (PEFT's A = R, B = L of its
  transposed weight) — not divided by s, as in PEFT, so
  deq(base) + s A B approximates M when s = 1 (``lora_alpha == r``).

``fan_in`` is the product of the kernel's input axes (for a conv, window x
input channels, as in PyTorch). Data-driven inits work in NumPy (float64 up
to 2^20 values per kernel, float32 above), one kernel (one layer of a stacked
kernel) at a time, and only the adapted layers of a stacked kernel are
rewritten.

Random draws use NumPy's PCG64 generator seeded from the JAX key and the
module path: deterministic for a given key, independent of the order of the
targets, and free of the per-shape XLA compilations that ``jax.random``
would cost on every new adapter shape.
"""

from __future__ import annotations

import math
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import quant

REWRITES_BASE = ("pissa", "olora", "loftq")  # and "pissa_niter_<K>"
_F64_MAX = 1 << 20  # kernels up to this size (per layer) are decomposed in float64


def rewrites_base(init) -> bool:
  """Whether ``init`` replaces the base kernel (PiSSA, OLoRA, LoftQ)."""
  return isinstance(init, str) and (init in REWRITES_BASE or init.startswith("pissa_niter_"))


def generator(key, path: str) -> np.random.Generator:
  """A NumPy generator determined by a JAX PRNG key and a module path."""
  data = np.asarray(jax.random.key_data(key)).ravel().astype(np.uint64).tolist()
  return np.random.default_rng(data + [zlib.crc32(path.encode())])


def to_device(x, dtype) -> jax.Array:
  """A host array on the default device as ``dtype``, converted on the host (``jnp.asarray``
  would compile a conversion program per new shape)."""
  return jax.device_put(np.asarray(x, np.dtype(dtype)))


def zeros(shape, dtype) -> jax.Array:
  """``jnp.zeros`` without compiling a program per shape (a wrapped model has many)."""
  return jax.device_put(np.zeros(shape, np.dtype(dtype)))


def init_factors(init, key, target, dtype, kernel=None):
  """Returns (A, B) for ``target`` (a TargetMeta) for the random inits."""
  del kernel
  assert not rewrites_base(init), init  # see init_target
  rng = generator(key, target.path)

  def uniform(shape, bound):
    return to_device(rng.uniform(-bound, bound, shape), dtype)

  def normal(shape, std=1.0):
    return to_device(rng.standard_normal(shape) * std, dtype)

  a_shape, b_shape = target.a_shape(), target.b_shape()
  fan_in = target.fan_in   # per expert
  if init == "orthogonal":
    pairs = [orthogonal_factors(rng, fan_in, target.fan_out, target.r)
             for _ in range((target.n_layers or 1) * target.n_experts)]
    a = np.stack([p[0] for p in pairs]).reshape(a_shape)
    b = np.stack([p[1] for p in pairs]).reshape(b_shape)
    return to_device(a, dtype), to_device(b, dtype)
  if target.kind == "embed":  # PEFT: A = 0 and B ~ N(0, 1); both N(0, 1) when init is False
    return (normal(a_shape) if init is False else zeros(a_shape, dtype)), normal(b_shape)
  bound = 1.0 / math.sqrt(fan_in)
  if init is True:
    return uniform(a_shape, bound), zeros(b_shape, dtype)
  if init == "gaussian":
    return normal(a_shape, 1.0 / target.r), zeros(b_shape, dtype)
  if init is False:
    return uniform(a_shape, bound), uniform(b_shape, 1.0 / math.sqrt(target.r))
  raise ValueError(f"Unknown `init_lora_weights={init!r}`.")


# ------------------------------------------------------------ matrix forms ---

def orthogonal_factors(rng, n_in: int, n_out: int, r: int):
  """(A [n_in, r], B [r, n_out]) with A B = 0 and A, B != 0 (r even)."""
  q, _ = np.linalg.qr(rng.standard_normal((r, r)))
  a = rng.standard_normal((n_in, r // 2)) @ q[0::2]
  b = (rng.standard_normal((n_out, r // 2)) @ q[1::2]).T
  return a, b


def randomized_svd(m: np.ndarray, r: int, niter: int, rng):
  """Rank-r SVD of ``m`` from a Gaussian sketch with ``niter`` power iterations."""
  q, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], r)))
  for _ in range(niter):
    q, _ = np.linalg.qr(m.T @ q)
    q, _ = np.linalg.qr(m @ q)
  u, s, vh = np.linalg.svd(q.T @ m, full_matrices=False)
  return q @ u, s, vh


def pissa_factors(m: np.ndarray, r: int, scaling: float, niter: int | None = None, rng=None):
  """PiSSA's (A [in, r], B [r, out]) for the kernel matrix ``m`` [in, out]."""
  if niter is None:
    u, s, vh = np.linalg.svd(m, full_matrices=False)
  else:
    u, s, vh = randomized_svd(m, r, niter, rng)
  root = np.sqrt(s[:r] / scaling)
  return u[:, :r] * root, root[:, None] * vh[:r]


def olora_factors(m: np.ndarray, r: int):
  """OLoRA's (A [in, r], B [r, out]): from the QR of PEFT's weight W = m^T.

  Only the first r columns of Q and rows of R are needed; Householder QR
  fixes them in its first r steps, i.e. from W's first r columns:
  Q_r = qr(W[:, :r]).Q and R_r = Q_r^T W (O(r n^2), not O(n^3)).
  """
  w = m.T
  q, _ = np.linalg.qr(w[:, :r])
  return (q.T @ w).T, q.T


def loftq_factors(m: np.ndarray, r: int, iters: int, fake_quant):
  """LoftQ on the kernel matrix ``m``: returns (X, A, B), base = quant(X).

  ``fake_quant`` maps a matrix to ``deq(quant(matrix))``.
  """
  x = m
  for _ in range(iters):
    q = fake_quant(x)
    u, s, vh = np.linalg.svd(m - q, full_matrices=False)
    root = np.sqrt(s[:r])
    a, b = u[:, :r] * root, root[:, None] * vh[:r]
    if _ < iters - 1:
      x = m - a @ b
  return x, a, b


def to_matrix(k: np.ndarray, in_axes) -> np.ndarray:
  """A per-layer kernel as its [prod(in dims), prod(out dims)] matrix."""
  out_axes = tuple(a for a in range(k.ndim) if a not in in_axes)
  rows = math.prod(k.shape[a] for a in in_axes)
  return k.transpose(tuple(in_axes) + out_axes).reshape(rows, -1)


def from_matrix(m: np.ndarray, shape, in_axes) -> np.ndarray:
  """Inverse of :func:`to_matrix`."""
  out_axes = tuple(a for a in range(len(shape)) if a not in in_axes)
  perm = tuple(in_axes) + out_axes
  return m.reshape([shape[a] for a in perm]).transpose(np.argsort(perm))


# ------------------------------------------------------- base-rewriting ---

def loftq_method(spec, quantize: str | None) -> str:
  """The quantization scheme LoftQ uses and stores the base with."""
  bits = spec.loftq_config.get("loftq_bits", 4)
  default = "nf4" if bits == 4 else "int8"
  return quantize or default


def init_target(spec, key, target, leaf, dtype, *, quantize: str | None = None):
  """(A, B, new base leaf or None) for one target.

  The new leaf is the rewritten kernel (PiSSA/OLoRA residual, LoftQ base),
  quantized when ``quantize`` is given or the init is LoftQ; ``None`` when
  the base leaf stays as it is. Works one layer at a time in float64.
  """
  init = spec.init_lora_weights
  was = leaf.method if quant.is_quantized(leaf) else None
  method = loftq_method(spec, quantize or was) if init == "loftq" else (quantize or was)
  if not rewrites_base(init):
    a, b = init_factors(init, key, target, dtype)
    if quantize is None:
      return a, b, None
    return a, b, quant.quantize(leaf, quantize, in_axes=target.in_axes,
                                stacked=bool(target.stacked))
  kernel_dtype = leaf.dtype
  # float64 where it is cheap; LAPACK's float32 SVD/QR is several times faster on big kernels.
  work = np.float64 if math.prod(target.kernel_shape) <= _F64_MAX else np.float32
  w = np.array(quant.dequantize_np(leaf) if was else leaf, work)
  layers = (target.layers if target.layers is not None else range(target.stacked)
            ) if target.stacked else [None]
  rng = generator(key, target.path)
  per_shape = target.kernel_shape
  a_list, b_list = [], []
  for layer in layers:
    k = w[layer] if layer is not None else w
    m = to_matrix(k, target.in_axes)
    if init == "loftq":
      def fake_quant(x):
        kx = from_matrix(x, per_shape, target.in_axes)
        return to_matrix(quant.fake_quantize_np(kx, method, in_axes=target.in_axes),
                         target.in_axes).astype(work)
      x, a, b = loftq_factors(m, target.r, spec.loftq_config.get("loftq_iter", 1), fake_quant)
    else:
      if init == "olora":
        a, b = olora_factors(m, target.r)
      else:
        niter = None if init == "pissa" else int(init[len("pissa_niter_"):])
        a, b = pissa_factors(m, target.r, target.scaling, niter, rng)
      x = m - target.scaling * (a @ b)
    new = from_matrix(x, per_shape, target.in_axes)
    if layer is None:
      w = new
    else:
      w[layer] = new
    a_list.append(a)
    b_list.append(b)
  a = np.stack(a_list).reshape(target.a_shape())
  b = np.stack(b_list).reshape(target.b_shape())
  if method is None:
    new_leaf = jnp.asarray(w, kernel_dtype)
  else:
    new_leaf = quant.quantize(w.astype(np.float32), method, in_axes=target.in_axes,
                              stacked=bool(target.stacked))
    new_leaf = quant.QuantizedArray(new_leaf.data, method=method, shape=new_leaf.shape,
                                    dtype=kernel_dtype, stacked=new_leaf.stacked,
                                    in_axes=new_leaf.in_axes)
  return to_device(a, dtype), to_device(b, dtype), new_leaf


def check(spec, t, leaf, quantize: str | None) -> list[str]:
  """Why ``spec``'s init (or ``quantize``) does not fit target ``t``: one line per problem."""
  init = spec.init_lora_weights
  bad = []
  if init == "orthogonal" and t.r % 2:
    bad.append(f"  {t.path}: `init_lora_weights='orthogonal'` needs an even rank, this target "
               f"has r={t.r} (check `rank_pattern`)")
  if rewrites_base(init) and t.expert_axes:
    bad.append(f"  {t.path}: `init_lora_weights={init!r}` does not support expert kernels yet "
               f"(axes {list(t.expert_axes)} index experts)")
  elif rewrites_base(init) and t.r > min(t.fan_in, t.fan_out):
    bad.append(f"  {t.path}: `init_lora_weights={init!r}` needs r <= min(fan_in, fan_out) = "
               f"{min(t.fan_in, t.fan_out)}, got r={t.r}")
  if (init == "loftq" or quantize is not None) and t.kind != "dense":
    what = "`init_lora_weights='loftq'`" if init == "loftq" else f"`quantize={quantize!r}`"
    bad.append(f"  {t.path}: {what} supports dense (matmul) kernels only; this is a "
               f"{t.kind} kernel")
  if init == "loftq":
    bits = spec.loftq_config.get("loftq_bits", 4)
    method = quantize or (leaf.method if quant.is_quantized(leaf) else None)
    if method is not None and (method == "int8") != (bits == 8):
      bad.append(f"  {t.path}: `loftq_config['loftq_bits']={bits}` does not match the "
                 f"quantization {method!r} (4 bits: 'nf4' or 'nf4-dq', 8 bits: 'int8')")
  return bad


def warn_loftq_scaling(spec, targets) -> None:
  """LoftQ's factors approximate the kernel only for scaling 1 (as in PEFT): say so."""
  if spec.init_lora_weights == "loftq" and (odd := sorted({t.scaling for t in targets} - {1.0})):
    warnings.warn(
        f"LoftQ's factors are not divided by the scaling (as in PEFT): at init the model "
        f"computes deq(base) + s*A@B with s = {odd}, which approximates the original "
        "kernels only for s = 1. Set `lora_alpha` equal to `r` (without `use_rslora`).",
        stacklevel=3)
