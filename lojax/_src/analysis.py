"""How a function uses each kernel: traced once with abstract inputs.

:func:`kernel_infos` decides, for every leaf named ``kernel`` or ``embedding``,
which axes are the kernel's *input* axes (those contracted with the
activations, or indexed by an embedding lookup), which are *output* axes, and
whether a leading axis is a stacked layer axis sliced by ``nn.scan`` /
``lax.scan``. With ``apply_fn`` the answer is read from the traced program;
without it, 2-D kernels follow Flax's ``[in, out]`` convention, 2-D embedding
tables ``[vocab, features]``, and N-D kernels need ``spec.kernel_axes``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from lojax._src import interpret
from lojax._src import matcher
from lojax._src import paths as P
from lojax._src import rules
from lojax._src import tagged as tg


@dataclasses.dataclass(frozen=True)
class KernelUse:
  """The layout of one kernel leaf (per layer for stacked leaves)."""
  kind: str                      # dense | conv | embed | unknown | unused
  in_axes: tuple[int, ...]       # per-layer kernel axes on the input side
  stacked: int | None            # size of the leading layer axis, if stacked
  reason: str = ""               # why kind is unknown


def _is_dynamic(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def split_args(args, kwargs):
  """Splits call args into dynamic array leaves and a static rebuild."""
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  dyn_idx = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
  dyn = [leaves[i] for i in dyn_idx]

  def rebuild(dyn_vals):
    out = list(leaves)
    for i, v in zip(dyn_idx, dyn_vals):
      out[i] = v
    return jax.tree_util.tree_unflatten(treedef, out)

  return dyn, rebuild


def trace_uses(fn: Callable, tree: Any, candidates: dict[int, str], args, kwargs):
  """Records every use of the candidate leaves when ``fn(tree, *args)`` runs."""
  paths, leaves, treedef = P.flatten(tree)
  dyn, rebuild = split_args(args, kwargs)
  uses: dict[str, list[tuple]] = {p: [] for p in candidates.values()}

  def record(t: tg.Tagged, op: str, **info):
    uses[t.path].append((op, t.kaxes, t.stack, info))

  def flat_fn(tree_leaves, dyn_vals):
    a, kw = rebuild(dyn_vals)
    return fn(jax.tree_util.tree_unflatten(treedef, tree_leaves), *a, **kw)

  def run(tree_leaves, dyn_vals):
    closed = jax.make_jaxpr(flat_fn)(tree_leaves, dyn_vals)
    invals = list(tree_leaves)
    for i, path in candidates.items():
      invals[i] = tg.Tagged(invals[i], path, None, (), tuple(range(np.ndim(invals[i]))))
    outs = interpret.run_closed(closed, invals + list(dyn_vals), rules.Context(record=record))
    return [tg.materialize(o) if isinstance(o, tg.Tagged) else o for o in outs]

  abstract = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
  jax.eval_shape(run, abstract, [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in dyn])
  return uses


def _decide(leaf: str, shape: tuple[int, ...], uses: list[tuple]) -> KernelUse:
  if not uses:
    return KernelUse("unused", (), None, "the function never reads it")
  stacks = {u[2] for u in uses}
  if len(stacks) != 1:
    return KernelUse("unknown", (), None, "it is used both per layer and as a whole")
  stack = stacks.pop()
  if stack not in ((), (0,)):
    return KernelUse("unknown", (), None, f"it is sliced along axes {stack} by nested scans")
  off = len(stack)
  stacked = shape[0] if stack else None
  nd = len(shape) - off
  parts: list[tuple[str, set[int] | None]] = []
  for op, kaxes, _, info in uses:
    if kaxes is None or any(k < 0 for k in kaxes):
      parts.append((op, None))
      continue
    logical = [k - off for k in kaxes]
    if op == "dot_general":
      parts.append((op, {logical[j] for j in info["contract"] + info["batch"]}))
    elif op == "conv":
      parts.append((op, set(range(nd)) - {logical[info["out_axis"]]}))
    elif op == "gather":
      parts.append((op, {logical[j] for j in info["index_axes"]}))
    else:
      parts.append((info.get("prim", op), None))
  kinds = {op for op, _ in parts}
  if leaf == "embedding" and nd == 2:
    in_axes = {0}
  else:
    chosen = ([s for op, s in parts if op == "gather" and s] + [s for op, s in parts if op == "conv" and s]
              + [s for op, s in parts if op == "dot_general" and s])
    if not chosen:
      ops = sorted(kinds)
      return KernelUse("unknown", (), stacked, f"it is only used by {ops}, not by a matmul, conv or lookup")
    in_axes = chosen[0]
  out_axes = set(range(nd)) - in_axes
  for op, s in parts:
    if op == "dot_general" and s is not None and not (s <= in_axes or s <= out_axes):
      return KernelUse("unknown", (), stacked,
                       f"its uses contract different axis sets ({sorted(in_axes)} and {sorted(s)})")
  if not in_axes or not out_axes:
    return KernelUse("unknown", (), stacked, "all of its axes are contracted")
  kind = "embed" if (leaf == "embedding" or "gather" in kinds) else "conv" if "conv" in kinds else "dense"
  return KernelUse(kind, tuple(sorted(in_axes)), stacked)


def kernel_infos(tree, spec, apply_fn=None, args=(), kwargs=None):
  """KernelInfo (for the matcher) and KernelUse (for wrap) of every kernel leaf."""
  paths, leaves, _ = P.flatten(tree)
  candidates = {i: p for i, p in enumerate(paths)
                if P.split(p)[1] in P.KERNEL_LEAVES and np.ndim(leaves[i]) >= 1}
  traced = None
  if apply_fn is not None:
    traced = trace_uses(apply_fn, tree, candidates, args, kwargs or {})
  infos, layouts = [], {}
  for i, path in candidates.items():
    module, leaf = P.split(path)
    shape = tuple(np.shape(leaves[i]))
    explicit = matcher.lookup(spec.kernel_axes, module) if spec.kernel_axes else None
    if explicit is not None:
      ax = tuple(sorted(int(a) for a in explicit[1]))
      use = KernelUse("dense", ax, None)
      if max(ax) >= len(shape) or len(ax) >= len(shape):
        use = KernelUse("unknown", (), None,
                        f"`kernel_axes[{explicit[0]!r}]={list(explicit[1])}` does not fit shape {shape}")
    elif traced is not None:
      use = _decide(leaf, shape, traced[path])
    elif len(shape) == 2:
      use = KernelUse("embed" if leaf == "embedding" else "dense", (0,), None)
    else:
      use = KernelUse("unknown", (), None,
                      f"a {len(shape)}-D kernel's input axes cannot be read from its path")
    layouts[module] = use
    kind = "unknown" if use.kind == "unused" else use.kind
    infos.append(matcher.KernelInfo(path=module, leaf=leaf, shape=shape, kind=kind,
                                    stacked=use.stacked))
  return infos, layouts
