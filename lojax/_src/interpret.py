"""A jaxpr interpreter that carries adapted kernels in factorized form.

``run(jaxpr, consts, args, ctx)`` evaluates a jaxpr like ``jax.core.eval_jaxpr``
except that some inputs are :class:`~lojax._src.tagged.Tagged` values. An
equation with a tagged input is dispatched on its primitive object through the
one table :data:`lojax._src.primitives.HANDLERS`: layout ops (casts,
transposes, reshapes, slices, splits) are applied to the factors, consumers
(dot_general, conv, gather) use the factorized rules, and higher-order
primitives (jit, remat, scan, while, cond) are entered so kernels inside them
are handled the same way. Any other use gets the merged kernel ``W + s*A@B``
with one warning naming the path and the op.

Everything runs at trace time, under the caller's ``jax.jit``: the compiled
program contains only the rewritten computation.
"""

from __future__ import annotations

from typing import Any, Sequence

from jax.extend import core as jcore

from lojax._src import fused
from lojax._src import primitives
from lojax._src import rules
from lojax._src import tagged as tg

Tagged = tg.Tagged


def _read(env, v):
  return v.val if isinstance(v, jcore.Literal) else env[v]


def run(jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: rules.Context) -> list[Any]:
  """Evaluates ``jaxpr`` on ``args``, some of them tagged kernels; returns its outputs."""
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
        # The rules trace under the equation's own context (its abstract mesh, e.g. inside
        # ``auto_axes``; compute type; XLA metadata), as :func:`primitives.bind` does.
        with eqn.ctx.manager:
          outs = _tagged_eqn(eqn, invals, ctx)
      finally:
        ctx.site = None
    else:
      outs = primitives.bind(eqn, invals)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [_read(env, v) for v in jaxpr.outvars]


def run_closed(closed, args, ctx):
  """:func:`run` for a ``ClosedJaxpr``."""
  return run(closed.jaxpr, closed.consts, args, ctx)


def _tagged_eqn(eqn, invals, ctx):
  if (ctx.record is None and sum(isinstance(x, Tagged) for x in invals) > 1
      and not _has_body(eqn)):
    # a tagged value without terms (a quantized leaf outside the targets) beside an adapted
    # kernel is an operand like any other (e.g. x @ (T @ U), T adapted): the rules see one
    # tagged input. (A scan, checkpoint, ... keeps it tagged: its body decodes the codes.)
    invals = [x.value if isinstance(x, Tagged) and not x.terms else x for x in invals]
    if not any(isinstance(x, Tagged) for x in invals):
      return primitives.bind(eqn, invals)
  handler = primitives.HANDLERS.get(eqn.primitive)
  if handler is not None:
    out = handler(eqn, invals, ctx, run)
    if out is not None:
      return out
  name = eqn.primitive.name
  for x in invals:
    if isinstance(x, Tagged) and any(t.bias is not None for t in x.terms):
      raise ValueError(
          f"The adapted kernel '{x.path}' has a LoRA bias (`lora_bias=True`), which lojax adds "
          f"to the output of the matmul or conv that consumes the kernel; here it is used by "
          f"`{name}`, which lojax cannot factorize, so there is no such output. Leave this "
          "module out of the targets, or use `lora_bias=False`.")
  return primitives.bind(eqn, [primitives.merged(ctx, x, name) for x in invals])


def _has_body(eqn) -> bool:
  """Whether ``eqn`` runs inner jaxprs (scan, while, cond, checkpoint, jit, custom rules)."""
  inner = (jcore.Jaxpr, jcore.ClosedJaxpr)
  return any(isinstance(v, inner) or (isinstance(v, (tuple, list)) and
                                      any(isinstance(b, inner) for b in v))
             for v in eqn.params.values())
