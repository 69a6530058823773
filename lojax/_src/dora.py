"""DoRA (weight-decomposed LoRA): a trainable magnitude per output feature.

The adapted kernel is ``W' = (m / n) * (W + s*A@B)`` with ``n`` the norm of
``W + s*A@B`` over the kernel's input axes (one value per output feature,
per layer for stacked kernels) and ``m`` initialised to that norm, so the
model is unchanged at init. In training lojax computes
``(m/n) * (x@W + s*(x@A)@B)`` without forming ``W + s*A@B``: ``n`` comes from
``||W||²``, ``AᵀW`` and ``AᵀA`` (no token factor) and is a constant for the
gradient, as in the DoRA paper (section 4.3). With ``lora_dropout`` in
training the step computes PEFT's (and the paper's) placement,
``x@W + (m/n - 1)*(drop(x)@W) + (m/n)*s*(drop(x)@A)@B``: one extra frozen
matmul on the dropped input, still no kernel-sized temporary.

A DoRA target holds plain LoRA's factors plus ``lora_magnitude``
``[L?, out...]``; the compute path gets it as :attr:`Factors.m`.
"""

from __future__ import annotations

import jax.numpy as jnp

from lojax._src import lora
from lojax._src import model
from lojax._src import tagged as tg
from lojax._src.model import Factors

KEY = "lora_magnitude"


def _shell(t, w, a, b, m=None):
  return tg.Tagged(w, t.leaf_path, t.sides(), (tg.Term(a, b, m=m),), None)


def column_norm(t, w, a, b):
  """||W + s*A@B|| over the input axes, shaped like the magnitude [L?, out...]."""
  merged = w.astype(jnp.float32) + tg.delta(_shell(t, w, a, b), jnp.float32)
  lead = 1 if t.stacked else 0
  in_axes = tuple(lead + ax for ax in t.in_axes)
  return jnp.sqrt(jnp.sum(jnp.square(merged), axis=in_axes))


def term_magnitude(t, magnitude):
  """The magnitude laid out like factor B with a rank axis of size 1."""
  lead = 1 if t.stacked else 0
  return jnp.expand_dims(magnitude, lead)


class Dora(lora.Lora):
  """``(m / ||W + s*A@B||) * (W + s*A@B)``."""

  name = "dora"

  def check_target(self, t):
    return self._refuse_experts(t, "DoRA")

  def layout(self, t):
    return dict(super().layout(t), **{KEY: t.b_roles()[:1] + t.out_axes if t.stacked
                                      else t.out_axes})

  def init(self, spec, key, t, kernel, dtype, quantize):
    if t.kind == "embed":
      raise ValueError(f"DoRA on the embedding '{t.path}' is not supported; leave embeddings "
                       "out of `target_modules` when `use_dora=True`.")
    if t.stacked and t.layers is not None:
      raise ValueError(f"DoRA on a subset of the stacked layers of '{t.path}' is not "
                       "supported; drop `layers_to_transform` or adapt every layer.")
    entry, new = super().init(spec, key, t, kernel, dtype, quantize)
    w = model.decode(kernel if new is None else new)  # the magnitude of the rewritten kernel
    f = super().factors(t, entry)
    entry[KEY] = column_norm(t, jnp.asarray(w), f.a, f.b).astype(dtype)
    return entry, new

  def factors(self, t, entry):
    f = super().factors(t, entry)
    return Factors(f.a, f.b, term_magnitude(t, entry[KEY]))

  def merge(self, t, w, entry):
    f = self.factors(t, entry)
    return tg.materialize(_shell(t, w, f.a, f.b, f.m))

  def unmerge(self, t, merged, entry, base_w):
    """Recovers ``W`` from a merged kernel: ``W' * n/m - s*A@B`` with n from the base."""
    f = self.factors(t, entry)
    n = column_norm(t, base_w, f.a, f.b)
    lead = 1 if t.stacked else 0
    shape = [1 if (j - lead) in t.in_axes and j >= lead else d for j, d in enumerate(t.shape)]
    scale = (n / entry[KEY].astype(jnp.float32)).reshape(shape)
    return merged.astype(jnp.float32) * scale - tg.delta(_shell(t, base_w, f.a, f.b),
                                                         jnp.float32)


  def to_peft(self, t, layer):
    """Plain LoRA's tensors plus ``lora_magnitude_vector [out]``."""
    return dict(super().to_peft(t, layer), lora_magnitude_vector=layer[KEY].reshape(-1))

  def from_peft(self, t, tensors):
    entry, m = super().from_peft(t, tensors), tensors.get("lora_magnitude_vector")
    if entry is None or m is None:
      return None
    return dict(entry, **{KEY: m.reshape(tuple(t.kernel_shape[i] for i in t.out_axes))})


DORA = Dora()
