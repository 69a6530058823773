"""The factorized dense op with a memory-lean backward.

:func:`dense` computes ``x@W + Σ (x@A)@B`` for the common 2-D case as ONE
matmul ``[x | x@A ...] @ [W; B ...]`` under a ``jax.custom_vjp``. Two things
make the plain form (``x@W``, ``(x@A)@B``, add) cost an activation-sized
buffer or two per adapted kernel in a training step:

* XLA fuses the add of the two matmul outputs into every consumer of the sum
  (bias add, activation, their backward) instead of materialising it, so
  *both* summands stay alive until the backward (e.g. two ``[tokens, 4d]``
  buffers for an MLP's up-projection). One matmul has one output.
* ``dA = xᵀ(dy Bᵀ)`` needs the kernel input ``x`` in the backward, which the
  frozen model never needs (its input gradient only needs ``W``). When ``x``
  is a cheap elementwise/layout function of a few values the model computed
  just before (a LayerNorm of the residual stream, an activation of the
  previous matmul's output, a reshape of the attention output), the
  interpreter hands that chain of ops (:func:`chain`) to :func:`dense`, which
  keeps the chain's inputs (its *anchors*) instead of ``x`` and recomputes
  ``x`` in the backward. When the chain starts from a single activation
  (its other anchors being inputs such as params) and ``x`` has no other
  use, e.g. an activation function, the chain's own backward runs here too,
  so its internal residuals (``tanh`` of a GELU, ...) are not kept either.

The backward depends on the cotangent through :func:`_after` so XLA can
neither run the recomputation early nor merge it with the forward's (XLA:CPU
removes optimization barriers before common-subexpression elimination).

The math is unchanged: the same products, ``W``'s and the adapters' summed in
one contraction; the backward computes ``dx = dy Wᵀ + (dy Bᵀ) Aᵀ``,
``dA = xᵀ (dy Bᵀ)`` and ``dB = (x A)ᵀ dy`` as before, with the same ``x``.
The base kernel gets no gradient (lorafy stops it). Forward-mode
differentiation (``jax.jvp``) does not go through a ``custom_vjp``; pass
``remat=False`` to :func:`lojax.lorafy` for that.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

# Elementwise and layout primitives a kernel input may be recomputed through
# (primitive objects, like the interpreter's table in primitives.py; that module
# imports rules, which imports this one, so the set lives here).
_CHEAP = frozenset({
    lax.add_p, lax.sub_p, lax.mul_p, lax.div_p, lax.neg_p, lax.max_p, lax.min_p, lax.exp_p,
    lax.exp2_p, lax.log_p, lax.log1p_p, lax.expm1_p, lax.tanh_p, lax.logistic_p, lax.sqrt_p,
    lax.rsqrt_p, lax.cbrt_p, lax.integer_pow_p, lax.pow_p, lax.square_p, lax.abs_p,
    lax.sign_p, lax.erf_p, lax.erfc_p, lax.sin_p, lax.cos_p, lax.select_n_p,
    lax.convert_element_type_p, lax.reduce_precision_p, lax.copy_p, lax.clamp_p,
    lax.broadcast_in_dim_p, lax.reshape_p, lax.transpose_p, lax.squeeze_p,
})
_MAX_EQNS = 64          # longest chain recomputed
_ANCHOR_SLACK = 1.25    # anchors may hold at most this many bytes per byte of x

# What recomputing a chain costs, in FLOPs per element of its output as XLA:CPU ends up
# counting them (the backward's recomputation lands in several fusions, so each op is paid
# a few times): layout ops are free, other elementwise ops about 6 (a LayerNorm measured
# ~80 per element of x, a tanh GELU ~43), and erf, which XLA expands into a polynomial,
# about 250 (an exact GELU measured 266).
_FREE = frozenset({lax.broadcast_in_dim_p, lax.reshape_p, lax.transpose_p, lax.squeeze_p,
                   lax.convert_element_type_p, lax.reduce_precision_p, lax.copy_p})
_OP_COST = 6
_EXPANDED = {lax.erf_p: 250, lax.erfc_p: 250}
RECOMPUTE_PER_COLUMN = 0.4
"""A chain is recomputed when it costs at most this many FLOPs per element of ``x`` per
output column ``D`` of the matmul it feeds, i.e. at most ~10% of that matmul's frozen step
work (``~4·D`` FLOPs per element of ``x``); otherwise ``x`` is kept, as on the plain path.
A LayerNorm is recomputed before matmuls of 60 columns and more, a tanh GELU from ~120, an
exact GELU from ~700."""


class JaxprInfo:
  """Producers and use counts of one jaxpr's variables."""

  def __init__(self, jaxpr):
    self.producer: dict[Any, Any] = {}
    self.uses: Counter = Counter()
    for e in jaxpr.eqns:
      for v in e.invars:
        if not isinstance(v, jcore.Literal):
          self.uses[v] += 1
      for v in e.outvars:
        self.producer[v] = e
    for v in jaxpr.outvars:
      if not isinstance(v, jcore.Literal):
        self.uses[v] += 1


@dataclasses.dataclass
class Site:
  """The equation a rule is applied to, with its jaxpr's info and environment."""
  eqn: Any
  info: JaxprInfo
  env: dict


@dataclasses.dataclass
class Recompute:
  """How the backward recomputes the kernel input: ``g(anchors)``."""
  g: Callable[[Sequence[Any]], Any]
  anchors: tuple
  remat: bool   # the chain's backward runs in dense's backward (x's gradient flows to anchors)


def _nbytes(aval) -> int:
  return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize


def chain(site: Site, var, bind: Callable, is_opaque: Callable[[Any], bool],
          budget: float = float("inf")):
  """A :class:`Recompute` of ``var`` (a jaxpr variable) from its anchors, or None.

  Walks back from ``var`` through elementwise/layout equations whose outputs
  have no other use, stopping at values used more than once, at other
  primitives and at the jaxpr's inputs (the anchors). None when there is no
  such chain, when an anchor is ``is_opaque`` (an adapted kernel), when the
  anchors would take more memory than ``var`` itself, or when recomputing
  costs more than ``budget`` FLOPs per element of ``var`` (see
  :data:`RECOMPUTE_PER_COLUMN`).
  """
  info = site.info
  if isinstance(var, jcore.Literal) or var not in info.producer:
    return None
  eqns, anchors, seen = [], [], set()

  def visit(v, root=False) -> bool:
    if isinstance(v, jcore.Literal) or v in seen:
      return True
    seen.add(v)
    e = info.producer.get(v)
    if (e is None or e.primitive not in _CHEAP or len(e.outvars) != 1
        or (not root and info.uses[v] > 1)):
      anchors.append(v)
      return not is_opaque(site.env[v])
    if not all(visit(u) for u in e.invars):
      return False
    eqns.append(e)
    return len(eqns) <= _MAX_EQNS

  if not visit(var, root=True) or not eqns:
    return None
  if sum(_nbytes(v.aval) for v in anchors) > _ANCHOR_SLACK * _nbytes(var.aval):
    return None
  if cost(eqns) > budget * math.prod(var.aval.shape):
    return None
  inner = [v for v in anchors if v in info.producer]   # values computed in this jaxpr
  remat = len(inner) == 1 and info.uses[var] == 1

  def g(vals):
    env = dict(zip(anchors, vals))
    for e in eqns:
      env[e.outvars[0]] = bind(e, [u.val if isinstance(u, jcore.Literal) else env[u]
                                   for u in e.invars])
    return env[var]

  return Recompute(g, tuple(jnp.asarray(site.env[v]) for v in anchors), remat)


def cost(eqns) -> float:
  """The FLOPs of recomputing ``eqns`` (elementwise / layout equations), as XLA counts them."""
  return sum(0 if e.primitive in _FREE else
             _EXPANDED.get(e.primitive, _OP_COST) * math.prod(e.outvars[0].aval.shape)
             for e in eqns)


def _after(vals, dy):
  """``vals``, bit for bit, but computed from ``dy``.

  A recomputation from the result can only run once the backward has reached
  this op, and no compiler pass can merge it with the forward's (which would
  keep the forward's values alive): ``-0.0`` derived from an element of
  ``dy`` is added (``v + -0.0 == v`` for every ``v``), and the value itself
  is selected if that element is not finite.
  """
  if dy.size == 0:
    return vals
  # lax, not jnp: the same ops without a jitted wrapper per call, which is most of the cost
  # of tracing this (once per adapted kernel in every step's trace)
  d0 = lax.reshape(lax.slice(dy, (0,) * dy.ndim, (1,) * dy.ndim), ())
  finite = lax.is_finite(d0)
  zero = lax.mul(lax.abs(d0), lax.full((), 0, d0.dtype))   # +0.0 where d0 is finite

  def tie(v):
    v = jnp.asarray(v)
    if jnp.issubdtype(v.dtype, jnp.integer):   # e.g. quantized codes: + 0 from dy
      z = lax.convert_element_type(zero, v.dtype)
    elif jnp.issubdtype(v.dtype, jnp.floating):
      z = lax.convert_element_type(lax.neg(zero), v.dtype)   # -0.0: v + -0.0 == v, even -0.0
    else:
      return v
    return lax.select(finite, lax.add(v, lax.broadcast(z, v.shape)), v)

  return jax.tree.map(tie, vals)


def dense(x2, w2, factors, recompute: Recompute | None = None, *, precision=None,
          preferred_element_type=None, w_source=None, concat=True):
  """``x2 @ w2 + Σ (x2 @ a) @ b`` as one matmul, with a memory-lean backward.

  Differentiated, the forward is the single matmul ``[x2 | x2@a] @ [w2; b]``;
  not differentiated, it is ``x2 @ w2`` plus the skinny products, so inference
  never writes the ``[w2; b]`` concatenation (a copy of the kernel per call).

  ``x2`` is ``[N, C]``, ``w2`` ``[C, D]`` (it gets no gradient), ``factors``
  a sequence of ``(a [C, r], b [r, D])`` in ``x2``'s dtype (empty for a quantized kernel
  with no adapter: only ``w_source`` then, and nothing of ``x2`` is kept). With
  ``recompute``, the backward recomputes ``x2`` as ``recompute.g(anchors)``
  instead of keeping it. With ``w_source = (fn, arrays)`` (a quantized
  kernel: ``w2 == fn(arrays)``, its codes and scales), ``w2`` is made from
  ``arrays`` in the forward and again in the backward, which keeps ``arrays``
  instead of the float kernel.

  ``concat=False`` (a kernel split over mesh axes): the training forward is
  ``x2 @ w2 + Σ (x2@a) @ b``, two matmuls. Concatenated along a split axis
  (the contracting one of a row-parallel kernel, say), ``[x2 | x2@a]`` and
  ``[w2; b]`` make the partitioner move activations and kernel shards between
  devices (all-to-alls) that the frozen model never moves; on one device the
  concatenation keeps less (XLA does not materialise the sum of two products).
  """
  if w_source is not None:
    w_fn, w2 = w_source
  else:
    w_fn = None
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  x_dtype = x2.dtype
  a_s = tuple(a for a, _ in factors)
  b_s = tuple(b for _, b in factors)
  anchors = () if recompute is None else recompute.anchors
  t_dims = (((1,), (1,)), ((), ()))     # contract the last axes: u @ vᵀ
  n_dims = (((0,), (0,)), ((), ()))     # contract the first axes: uᵀ @ v

  def fwd(x2, anchors, w_in, a_s, b_s):
    w2 = w_in if w_fn is None else w_fn(w_in)
    ts = tuple(jnp.matmul(x2, a, **kw).astype(x2.dtype) for a in a_s)
    if concat and ts:
      y = jnp.matmul(jnp.concatenate((x2,) + ts, axis=1),
                     jnp.concatenate((w2,) + b_s, axis=0), **kw)
    else:
      y = jnp.matmul(x2, w2, **kw)
      for t, b in zip(ts, b_s):
        y = y + jnp.matmul(t, b, **kw)
    kept = None if recompute is not None or not factors else x2   # only dA needs x
    return y, (kept, anchors, w_in, a_s, b_s, ts)

  def bwd(res, dy):
    x2, anchors, w2, a_s, b_s, ts = res
    d_anchors = tuple(None for _ in anchors)
    d_w = None
    if w_fn is not None:   # decode again, now that the backward has reached this op
      d_w = jax.tree.map(lambda v: None, w2)
      w2 = w_fn(_after(w2, dy))
    if recompute is not None:
      anchors = _after(anchors, dy)
      if recompute.remat:
        x2, g_vjp = jax.vjp(recompute.g, anchors)
      else:
        x2 = recompute.g(anchors)
    # the frozen input gradient from the cotangent as it comes (an f32 cotangent of a bf16
    # matmul with preferred_element_type=f32 is not rounded first, as in JAX's own rule)
    dx = lax.dot_general(dy, w2, t_dims, **kw)
    dy = dy.astype(x_dtype)
    gs = tuple(lax.dot_general(dy, b, t_dims, **kw).astype(x_dtype) for b in b_s)
    for gi, a in zip(gs, a_s):
      dx = dx + lax.dot_general(gi, a, t_dims, **kw)
    dx = dx.astype(x_dtype)
    da = tuple(lax.dot_general(x2, gi, n_dims, **kw).astype(a.dtype) for gi, a in zip(gs, a_s))
    db = tuple(lax.dot_general(t, dy, n_dims, **kw).astype(b.dtype) for t, b in zip(ts, b_s))
    if recompute is not None and recompute.remat:
      (d_anchors,) = g_vjp(dx)
      dx = None
    return dx, d_anchors, d_w, da, db

  @jax.custom_vjp
  def f(x2, anchors, w_in, a_s, b_s):
    # Not differentiated (evaluation, prefill, decoding): the two matmuls, without writing
    # the kernel-sized [W; B] that only the training step's single output pays for.
    w2 = w_in if w_fn is None else w_fn(w_in)
    y = jnp.matmul(x2, w2, **kw)
    for a, b in zip(a_s, b_s):
      y = y + jnp.matmul(jnp.matmul(x2, a, **kw).astype(x2.dtype), b, **kw)
    return y

  f.defvjp(fwd, bwd)
  return f(x2, anchors, w2, a_s, b_s)
