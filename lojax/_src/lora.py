"""Plain LoRA, the variant every other one extends.

A target holds ``lora_A [L?, in..., r]`` and ``lora_B [L?, r, out...]`` (a
stacked kernel's adapted layers only); its delta is ``s * A @ B`` with ``s``
the target's scaling, in the kernel's own layout.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import inits
from lojax._src import model
from lojax._src import tagged as tg
from lojax._src.model import Factors, TargetMeta

A, B = "lora_A", "lora_B"
BIAS = "lora_B_bias"   # lora_bias: PEFT's lora_B.bias


def delta(t: TargetMeta, f: Factors, dtype) -> Any:
  """The delta ``a @ b`` of ``f`` in the layout of ``t``'s leaf (materialised)."""
  shell = tg.Tagged(jax.ShapeDtypeStruct(t.shape, dtype), t.leaf_path, t.sides(),
                    (tg.Term(f.a, f.b),), None)
  return tg.delta(shell, dtype)


class Lora(model.Variant):
  """``W + s * A @ B``."""

  name = "lora"
  splittable = True

  def layout(self, t: TargetMeta) -> dict[str, tuple]:
    return {A: t.a_roles(), B: t.b_roles()}

  def init(self, spec, key, t, kernel, dtype, quantize):
    a, b, new = inits.init_target(spec, key, t, kernel, dtype, quantize=quantize)
    return {A: a, B: b}, new

  def factors(self, t: TargetMeta, entry: Mapping) -> Factors:
    b = entry[B]
    return Factors(t.expand_layers(entry[A]),
                   t.expand_layers(b) * jnp.asarray(t.scaling, b.dtype))

  def merge(self, t, w, entry):
    d = delta(t, self.factors(t, entry), jnp.promote_types(w.dtype, jnp.float32))
    return w.astype(d.dtype) + d

  def unmerge(self, t, merged, entry, base_w):
    d = delta(t, self.factors(t, entry), jnp.promote_types(merged.dtype, jnp.float32))
    return merged.astype(d.dtype) - d

  def unscaled(self, t, entry, scaling):
    return dict(entry, **{B: entry[B] * scaling})

  def to_peft(self, t, layer):
    """PEFT's layouts: ``lora_A.weight [r, in]`` / ``lora_B.weight [out, r]`` (conv: ``[r, cin,
    k...]`` / ``[cout, r, 1...]``; embedding: ``lora_embedding_A [r, num]`` / ``_B [dim, r]``)."""
    a, b, r = layer[A], layer[B], t.r
    if t.kind == "embed":
      return {"lora_embedding_A": a.T, "lora_embedding_B": b.T}
    if t.kind == "conv":
      n = a.ndim - 1  # spatial axes + cin
      ta = np.transpose(a, (n, n - 1) + tuple(range(n - 1)))
      return {"lora_A.weight": ta, "lora_B.weight": b.T.reshape(b.shape[1], r, *([1] * (n - 1)))}
    return {"lora_A.weight": a.reshape(-1, r).T, "lora_B.weight": b.reshape(r, -1).T}

  def from_peft(self, t, tensors):
    if t.kind == "embed":
      a, b = tensors.get("lora_embedding_A"), tensors.get("lora_embedding_B")
      return None if a is None or b is None else {A: a.T, B: b.T}
    a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
    if a is None or b is None:
      return None
    r = a.shape[0]
    if t.kind == "conv":
      n = a.ndim - 1
      return {A: np.transpose(a, tuple(range(2, n + 1)) + (1, 0)), B: b.reshape(b.shape[0], r).T}
    n_in, n_out = math.prod(_in_shape(t)), math.prod(_out_shape(t))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_in or b.shape != (n_out, r):
      raise ValueError(f"a dense kernel's factors are lora_A [r, {n_in}] and lora_B "
                       f"[{n_out}, r] in PEFT, got {a.shape} and {b.shape}")
    return {A: a.reshape(r, -1).T.reshape(_in_shape(t) + (r,)),
            B: b.reshape(-1, r).T.reshape((r,) + _out_shape(t))}

  # PEFT's `target_parameters` (lora.ParamWrapper): an expert kernel, or a bare array. Per
  # expert e, PEFT's delta is lora_B_e @ lora_A_e in its view of the parameter, [out, in].
  def to_peft_parameter(self, t, layer, *, swapped: bool = False):
    """PEFT's layout of a target parameter: with ``E`` experts (1 for a 2-D parameter) and
    rank ``r``, ``lora_A.weight [E*r, in]`` expert-major (row ``e*r + k`` is expert ``e``'s
    ``A[e, :, k]``) and ``lora_B.weight [out, r*E]`` rank-major (column ``k*E + e`` is
    ``B[e, k, :]``). ``swapped``: PEFT's input and output are the kernel's output and input,
    so ``lora_A`` holds ``B`` and ``lora_B`` holds ``A``."""
    self._check_parameter_target(t)
    n, r = t.n_experts, t.r
    a = np.asarray(layer[A]).reshape(n, -1, r)       # [E, in, r]
    b = np.asarray(layer[B]).reshape(n, r, -1)       # [E, r, out]
    x, y = (b, a) if swapped else (a.transpose(0, 2, 1), b.transpose(0, 2, 1))
    # x [E, r, PEFT in], y [E, PEFT out, r]
    return {"lora_A.weight": x.reshape(n * r, -1),
            "lora_B.weight": y.transpose(1, 2, 0).reshape(y.shape[1], r * n)}

  def from_peft_parameter(self, t, tensors, *, swapped: bool = False):
    """One layer's ``{lora_A, lora_B}`` from PEFT's target-parameter tensors
    (:meth:`to_peft_parameter`); None if one is missing."""
    self._check_parameter_target(t)
    a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
    if a is None or b is None:
      return None
    n, n_in, n_out = t.n_experts, t.fan_in, t.fan_out
    n_a, n_b = (n_out, n_in) if swapped else (n_in, n_out)
    r = a.shape[0] // n if a.ndim == 2 else 0
    if (a.ndim != 2 or b.ndim != 2 or r < 1 or a.shape != (n * r, n_a)
        or b.shape != (n_b, r * n)):
      raise ValueError(f"a target parameter with {n} expert(s) has factors lora_A [{n}*r, "
                       f"{n_a}] and lora_B [{n_b}, r*{n}] in PEFT, got {a.shape} and {b.shape}")
    x = a.reshape(n, r, n_a)                          # [E, r, PEFT in]
    y = b.reshape(n_b, r, n).transpose(2, 0, 1)       # [E, PEFT out, r]
    fa, fb = (y, x) if swapped else (x.transpose(0, 2, 1), y.transpose(0, 2, 1))
    experts = tuple(t.kernel_shape[i] for i in t.expert_axes)
    return {A: fa.reshape(experts + _in_shape(t) + (r,)),
            B: fb.reshape(experts + (r,) + _out_shape(t))}

  def _check_parameter_target(self, t):
    if type(self) is not Lora:
      raise ValueError(f"'{t.path}' would be a PEFT target parameter, which PEFT adapts with "
                       f"plain LoRA only (its lora.ParamWrapper refuses {self.name}); use a "
                       "plain LoraSpec.")


def _in_shape(t: TargetMeta) -> tuple[int, ...]:
  return tuple(t.kernel_shape[i] for i in t.in_axes)


def _out_shape(t: TargetMeta) -> tuple[int, ...]:
  return tuple(t.kernel_shape[i] for i in t.out_axes)


class BiasedLora(Lora):
  """``lora_bias=True``: ``W + s*A@B`` and ``s*b`` added to the module's output.

  PEFT's ``lora_B`` is then a linear (or conv) layer with a bias ``b`` ``[out]``: the
  module computes ``x@W + s*((x@A)@B + b)``, the bias outside the dropout. lojax adds
  ``s*b`` to the output of each matmul or conv that consumes the kernel (never to the
  kernel); merging adds it to the module's own bias. As in PEFT: dense and conv kernels
  only (no embeddings, no expert kernels), ``b`` starts at zero.
  """

  name = "lora_bias"
  splittable = False

  def check_target(self, t):
    if t.kind == "embed":
      return [f"  {t.path}: `lora_bias=True` does not adapt embedding tables (PEFT has no "
              "bias for lora_embedding_B either)"]
    return self._refuse_experts(t, "lora_bias")

  def layout(self, t):
    return dict(super().layout(t), **{BIAS: t.b_roles()[:1] + t.out_axes if t.stacked
                                      else t.out_axes})

  def init(self, spec, key, t, kernel, dtype, quantize):
    entry, new = super().init(spec, key, t, kernel, dtype, quantize)
    entry[BIAS] = inits.zeros(self.shapes(t)[BIAS], dtype)
    return entry, new

  def factors(self, t, entry):
    f = super().factors(t, entry)
    c = t.expand_layers(entry[BIAS]) * jnp.asarray(t.scaling, entry[BIAS].dtype)
    return Factors(f.a, f.b, bias=jnp.expand_dims(c, 1 if t.stacked else 0))

  def bias_delta(self, t, entry):
    return t.expand_layers(entry[BIAS]) * jnp.asarray(t.scaling, entry[BIAS].dtype)

  def unscaled(self, t, entry, scaling):
    return dict(super().unscaled(t, entry, scaling), **{BIAS: entry[BIAS] * scaling})

  def to_peft(self, t, layer):
    """Plain LoRA's tensors plus ``lora_B.bias [out]``."""
    return dict(super().to_peft(t, layer), **{"lora_B.bias": np.reshape(layer[BIAS], -1)})

  def from_peft(self, t, tensors):
    entry, c = super().from_peft(t, tensors), tensors.get("lora_B.bias")
    if entry is None or c is None:
      return None
    if c.ndim != 1 or c.shape[0] != t.fan_out:
      raise ValueError(f"lora_B.bias is [{t.fan_out}] for this kernel, got {c.shape}")
    return dict(entry, **{BIAS: c.reshape(_out_shape(t))})


LORA = Lora()
LORA_BIAS = BiasedLora()
