"""Factorized consumers of adapted kernels: dot_general, conv and gather.

Each rule receives the equation's inputs (one of them a :class:`Tagged`),
computes the frozen op on the base value as the function would, and adds each
adapter term as ``(x @ A) @ B`` — two skinny contractions, never ``W + A@B``.
A rule returns ``None`` when the use cannot be factorized; the interpreter
then falls back to the merged kernel and warns once, naming the path and op.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lojax._src import fused
from lojax._src import tagged as tg

_LETTERS = string.ascii_letters


class Context:
  """Per-trace state: dropout rng, use counter, analysis recorder."""

  def __init__(self, rng=None, record: Callable | None = None, example_ids=None,
               remat: bool = True, split: bool = False):
    self.rng = rng
    self.record = record
    self.example_ids = example_ids   # [batch] adapter index per example (-1: base only)
    self.remat = remat               # memory-lean custom-VJP dense op (fused.dense)
    self.counter = 0
    self.warned: set[tuple[str, str]] = set()
    self.site = None                 # the equation a rule is applied to (set by the interpreter)
    self.split = split               # the kernel at hand is split over mesh axes
    self.contracted: dict[str, set[str]] = {}   # leaf path -> sides its matmuls contract

  def next_key(self):
    self.counter += 1
    return jax.random.fold_in(self.rng, self.counter)

  def with_rng(self, rng) -> "Context":
    ctx = Context(rng, self.record, self.example_ids, self.remat, self.split)
    ctx.counter = self.counter
    ctx.warned = self.warned
    ctx.contracted = self.contracted
    return ctx


def _select(ctx: Context, x, term, axis: int = 0):
  """Zeroes the examples of ``x`` (along ``axis``) that do not use ``term``'s adapter.

  With a per-example adapter index (a mixed-adapter batch), each adapter's
  delta is computed on the whole batch with the other examples masked out:
  the cost grows with the number of adapters, not with the batch size. (Plain
  ``x @ W`` uses take :func:`_mixed_delta` instead: one gathered pass.)
  """
  ids = ctx.example_ids
  if ids is None:
    return x
  n, size = ids.shape[0], x.shape[axis]
  keep = ids == term.index
  if size != n:
    if size % n:
      raise ValueError(
          f"A mixed-adapter batch has {n} examples, but the adapted kernel '{term.name}' sees "
          f"activations whose axis {axis} has size {size}; lojax needs the examples on the "
          "leading axis (or flattened example-major into it).")
    keep = jnp.repeat(keep, size // n)
  shape = [1] * x.ndim
  shape[axis] = size
  return jnp.where(keep.reshape(shape), x, jnp.zeros((), x.dtype))


def _with_bias(ctx: Context, d, term, syms: str, out_syms: str, example_axis: int | None):
  """``d`` (one term's delta, einsum symbols ``out_syms``) plus the term's LoRA bias.

  The bias is laid out like factor B with a rank axis of size 1 (symbols ``syms``); it is
  broadcast over the output's other axes. In a mixed-adapter batch only the term's own
  examples (along ``example_axis`` of the output) get it.
  """
  if term.bias is None:
    return d
  keep = [j for j, c in enumerate(syms) if c in out_syms]
  if len(keep) != term.bias.ndim - 1:
    raise ValueError(f"The LoRA bias of '{term.name}' cannot be laid out on this use's output.")
  kept = [syms[j] for j in keep]
  order = sorted(range(len(kept)), key=lambda j: out_syms.index(kept[j]))
  v = jnp.transpose(term.bias.reshape([term.bias.shape[j] for j in keep]), order)
  sizes = dict(zip((kept[j] for j in order), v.shape))
  v = v.reshape([sizes.get(c, 1) for c in out_syms])
  d = d + v.astype(d.dtype)
  if ctx.example_ids is not None:
    if example_axis is None:
      raise ValueError(f"A mixed-adapter batch needs the examples on a free axis of the input "
                       f"of '{term.name}' to add its LoRA bias per example.")
    d = _select(ctx, d, term, example_axis)
  return d


def _no_transposed_bias(k, first: int) -> None:
  if first != 0 and any(t.bias is not None for t in k.terms):
    raise ValueError(
        f"The adapted kernel '{k.path}' has a LoRA bias (`lora_bias=True`), added to the "
        "output of the matmuls that contract its input axes; this use contracts its output "
        "axes (a transposed use, e.g. tied logits), where such a bias has no place. Use "
        "`lora_bias=False` for this kernel.")


def _gathers(ctx: Context, terms, first: int, lay, x) -> bool:
  """Whether a mixed-adapter batch can take :func:`_mixed_delta`'s single gathered pass.

  The examples must lead the ``[N, C]`` rows: x's axis 0 is its first free axis.
  """
  ids = ctx.example_ids
  banked = any(t.slots for t in terms)
  ok = (ids is not None and (len(terms) > 1 or banked) and first == 0 and bool(lay.free_shape)
        and lay.x_perm[0] == 0 and x.shape[0] % ids.shape[0] == 0
        and all(t.dropout <= 0.0 and t.m is None for t in terms))
  if banked and not (ok and len(terms) == 1):
    raise _bank_error(terms[0].name, "this use of it")
  return ok


def _bank_error(name: str, where: str) -> ValueError:
  return ValueError(
      f"The adapter bank holds '{name}', and {where} is not a plain x @ W matmul of a "
      "mixed-adapter batch with the examples leading (the only use a bank serves: its "
      "factors are gathered per example). Call without `lora_bank`.")


def _no_bank(terms, name: str, op: str) -> None:
  if any(t.slots for t in terms):
    raise _bank_error(name, f"its use by `{op}`")


def _mixed_delta(ctx: Context, x2, terms, c: int, d: int, dtype, kw):
  """``Σ`` over adapters of ``(x@A)@(s·B)`` for a mixed-adapter batch, in one pass.

  ``x2`` is ``[N, C]`` with the examples leading (``N = batch * rows``). Each
  example gathers its own adapter's factors (ranks zero-padded to the largest;
  a zero slot for examples without one) and one batched ``[rows, C] @ [C, r]``,
  ``[rows, r] @ [r, D]`` product per example follows: the cost is one
  adapter's pass over the batch, whatever the number of adapters.
  """
  ids = ctx.example_ids
  batch, n = ids.shape[0], x2.shape[0]
  if terms[0].slots:   # a bank: already stacked; an example without an adapter gets zero
    (bank,) = terms
    k = bank.a.shape[0]
    a_all = bank.a.astype(dtype).reshape(k, c, -1)
    b_all = bank.b.astype(dtype).reshape(k, a_all.shape[2], d)
    slot = jnp.clip(ids, 0, k - 1)
    x3 = x2.reshape(batch, n // batch, c)
    t = jnp.einsum("bnc,bcr->bnr", x3, a_all[slot], **kw)
    y = jnp.einsum("bnr,brd->bnd", t.astype(dtype), b_all[slot], **kw)
    y = jnp.where((ids >= 0)[:, None, None], y, jnp.zeros((), y.dtype))
    return y.reshape(n, d)
  a_s = [t.a.astype(dtype).reshape(c, -1) for t in terms]
  b_s = [t.b.astype(dtype).reshape(a.shape[1], d) for t, a in zip(terms, a_s)]
  r = max(a.shape[1] for a in a_s)
  a_all = jnp.stack([jnp.pad(a, ((0, 0), (0, r - a.shape[1]))) for a in a_s]
                    + [jnp.zeros((c, r), dtype)])                        # [T+1, C, r]
  b_all = jnp.stack([jnp.pad(b, ((0, r - b.shape[0]), (0, 0))) for b in b_s]
                    + [jnp.zeros((r, d), dtype)])                        # [T+1, r, D]
  size = max(t.index for t in terms) + 1
  table = np.full(size + 1, len(terms), np.int32)   # adapter index -> slot; default: zeros
  for j, t in enumerate(terms):
    table[t.index] = j
  slot = jnp.asarray(table)[jnp.where((ids >= 0) & (ids < size), ids, size)]
  x3 = x2.reshape(batch, n // batch, c)
  t = jnp.einsum("bnc,bcr->bnr", x3, a_all[slot], **kw)
  y = jnp.einsum("bnr,brd->bnd", t.astype(dtype), b_all[slot], **kw)
  if any(t.bias is not None for t in terms):   # lora_bias: each example its adapter's
    zero = jnp.zeros((d,), dtype)
    bias = jnp.stack([zero if t.bias is None else t.bias.astype(dtype).reshape(d)
                      for t in terms] + [zero])                            # [T+1, D]
    y = y + bias[slot][:, None, :]
  return y.reshape(n, d)


def _dropout(ctx: Context, x, rate: float):
  if rate <= 0.0 or ctx.rng is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(ctx.next_key(), keep, x.shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


# --------------------------------------------------------------------------
# dot_general
# --------------------------------------------------------------------------

def dot_general(ctx: Context, lhs, rhs, *, dimension_numbers, precision=None,
                preferred_element_type=None, out_sharding=None, **unused):
  base = lax.dot_general(
      lhs.value if isinstance(lhs, tg.Tagged) else lhs,
      rhs.value if isinstance(rhs, tg.Tagged) else rhs,
      dimension_numbers, precision=precision, preferred_element_type=preferred_element_type,
      out_sharding=out_sharding)
  (lc, rc), (lb, rb) = dimension_numbers
  if isinstance(lhs, tg.Tagged) and isinstance(rhs, tg.Tagged):
    return None  # kernel @ kernel: materialise both (caller handles)
  if isinstance(rhs, tg.Tagged):
    k, x, kc, xc, kb, xb, k_first = rhs, lhs, rc, lc, rb, lb, False
  else:
    k, x, kc, xc, kb, xb, k_first = lhs, rhs, lc, rc, lb, rb, True
  if ctx.record is not None:
    ctx.record(k, "dot_general", contract=tuple(kc), batch=tuple(kb))
  if not k.terms:
    if (k.source is not None and ctx.remat and kc and not kb and out_sharding is None
        and x.dtype == k.dtype):
      return _dot_decoded(x, k, xc, kc, k_first, precision, preferred_element_type)
    return base
  sides = k.sides
  csides = {sides[a] for a in kc}
  if any(t.slots for t in k.terms) and (not kc or len(csides) != 1 or csides & set(tg.SHARED)
                                        or csides != {"I"}):
    raise _bank_error(k.path, "this matmul")
  if not kc or len(csides) != 1 or csides & set(tg.SHARED):
    return None
  first = 0 if csides == {"I"} else 1
  side = "I" if first == 0 else "O"
  ctx.contracted.setdefault(k.path, set()).add(side)
  _no_transposed_bias(k, first)
  fast = (not kb and not tg.n_shared(sides)
          and set(kc) == {j for j, s in enumerate(sides) if s == side})
  if any(t.slots for t in k.terms) and not fast:
    raise _bank_error(k.path, "this contraction")
  if any(t.m is not None for t in k.terms) and not (fast and first == 0):
    return None  # DoRA outside the plain x @ W form: exact merged fallback
  if fast:
    # DoRA takes the lean op when it is the kernel's only term (several terms with a DoRA
    # one, and DoRA with dropout, keep the plain factorized form).
    if (ctx.remat and first == 0 and out_sharding is None and ctx.example_ids is None
        and x.dtype == k.dtype and all(t.dropout <= 0.0 for t in k.terms)
        and (len(k.terms) == 1 or all(t.m is None for t in k.terms))):
      return _dot_fused(ctx, x, k, xc, kc, k_first, base, precision, preferred_element_type)
    return _dot_2d(ctx, x, k, xc, kc, k_first, first, base, precision, preferred_element_type)
  # General case (batch or layer axes, partial contractions): einsum.
  # Einsum symbols: kernel value axes, then x's own free axes.
  nk, nx = len(k.shape), len(x.shape)
  k_syms = list(_LETTERS[:nk])
  x_syms = [None] * nx
  for a, b in zip(xc, kc):
    x_syms[a] = k_syms[b]
  for a, b in zip(xb, kb):
    x_syms[a] = k_syms[b]
  fresh = iter(_LETTERS[nk:])
  for j in range(nx):
    if x_syms[j] is None:
      x_syms[j] = next(fresh)
  r_sym = next(fresh)
  k_free = [k_syms[j] for j in range(nk) if j not in kc and j not in kb]
  x_free = [x_syms[j] for j in range(nx) if j not in xc and j not in xb]
  batch = [k_syms[j] for j in kb]
  out_syms = batch + (k_free + x_free if k_first else x_free + k_free)
  a_s, b_s = tg.factor_symbols(sides, k_syms, r_sym)
  f1_s, f2_s = (a_s, b_s) if first == 0 else (b_s, a_s)
  t_syms = [s for s in x_syms if s in out_syms or s in f2_s]
  t_syms += [s for s in f1_s if s not in t_syms and (s in out_syms or s in f2_s)]
  dtype = k.dtype
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  out = base
  xs, fs, ts, os_ = "".join(x_syms), f1_s, "".join(t_syms), "".join(out_syms)
  for term in k.terms:
    f1, f2 = (term.a, term.b) if first == 0 else (term.b, term.a)
    xd = _dropout(ctx, _select(ctx, x, term), term.dropout)
    t = jnp.einsum(f"{xs},{fs}->{ts}", xd, f1.astype(dtype), **kw)
    d = jnp.einsum(f"{ts},{f2_s}->{os_}", t.astype(dtype), f2.astype(dtype), **kw)
    d = _with_bias(ctx, d, term, f2_s, os_, os_.index(xs[0]) if xs[0] in os_ else None)
    out = out + d.astype(out.dtype)
  return out


def _dora_scale(w2, a2, b2, m):
  """DoRA's ``m / ||W + A@B||`` per output column, from ||W||², AᵀW and AᵀA.

  ``w2`` is the kernel as ``[C, D]``, ``a2`` ``[C, r]``, ``b2`` ``[r, D]`` with
  the scaling folded in. No activation enters, so this costs no token factor;
  the norm is a constant for the gradient (DoRA, section 4.3).

  Computed scaled, so no square overflows or underflows: A is divided by a
  power of two near ``max|A|`` (and B multiplied by it, A@B unchanged), then
  column ``j`` of W and B by a power of two ``c_j`` near
  ``max(max_i |W_ij|, sum_k |B_kj|)``, which bounds ``|W + A@B|`` in column
  ``j`` up to a small factor; ``n_j`` is the scaled norm times ``c_j``. Powers of
  two divide exactly: where the plain formula is finite the result is the
  same. A zero norm gives the scale 0 (:func:`tagged.ratio`), not ``0/0``.

  The kernel is only read (its column maxima, ``||W/c||²``, ``AᵀW``), never
  written rescaled: ``AᵀW`` is formed from the unscaled kernel and divided by
  ``c`` after, the same bits unless a product is subnormal. (With ``|A| < 2``
  its entries are below ``2·sqrt(C)·||W_j||``: finite unless the column's norm
  is itself within that factor of float32's range.) Writing the rescaled
  kernels cost ~30 ms a step (~2%) on the benchmark GPT on CPU.
  """
  w2, a2, b2 = (z.astype(jnp.float32) for z in (w2, a2, b2))
  alpha = tg.pow2_scale(jnp.max(jnp.abs(a2)))
  a2, b2 = a2 / alpha, b2 * alpha
  c = tg.pow2_scale(jnp.maximum(jnp.max(jnp.abs(w2), 0), jnp.sum(jnp.abs(b2), 0)))   # [D]
  b2 = b2 / c
  first = (((0,), (0,)), ((), ()))                  # contract the first axes: uᵀ @ v
  ata = lax.dot_general(a2, a2, first)              # [r, r]
  atw = lax.dot_general(a2, w2, first) / c          # [r, D], = Aᵀ (W / c)
  sq = (jnp.sum(jnp.square(w2 / c), 0) + 2 * jnp.sum(atw * b2, 0)
        + jnp.sum((ata @ b2) * b2, 0))
  norm = jnp.sqrt(jnp.maximum(sq, 0.0)) * c
  return tg.ratio(m, lax.stop_gradient(norm))


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How ``dot_general(x, kernel)`` maps onto one canonical ``[N, C] @ [C, D]`` matmul.

  ``x``'s free axes merge into N and its contracted axes into C, in the order
  of the kernel's ``side`` axes (``"I"``: input, ``"O"``: a transposed use);
  the kernel's free axes merge into D.
  """

  x_perm: list
  f1_axes: list         # the kernel's contracted-side axes, in value order
  k_free: list
  free_shape: list      # x's free axes' sizes
  kfree_shape: list
  n: int
  c: int
  d: int
  k_first: bool         # the kernel is dot_general's lhs: its free axes come first

  def to_2d(self, v):
    if self.x_perm != list(range(v.ndim)):
      v = jnp.transpose(v, self.x_perm)
    return v.reshape(self.n, self.c)

  def from_2d(self, y):
    """``[N, D]`` back to dot_general's output layout."""
    y = y.reshape(self.free_shape + self.kfree_shape)
    if self.k_first:
      nf = len(self.free_shape)
      y = jnp.transpose(y, list(range(nf, y.ndim)) + list(range(nf)))
    return y

  def w2(self, kernel):
    """The kernel as ``[C, D]``."""
    return jnp.transpose(kernel, self.f1_axes + self.k_free).reshape(self.c, self.d)


def _layout(x, k, xc, kc, k_first, side=None) -> _Layout:
  # the contracted side's axes in value order; without a side, in the order dot_general pairs
  # them with x's (a kernel with no terms)
  f1_axes = list(kc) if side is None else [j for j, s in enumerate(k.sides) if s == side]
  k_free = [j for j in range(len(k.shape)) if j not in kc]
  pair = dict(zip(kc, xc))
  x_free = [j for j in range(x.ndim) if j not in xc]
  return _Layout(
      x_perm=x_free + [pair[j] for j in f1_axes], f1_axes=f1_axes, k_free=k_free,
      free_shape=[x.shape[j] for j in x_free], kfree_shape=[k.shape[j] for j in k_free],
      n=math.prod(x.shape[j] for j in x_free), c=math.prod(k.shape[j] for j in f1_axes),
      d=math.prod(k.shape[j] for j in k_free), k_first=k_first)


def _dot_2d(ctx, x, k, xc, kc, k_first, first, base, precision, preferred_element_type):
  """The common case as two plain 2-D matmuls: ``[N, C] @ [C, r] @ [r, D]``.

  ``x``'s free axes are merged into N and its contracted axes into C (in the
  order of the contracted factor's axes), so XLA sees canonical row-major
  matmuls; contractions over several axes at once (e.g. batch and sequence
  in the weight gradient) are much slower on XLA:CPU.
  """
  lay = _layout(x, k, xc, kc, k_first, "I" if first == 0 else "O")
  c, d = lay.c, lay.d
  dtype = k.dtype
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  if _gathers(ctx, k.terms, first, lay, x):
    y = _mixed_delta(ctx, lay.to_2d(x), k.terms, c, d, dtype, kw)
    return base + lay.from_2d(y).astype(base.dtype)
  out = base
  for term in k.terms:
    xs = _select(ctx, x, term)
    xd = _dropout(ctx, xs, term.dropout)
    x2 = lay.to_2d(xd)
    if first == 0:   # contract the input side: x @ A then @ B
      f1 = term.a.astype(dtype).reshape(c, -1)                     # [C, r]
      f2 = term.b.astype(dtype).reshape(f1.shape[1], d)            # [r, D]
      t = jnp.matmul(x2, f1, **kw)
      y = lay.from_2d(jnp.matmul(t.astype(dtype), f2, **kw))
      if term.m is not None:
        mn = _dora_scale(lay.w2(k.value), f1, f2, term.m.reshape(d))
        free_ones = [1] * len(lay.free_shape)
        mn = mn.reshape(lay.kfree_shape + free_ones if k_first else lay.kfree_shape)
        # PEFT and the DoRA paper: x@W + (m/n - 1)*(drop(x)@W) + (m/n)*s*(drop(x)@A)@B.
        based = base if xd is xs else lay.from_2d(
            jnp.matmul(x2, lay.w2(k.value).astype(dtype), **kw)).astype(base.dtype)
        out = out + ((mn - 1) * based + mn * y).astype(out.dtype)
        continue
    else:            # transposed use: contract the output side: x @ Bᵀ then @ Aᵀ
      f1 = term.b.astype(dtype).reshape(-1, c)                     # [r, C]
      f2 = term.a.astype(dtype).reshape(d, f1.shape[0])            # [D, r]
      t = lax.dot_general(x2, f1, (((1,), (1,)), ((), ())), **kw)
      if term.rows is not None and not lay.k_first and len(lay.kfree_shape) == 1:
        # trainable tokens' tied logits: A is a one-hot of rows, so @ Aᵀ adds t's columns
        # to those rows' logits (no [N, vocab] product, nor its buffer)
        t = t.reshape(lay.free_shape + [len(term.rows)]).astype(out.dtype)
        out = out.at[..., np.asarray(term.rows)].add(t)
        continue
      y = lay.from_2d(lax.dot_general(t.astype(dtype), f2, (((1,), (1,)), ((), ())), **kw))
    if term.bias is not None:
      y = _with_bias(ctx, y, term, *_bias_syms(lay), _example_axis(lay))
    out = out + y.astype(out.dtype)
  return out


def _bias_syms(lay: "_Layout") -> tuple[str, str]:
  """Einsum symbols of a bias ``[1, kernel free axes...]`` and of ``lay``'s output."""
  nf, nk = len(lay.free_shape), len(lay.kfree_shape)
  x_s, k_s = _LETTERS[:nf], _LETTERS[nf:nf + nk]
  return _LETTERS[nf + nk] + k_s, (k_s + x_s if lay.k_first else x_s + k_s)


def _example_axis(lay: "_Layout") -> int | None:
  """The output axis of ``lay``'s x axis 0 (the examples), if that axis is free."""
  if lay.x_perm[0] != 0 or not lay.free_shape:
    return None
  return len(lay.kfree_shape) if lay.k_first else 0


def _bind_eqn(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    return eqn.primitive.bind(*invals, **params)


def _dot_fused(ctx, x, k, xc, kc, k_first, base, precision, preferred_element_type):
  """``x @ W + Σ s·(x@A)@B`` as :func:`fused.dense`: one matmul, lean residuals.

  The same canonical ``[N, C] @ [C, D]`` layout as :func:`_dot_2d`. When the
  interpreter can see how ``x`` was made from a few values (a LayerNorm, an
  activation, a reshape), the backward recomputes ``x`` from them instead of
  keeping it for ``dA``.

  A DoRA term (the kernel's only one) scales the op's output ``z`` by the
  per-column ``m/n`` of :func:`_dora_scale`: ``(m/n) * (x@W + s·(x@A)@B)``,
  PEFT's formula without dropout. The backward of that product keeps ``z``
  (m's gradient is ``colsum(dy * z) / n``) and ``[D]`` vectors: one
  output-sized buffer per kernel beyond LoRA's, none where the frozen model's
  backward keeps the output anyway (an activation's input, say), and nothing
  kernel-sized. (The exact alternative to keeping ``z``, recomputing ``x@W`` in
  the backward, costs the frozen matmul again.)
  """
  lay = _layout(x, k, xc, kc, k_first, "I")
  recompute = None
  site = ctx.site
  if site is not None:
    found = fused.chain(site, site.eqn.invars[1 if k_first else 0], _bind_eqn,
                        lambda v: isinstance(v, tg.Tagged),
                        budget=fused.RECOMPUTE_PER_COLUMN * lay.d)
    if found is not None:
      g = found.g
      recompute = dataclasses.replace(found, g=lambda vals: lay.to_2d(g(vals)))
  dtype = k.dtype
  factors = []
  for term in k.terms:
    f1 = term.a.astype(dtype).reshape(lay.c, -1)                    # [C, r]
    factors.append((f1, term.b.astype(dtype).reshape(f1.shape[1], lay.d)))
  w2 = lay.w2(k.value)
  y = fused.dense(lay.to_2d(x), w2, factors, recompute, precision=precision,
                  preferred_element_type=preferred_element_type, w_source=_w_source(k, lay),
                  concat=not ctx.split)
  m = k.terms[0].m if len(k.terms) == 1 else None
  if m is not None:   # DoRA: (m/n) * z, a [D] scale on the one output
    a2, b2 = factors[0]
    y = y * _dora_scale(w2, a2, b2, m.reshape(lay.d))
  for term in k.terms:   # lora_bias: one [D] vector per term, on every row
    if term.bias is not None:
      y = y + term.bias.astype(y.dtype).reshape(lay.d)
  return lay.from_2d(y).astype(base.dtype)


def _w_source(k, lay: _Layout):
  """``(fn, arrays)`` with ``fn(arrays) == lay.w2(k.value)`` for a quantized kernel (its codes
  and scales, decoded by ``fn``), so :func:`fused.dense` keeps the codes; None otherwise."""
  if k.source is None:
    return None
  src = k.source
  children, treedef = jax.tree_util.tree_flatten(src.encoded)
  return (lambda arrs: lay.w2(src.make(jax.tree_util.tree_unflatten(treedef, arrs))),
          tuple(children))


def _dot_decoded(x, k, xc, kc, k_first, precision, preferred_element_type):
  """``x @ W`` for a quantized kernel with no adapter (one stored with :func:`lojax.quantize`
  outside the targets) as :func:`fused.dense` without factors: the backward's input gradient
  decodes the codes again instead of keeping the decoded kernel from the forward, as for a
  target. Nothing of ``x`` is kept (no adapter gradient needs it)."""
  lay = _layout(x, k, xc, kc, k_first)
  y = fused.dense(lay.to_2d(x), lay.w2(k.value), (), precision=precision,
                  preferred_element_type=preferred_element_type, w_source=_w_source(k, lay))
  return lay.from_2d(y)


# --------------------------------------------------------------------------
# conv_general_dilated (kernel as rhs)
# --------------------------------------------------------------------------

def conv(ctx: Context, lhs, rhs, **params):
  if isinstance(lhs, tg.Tagged) or not isinstance(rhs, tg.Tagged):
    return None
  base = lax.conv_general_dilated_p.bind(lhs, rhs.value, **params)
  dn = params["dimension_numbers"]
  rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
  if ctx.record is not None:
    ctx.record(rhs, "conv", out_axis=rhs_spec[0])
  if not rhs.terms:
    return base
  _no_bank(rhs.terms, rhs.path, "conv")
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    return None
  sides = rhs.sides
  if tg.n_shared(sides) or sides[rhs_spec[0]] != "O" or sides.count("O") != 1:
    return None
  out = base
  feat = out_spec[1]
  for term in rhs.terms:
    a = jnp.moveaxis(term.a.astype(rhs.dtype), -1, rhs_spec[0])
    xs = _select(ctx, lhs, term, dn.lhs_spec[0])
    xd = _dropout(ctx, xs, term.dropout)
    p = dict(params)
    t = lax.conv_general_dilated_p.bind(xd, a, **p)
    d = jnp.tensordot(t, term.b.astype(t.dtype), axes=[[feat], [0]])
    d = jnp.moveaxis(d, -1, feat)
    if term.m is not None:
      cout = rhs.shape[rhs_spec[0]]
      w2 = jnp.moveaxis(rhs.value, rhs_spec[0], -1).reshape(-1, cout)
      mn = _dora_scale(w2, term.a.reshape(w2.shape[0], -1), term.b, term.m.reshape(cout))
      shape = [1] * out.ndim
      shape[feat] = cout
      mn = mn.reshape(shape)
      based = base if xd is xs else lax.conv_general_dilated_p.bind(xd, rhs.value, **params)
      out = out + ((mn - 1) * based + mn * d).astype(out.dtype)
      continue
    if term.bias is not None:
      shape = [1] * d.ndim
      shape[feat] = d.shape[feat]
      d = d + term.bias.astype(d.dtype).reshape(shape)
      if ctx.example_ids is not None:
        d = _select(ctx, d, term, out_spec[0])
    out = out + d.astype(out.dtype)
  return out


# --------------------------------------------------------------------------
# gather (embedding lookup)
# --------------------------------------------------------------------------

def gather(ctx: Context, operand, indices, *, dimension_numbers, slice_sizes, **params):
  if not isinstance(operand, tg.Tagged) or isinstance(indices, tg.Tagged):
    return None
  base = lax.gather_p.bind(operand.value, indices, dimension_numbers=dimension_numbers,
                           slice_sizes=slice_sizes, **params)
  dn = dimension_numbers
  if ctx.record is not None:
    ctx.record(operand, "gather", index_axes=tuple(dn.start_index_map))
  if not operand.terms:
    return base
  _no_bank(operand.terms, operand.path, "gather")
  if any(t.m is not None for t in operand.terms):
    return None  # DoRA on a lookup: exact merged fallback
  if any(t.bias is not None for t in operand.terms):
    return None  # no LoRA bias on a lookup (PEFT has none): the interpreter's error
  sides = operand.sides
  i_axes = [j for j, s in enumerate(sides) if s == "I"]
  o_axes = [j for j, s in enumerate(sides) if s == "O"]
  if (tg.n_shared(sides) or dn.operand_batching_dims or len(o_axes) != 1
      or sorted(dn.start_index_map) != i_axes or sorted(dn.collapsed_slice_dims) != i_axes
      or any(slice_sizes[j] != 1 for j in i_axes)
      or slice_sizes[o_axes[0]] != operand.shape[o_axes[0]]):
    return None
  # Factor a is [I-side..., r]: gather it the same way, r in place of the O axis.
  pos = {j: n for n, j in enumerate(i_axes)}
  a_dn = lax.GatherDimensionNumbers(
      offset_dims=dn.offset_dims,
      collapsed_slice_dims=tuple(pos[j] for j in dn.collapsed_slice_dims),
      start_index_map=tuple(pos[j] for j in dn.start_index_map),
      operand_batching_dims=(), start_indices_batching_dims=())
  out = base
  off = dn.offset_dims[0]
  for term in operand.terms:
    r = term.a.shape[-1]
    a_sizes = tuple([1] * len(i_axes) + [r])
    t = lax.gather_p.bind(term.a.astype(operand.dtype), indices, dimension_numbers=a_dn,
                          slice_sizes=a_sizes, **params)
    t = _select(ctx, t, term)
    d = jnp.tensordot(t, term.b.astype(t.dtype), axes=[[off], [0]])
    d = jnp.moveaxis(d, -1, off)
    out = out + d.astype(out.dtype)
  return out


# --------------------------------------------------------------------------
# ragged_dot (grouped matmul: MoE experts)
# --------------------------------------------------------------------------

def ragged_dot(ctx: Context, lhs, rhs, group_sizes, *, ragged_dot_dimension_numbers,
               precision=None, preferred_element_type=None, group_offset=None, **params):
  """``lax.ragged_dot``'s grouped matmul: rows of ``lhs`` in group ``g`` meet expert ``g``.

  With the kernel's group axis an expert axis, expert ``g``'s delta is
  ``(x_g @ A_g) @ B_g``: two grouped matmuls over the same groups, the first
  with the ``[E, in, r]`` factor, the second with ``[E, r, out]``.
  """
  if isinstance(lhs, tg.Tagged) or isinstance(group_sizes, tg.Tagged) or not isinstance(
      rhs, tg.Tagged):
    return None
  rdn = ragged_dot_dimension_numbers
  kw = dict(precision=precision, preferred_element_type=preferred_element_type,
            group_offset=group_offset, **params)
  base = lax.ragged_dot_general(lhs, rhs.value, group_sizes, rdn, **kw)
  (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
  groups, ragged = tuple(rdn.rhs_group_dimensions), tuple(rdn.lhs_ragged_dimensions)
  if ctx.record is not None:
    ctx.record(rhs, "ragged_dot", contract=tuple(rc), batch=tuple(rb), group=groups)
  if not rhs.terms:
    return base
  _no_bank(rhs.terms, rhs.path, "ragged_dot")
  sides = rhs.sides
  i_axes = [j for j, s in enumerate(sides) if s == "I"]
  lhs_free = [j for j in range(lhs.ndim) if j not in lc and j not in lb]
  if (lb or rb or group_offset is not None or len(groups) != 1 or len(ragged) != 1
      or [j for j, s in enumerate(sides) if s in tg.SHARED] != list(groups)
      or sides[groups[0]] != "E" or sorted(rc) != i_axes or ragged[0] not in lhs_free
      or any(t.m is not None or t.bias is not None for t in rhs.terms)):
    return None
  pair = dict(zip(rc, lc))
  dims1 = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([pair[j] for j in i_axes], list(range(1, 1 + len(i_axes)))),
                             ([], [])),
      lhs_ragged_dimensions=list(ragged), rhs_group_dimensions=[0])
  free_pos = lhs_free.index(ragged[0])           # the ragged axis inside ``x @ A``
  out = base
  for term in rhs.terms:
    x = _dropout(ctx, _select(ctx, lhs, term), term.dropout)
    t = lax.ragged_dot_general(x, term.a.astype(rhs.dtype), group_sizes, dims1, **kw)
    dims2 = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([t.ndim - 1], [1]), ([], [])),
        lhs_ragged_dimensions=[free_pos], rhs_group_dimensions=[0])
    d = lax.ragged_dot_general(t.astype(rhs.dtype), term.b.astype(rhs.dtype), group_sizes,
                               dims2, **kw)
    out = out + d.astype(out.dtype)
  return out


def record_other(ctx: Context, t: tg.Tagged, prim: str):
  if ctx.record is not None:
    ctx.record(t, "other", prim=prim)

