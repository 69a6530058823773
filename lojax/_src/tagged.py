"""Values derived from an adapted kernel, carried through the interpreter.

A :class:`Tagged` stands for ``value + sum(delta_t)`` where ``value`` is the
(frozen) kernel as the traced function currently sees it — after any
transposes, reshapes, casts or slices — and each delta is the low-rank product
of two factors laid out like the value:

* every value axis has a *side*: ``"I"`` (input side: lives in factor A),
  ``"O"`` (output side: lives in factor B), or a *shared* side that lives in
  both factors: ``"L"`` (a stacked layer axis) or ``"E"`` (an expert axis:
  each expert has its own factors);
* ``a`` has shape ``[shared dims in value order] + [I-side dims in value
  order] + [r]``;
* ``b`` has shape ``[shared dims] + [r] + [O-side dims in value order]`` (the
  adapter scaling is already folded into ``b``).

Layout ops (transpose, reshape, slice, ...) are applied to the factors, never
to a materialised delta, so the delta reaches its consumer (dot_general, conv,
gather) in factorized form. ``kaxes`` maps value axes back to the axes of the
original leaf (or ``None`` once a reshape mixes them); the analysis pass
uses it to learn how a function contracts each kernel.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

_LETTERS = string.ascii_letters
SHARED = ("L", "E")   # sides that both factors carry, leading, in value order


def n_shared(sides) -> int:
  """How many of ``sides`` are shared (leading axes of both factors)."""
  return sum(s in SHARED for s in sides)


@dataclasses.dataclass(frozen=True)
class Term:
  """One adapter's low-rank delta in value layout."""
  a: Any
  b: Any
  dropout: float = 0.0
  name: str = ""
  index: int = 0          # position of the adapter in the active set (mixed batches)
  m: Any = None           # DoRA magnitude, laid out like ``b`` with a rank axis of size 1
  bias: Any = None        # lora_bias, laid out like ``m`` (scaling folded in): added to the
                          # consumer's output, never part of the kernel
  rows: tuple[int, ...] | None = None   # trainable tokens: ``a`` is the one-hot selector of
                                        # these rows of the value's axis 0 (dropped by layout ops)
  slots: bool = False     # an adapter bank: ``a`` and ``b`` carry a leading axis of adapters,
                          # gathered per example (serving.AdapterBank)


@dataclasses.dataclass(frozen=True)
class Source:
  """How ``value`` is made from an encoded (e.g. quantized) base leaf: ``ops`` applied in
  turn to ``decode(encoded)``. Consumers may keep ``encoded`` and decode again instead of
  keeping the float value (:func:`fused.dense`), and scans slice ``encoded`` per layer."""
  encoded: Any
  ops: tuple[Callable[[Any], Any], ...] = ()

  def make(self, encoded=None):
    v = (self.encoded if encoded is None else encoded).decode()
    for op in self.ops:
      v = op(v)
    return v

  def then(self, op) -> "Source":
    return Source(self.encoded, self.ops + (op,))


@dataclasses.dataclass(frozen=True)
class Tagged:
  value: Any
  path: str
  sides: tuple[str, ...] | None        # None in analysis mode
  terms: tuple[Term, ...]
  kaxes: tuple[int, ...] | None         # value axis -> original leaf axis
  stack: tuple[int, ...] = ()           # leaf axes sliced away by scans
  indexed: tuple[int, ...] = ()         # leaf axes squeezed away (``w[e]``: an expert index)
  source: Source | None = None          # the encoded leaf ``value`` decodes from, if any

  @property
  def shape(self):
    return self.value.shape

  @property
  def dtype(self):
    return self.value.dtype

  def replace(self, **kw) -> "Tagged":
    """A copy with fields changed; a new ``value`` drops ``source`` unless it is given (only
    the ops that know how the value follows from the old one carry it)."""
    if "value" in kw:
      kw.setdefault("source", None)
    return dataclasses.replace(self, **kw)

  # --- bookkeeping: where each value axis lives in the factors -------------
  def owners(self, axis: int) -> list[tuple[int, int]]:
    """(factor index 0=a / 1=b, axis in that factor) for value ``axis``."""
    sides = self.sides
    ns = n_shared(sides)
    side = sides[axis]
    if side in SHARED:
      pos = sum(1 for j in range(axis) if sides[j] in SHARED)
      return [(0, pos), (1, pos)]
    pos = sum(1 for j in range(axis) if sides[j] == side)
    if side == "I":
      return [(0, pos + ns)]
    return [(1, pos + 1 + ns)]


def map_terms(t: Tagged, fa, fb) -> tuple[Term, ...]:
  out = []
  for term in t.terms:
    if term.slots:   # the layout op applies to each adapter's factors
      fa_, fb_ = jax.vmap(fa), jax.vmap(fb)
      out.append(dataclasses.replace(term, a=fa_(term.a), b=fb_(term.b)))
      continue
    a = fa(term.a)
    # ``rows`` holds while ``a`` is still the [rows' axis, r] selector (its rank axis is last)
    rows = term.rows if term.rows is not None and a.shape == term.a.shape else None
    out.append(dataclasses.replace(term, a=a, b=fb(term.b),
                                   m=None if term.m is None else fb(term.m),
                                   bias=None if term.bias is None else fb(term.bias), rows=rows))
  return tuple(out)


# --------------------------------------------------------------------------
# Layout ops on tagged values. Each returns a new Tagged, or None when the op
# cannot be carried by the factors (the caller then materialises).
# --------------------------------------------------------------------------

def transpose(t: Tagged, value, permutation: Sequence[int]) -> Tagged:
  kaxes = None if t.kaxes is None else tuple(t.kaxes[p] for p in permutation)
  if t.sides is None:
    return t.replace(value=value, kaxes=kaxes)
  sides = tuple(t.sides[p] for p in permutation)

  def axes(side, order):
    return [j for j in order if (t.sides[j] in SHARED if side == "S" else t.sides[j] == side)]

  old, new = range(len(t.sides)), list(permutation)
  s_old, i_old, o_old = axes("S", old), axes("I", old), axes("O", old)
  ns = len(s_old)
  lead = [s_old.index(p) for p in axes("S", new)]
  perm_a = lead + [ns + i_old.index(p) for p in axes("I", new)] + [ns + len(i_old)]
  perm_b = lead + [ns] + [ns + 1 + o_old.index(p) for p in axes("O", new)]
  terms = map_terms(t, lambda a: jnp.transpose(a, perm_a), lambda b: jnp.transpose(b, perm_b))
  return t.replace(value=value, sides=sides, terms=terms, kaxes=kaxes)


def squeeze(t: Tagged, value, dims: Sequence[int]) -> Tagged:
  dims = sorted(d % len(t.shape) for d in dims)
  keep = [j for j in range(len(t.shape)) if j not in dims]
  kaxes = None if t.kaxes is None else tuple(t.kaxes[j] for j in keep)
  indexed = t.indexed + (() if t.kaxes is None else tuple(t.kaxes[j] for j in dims
                                                          if t.kaxes[j] >= 0))
  t = t.replace(indexed=indexed)
  if t.sides is None:
    return t.replace(value=value, kaxes=kaxes)
  drop_a, drop_b = [], []
  for d in dims:
    for f, ax in t.owners(d):
      (drop_a if f == 0 else drop_b).append(ax)
  sides = tuple(t.sides[j] for j in keep)
  terms = map_terms(t, lambda a: jnp.squeeze(a, tuple(drop_a)) if drop_a else a,
                     lambda b: jnp.squeeze(b, tuple(drop_b)) if drop_b else b)
  return t.replace(value=value, sides=sides, terms=terms, kaxes=kaxes)


def expand(t: Tagged, value, positions: Sequence[int]) -> Tagged:
  """Inserts size-1 axes at ``positions`` of the result (sorted)."""
  nd = len(t.shape) + len(positions)
  positions = sorted(p % nd for p in positions)
  kaxes, sides, it = [], [], 0
  old_for_new = []
  for j in range(nd):
    if j in positions:
      kaxes.append(-1)
      sides.append("I")
      old_for_new.append(None)
    else:
      kaxes.append(None if t.kaxes is None else t.kaxes[it])
      sides.append(None if t.sides is None else t.sides[it])
      old_for_new.append(it)
      it += 1
  new_kaxes = None if t.kaxes is None else tuple(kaxes)
  if t.sides is None:
    return t.replace(value=value, kaxes=new_kaxes)
  ns = n_shared(t.sides)
  # New I-side size-1 axes go into ``a`` at their rank among I-side axes.
  a_pos = [ns + sum(1 for k in range(j) if sides[k] == "I") for j in positions]
  terms = map_terms(t, lambda a: jnp.expand_dims(a, tuple(a_pos)), lambda b: b)
  return t.replace(value=value, sides=tuple(sides), terms=terms, kaxes=new_kaxes)


def _blocks(old: Sequence[int], new: Sequence[int]):
  """Splits a reshape of non-unit dims into aligned (old, new) index blocks."""
  blocks, i, j = [], 0, 0
  while i < len(old) and j < len(new):
    bi, bj = [i], [j]
    po, pn = old[i], new[j]
    i += 1
    j += 1
    while po != pn:
      if po < pn:
        bi.append(i)
        po *= old[i]
        i += 1
      else:
        bj.append(j)
        pn *= new[j]
        j += 1
    blocks.append((bi, bj))
  if i != len(old) or j != len(new):
    return None
  return blocks


def reshape(t: Tagged, value, new_sizes: Sequence[int]) -> Tagged | None:
  old = list(t.shape)
  new = list(new_sizes)
  # 1. squeeze unit axes, 2. reshape non-unit blocks, 3. insert unit axes.
  unit_old = [j for j, d in enumerate(old) if d == 1]
  cur = squeeze(t, jnp.squeeze(t.value, tuple(unit_old)) if unit_old else t.value, unit_old) if unit_old else t
  core_old = [d for d in old if d != 1]
  core_new = [d for d in new if d != 1]
  blocks = _blocks(core_old, core_new)
  if blocks is None:
    return None
  kaxes: list[int] | None = [] if cur.kaxes is not None else None
  sides: list[str] = []
  for bi, bj in blocks:
    if kaxes is not None:
      if len(bi) == 1 and len(bj) == 1:
        kaxes.append(cur.kaxes[bi[0]])
      else:
        kaxes = None
    if cur.sides is not None:
      s = {cur.sides[k] for k in bi}
      if len(s) != 1 or (s & set(SHARED) and (len(bi) != 1 or len(bj) != 1)):
        return None
      sides.extend([s.pop()] * len(bj))
  core_value = jnp.reshape(value, core_new)
  if cur.sides is None:
    out = cur.replace(value=core_value, kaxes=None if kaxes is None else tuple(kaxes))
  else:
    ns = n_shared(cur.sides)
    new_a = [d for d, s in zip(core_new, sides) if s == "I"]
    new_b = [d for d, s in zip(core_new, sides) if s == "O"]

    def fa(a):
      return jnp.reshape(a, a.shape[:ns] + tuple(new_a) + a.shape[-1:])

    def fb(b):
      return jnp.reshape(b, b.shape[:ns + 1] + tuple(new_b))

    out = cur.replace(value=core_value, sides=tuple(sides), terms=map_terms(cur, fa, fb),
                      kaxes=None if kaxes is None else tuple(kaxes))
  unit_new = [j for j, d in enumerate(new) if d == 1]
  if unit_new:
    out = expand(out, value, unit_new)
  return out.replace(value=value)


def slice_axes(t: Tagged, value, slicer) -> Tagged:
  """Applies ``slicer(x, axis_map)`` — a slice of value axes — to the factors.

  ``slicer(x, axes)`` receives an array and a dict {axis of x: value axis} and
  must return x sliced like the value along those axes.
  """
  if t.sides is None:
    return t.replace(value=value)
  amap: dict[int, dict[int, int]] = {0: {}, 1: {}}
  for j in range(len(t.shape)):
    for f, ax in t.owners(j):
      amap[f][ax] = j
  terms = map_terms(t, lambda a: slicer(a, amap[0]), lambda b: slicer(b, amap[1]))
  return t.replace(value=value, terms=terms)


# --------------------------------------------------------------------------
# Materialisation (merged fallback) and delta in value layout
# --------------------------------------------------------------------------

def factor_symbols(sides: Sequence[str], value_syms: Sequence[str], r_sym: str):
  """Einsum symbols of factors a and b given the value's symbols."""
  l_sym = [s for s, side in zip(value_syms, sides) if side in SHARED]
  a_syms = l_sym + [s for s, side in zip(value_syms, sides) if side == "I"] + [r_sym]
  b_syms = l_sym + [r_sym] + [s for s, side in zip(value_syms, sides) if side == "O"]
  return "".join(a_syms), "".join(b_syms)


def delta(t: Tagged, dtype=None):
  """The summed delta of ``t``'s terms in the value's layout (materialised)."""
  nd = len(t.shape)
  syms = _LETTERS[:nd]
  r_sym = _LETTERS[nd]
  a_s, b_s = factor_symbols(t.sides, syms, r_sym)
  dtype = dtype or t.dtype
  out = None
  for term in t.terms:
    if term.slots:
      raise ValueError(f"The adapter bank's kernel '{t.path}' is used where lojax would need "
                       "its merged value; a bank serves factorized matmuls in mixed-adapter "
                       "batches only. Call without `lora_bank` here.")
    d = jnp.einsum(f"{a_s},{b_s}->{syms}", term.a.astype(dtype), term.b.astype(dtype))
    out = d if out is None else out + d
  return out


def pow2_scale(c):
  """The largest power of two ``<= c``, a scale that divides exactly.

  Clipped to float32's normal range; 1 where ``c`` is 0, inf or NaN.
  """
  c = jnp.asarray(c, jnp.float32)
  _, e = jnp.frexp(c)
  p = jnp.ldexp(jnp.ones_like(c), jnp.clip(e - 1, -126, 127))
  return jnp.where(jnp.isfinite(c) & (c > 0), p, jnp.ones_like(c))


def norm(x, axis, keepdims=False):
  """``sqrt(sum(x**2, axis))`` in float32 that neither overflows nor underflows.

  ``x`` is divided by a power of two near its largest magnitude along
  ``axis`` first (as LAPACK's ``nrm2`` scales), and the norm multiplied back.
  """
  x = jnp.asarray(x, jnp.float32)
  c = pow2_scale(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
  n = jnp.sqrt(jnp.sum(jnp.square(x / c), axis=axis, keepdims=True)) * c
  return n if keepdims else jnp.squeeze(n, axis)


def ratio(m, n):
  """DoRA's scale ``m / n``, and 0 where ``n == 0`` (an all-zero column has no direction).

  Finite, with finite gradients, for every ``n >= 0``; equal to ``m / n``
  wherever ``n > 0``.
  """
  m, n = jnp.asarray(m, jnp.float32), jnp.asarray(n, jnp.float32)
  pos = n > 0
  return jnp.where(pos, m / jnp.where(pos, n, 1.0), 0.0)


def dora_factor(t: Tagged, term: Term, w):
  """DoRA's ``m / ||w||`` in value layout (norm over the input-side axes)."""
  i_axes = tuple(j for j, s in enumerate(t.sides) if s == "I")
  n = norm(w, axis=i_axes, keepdims=True)   # scaled: no overflow, no underflow
  # m is [shared..., 1, O-side...]: drop the rank axis, size-1 axes at the I positions.
  m = jnp.squeeze(term.m, axis=n_shared(t.sides)).astype(jnp.float32)
  order = ([j for j, s in enumerate(t.sides) if s in SHARED]
           + [j for j, s in enumerate(t.sides) if s == "O"])     # m's axes, as value axes
  m = jnp.transpose(m, sorted(range(len(order)), key=order.__getitem__))
  m = jnp.expand_dims(m, tuple(i_axes))
  return ratio(m, jax.lax.stop_gradient(n))   # 0 for an all-zero column, not NaN


def materialize(t: Tagged):
  """``value`` with every term applied (DoRA terms rescale their merged kernel)."""
  if not t.terms:
    return t.value
  out = t.value.astype(jnp.float32)
  for term in t.terms:
    d = delta(t.replace(terms=(term,)), jnp.float32)
    if term.m is None:
      out = out + d
    else:
      w = t.value.astype(jnp.float32) + d
      out = out + dora_factor(t, term, w) * w - t.value.astype(jnp.float32)
  return out.astype(t.dtype)

