"""Serving: swap an adapter's weights into a compiled server without recompiling.

A jitted function of a :class:`LoraParams` is compiled for its tree structure,
shapes and static metadata (targets, ranks, scalings). :func:`hotswap`
returns the server's tree with one adapter's weights replaced by another
adapter's, written in the server's layout: ranks zero-padded to the server's,
the incoming scaling folded into ``B`` (``s_server * B' = s_new * B``), targets
the incoming adapter does not adapt set to zero. The metadata is the server's
own, so the compiled function is reused, and the outputs are exactly the
incoming adapter's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import lora as lora_lib
from lojax._src import model
from lojax._src import tagged as tg
from lojax._src.model import LoraParams, TargetMeta

_A, _B = "lora_A", "lora_B"


def hotswap(server: LoraParams, new: LoraParams, /, *, adapter_name: str | None = None,
            source_name: str | None = None) -> LoraParams:
  """``server`` with adapter ``adapter_name`` holding ``new``'s adapter, padded to fit.

  Args:
    server: the :class:`LoraParams` a serving function was compiled for, e.g.
      wrapped with ``r`` the largest rank it must accept (its own weights do not
      matter).
    new: a :class:`LoraParams` on the same base holding the adapter to serve
      (from :func:`lojax.wrap` and training, :func:`lojax.restore_adapters` or
      :func:`lojax.load_peft`).
    adapter_name: the server's adapter to overwrite (default: its only one).
    source_name: ``new``'s adapter to take (default: its only one).

  Returns:
    A :class:`LoraParams` with the server's structure, shapes, dtypes and
    metadata (so no jitted function of it recompiles) whose adapter computes
    what ``new``'s does: each factor pair zero-padded from rank r to the
    server's, ``B`` times ``s_new / s_server``, targets ``new`` does not
    adapt (or layers of a stacked kernel it does not adapt) set to zero; DoRA
    magnitudes and ``modules_to_save`` copies taken as they are, trained
    biases likewise (zero where ``new`` trains none).

  Raises:
    ValueError: ``new`` adapts a kernel (or a layer) the server does not, with
      a rank above the server's, with another variant (LoRA vs DoRA; AdaLoRA
      is not swappable: serve it resized or merged), or trains a bias or saves a
      module the server does not; every problem is listed.

  >>> import jax, jax.numpy as jnp, lojax
  >>> params = {"q": {"kernel": jnp.ones((4, 3))}}
  >>> server = lojax.wrap(params, lojax.LoraSpec(r=8, target_modules=["q"]),
  ...                     key=jax.random.key(0))
  >>> small = lojax.wrap(params, lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["q"]),
  ...                    key=jax.random.key(1))
  >>> lojax.hotswap(server, small).adapters["default"]["lora"]["q"]["lora_A"].shape
  (4, 8)
  """
  for arg, value in (("server", server), ("new", new)):
    if not isinstance(value, LoraParams):
      raise TypeError(f"`{arg}` must be a lojax.LoraParams, got {type(value).__name__}.")
  name = _one(server, adapter_name, "adapter_name", "server")
  src = _one(new, source_name, "source_name", "new")
  s_meta, n_meta = server.meta.adapter(name), new.meta.adapter(src)
  problems = []
  kinds = {s_meta.variant.name, n_meta.variant.name}
  if "adalora" in kinds:
    problems.append("  AdaLoRA adapters are not swapped: resize them (lojax.adalora_resize) into "
                    "plain LoRA, or serve them merged")
  elif len(kinds) > 1:
    problems.append(f"  the server's adapter {name!r} is {s_meta.variant.name}, the new one "
                    f"{n_meta.variant.name}: compile a server of the same variant")
  by_path = {t.path: t for t in s_meta.targets}
  for t in n_meta.targets:
    st = by_path.get(t.path)
    if st is None:
      problems.append(f"  {t.path}: adapted by the new adapter, not by the server")
    elif (st.shape, st.kind, st.in_axes, st.expert_axes) != (t.shape, t.kind, t.in_axes,
                                                               t.expert_axes):
      problems.append(f"  {t.path}: the server adapts it as {st.kind} {st.shape} with inputs "
                      f"{st.in_axes}, the new adapter as {t.kind} {t.shape} with {t.in_axes}")
    elif t.r > st.r:
      problems.append(f"  {t.path}: rank {t.r} is above the server's {st.r}; compile the "
                      f"server with r >= {t.r} (e.g. rank_pattern)")
    elif st.stacked and not set(_layers(t)) <= set(_layers(st)):
      problems.append(f"  {t.path}: the new adapter adapts layers {list(_layers(t))}, the "
                      f"server only {list(_layers(st))}")
  own = sorted({k for t in s_meta.targets for k in s_meta.variant.layout(t)} - {_A, _B})
  if own and {(t.path, _layers(t) if t.stacked else ()) for t in n_meta.targets} != {
      (t.path, _layers(t) if t.stacked else ()) for t in s_meta.targets}:
    problems.append(f"  {s_meta.variant.name}: the new adapter must adapt exactly the server's "
                    f"kernels and layers (its {own} have no neutral value to fill in)")
  if s_meta.tokens != n_meta.tokens:
    problems.append(f"  trainable tokens: the server trains {list(s_meta.tokens)}, the new "
                    f"adapter {list(n_meta.tokens)}; they must be the same rows")
  s_ad, n_ad = server.adapters[name], new.adapters[src]
  for group, what in ((model.BIAS, "trains the bias"), (model.SAVED, "saves")):
    for p in sorted(set(n_ad[group]) - set(s_ad[group])):
      problems.append(f"  {p}: the new adapter {what} {p}, the server does not")
  if problems:
    raise ValueError(f"Cannot swap adapter {src!r} into the server's {name!r}:\n" +
                     "\n".join(problems))
  lora = {}
  for st in s_meta.targets:
    entry = s_ad[model.LORA][st.path]
    t = next((t for t in n_meta.targets if t.path == st.path), None)
    lora[st.path] = (_zero(entry) if t is None else _fit(
        st, t, s_meta.variant, entry, n_ad[model.LORA][t.path]))
  group = lambda g: {p: (jnp.asarray(n_ad[g][p], x.dtype) if p in n_ad[g] else jnp.zeros_like(x))
                     for p, x in s_ad[g].items()}
  saved = {p: jnp.asarray(n_ad[model.SAVED][p], x.dtype) if p in n_ad[model.SAVED] else x
           for p, x in s_ad[model.SAVED].items()}   # a module not saved keeps the server's copy
  adapter = dict(s_ad, **{model.LORA: lora, model.BIAS: group(model.BIAS), model.SAVED: saved})
  if model.TOKENS in s_ad:
    adapter[model.TOKENS] = {p: jnp.asarray(n_ad[model.TOKENS][p], x.dtype)
                             for p, x in s_ad[model.TOKENS].items()}
  return LoraParams(server.base, dict(server.adapters, **{name: adapter}), server.meta)


def _one(lora: LoraParams, name, arg: str, what: str) -> str:
  if name is not None:
    lora.meta.adapter(name)
    return name
  if len(lora.meta.names) != 1:
    raise ValueError(f"`{arg}` is required: `{what}` has adapters {list(lora.meta.names)}.")
  return lora.meta.names[0]


def _layers(t: TargetMeta) -> tuple[int, ...]:
  return tuple(t.layers) if t.layers is not None else tuple(range(t.stacked))


def _zero(entry):
  return {k: jnp.zeros_like(v) for k, v in entry.items()}


def _fit(st: TargetMeta, t: TargetMeta, variant, server_entry, entry):
  """``entry`` (target ``t``) in the server target ``st``'s layout: rank, layers, scaling.

  Each parameter is zero-padded along its rank axis (the variant's layout roles); those
  the scaling multiplies (``B``, a LoRA bias: :meth:`Variant.unscaled`) also take
  ``s_new / s_server``; the others are taken as they are.
  """
  out = {}
  entry = variant.unscaled(t, {k: jnp.asarray(v, jnp.float32) for k, v in entry.items()},
                           t.scaling / st.scaling)
  for k, roles in variant.layout(st).items():
    x = entry[k]
    if model.RANK in roles:
      axis = roles.index(model.RANK)
      x = jnp.pad(x, [(0, st.r - t.r if i == axis else 0) for i in range(x.ndim)])
    out[k] = x.astype(server_entry[k].dtype)
  if st.stacked and _layers(st) != _layers(t):   # scatter the new layers into the server's
    rows = np.searchsorted(np.asarray(_layers(st)), np.asarray(_layers(t)))
    out = {k: jnp.zeros_like(server_entry[k]).at[rows].set(v) for k, v in out.items()}
  return out


@jax.tree_util.register_pytree_with_keys_class
class AdapterBank:
  """The active adapters' factors stacked once, for mixed-adapter batches.

  A mixed-adapter batch (``lora_adapter_ids``) gathers each example's factors
  from the active adapters' stack. Without a bank, every call stacks them again
  (each kernel's ``A`` and ``B`` of every adapter copied, per call: a prefill
  pays it in full). :func:`adapter_bank` stacks them once; pass the bank to the
  lorafied function as ``lora_bank=`` and the call only gathers.

  Attributes:
    names: the adapters, in slot order (the active adapters' order, so
      :func:`lojax.adapter_ids` gives the slots).
    factors: ``{leaf path: (a [K, L?, in..., r], b [K, L?, r, out...])}``,
      scaling folded into ``b``, ranks zero-padded to the largest, zeros for
      an adapter that does not adapt the leaf.
    sides: ``{leaf path: the leaf's axis sides}`` (static).
  """

  def __init__(self, names, factors, sides):
    self.names = tuple(names)
    self.factors = dict(factors)
    self.sides = dict(sides)

  def tree_flatten_with_keys(self):
    paths = tuple(sorted(self.factors))
    children = tuple((jax.tree_util.DictKey(p), self.factors[p]) for p in paths)
    return children, (self.names, paths, tuple(self.sides[p] for p in paths))

  @classmethod
  def tree_unflatten(cls, aux, children):
    names, paths, sides = aux
    return cls(names, dict(zip(paths, children)), dict(zip(paths, sides)))

  def __repr__(self):
    return f"AdapterBank({list(self.names)}, {len(self.factors)} kernels)"


def adapter_bank(lora: LoraParams, /) -> AdapterBank:
  """Stacks the active adapters' factors once, for mixed-adapter batches.

  ``apply(lora, x, lora_adapter_ids=ids, lora_bank=lojax.adapter_bank(lora))``
  computes what ``apply(lora, x, lora_adapter_ids=ids)`` does, without
  stacking the adapters' factors in every call. Rebuild the bank when the
  adapters change (e.g. after :func:`hotswap`): the same shapes compile once.
  Plain LoRA adapters only (DoRA's magnitude and LoRA biases are per-example
  terms a bank does not hold).

  >>> import jax, jax.numpy as jnp, lojax
  >>> p = {"d": {"kernel": jnp.ones((4, 3))}}
  >>> spec = lojax.LoraSpec(r=2, target_modules=["d"], init_lora_weights=False)
  >>> lora = lojax.wrap(p, spec, key=jax.random.key(0))
  >>> lora = lojax.set_adapter(lojax.wrap(lora, spec, key=jax.random.key(1), adapter_name="b"),
  ...                          ["default", "b"])
  >>> bank = lojax.adapter_bank(lora)
  >>> ids = lojax.adapter_ids(lora, ["b", "default", "__base__"])
  >>> f = lojax.lorafy(lambda p, x: x @ p["d"]["kernel"])
  >>> x = jnp.ones((3, 4))
  >>> bool(jnp.allclose(f(lora, x, lora_adapter_ids=ids), f(lora, x, lora_adapter_ids=ids,
  ...                                                     lora_bank=bank)))
  True
  """
  model.require_lora(lora, "lojax.adapter_bank")
  names = lora.meta.active
  if not names:
    raise ValueError("lojax.adapter_bank: no adapter is active; activate the adapters the "
                     "server mixes with lojax.set_adapter(lora, [...]).")
  by_leaf: dict[str, list] = {}
  problems = []
  for k, name in enumerate(names):
    meta = lora.meta.adapter(name)
    if type(meta.variant) is not type(lora_lib.LORA):
      problems.append(f"  {name!r} is a {meta.variant.name} adapter; a bank holds plain LoRA "
                      "factors only")
      continue
    for t in meta.targets:
      f = model.factors(meta, t, lora.adapters[name][model.LORA][t.path])
      by_leaf.setdefault(t.leaf_path, []).append((k, t, f))
  if problems:
    raise ValueError("Cannot bank these adapters:\n" + "\n".join(problems))
  factors, sides = {}, {}
  for leaf, parts in by_leaf.items():
    layouts = {t.sides() for _, t, _ in parts}
    if len(layouts) != 1:
      raise ValueError(f"lojax.adapter_bank: the adapters read '{leaf}' with different layouts "
                       f"{sorted(layouts)}.")
    r = max(int(f.a.shape[-1]) for _, _, f in parts)
    a0, b0 = parts[0][2].a, parts[0][2].b
    ns = tg.n_shared(parts[0][1].sides())
    a_shape = a0.shape[:-1] + (r,)
    b_shape = b0.shape[:ns] + (r,) + b0.shape[ns + 1:]
    dtype = jnp.result_type(*[f.a.dtype for _, _, f in parts])
    a_all = jnp.zeros((len(names),) + a_shape, dtype)
    b_all = jnp.zeros((len(names),) + b_shape, dtype)
    for k, _, f in parts:
      pad = r - f.a.shape[-1]
      a_all = a_all.at[k].set(jnp.pad(f.a.astype(dtype), [(0, 0)] * (f.a.ndim - 1) + [(0, pad)]))
      b_all = b_all.at[k].set(jnp.pad(f.b.astype(dtype), [(0, 0)] * ns + [(0, pad)]
                                      + [(0, 0)] * (f.b.ndim - ns - 1)))
    factors[leaf], sides[leaf] = (a_all, b_all), parts[0][1].sides()
  return AdapterBank(names, factors, sides)
