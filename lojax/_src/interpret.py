"""A jaxpr interpreter that carries adapted kernels in factorized form.

``run(jaxpr, consts, args, ctx)`` evaluates a jaxpr like ``jax.core.eval_jaxpr``
except that some inputs are :class:`~lojax._src.tagged.Tagged` values. Ops that
only re-lay-out a tagged kernel (casts, transposes, reshapes, slices) are
applied to its factors; ops that consume it (dot_general, conv, gather) use the
factorized rules; higher-order primitives (jit, remat, scan, while, cond) are
entered so kernels inside them are handled the same way. Any other use gets
the merged kernel ``W + s*A@B`` with one warning naming the path and the op.

Everything runs at trace time, under the caller's ``jax.jit``: the compiled
program contains only the rewritten computation.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from lojax._src import fused
from lojax._src import rules
from lojax._src import tagged as tg

Tagged = tg.Tagged


def _read(env, v):
  return v.val if isinstance(v, jcore.Literal) else env[v]


def _materialize(ctx: rules.Context, x, prim: str):
  if not isinstance(x, Tagged):
    return x
  rules.record_other(ctx, x, prim)
  if x.terms and (x.path, prim) not in ctx.warned:
    ctx.warned.add((x.path, prim))
    warnings.warn(
        f"lojax: the adapted kernel '{x.path}' is used by `{prim}`, which lojax cannot "
        "factorize; this use gets the merged kernel W + s*A@B (a full-size weight "
        "gradient in training). Factorized uses: dot_general/einsum, conv, embedding "
        "lookup.", stacklevel=2)
  return tg.materialize(x)


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    return eqn.primitive.bind(*invals, **params)


def run(jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: rules.Context) -> list[Any]:
  env: dict[Any, Any] = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  info = None
  for eqn in jaxpr.eqns:
    invals = [_read(env, v) for v in eqn.invars]
    if any(isinstance(x, Tagged) for x in invals):
      if info is None:
        info = fused.JaxprInfo(jaxpr)
      ctx.site = fused.Site(eqn, info, env)   # lets a rule look at how its inputs were made
      try:
        outs = _tagged_eqn(eqn, invals, ctx)
      finally:
        ctx.site = None
    else:
      outs = _bind(eqn, invals)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [_read(env, v) for v in jaxpr.outvars]


def run_closed(closed, args, ctx):
  return run(closed.jaxpr, closed.consts, args, ctx)


# --------------------------------------------------------------------------
# Dispatch for equations with at least one tagged input
# --------------------------------------------------------------------------

def _tagged_eqn(eqn, invals, ctx):
  name = eqn.primitive.name
  p = eqn.params
  if name in rules.RULES:
    out = rules.RULES[name](ctx, invals, p)
    if out is not None:
      return out
  elif len(invals) == 1 or name in ("dynamic_slice",):
    out = _layout(name, invals, p, eqn, ctx)
    if out is not None:
      return out
  handler = _HIGHER.get(name)
  if handler is not None:
    return handler(eqn, invals, ctx)
  return _bind(eqn, [_materialize(ctx, x, name) for x in invals])


def _layout(name, invals, p, eqn, ctx):
  t = invals[0]
  if name == "dynamic_slice" and any(isinstance(x, Tagged) for x in invals[1:]):
    return None
  value = _bind(eqn, [t.value] + list(invals[1:]))
  if name in ("convert_element_type", "copy", "copy_p", "sharding_constraint",
              "reduce_precision", "device_put", "optimization_barrier"):
    if isinstance(value, (list, tuple)):
      if len(value) != 1:
        return None
      return [t.replace(value=value[0])]
    return t.replace(value=value)
  if name == "transpose":
    return tg.transpose(t, value, p["permutation"])
  if name == "squeeze":
    return tg.squeeze(t, value, p["dimensions"])
  if name == "reshape":
    if p.get("dimensions") is not None:
      return None
    return tg.reshape(t, value, p["new_sizes"])
  if name == "expand_dims":
    return tg.expand(t, value, p["dimensions"])
  if name == "broadcast_in_dim":
    shape, bdims = p["shape"], p["broadcast_dimensions"]
    new = [j for j in range(len(shape)) if j not in bdims]
    if list(bdims) != sorted(bdims) or any(shape[j] != 1 for j in new) or any(
        shape[b] != d for b, d in zip(bdims, t.shape)):
      return None
    return tg.expand(t, value, new)
  if name == "slice":
    start, limit, strides = p["start_indices"], p["limit_indices"], p["strides"]

    def slicer(x, axes):
      s = [0] * x.ndim
      e = list(x.shape)
      st = [1] * x.ndim
      for fa, va in axes.items():
        s[fa], e[fa] = start[va], limit[va]
        st[fa] = 1 if strides is None else strides[va]
      return lax.slice(x, s, e, st)

    return tg.slice_axes(t, value, slicer)
  if name == "dynamic_slice":
    starts = invals[1:]
    sizes = p["slice_sizes"]

    def dslicer(x, axes):
      s = [jnp.zeros((), jnp.int32)] * x.ndim
      z = list(x.shape)
      for fa, va in axes.items():
        s[fa], z[fa] = starts[va], sizes[va]
      return lax.dynamic_slice(x, s, z)

    return tg.slice_axes(t, value, dslicer)
  return None


# --------------------------------------------------------------------------
# Higher-order primitives
# --------------------------------------------------------------------------

def _pack(vals):
  """Flattens tagged values into arrays plus a rebuild function."""
  flat, specs = [], []
  for x in vals:
    if isinstance(x, Tagged):
      leaves, tdef = jax.tree_util.tree_flatten([(t.a, t.b, t.m) for t in x.terms])
      specs.append((x, tdef, len(leaves)))
      flat.append(x.value)
      flat.extend(leaves)
    else:
      specs.append(None)
      flat.append(x)

  def rebuild(arrs):
    out, i = [], 0
    for s in specs:
      if s is None:
        out.append(arrs[i])
        i += 1
      else:
        x, tdef, n = s
        value = arrs[i]
        pairs = jax.tree_util.tree_unflatten(tdef, list(arrs[i + 1:i + 1 + n]))
        terms = tuple(dataclasses.replace(t, a=a, b=b, m=m) for t, (a, b, m) in zip(x.terms, pairs))
        out.append(x.replace(value=value, terms=terms))
        i += 1 + n
    return out

  return flat, rebuild


def _inline(eqn, invals, ctx):
  p = eqn.params
  closed = p.get("jaxpr", p.get("call_jaxpr"))
  if isinstance(closed, jcore.ClosedJaxpr):
    return run_closed(closed, invals, ctx)
  return run(closed, (), invals, ctx)


def _plain_outs(ctx, outs, prim):
  return [_materialize(ctx, o, prim) for o in outs]


def _remat(eqn, invals, ctx):
  p = eqn.params
  flat, rebuild = _pack(invals)
  inner = p["jaxpr"]

  @functools.partial(jax.checkpoint, prevent_cse=p.get("prevent_cse", True),
                     policy=p.get("policy"))
  def body(*arrs):
    return _plain_outs(ctx, run(inner, (), rebuild(list(arrs)), ctx), "checkpoint")

  return body(*flat)


def _scan(eqn, invals, ctx):
  p = eqn.params
  nc, ncarry = p["num_consts"], p["num_carry"]
  consts, carry, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  carry = [_materialize(ctx, c, "scan carry") for c in carry]
  closed = p["jaxpr"]
  length = p["length"]
  flat, rebuild = _pack_scanned(xs)
  use_rng = ctx.rng is not None
  idx = [jnp.arange(length, dtype=jnp.uint32)] if use_rng else []

  def body(c, x):
    x = list(x)
    inner_ctx = ctx
    if use_rng:
      inner_ctx = ctx.with_rng(jax.random.fold_in(ctx.rng, x.pop()))
    outs = run_closed(closed, list(consts) + list(c) + rebuild(x), inner_ctx)
    outs = _plain_outs(ctx, outs, "scan output")
    return outs[:ncarry], outs[ncarry:]

  c_out, ys = lax.scan(body, list(carry), flat + idx, length=length, reverse=p["reverse"],
                       unroll=p["unroll"])
  return list(c_out) + list(ys)


def _pack_scanned(xs):
  """Flat scan inputs; a tagged input's factors are scanned along with its value.

  The value's leading axis is sliced by the scan; the factor axis that owns it
  (both factors for a stacked layer axis) is moved to the front so the scan
  slices it too, leaving the factors of each slice in value layout.
  """
  flat, specs = [], []
  for x in xs:
    if not isinstance(x, Tagged):
      specs.append(None)
      flat.append(x)
      continue
    pairs = []
    owners = x.owners(0) if x.terms else []
    for t in x.terms:
      a, b, m = t.a, t.b, t.m
      for f, ax in owners:
        if f == 0:
          a = jnp.moveaxis(a, ax, 0)
        else:
          b = jnp.moveaxis(b, ax, 0)
          m = None if m is None else jnp.moveaxis(m, ax, 0)
      pairs.append((a, b, m))
    leaves, tdef = jax.tree_util.tree_flatten(pairs)
    specs.append((x, tdef, len(leaves)))
    flat.append(x.value)
    flat.extend(leaves)

  def rebuild(arrs):
    out, i = [], 0
    for s in specs:
      if s is None:
        out.append(arrs[i])
        i += 1
        continue
      x, tdef, n = s
      pairs = jax.tree_util.tree_unflatten(tdef, list(arrs[i + 1:i + 1 + n]))
      out.append(_scan_slice(x, arrs[i], pairs))
      i += 1 + n
    return out

  return flat, rebuild


def _scan_slice(x: Tagged, value, pairs):
  """The tagged value of one scan slice of ``x`` (its leading axis removed)."""
  kaxes = None if x.kaxes is None else x.kaxes[1:]
  stack = x.stack + ((x.kaxes[0],) if x.kaxes is not None else (-1,))
  if x.sides is None:
    return x.replace(value=value, kaxes=kaxes, stack=stack)
  terms = tuple(dataclasses.replace(t, a=a, b=b, m=m) for t, (a, b, m) in zip(x.terms, pairs))
  return x.replace(value=value, sides=x.sides[1:], terms=terms, kaxes=kaxes, stack=stack)


def _while(eqn, invals, ctx):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  init = [_materialize(ctx, c, "while carry") for c in init]
  use_rng = ctx.rng is not None

  def cond(c):
    c = list(c)
    if use_rng:
      c = c[1:]
    return _plain_outs(ctx, run_closed(p["cond_jaxpr"], list(cconsts) + c, ctx), "while")[0]

  def body(c):
    c = list(c)
    inner = ctx
    if use_rng:
      i, c = c[0], c[1:]
      inner = ctx.with_rng(jax.random.fold_in(ctx.rng, i))
    outs = _plain_outs(ctx, run_closed(p["body_jaxpr"], list(bconsts) + c, inner), "while")
    return ([i + 1] if use_rng else []) + outs

  start = [jnp.zeros((), jnp.uint32)] if use_rng else []
  out = lax.while_loop(cond, body, start + init)
  return list(out)[1:] if use_rng else list(out)


def _cond(eqn, invals, ctx):
  p = eqn.params
  index, ops = invals[0], invals[1:]
  branches = [
      (lambda br: (lambda *_: _plain_outs(ctx, run_closed(br, ops, ctx), "cond")))(br)
      for br in p["branches"]
  ]
  if isinstance(index, Tagged):
    index = tg.materialize(index)
  return list(lax.switch(index, branches))


_HIGHER = {
    "pjit": _inline,
    "jit": _inline,
    "closed_call": _inline,
    "core_call": _inline,
    "remat": _remat,
    "remat2": _remat,
    "checkpoint": _remat,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
}
