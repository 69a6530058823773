"""``lorafy``: run any function of a param tree with LoRA composed inside."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from lojax._src import analysis
from lojax._src import interpret
from lojax._src import model
from lojax._src import paths as P
from lojax._src import primitives
from lojax._src import rules
from lojax._src import tagged as tg
from lojax._src import tokens
from lojax._src.model import LoraParams, TargetMeta


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
      entry = params.get(model.LORA, {}).get(t.path)
      if entry is None:
        problems.append(f"  [{name}] {t.path}: adapter weights missing")
        continue
      for k, want in meta.variant.shapes(t).items():
        have = tuple(np.shape(entry[k])) if k in entry else None
        if have != want:
          problems.append(f"  [{name}] {t.path}/{k}: shape {have}, expected {want}")
    for p, rows in meta.tokens:
      x = params.get(model.TOKENS, {}).get(p)
      want = (len(rows),) + shapes.get(p, (0,))[1:]
      if x is None or tuple(np.shape(x)) != want:
        problems.append(f"  [{name}] trainable tokens {p}: shape "
                        f"{None if x is None else tuple(np.shape(x))}, expected {want}")
    for group in (model.BIAS, model.SAVED):
      for p, x in params.get(group, {}).items():
        if p not in shapes:
          problems.append(f"  [{name}] {group} {p}: not in the params")
          continue
        want = meta.bias_shape(p, shapes[p]) if group == model.BIAS else shapes[p]
        if tuple(np.shape(x)) != want:
          problems.append(f"  [{name}] {group} {p}: shape {tuple(np.shape(x))}, expected "
                          f"{want} (params have {shapes[p]})")
  if problems:
    raise ValueError("The adapters do not fit these params:\n" + "\n".join(problems) +
                     "\nWrap the params this model uses (same paths and shapes), or load "
                     "adapters made for this base.")


def view(lora: LoraParams):
  """The base leaves as the wrapped function sees them, plus kernel terms."""
  paths, leaves, treedef = P.flatten(lora.base)
  check_fit(lora, paths, leaves)
  index = {p: i for i, p in enumerate(paths)}
  encoded = [x if model.is_encoded(x) else None for x in leaves]
  leaves = [model.decode(x) for x in leaves]  # e.g. quantized kernels, inside the step
  # The base is frozen by construction: however the caller differentiates,
  # no gradient (and so no full-size weight gradient) flows into it.
  leaves = [jax.lax.stop_gradient(x) for x in leaves]
  saved_by: dict[str, str] = {}
  terms: dict[int, list[tuple[TargetMeta, Any, Any]]] = {}
  for name in lora.meta.active:
    meta = lora.meta.adapter(name)
    params = lora.adapters[name]
    for p, x in params[model.SAVED].items():
      if p in saved_by:
        raise ValueError(
            f"Active adapters {saved_by[p]!r} and {name!r} both hold a trained copy of "
            f"'{p}' (modules_to_save); activate only one of them.")
      saved_by[p] = name
      leaves[index[p]] = x
      encoded[index[p]] = None   # the trained copy is what the step uses, not the base's codes
    for p, d in params[model.BIAS].items():
      x = leaves[index[p]]
      leaves[index[p]] = x + meta.expand_bias(p, d.astype(x.dtype), x.shape)
      encoded[index[p]] = None
    for t in meta.targets:
      f = model.factors(meta, t, params[model.LORA][t.path])
      terms.setdefault(index[t.leaf_path], []).append((t, f, name))
    for p, rows in meta.tokens:   # trainable tokens: a one-hot-by-rows low-rank delta
      i = index[p]
      f = tokens.factors(leaves[i], rows, params[model.TOKENS][p])
      terms.setdefault(i, []).append((tokens.target(p, np.shape(leaves[i]), rows), f, name))
  tokens.check_disjoint([lora.meta.adapter(n) for n in lora.meta.active])
  for ts in terms.values():
    if len({t.sides() for t, *_ in ts}) > 1:
      raise ValueError(f"The adapters {[n for *_, n in ts]} read '{ts[0][0].leaf_path}' "
                       "with different input axes; wrap them with the same layout.")
  return paths, leaves, treedef, terms, encoded


def _check_ids(ids, n_active: int):
  if ids is None:
    return None
  if not isinstance(ids, (jax.Array, np.ndarray, list, tuple)):
    raise TypeError(f"`lora_adapter_ids` must be a 1-D int array (lojax.adapter_ids(lora, "
                    f"names)), got {type(ids).__name__}.")
  traced = isinstance(ids, jax.core.Tracer)
  try:
    concrete = None if traced else np.asarray(ids)   # before jnp: under jit that would trace it
  except ValueError:   # a ragged list
    concrete = np.asarray(ids, object)
  if concrete is not None and concrete.dtype == object:
    raise ValueError("`lora_adapter_ids` must be a 1-D int array (one adapter index per "
                     f"example), got {ids!r:.80}.")
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"`lora_adapter_ids` must be a 1-D int array (one adapter index per "
                     f"example); got shape {ids.shape} and dtype {ids.dtype}.")
  if n_active == 0:
    raise ValueError("`lora_adapter_ids` was given but no adapter is active; activate the "
                     "adapters of the batch with lojax.set_adapter(lora, [...]).")
  if traced:   # values unknown at trace time: checked under checkify only
    checkify.debug_check(jnp.all((ids >= -1) & (ids < n_active)), f"`lora_adapter_ids` must "
                         f"lie in [-1, {n_active}) (-1: no adapter; {n_active} active "
                         "adapters); got {ids}.", ids=ids)
    return ids
  rows = np.flatnonzero((concrete < -1) | (concrete >= n_active))
  if rows.size:
    got = ", ".join(f"ids[{i}]={int(concrete[i])}" for i in rows[:10])
    raise ValueError(f"`lora_adapter_ids` must lie in [-1, {n_active}) (-1: no adapter, else "
                     f"an index into the {n_active} active adapters); got {got}"
                     f"{' and more' if rows.size > 10 else ''}. Build them with "
                     "lojax.adapter_ids(lora, names).")
  return ids


def lorafy(fn: Callable, /, *, remat: bool = True, split_kernels: bool = False) -> Callable:
  """Turns ``fn(params, *args, **kwargs)`` into ``f(lora, *args, **kwargs)``.

  The returned function runs ``fn`` on the base params with every active
  adapter composed in factorized form: each matmul, conv or embedding lookup
  that reads an adapted kernel computes ``x@W + s*((dropout(x)@A)@B)``; the
  delta ``A@B`` is never formed (except for uses lojax cannot factorize,
  which warn). Works for ``model.apply`` of Flax linen, a function that
  merges an NNX graphdef with its state, or any function of a pytree.

  Args:
    fn: any function whose first argument is the param tree.
    remat: a compile-time choice, default True: plain ``x @ W`` uses of
      adapted kernels (and of quantized kernels outside the targets, whose
      backward decodes them again) run as one matmul under a custom VJP whose backward
      recomputes the kernel input from the values it was computed from (see
      ``lojax/_src/fused.py``), instead of keeping an activation-sized
      buffer per adapted kernel for the adapter gradients. Set False to
      differentiate the function in forward mode (``jax.jvp``,
      ``jax.jacfwd``), which a custom VJP does not support.
    split_kernels: a compile-time choice, default False: set True when the
      kernels are split over mesh axes (tensor parallelism) on a mesh with
      Auto axes, the default kind. The memory-lean op then computes
      ``x@W + (x@A)@B`` as two matmuls instead of one over the concatenated
      ``[x | x@A] @ [W; B]``, whose layout XLA's partitioner can only
      reconcile with a split ``W`` by moving activations with all-to-alls
      (the 8-device TP x DP check of ``tests/sharding_check.py``: 128
      all-to-alls a step, the frozen model 32; with this option 32). On one
      device the concatenated form keeps less temp memory (549 vs 613 MiB on
      the benchmark GPT). On a mesh with Explicit axes lojax reads each
      kernel's type and chooses per kernel; this option is not needed there.

  Extra keyword arguments of the returned function (they vary per call):

  * ``lora_rng``: PRNG key for LoRA dropout (training).
  * ``lora_deterministic``: set True to disable LoRA dropout (evaluation); a
    Python bool (static under ``jax.jit``).
  * ``lora_adapter_ids``: for a mixed-adapter batch, an int array ``[batch]``:
    example ``i`` uses active adapter ``lora.meta.active[ids[i]]`` only, or
    none when ``ids[i] == -1`` (see :func:`lojax.adapter_ids`). The
    activations' leading axis must be the examples. Concrete ids outside
    ``[-1, len(lora.meta.active))`` raise a ValueError; traced ids (under
    ``jax.jit``) cannot be checked at trace time: such a row silently gets
    the base model unless the call runs under
    ``jax.experimental.checkify.checkify``, whose error then reports them.

  * ``lora_bank``: with ``lora_adapter_ids``, the active adapters' factors
    stacked once by :func:`lojax.adapter_bank` (the call then only gathers
    each example's; without it every call stacks them).

  A spec with ``lora_dropout > 0`` needs one of the first two.

  The base params are wrapped in ``lax.stop_gradient``: differentiating with
  respect to the whole :class:`LoraParams` gives zero base gradients, and
  XLA never forms a weight gradient for a frozen kernel.

  Every call runs under ``jax.jit`` (non-array arguments are static): called
  outside a jit, e.g. on concrete values or under ``jax.grad`` alone, it runs
  as one compiled program rather than op by op, and ``lorafy`` of an equal
  ``fn`` (``model.apply`` of the same module) reuses it. Inside
  ``jax.disable_jit()`` it runs op by op.

  >>> import jax, jax.numpy as jnp, lojax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> f = lambda p, x: x @ p["dense"]["kernel"]
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> jax.jit(lojax.lorafy(f))(lora, jnp.ones((1, 4))).shape
  (1, 3)
  """

  if not callable(fn):
    raise TypeError(f"`fn` must be a function of the params, got {type(fn).__name__}.")
  if not isinstance(remat, bool):
    raise TypeError(f"`remat` must be a Python bool, got {remat!r} ({type(remat).__name__}).")
  if not isinstance(split_kernels, bool):
    raise TypeError(f"`split_kernels` must be a Python bool, got {split_kernels!r} "
                    f"({type(split_kernels).__name__}).")

  @functools.wraps(fn)
  def wrapped(lora, /, *args, lora_rng=None, lora_deterministic=False, lora_adapter_ids=None,
              lora_bank=None, **kwargs):
    if "lora_remat" in kwargs:
      raise TypeError("`lora_remat` is no longer a per-call argument: it is a compile-time "
                      "choice of the lorafied function. Use `lojax.lorafy(fn, remat=False)`.")
    if not isinstance(lora, LoraParams):
      raise TypeError(
          f"The first argument must be the LoraParams returned by lojax.wrap, got "
          f"{type(lora).__name__}. For plain params call the original function.")
    if isinstance(lora_deterministic, jax.core.Tracer):
      raise TypeError(
          "`lora_deterministic` must be a Python bool, not a traced value: close over it or "
          "mark it static, e.g. jax.jit(apply, static_argnames='lora_deterministic').")
    if lora_rng is not None and not model.is_prng_key(lora_rng):
      raise TypeError(f"`lora_rng` must be a JAX PRNG key (e.g. jax.random.key(0)) or None, "
                      f"got {type(lora_rng).__name__} {lora_rng!r:.60}.")
    if not isinstance(lora_deterministic, (bool, np.bool_)):
      raise TypeError(f"`lora_deterministic` must be a Python bool, got {lora_deterministic!r}.")
    opts = (lora_rng, bool(lora_deterministic), lora_adapter_ids, lora_bank)
    call = _compiled_call(lora, args, kwargs, opts)
    if call is not None:
      return _JITTED(how, lora, *call[0], **call[1])
    return _interpreted(how, lora, args, kwargs, *opts)

  how = _How(fn, remat, split_kernels)
  return wrapped


@dataclasses.dataclass(frozen=True)
class _How:
  """What a lorafied function interprets: ``fn`` and its compile-time options. Equal for two
  ``lorafy`` calls on an equal ``fn`` (``model.apply`` of the same module, say), so they share
  compiled programs; a ``fn`` that cannot be hashed is keyed by identity."""
  fn: Callable
  remat: bool
  split: bool

  def __hash__(self):
    try:
      return hash((self.fn, self.remat, self.split))
    except TypeError:
      return hash((id(self.fn), self.remat, self.split))

  def __eq__(self, other):
    if not isinstance(other, _How) or (self.remat, self.split) != (other.remat, other.split):
      return False
    try:
      return bool(self.fn is other.fn or self.fn == other.fn)
    except Exception:  # noqa: BLE001 - e.g. a callable pytree of arrays: identity only
      return False


def _from_compiled(how, lora, dyn, rng, ids, bank, *, static, deterministic):
  treedef, dyn_idx, constants = static
  leaves = {i: x for i, _, x in constants}
  leaves.update(zip(dyn_idx, dyn))
  args, kwargs = jax.tree_util.tree_unflatten(treedef, [leaves[i] for i in range(len(leaves))])
  return _interpreted(how, lora, args, kwargs, rng, deterministic, ids, bank)


# Every call of a lorafied function goes through jax.jit (traced once per function, shapes and
# static arguments): called on concrete values, or under jax.grad or jax.vmap without an outer
# jit, it runs as one program instead of op by op (each op lojax adds would dispatch, and
# compile, on its own); under an outer jit XLA inlines it.
_JITTED = jax.jit(_from_compiled, static_argnums=0, static_argnames=("static", "deterministic"))


def _interpreted(how, lora, args, kwargs, lora_rng, lora_deterministic, lora_adapter_ids,
                 lora_bank):
  """One call of ``lorafy(how.fn, ...)``, interpreted in the caller's trace."""
  fn, remat, split_kernels = how.fn, how.remat, how.split
  paths, leaves, treedef, terms, encoded = view(lora)
  banked = _banked(lora, lora_bank, lora_adapter_ids, paths, terms)
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
  for i, enc in enumerate(encoded):
    if (enc is not None and i not in terms
        and not primitives.on_explicit_mesh(getattr(jax.typeof(leaves[i]), "sharding", None))):
      # a quantized leaf with no adapter (lojax.quantize by hand): tagged without terms, so
      # its consumers may keep its codes (a matmul's backward, a scan, a checkpoint) rather
      # than the decoded value (on an Explicit mesh it stays a plain decoded array)
      invals[i] = tg.Tagged(leaves[i], paths[i], None, (), tuple(range(np.ndim(leaves[i]))),
                            source=tg.Source(enc))
  for i, ts in terms.items():
    t0 = ts[0][0]
    sides = t0.sides()
    if i in banked:   # one term: every active adapter's factors, stacked once
      a_all, b_all = banked[i]
      invals[i] = tg.Tagged(leaves[i], t0.leaf_path, sides,
                            (tg.Term(a_all, b_all, name=t0.leaf_path, slots=True),),
                            tuple(range(len(sides))),
                            source=None if encoded[i] is None else tg.Source(encoded[i]))
      continue
    invals[i] = tg.Tagged(
        leaves[i], t0.leaf_path, sides,
        tuple(tg.Term(f.a, f.b, dropout=t.dropout if rng is not None else 0.0,
                      name=t.leaf_path, index=lora.meta.active.index(name), m=f.m,
                      bias=f.bias, rows=f.rows)
              for t, f, name in ts),
        tuple(range(len(sides))),
        # a quantized kernel: consumers may keep its codes rather than the float kernel
        source=None if encoded[i] is None else tg.Source(encoded[i]))
  if lora_adapter_ids is not None and any(f.m is not None for ts in terms.values()
                                          for _, f, _ in ts):
    raise ValueError("DoRA adapters cannot serve mixed-adapter batches (their magnitude "
                     "rescales the base output of every example); run them separately.")
  ctx = rules.Context(rng=rng, example_ids=_check_ids(lora_adapter_ids, len(lora.meta.active)),
                      remat=remat, split=split_kernels)
  outs = interpret.run_closed(closed, invals + list(dyn), ctx)
  _warn_transposed(terms, ctx.contracted)
  outs = [tg.materialize(o) if isinstance(o, tg.Tagged) else o for o in outs]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def _compiled_call(lora, args, kwargs, opts):
  """``((dyn, rng, ids, bank), {static, deterministic})`` for ``_JITTED``, or None when the
  call cannot go through ``jax.jit`` (an argument ``jax.jit`` refuses, or one that is not
  hashable as a static argument): it is then interpreted in the caller's trace. Concrete
  adapter ids are checked here, where their values are known."""
  rng, deterministic, ids, bank = opts
  from lojax._src import serving
  if bank is not None and not isinstance(bank, serving.AdapterBank):
    return None   # the interpreted call says what is wrong
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    return None
  dyn_idx = tuple(i for i, x in enumerate(leaves) if analysis.is_dynamic(x))
  # typed: 1, 1.0 and True are equal (and hash alike) but trace differently
  constants = tuple((i, type(x), x) for i, x in enumerate(leaves) if i not in dyn_idx)
  try:
    hash(constants)
  except TypeError:   # e.g. a list or dict leaf of a custom pytree: interpreted op by op
    return None
  if ids is not None and not isinstance(ids, jax.core.Tracer):
    ids = _check_ids(ids, len(lora.meta.active))
  return ([leaves[i] for i in dyn_idx], rng, ids, bank), dict(
      static=(treedef, dyn_idx, constants), deterministic=deterministic)


def _banked(lora, bank, ids, paths, terms) -> dict[int, tuple]:
  """``{leaf index: (a, b)}`` of ``bank`` (``lora_bank=``), checked against ``lora``."""
  if bank is None:
    return {}
  from lojax._src import serving   # serving builds on apply's neighbours, not the reverse
  if not isinstance(bank, serving.AdapterBank):
    raise TypeError(f"`lora_bank` must be the lojax.adapter_bank(lora) of these adapters, got "
                    f"{type(bank).__name__}.")
  if bank.names != tuple(lora.meta.active):
    raise ValueError(f"`lora_bank` stacks adapters {list(bank.names)}, but the active adapters "
                     f"are {list(lora.meta.active)}; rebuild it with lojax.adapter_bank(lora).")
  if ids is None:
    raise ValueError("`lora_bank` serves mixed-adapter batches: pass `lora_adapter_ids` too "
                     "(lojax.adapter_ids(lora, names)).")
  index = {p: i for i, p in enumerate(paths)}
  out = {}
  for p, (a, b) in bank.factors.items():
    i = index.get(p)
    ts = terms.get(i, [])
    if i is None or not ts or any(f.rows is not None for _, f, _ in ts):
      raise ValueError(f"`lora_bank` holds '{p}', which the active adapters do not adapt as it "
                       "does (or train tokens of); rebuild it with lojax.adapter_bank(lora).")
    if bank.sides[p] != ts[0][0].sides():
      raise ValueError(f"`lora_bank` reads '{p}' with another layout than the adapters.")
    out[i] = (a, b)
  missing = [ts[0][0].leaf_path for i, ts in terms.items() if i not in out]
  if missing:
    raise ValueError(f"`lora_bank` lacks {missing[:4]}, which the active adapters adapt; "
                     "rebuild it with lojax.adapter_bank(lora).")
  return out


def _warn_transposed(terms, contracted: Mapping[str, set]) -> None:
  """Warns about dense targets ``fn`` only ever contracts on their output side.

  Their layout was taken by convention (``[in, out]``, without ``apply_fn``), but
  ``fn`` stores them ``[out, in]``: the delta is still exact, yet A and B have
  swapped roles against PEFT (A's init, PEFT files).
  """
  for ts in terms.values():
    t = ts[0][0]
    if t.kind == "dense" and contracted.get(t.leaf_path) == {"O"}:
      warnings.warn(
          f"lojax: '{t.leaf_path}' {list(t.shape)} was wrapped as an [in, out] kernel (input "
          f"axes {list(t.in_axes)}), but this function contracts its other axes: it stores "
          "the kernel [out, in], as torch and transformers' GPT-2 Conv1D do. The delta is "
          "still applied exactly, but A and B have swapped roles against PEFT (A's init, PEFT "
          "files). Wrap with `apply_fn=` (and `example_args=`) so lojax traces the layout, or "
          "give `kernel_axes`.", stacklevel=3)
