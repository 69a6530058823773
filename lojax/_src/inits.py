"""Adapter initialisation (``LoraSpec.init_lora_weights``), PEFT's numbers.

With A the input-side factor ``[in..., r]`` and B the output-side factor
``[r, out...]`` (a Flax kernel is ``[in, out]``, PEFT's weight ``[out, in]``):

* ``True``: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform with
  a=sqrt(5)), B = 0 — the delta is zero at init. Embedding tables swap the
  roles: A = 0, B ~ N(0, 1).
* ``"gaussian"``: A ~ N(0, (1/r)^2), B = 0 (embeddings as for ``True``).
* ``False``: A and B both random (the delta is not zero; for debugging).

``fan_in`` is the product of the kernel's input axes (for a conv, window x
input channels, as in PyTorch).

Random draws use NumPy's PCG64 generator seeded from the JAX key and the
module path: deterministic for a given key, independent of the order of the
targets, and free of the per-shape XLA compilations that ``jax.random``
would cost on every new adapter shape.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

_LATER = ("pissa", "olora", "loftq", "orthogonal")


def generator(key, path: str) -> np.random.Generator:
  """A NumPy generator determined by a JAX PRNG key and a module path."""
  data = np.asarray(jax.random.key_data(key)).ravel().astype(np.uint64).tolist()
  return np.random.default_rng(data + [zlib.crc32(path.encode())])


def init_factors(init, key, target, dtype, kernel=None):
  """Returns (A, B) for ``target`` (a TargetMeta)."""
  del kernel  # data-driven inits (pissa, olora, loftq) will read the kernel.
  rng = generator(key, target.path)

  def uniform(shape, bound):
    return jnp.asarray(rng.uniform(-bound, bound, shape), dtype)

  def normal(shape, std=1.0):
    return jnp.asarray(rng.standard_normal(shape) * std, dtype)

  a_shape, b_shape = target.a_shape(), target.b_shape()
  lead = 1 if target.stacked else 0
  fan_in = math.prod(a_shape[lead:-1])
  if isinstance(init, str) and (init in _LATER or init.startswith("pissa_niter_")):
    raise ValueError(
        f"`init_lora_weights={init!r}` is not available in this version of lojax; "
        "use True, False or 'gaussian'.")
  if target.kind == "embed" and init is not False:
    return jnp.zeros(a_shape, dtype), normal(b_shape)
  bound = 1.0 / math.sqrt(fan_in)
  if init is True:
    return uniform(a_shape, bound), jnp.zeros(b_shape, dtype)
  if init == "gaussian":
    return normal(a_shape, 1.0 / target.r), jnp.zeros(b_shape, dtype)
  if init is False:
    return uniform(a_shape, bound), uniform(b_shape, 1.0 / math.sqrt(target.r))
  raise ValueError(f"Unknown `init_lora_weights={init!r}`.")
