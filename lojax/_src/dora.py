"""DoRA (weight-decomposed LoRA): a trainable magnitude per output feature.

The adapted kernel is ``W' = (m / n) * (W + s*A@B)`` with ``n`` the norm of
``W + s*A@B`` over the kernel's input axes (one value per output feature,
per layer for stacked kernels) and ``m`` initialised to that norm, so the
model is unchanged at init. In training lojax computes
``(m/n) * (x@W + s*(x@A)@B)`` without forming ``W + s*A@B``: ``n`` comes from
``||W||²``, ``AᵀW`` and ``AᵀA`` (no token factor) and is a constant for the
gradient, as in the DoRA paper (section 4.3). On the memory-lean path
(``rules._dot_fused``) the scale ``m/n`` multiplies the one output of
``fused.dense``: the backward keeps that output (for m's gradient) and
per-column vectors, nothing kernel-sized. With ``lora_dropout`` in
training the step computes PEFT's (and the paper's) placement,
``x@W + (m/n - 1)*(drop(x)@W) + (m/n)*s*(drop(x)@A)@B``: one extra frozen
matmul on the dropped input, still no kernel-sized temporary.

A DoRA target holds plain LoRA's factors plus ``lora_magnitude``
``[L?, out...]``; the compute path gets it as :attr:`Factors.m`.

Degenerate columns never give NaN or inf at init, in the factorized step,
merge, unmerge or the merged fallback for uses lojax cannot factorize
(``tagged.dora_factor``). Every norm is computed scaled (:func:`tagged.norm`): the values are divided by a power of two near the column's
largest value, so no square overflows (above ~1.8e19 in float32) or
underflows, and the result is bit-identical to the plain formula wherever
that one is finite. A column whose ``W + s*A@B`` is all zero has no
direction: its scale ``m / n`` is 0 (:func:`tagged.ratio`), so it stays zero, where
PEFT (which has no epsilon in the DoRA norm or division) gives ``0/0 = NaN``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lojax._src import lora
from lojax._src import model
from lojax._src import tagged as tg
from lojax._src.model import Factors
from lojax._src.tagged import norm, ratio

KEY = "lora_magnitude"


def _shell(t, w, a, b):
  return tg.Tagged(w, t.leaf_path, t.sides(), (tg.Term(a, b),), None)


def merged_kernel(t, w, a, b):
  """``W + s*A@B`` in float32, in the kernel's layout."""
  return w.astype(jnp.float32) + tg.delta(_shell(t, w, a, b), jnp.float32)


def column_norm(t, w, a, b):
  """||W + s*A@B|| over the input axes, shaped like the magnitude [L?, out...]."""
  lead = 1 if t.stacked else 0
  return norm(merged_kernel(t, w, a, b), tuple(lead + ax for ax in t.in_axes))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _init_norm(t, w, a, b, dtype):
  """The initial magnitude, :func:`column_norm` compiled once per target layout (eager, its
  ops would each compile on their own for every kernel shape)."""
  return column_norm(t, w, a, b).astype(dtype)


def _per_column(t, v):
  """A ``[L?, out...]`` value laid out to broadcast against the kernel."""
  lead = 1 if t.stacked else 0
  shape = [1 if (j - lead) in t.in_axes and j >= lead else d for j, d in enumerate(t.shape)]
  return v.reshape(shape)


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
    entry[KEY] = _init_norm(t, jnp.asarray(w), f.a, f.b, dtype)
    return entry, new

  def factors(self, t, entry):
    f = super().factors(t, entry)
    return Factors(f.a, f.b, term_magnitude(t, entry[KEY]))

  def merge(self, t, w, entry):
    """``(m/n) * (W + s*A@B)``; a column with ``n == 0`` merges to zero.

    ``n`` is a constant for the gradient, as in the training step.
    """
    f = super().factors(t, entry)
    v = merged_kernel(t, w, f.a, f.b)
    lead = 1 if t.stacked else 0
    n = jax.lax.stop_gradient(norm(v, tuple(lead + ax for ax in t.in_axes)))
    return (v * _per_column(t, ratio(entry[KEY], n))).astype(w.dtype)

  def unmerge(self, t, merged, entry, base_w):
    """Recovers ``W`` from a merged kernel: ``W' * n/m - s*A@B`` with n from the base.

    A column that merged to zero (``m/n == 0``: a zero magnitude, or a zero
    ``W + s*A@B``) holds nothing of ``W``; it comes back as the base's column.
    """
    f = super().factors(t, entry)
    n = column_norm(t, base_w, f.a, f.b)
    m = entry[KEY].astype(jnp.float32)
    kept = ratio(m, n) != 0                  # then m != 0 and n > 0
    scale = _per_column(t, jnp.where(kept, n / jnp.where(kept, m, 1.0), 0.0))
    out = merged.astype(jnp.float32) * scale - tg.delta(_shell(t, base_w, f.a, f.b),
                                                        jnp.float32)
    return jnp.where(_per_column(t, kept), out, base_w.astype(jnp.float32))

  def to_peft(self, t, layer):
    """Plain LoRA's tensors plus ``lora_magnitude_vector [out]``."""
    return dict(super().to_peft(t, layer), lora_magnitude_vector=layer[KEY].reshape(-1))

  def from_peft(self, t, tensors):
    entry, m = super().from_peft(t, tensors), tensors.get("lora_magnitude_vector")
    if entry is None or m is None:
      return None
    if m.ndim != 1:   # PEFT's magnitude is one value per output feature
      raise ValueError(f"lora_magnitude_vector is 1-D in PEFT, got {m.shape}")
    return dict(entry, **{KEY: m.reshape(tuple(t.kernel_shape[i] for i in t.out_axes))})


DORA = Dora()
