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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_LATER = ("pissa", "olora", "loftq", "orthogonal")


def init_factors(init, key, target, dtype, kernel=None):
  """Returns (A, B) for ``target`` (a TargetMeta)."""
  del kernel  # data-driven inits (pissa, olora, loftq) will read the kernel.
  ka, kb = jax.random.split(key)
  a_shape, b_shape = target.a_shape(), target.b_shape()
  lead = 1 if target.stacked else 0
  fan_in = math.prod(a_shape[lead:-1])
  if isinstance(init, str) and (init in _LATER or init.startswith("pissa_niter_")):
    raise ValueError(
        f"`init_lora_weights={init!r}` is not available in this version of lojax; "
        "use True, False or 'gaussian'.")
  if target.kind == "embed" and init is not False:
    return jnp.zeros(a_shape, dtype), jax.random.normal(kb, b_shape, dtype)
  bound = 1.0 / math.sqrt(fan_in)
  if init is True:
    return jax.random.uniform(ka, a_shape, dtype, -bound, bound), jnp.zeros(b_shape, dtype)
  if init == "gaussian":
    return jax.random.normal(ka, a_shape, dtype) / target.r, jnp.zeros(b_shape, dtype)
  if init is False:
    b_bound = 1.0 / math.sqrt(target.r)
    return (jax.random.uniform(ka, a_shape, dtype, -bound, bound),
            jax.random.uniform(kb, b_shape, dtype, -b_bound, b_bound))
  raise ValueError(f"Unknown `init_lora_weights={init!r}`.")
