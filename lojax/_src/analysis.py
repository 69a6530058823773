"""Which leaves are kernels, and how a function uses each: traced once with abstract inputs.

A *kernel* is a leaf that a matmul, convolution or lookup consumes as its
weight. Candidates are found two ways:

* by name: leaves named ``kernel``, ``embedding``, ``w`` or ``weight``
  (:data:`KERNEL_NAMES`: Flax, gemma / tunix ``Einsum``, equinox) or one of
  ``spec.kernel_names``; their module path is the dict that holds them;
* by use, when ``apply_fn`` is given: any other float leaf with at least two
  axes that the traced program uses as a matmul / conv / lookup weight (an
  MoE layer's expert arrays, gemma's bare MLP arrays). Such a leaf is its own
  module: its module path is its leaf path. ``"all-linear"`` and the group
  flags take those without expert axes (a projection, as a PEFT ``Linear``);
  expert arrays are named in ``target_modules``, as PEFT's
  ``target_parameters`` does.

:func:`kernel_infos` then decides which axes are the kernel's *input* axes
(those contracted with the activations, or indexed by an embedding lookup),
which are *output* axes, and whether a leading axis is a stacked layer axis
sliced by ``nn.scan`` / ``lax.scan``. With ``apply_fn`` the answer is read
from the traced program. Without it only the Flax names have a convention:
a 2-D ``kernel`` is ``[in, out]``, a 2-D ``embedding`` ``[vocab, features]``;
``w``, ``weight`` (``[out, in]`` in equinox, ``[in, out]`` elsewhere), other
names and N-D kernels need ``apply_fn`` or ``spec.kernel_axes``.
"""

from __future__ import annotations

import collections
import dataclasses
import traceback
from typing import Any, Callable

import jax
import numpy as np

from lojax._src import interpret
from lojax._src import matcher
from lojax._src import paths as P
from lojax._src import rules
from lojax._src import tagged as tg


KERNEL_NAMES = ("kernel", "embedding", "w", "weight")
"""Leaf names that mark a kernel whatever its use (``spec.kernel_names`` adds more)."""
_CONVENTION = {"kernel": "dense", "embedding": "embed"}  # 2-D layouts known without tracing
_CONSUMERS = ("dot_general", "ragged_dot", "conv", "gather")   # the uses that make a kernel


@dataclasses.dataclass(frozen=True)
class KernelUse:
  """The layout of one kernel leaf (per layer for stacked leaves)."""
  kind: str                      # dense | conv | embed | unknown | unused
  in_axes: tuple[int, ...]       # per-layer kernel axes on the input side
  stacked: int | None            # size of the leading layer axis, if stacked
  reason: str = ""               # why kind is unknown
  expert_axes: tuple[int, ...] = ()  # per-layer axes that index experts
  tied: bool = False             # an embedding table the function also multiplies by (the
                                 # logits of a model with tied embeddings)


def is_dynamic(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def split_args(args, kwargs):
  """Splits call args into dynamic array leaves and a static rebuild."""
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  dyn_idx = [i for i, x in enumerate(leaves) if is_dynamic(x)]
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
    uses[t.path].append((op, t.kaxes, t.stack, dict(info, indexed=t.indexed)))

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
  try:
    jax.eval_shape(run, abstract, [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in dyn])
  except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    if "/lojax/_src/" in (frame.filename or "") and (frame.line or "").lstrip().startswith(
        "raise"):
      raise   # lojax's own error, already explained
    raise TypeError(
        f"Tracing `apply_fn(params, *example_args, **example_kwargs)` to learn how the kernels "
        f"are used failed: {type(e).__name__}: {str(e)[:300]}. Pass the function that "
        "consumes the params (e.g. model.apply) and example inputs it accepts (arrays or "
        "jax.ShapeDtypeStruct), e.g. `apply_fn=model.apply, example_args=(x,)`.") from e
  return uses


def _is_float(x) -> bool:
  return jax.numpy.issubdtype(getattr(x, "dtype", np.float32), jax.numpy.floating)


def _candidates(paths, leaves, spec, traced: bool) -> dict[int, tuple[str, str, bool]]:
  """``{leaf index: (module path, leaf name, named)}`` of every leaf that may be a kernel.

  A named kernel's module is its parent, unless the parent holds several named
  kernels; a leaf found by use (``traced``) is its own module. A leaf that is
  its own module has leaf name ``""``.
  """
  names = set(KERNEL_NAMES) | set(spec.kernel_names or ())
  named, found = {}, {}
  for i, (path, x) in enumerate(zip(paths, leaves)):
    module, leaf = P.split(path)
    nd = np.ndim(x)
    if leaf in names and (nd >= 2 or (nd == 1 and leaf in _CONVENTION)):
      named[i] = (module, leaf)
    elif traced and nd >= 2 and _is_float(x):
      found[i] = (path, "", False)
  per_module = collections.Counter(m for m, _ in named.values())
  out = {i: (m, l, True) if per_module[m] == 1 else (paths[i], "", True)
         for i, (m, l) in named.items()}
  return {**out, **found}


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
  # Per use: (op, its input-side axes or None, its expert axes or None). Expert axes are
  # those a matmul batches over (einsum "etd,edf->etf"), ragged_dot's group axis, and
  # axes indexed away before the use (``w[e]`` in a loop over experts).
  parts: list[tuple[str, set[int] | None, set[int] | None]] = []
  for op, kaxes, _, info in uses:
    if kaxes is None or any(k < 0 for k in kaxes):
      parts.append((op, None, None))
      continue
    logical = [k - off for k in kaxes]
    indexed = {k - off for k in info.get("indexed", ()) if k >= off and shape[k] > 1}
    if op in ("dot_general", "ragged_dot"):
      experts = {logical[j] for j in info["batch"] + info.get("group", ())} | indexed
      parts.append((op, {logical[j] for j in info["contract"]}, experts))
    elif op == "conv":
      parts.append((op, set(logical) - {logical[info["out_axis"]]}, indexed))
    elif op == "gather":
      parts.append((op, {logical[j] for j in info["index_axes"]}, indexed))
    else:
      parts.append((info.get("prim", op), None, None))
  kinds = {op for op, _, _ in parts}
  expert_sets = {frozenset(e) for _, s, e in parts if s is not None}
  if len(expert_sets) > 1:
    sets = sorted(sorted(e) for e in expert_sets)
    return KernelUse("unknown", (), stacked,
                     f"its uses index or batch over different axes ({sets}): lojax cannot "
                     "tell which axes index experts")
  experts = set(expert_sets.pop()) if expert_sets else set()
  if leaf == "embedding" and nd == 2:
    in_axes = {0}
  else:
    chosen = ([s for op, s, _ in parts if op == "gather" and s]
              + [s for op, s, _ in parts if op == "conv" and s]
              + [s for op, s, _ in parts if op in ("dot_general", "ragged_dot") and s])
    if not chosen:
      ops = sorted(kinds)
      return KernelUse("unknown", (), stacked, f"it is only used by {ops}, not by a matmul, conv or lookup")
    in_axes = chosen[0]
  out_axes = set(range(nd)) - in_axes - experts
  for op, s, _ in parts:
    if op in ("dot_general", "ragged_dot") and s is not None and not (
        s <= in_axes or s <= out_axes):
      return KernelUse("unknown", (), stacked,
                       f"its uses contract different axis sets ({sorted(in_axes)} and {sorted(s)})")
  if not in_axes or not out_axes:
    return KernelUse("unknown", (), stacked, "all of its axes are contracted")
  kind = "embed" if (leaf == "embedding" or "gather" in kinds) else "conv" if "conv" in kinds else "dense"
  if experts and kind != "dense":
    return KernelUse("unknown", (), stacked,
                     f"it is indexed along axes {sorted(experts)} before a {kind}: lojax adapts "
                     "expert axes of matmul kernels only")
  tied = kind == "embed" and bool(kinds & {"dot_general", "ragged_dot"})
  return KernelUse(kind, tuple(sorted(in_axes)), stacked, expert_axes=tuple(sorted(experts)),
                   tied=tied)


def kernel_infos(tree, spec, apply_fn=None, args=(), kwargs=None):
  """KernelInfo (for the matcher) and KernelUse (for wrap) of every kernel leaf."""
  paths, leaves, _ = P.flatten(tree)
  candidates = _candidates(paths, leaves, spec, apply_fn is not None)
  traced = None
  if apply_fn is not None:
    traced = trace_uses(apply_fn, tree, {i: paths[i] for i in candidates}, args, kwargs or {})
  infos, layouts = [], {}
  for i, (module, leaf, named) in candidates.items():
    shape = tuple(np.shape(leaves[i]))
    explicit = matcher.lookup(spec.kernel_axes, module) if spec.kernel_axes else None
    if explicit is not None:
      ax = tuple(sorted(int(a) for a in explicit[1]))
      use = KernelUse("dense", ax, None)
      if max(ax) >= len(shape) or len(ax) >= len(shape):
        use = KernelUse("unknown", (), None,
                        f"`kernel_axes[{explicit[0]!r}]={list(explicit[1])}` does not fit shape {shape}")
    elif traced is not None:
      use = _decide(leaf, shape, traced[paths[i]])
      if not named and (use.kind == "unused" or not any(
          u[0] in _CONSUMERS for u in traced[paths[i]])):
        continue  # found by use only: a leaf no matmul, conv or lookup takes as weight
    elif len(shape) == 2 and leaf in _CONVENTION:
      use = KernelUse(_CONVENTION[leaf], (0,), None)
    elif len(shape) == 2:
      use = KernelUse("unknown", (), None,
                      f"a 2-D `{leaf}` leaf has no layout convention (`weight` is [out, in] in "
                      "equinox and torch, [in, out] in Flax): pass `apply_fn` so its use is "
                      "traced, or `kernel_axes`")
    else:
      use = KernelUse("unknown", (), None,
                      f"a {len(shape)}-D kernel's input axes cannot be read from its path")
    layouts[module] = use
    kind = "unknown" if use.kind == "unused" else use.kind
    per_layer = shape[1:] if use.stacked else shape
    out_size = (int(np.prod([d for ax, d in enumerate(per_layer)
                             if ax not in use.in_axes and ax not in use.expert_axes]))
                if traced is not None and kind == "dense" else None)
    infos.append(matcher.KernelInfo(path=module, leaf=leaf, shape=shape, kind=kind,
                                    stacked=use.stacked, named=named, out_size=out_size,
                                    experts=bool(use.expert_axes)))
  return infos, layouts
