"""``lorafy``: run any function of a param tree with LoRA composed inside."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import analysis
from lojax._src import dora
from lojax._src import interpret
from lojax._src import paths as P
from lojax._src import quant
from lojax._src import rules
from lojax._src import tagged as tg
from lojax._src.lora import LoraParams, TargetMeta


def _expand_layers(x, t: TargetMeta):
  """Scatters per-selected-layer factors into the full stack (zeros elsewhere)."""
  if not t.stacked or t.layers is None:
    return x
  full = jnp.zeros((t.stacked,) + x.shape[1:], x.dtype)
  return full.at[jnp.asarray(t.layers)].set(x)


def factors(t: TargetMeta, params: dict):
  """The (A, B·scaling) factors of one target in the kernel's own layout.

  An AdaLoRA adapter's singular values E fold into A: ``A = P * E``.
  """
  a = params["lora_A"]
  if "lora_E" in params:
    e = params["lora_E"]
    lead = 1 if t.stacked else 0
    a = a * e.reshape(e.shape[:lead] + (1,) * (a.ndim - lead - 1) + e.shape[-1:])
  a = _expand_layers(a, t)
  b = _expand_layers(params["lora_B"], t) * jnp.asarray(t.scaling, params["lora_B"].dtype)
  return a, b


def check_fit(lora: LoraParams, paths: list[str], leaves: list[Any]):
  """Raises if the active adapters do not fit the base they are applied to."""
  shapes = {p: tuple(np.shape(x)) for p, x in zip(paths, leaves)}
  problems = []
  for name in lora.meta.active:
    meta = lora.meta.adapter(name)
    params = lora.adapters.get(name, {})
    for t in meta.targets:
      got = shapes.get(t.leaf_path)
      if got is None:
        problems.append(f"  [{name}] {t.leaf_path}: not in the params")
        continue
      if got != t.shape:
        problems.append(f"  [{name}] {t.leaf_path}: params have shape {got}, adapter was built "
                        f"for {t.shape}")
      entry = params.get("lora", {}).get(t.path)
      if entry is None:
        problems.append(f"  [{name}] {t.path}: adapter weights missing")
        continue
      wants = [("lora_A", t.a_shape()), ("lora_B", t.b_shape())]
      if "lora_E" in entry:
        wants.append(("lora_E", ((t.n_layers,) if t.stacked else ()) + (t.r,)))
      if dora.KEY in entry:
        wants.append((dora.KEY, t.b_shape()[:(1 if t.stacked else 0)] + t.b_shape()[
            (2 if t.stacked else 1):]))
      for k, want in wants:
        have = tuple(np.shape(entry.get(k))) if k in entry else None
        if have != want:
          problems.append(f"  [{name}] {t.path}/{k}: shape {have}, expected {want}")
    for group in ("bias", "modules_to_save"):
      for p, x in params.get(group, {}).items():
        if p not in shapes:
          problems.append(f"  [{name}] {group} {p}: not in the params")
        elif tuple(np.shape(x)) != shapes[p]:
          problems.append(f"  [{name}] {group} {p}: shape {tuple(np.shape(x))}, params have "
                          f"{shapes[p]}")
  if problems:
    raise ValueError("The adapters do not fit these params:\n" + "\n".join(problems) +
                     "\nWrap the params this model uses (same paths and shapes), or load "
                     "adapters made for this base.")


def view(lora: LoraParams):
  """The base leaves as the wrapped function sees them, plus kernel terms."""
  paths, leaves, treedef = P.flatten(lora.base)
  check_fit(lora, paths, leaves)
  index = {p: i for i, p in enumerate(paths)}
  leaves = quant.dequantize_leaves(leaves)  # quantized base kernels, inside the step
  # The base is frozen by construction: however the caller differentiates,
  # no gradient (and so no full-size weight gradient) flows into it.
  leaves = [jax.lax.stop_gradient(x) for x in leaves]
  saved_by: dict[str, str] = {}
  terms: dict[int, list[tuple[TargetMeta, Any, Any]]] = {}
  for name in lora.meta.active:
    meta = lora.meta.adapter(name)
    params = lora.adapters[name]
    for p, x in params["modules_to_save"].items():
      if p in saved_by:
        raise ValueError(
            f"Active adapters {saved_by[p]!r} and {name!r} both hold a trained copy of "
            f"'{p}' (modules_to_save); activate only one of them.")
      saved_by[p] = name
      leaves[index[p]] = x
    for p, d in params["bias"].items():
      leaves[index[p]] = leaves[index[p]] + d.astype(leaves[index[p]].dtype)
    for t in meta.targets:
      a, b = factors(t, params["lora"][t.path])
      mag = params["lora"][t.path].get(dora.KEY)
      m = None if mag is None else dora.term_magnitude(t, mag)
      terms.setdefault(index[t.leaf_path], []).append((t, a, b, name, m))
  return paths, leaves, treedef, terms


def _check_ids(ids, n_active: int):
  if ids is None:
    return None
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"`lora_adapter_ids` must be a 1-D int array (one adapter index per "
                     f"example); got shape {ids.shape} and dtype {ids.dtype}.")
  if n_active == 0:
    raise ValueError("`lora_adapter_ids` was given but no adapter is active; activate the "
                     "adapters of the batch with lojax.set_adapter(lora, [...]).")
  return ids


def lorafy(fn: Callable) -> Callable:
  """Turns ``fn(params, *args, **kwargs)`` into ``f(lora, *args, **kwargs)``.

  The returned function runs ``fn`` on the base params with every active
  adapter composed in factorized form: each matmul, conv or embedding lookup
  that reads an adapted kernel computes ``x@W + s*((dropout(x)@A)@B)``; the
  delta ``A@B`` is never formed (except for uses lojax cannot factorize,
  which warn). Works for ``model.apply`` of Flax linen, a function that
  merges an NNX graphdef with its state, or any function of a pytree.

  Extra keyword arguments of the returned function:
    lora_rng: PRNG key for LoRA dropout (training).
    lora_deterministic: set True to disable LoRA dropout (evaluation); a
      Python bool (static under ``jax.jit``).
    lora_adapter_ids: for a mixed-adapter batch, an int array ``[batch]``:
      example ``i`` uses active adapter ``lora.meta.active[ids[i]]`` only, or
      none when ``ids[i] == -1`` (see :func:`lojax.adapter_ids`). The
      activations' leading axis must be the examples.
    lora_remat: a Python bool, default True: plain ``x @ W`` uses of adapted
      kernels run as one matmul under a custom VJP whose backward recomputes
      the kernel input from the values it was computed from (see
      ``lojax/_src/fused.py``), instead of keeping an activation-sized buffer
      per adapted kernel for the adapter gradients. Set False to
      differentiate the function in forward mode (``jax.jvp``,
      ``jax.jacfwd``), which a custom VJP does not support.
  A spec with ``lora_dropout > 0`` needs one of the two.

  The base params are wrapped in ``lax.stop_gradient``: differentiating with
  respect to the whole :class:`LoraParams` gives zero base gradients, and
  XLA never forms a weight gradient for a frozen kernel.

  >>> import jax, jax.numpy as jnp, lojax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> f = lambda p, x: x @ p["dense"]["kernel"]
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> jax.jit(lojax.lorafy(f))(lora, jnp.ones((1, 4))).shape
  (1, 3)
  """

  @functools.wraps(fn)
  def wrapped(lora, /, *args, lora_rng=None, lora_deterministic=False, lora_adapter_ids=None,
              lora_remat=True, **kwargs):
    if not isinstance(lora, LoraParams):
      raise TypeError(
          f"The first argument must be the LoraParams returned by lojax.wrap, got "
          f"{type(lora).__name__}. For plain params call the original function.")
    if isinstance(lora_deterministic, jax.core.Tracer):
      raise TypeError(
          "`lora_deterministic` must be a Python bool, not a traced value: close over it or "
          "mark it static, e.g. jax.jit(apply, static_argnames='lora_deterministic').")
    if not isinstance(lora_remat, bool):
      raise TypeError(f"`lora_remat` must be a Python bool, got {type(lora_remat).__name__}.")
    paths, leaves, treedef, terms = view(lora)
    dropout = max((ts_[0].dropout for ts in terms.values() for ts_ in ts), default=0.0)
    rng = None
    if dropout > 0 and not lora_deterministic:
      if lora_rng is None:
        raise ValueError(
            f"This adapter has `lora_dropout={dropout}`: pass `lora_rng=key` when training "
            "or `lora_deterministic=True` when evaluating.")
      rng = lora_rng
    dyn, rebuild = analysis.split_args(args, kwargs)

    def flat_fn(tree_leaves, dyn_vals):
      a, kw = rebuild(dyn_vals)
      return fn(jax.tree_util.tree_unflatten(treedef, tree_leaves), *a, **kw)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(leaves, dyn)
    invals = list(leaves)
    for i, ts in terms.items():
      t0 = ts[0][0]
      sides = t0.sides()
      invals[i] = tg.Tagged(
          leaves[i], t0.leaf_path, sides,
          tuple(tg.Term(a, b, dropout=t.dropout if rng is not None else 0.0, name=t.leaf_path,
                        index=lora.meta.active.index(name), m=m)
                for t, a, b, name, m in ts),
          tuple(range(len(sides))))
    if lora_adapter_ids is not None and any(m is not None for ts in terms.values()
                                            for *_, m in ts):
      raise ValueError("DoRA adapters cannot serve mixed-adapter batches (their magnitude "
                       "rescales the base output of every example); run them separately.")
    ctx = rules.Context(rng=rng, example_ids=_check_ids(lora_adapter_ids, len(lora.meta.active)),
                        remat=lora_remat)
    outs = interpret.run_closed(closed, invals + list(dyn), ctx)
    outs = [tg.materialize(o) if isinstance(o, tg.Tagged) else o for o in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapped
