"""DoRA (weight-decomposed LoRA): a trainable magnitude per output feature.

The adapted kernel is ``W' = (m / n) * (W + s*A@B)`` with ``n`` the norm of
``W + s*A@B`` over the kernel's input axes (one value per output feature,
per layer for stacked kernels) and ``m`` initialised to that norm, so the
model is unchanged at init. In training lojax computes
``(m/n) * (x@W + s*(x@A)@B)`` without forming ``W + s*A@B``: ``n`` comes from
``||W||²``, ``AᵀW`` and ``AᵀA`` (no token factor) and is a constant for the
gradient, as in the DoRA paper (section 4.3).
"""

from __future__ import annotations

import jax.numpy as jnp

from lojax._src import tagged as tg

KEY = "lora_magnitude"


def _shell(t, w, a, b, m=None):
  return tg.Tagged(w, t.leaf_path, t.sides(), (tg.Term(a, b, m=m),), None)


def column_norm(t, w, a, b):
  """||W + s*A@B|| over the input axes, shaped like the magnitude [L?, out...]."""
  merged = w.astype(jnp.float32) + tg.delta(_shell(t, w, a, b), jnp.float32)
  lead = 1 if t.stacked else 0
  in_axes = tuple(lead + ax for ax in t.in_axes)
  return jnp.sqrt(jnp.sum(jnp.square(merged), axis=in_axes))


def init_magnitude(t, kernel, a, b):
  """The DoRA magnitude at init: the column norms of ``W + s*A@B``."""
  if t.kind == "embed":
    raise ValueError(f"DoRA on the embedding '{t.path}' is not supported; leave embeddings "
                     "out of `target_modules` when `use_dora=True`.")
  if t.stacked and t.layers is not None:
    raise ValueError(f"DoRA on a subset of the stacked layers of '{t.path}' is not supported; "
                     "drop `layers_to_transform` or adapt every layer.")
  return column_norm(t, jnp.asarray(kernel), a, b)


def term_magnitude(t, magnitude):
  """The magnitude laid out like factor B with a rank axis of size 1."""
  lead = 1 if t.stacked else 0
  return jnp.expand_dims(magnitude, lead)


def merged_kernel(t, w, a, b, magnitude):
  """``(m/n) * (W + s*A@B)`` in the kernel's layout (exact)."""
  return tg.materialize(_shell(t, w, a, b, term_magnitude(t, magnitude)))


def unmerged_kernel(t, merged, base_w, a, b, magnitude):
  """Recovers ``W`` from a merged kernel: ``W' * n/m - s*A@B`` with n from the base."""
  n = column_norm(t, base_w, a, b)
  lead = 1 if t.stacked else 0
  shape = [1 if (j - lead) in t.in_axes and j >= lead else d
           for j, d in enumerate(t.shape)]
  scale = (n / magnitude.astype(jnp.float32)).reshape(shape)
  return merged.astype(jnp.float32) * scale - tg.delta(_shell(t, base_w, a, b), jnp.float32)


