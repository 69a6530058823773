"""Named adapters on one frozen base: delete, disable, combine, mixed batches.

Adapters never nest: targeting (lists, regexes, ``"all-linear"``, groups)
only ever sees the base tree, and an adapter's factors live beside it, not in
it. All functions here are pure: they return a new :class:`LoraParams` that
shares the base (never copied) and the untouched adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import model
from lojax._src import paths as P
from lojax._src import spec as spec_lib
from lojax._src.model import AdapterMeta, LoraMeta, LoraParams

BASE = "__base__"


def delete_adapter(lora: LoraParams, name: str, /) -> LoraParams:
  """Removes adapter ``name`` (and drops it from the active set).

  >>> import jax, jax.numpy as jnp, lojax
  >>> p = {"d": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(p, lojax.LoraSpec(target_modules=["d"]), key=jax.random.key(0))
  >>> lora = lojax.wrap(lora, lojax.LoraSpec(target_modules=["d"]), key=jax.random.key(1),
  ...                   adapter_name="b")
  >>> lojax.delete_adapter(lora, "default").meta.names
  ('b',)
  """
  model.require_lora(lora, "lojax.delete_adapter")
  lora.meta.adapter(name)  # raises with the known names
  metas = tuple(m for m in lora.meta.adapters if m.name != name)
  adapters = {k: v for k, v in lora.adapters.items() if k != name}
  active = tuple(n for n in lora.meta.active if n != name)
  return LoraParams(lora.base, adapters, LoraMeta(metas, active))


def disable_adapters(lora: LoraParams, /) -> LoraParams:
  """No active adapter: ``lorafy`` computes the base model, nothing is trainable.

  Re-enable with :func:`lojax.set_adapter`.

  >>> import jax, jax.numpy as jnp, lojax
  >>> p = {"d": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(p, lojax.LoraSpec(target_modules=["d"]), key=jax.random.key(0))
  >>> lojax.disable_adapters(lora).trainable
  {}
  """
  model.require_lora(lora, "lojax.disable_adapters")
  return LoraParams(lora.base, lora.adapters, LoraMeta(lora.meta.adapters, ()))


def adapter_ids(lora: LoraParams, names: Sequence[str], /) -> jax.Array:
  """Per-example adapter indices for a mixed-adapter batch.

  Each name must be an active adapter or ``"__base__"`` (no adapter). Pass the
  result as ``lora_adapter_ids=`` to a :func:`lojax.lorafy` function: example
  ``i`` then uses only its own adapter.

  >>> import jax, jax.numpy as jnp, lojax
  >>> p = {"d": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(p, lojax.LoraSpec(target_modules=["d"]), key=jax.random.key(0))
  >>> lojax.adapter_ids(lora, ["default", "__base__"])
  Array([ 0, -1], dtype=int32)
  """
  model.require_lora(lora, "lojax.adapter_ids")
  active = lora.meta.active
  bad = [n for n in names if n != BASE and n not in active]
  if bad:
    raise ValueError(f"Adapters {sorted(set(bad))} are not active; a mixed batch can use the "
                     f"active adapters {list(active)} or '{BASE}'. Activate them first with "
                     "lojax.set_adapter(lora, [...]).")
  return jnp.asarray([-1 if n == BASE else active.index(n) for n in names], jnp.int32)


# --------------------------------------------------------------------------
# Weighted combination
# --------------------------------------------------------------------------

def _svd_truncate(a, b, k):
  """Best rank-k factors of a @ b (a [.., n, R], b [.., R, m]) via QR + a small SVD."""
  qa, ra = jnp.linalg.qr(a)                                    # [n, R'], [R', R]
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))              # [m, R''], [R'', R]
  core = ra @ jnp.swapaxes(rb, -1, -2)                         # [R', R'']
  u, s, vt = jnp.linalg.svd(core, full_matrices=False)
  k = min(k, s.shape[-1])
  root = jnp.sqrt(s[..., :k])
  new_a = (qa @ u[..., :, :k]) * root[..., None, :]
  new_b = root[..., :, None] * (vt[..., :k, :] @ jnp.swapaxes(qb, -1, -2))
  return new_a, new_b


def add_weighted_adapter(lora: LoraParams, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str, /, *, combination_type: str = "svd",
                         svd_rank: int | None = None) -> LoraParams:
  """Adds a new adapter combining existing ones (it starts inactive).

  With ``dW_i = s_i * A_i @ B_i`` (``s_i`` the adapter's true scaling, rsLoRA
  included) the new adapter has scaling 1 and:

  * ``"cat"``: exactly ``sum_i w_i dW_i``, rank ``sum_i r_i`` (factors stacked).
  * ``"svd"``: the best rank-``svd_rank`` approximation of ``sum_i w_i dW_i``
    (default rank: the largest ``r_i``), computed from the stacked factors
    with two QR decompositions and an SVD of a small ``[R, R]`` matrix — the
    ``d_in x d_out`` delta is never formed. Exact whenever ``svd_rank`` is at
    least the rank of the sum (e.g. one adapter with weight 1).
  * ``"linear"``: PEFT's rule for equal ranks: ``A = sum_i c_i A_i``,
    ``B = sum_i c_i B_i`` with ``c_i = sqrt(w_i s_i)``. This is *not*
    ``sum_i w_i dW_i`` (it has cross terms ``c_i c_j A_i B_j``).

  Bias deltas combine as ``sum_i w_i delta_i``. Adapters holding
  ``modules_to_save`` copies cannot be combined.

  >>> import jax, jax.numpy as jnp, lojax
  >>> p = {"d": {"kernel": jnp.ones((4, 3))}}
  >>> spec = lojax.LoraSpec(r=2, target_modules=["d"], init_lora_weights=False)
  >>> lora = lojax.wrap(p, spec, key=jax.random.key(0))
  >>> lora = lojax.wrap(lora, spec, key=jax.random.key(1), adapter_name="b")
  >>> both = lojax.add_weighted_adapter(lora, ["default", "b"], [1.0, 0.5], "mix",
  ...                                   combination_type="cat")
  >>> both.adapters["mix"]["lora"]["d"]["lora_A"].shape
  (4, 4)
  """
  model.require_lora(lora, "lojax.add_weighted_adapter")
  metas = _check_combination(lora, adapters, weights, adapter_name, combination_type)
  weights = [float(w) for w in weights]
  paths = sorted({t.path for m in metas for t in m.targets})
  new_lora, new_targets = {}, []
  for path in paths:
    parts = _parts(lora, metas, weights, path)
    a_new, b_new = _COMBINE[combination_type](path, parts, svd_rank)
    r_new = int(a_new.shape[-1])
    new_lora[path] = {"lora_A": a_new, "lora_B": b_new}
    new_targets.append(dataclasses.replace(parts[0][1], layers=None, r=r_new, alpha=float(r_new),
                                           scaling=1.0, dropout=0.0))
  bias: dict = {}
  base_paths, base_leaves, _ = P.flatten(lora.base)
  shapes = {p: np.shape(x) for p, x in zip(base_paths, base_leaves)}
  for m, w in zip(metas, weights):
    for p, d in lora.adapters[m.name][model.BIAS].items():   # whole leaves: bias="none" spec
      bias[p] = bias.get(p, 0) + w * m.expand_bias(p, d, shapes[p])
  spec = spec_lib.LoraSpec(r=max(t.r for t in new_targets), lora_alpha=1.0,
                           target_modules=list(paths))
  meta = AdapterMeta(adapter_name, spec, tuple(new_targets), (), tuple(sorted(bias)), ())
  return lora.with_adapter(meta, {model.LORA: new_lora, model.BIAS: bias, model.SAVED: {}})


def _check_combination(lora, adapters, weights, adapter_name, combination_type):
  """The metadata of the adapters to combine; raises for anything that cannot be combined."""
  if not isinstance(combination_type, str) or combination_type not in _COMBINE:
    raise ValueError(f"`combination_type` must be 'cat', 'svd' or 'linear'; got "
                     f"{combination_type!r}.")
  adapters = list(model.name_list(adapters, "lojax.add_weighted_adapter", "adapters"))
  if not isinstance(weights, (list, tuple)) and not (
      isinstance(weights, (np.ndarray, jax.Array)) and np.ndim(weights) == 1):
    raise TypeError(f"`weights` must be a list of numbers, one per adapter; got {weights!r:.80}.")
  if not isinstance(adapter_name, str) or not adapter_name:
    raise TypeError(f"`adapter_name` must be a non-empty str; got {adapter_name!r}.")
  weights = list(weights)
  if not adapters or len(adapters) != len(weights):
    raise ValueError(f"Give one weight per adapter; got adapters={adapters}, weights={weights}.")
  bad = [f"weights[{i}]={w!r}" for i, w in enumerate(weights) if not _finite(w)]
  if bad:
    raise ValueError(f"`weights` must be finite numbers (a NaN or inf weight makes every "
                     f"combined factor NaN); got {', '.join(bad)} in weights={weights}.")
  if adapter_name in lora.meta.names:
    raise ValueError(f"An adapter named {adapter_name!r} already exists; pick a new name.")
  metas = [lora.meta.adapter(n) for n in adapters]  # raises for unknown names
  saving = [m.name for m in metas if lora.adapters[m.name][model.SAVED]]
  if saving:
    raise ValueError(f"Adapters {saving} hold modules_to_save copies, which cannot be combined "
                     "into a low-rank adapter.")
  if tokens := [m.name for m in metas if m.tokens]:
    raise ValueError(f"Adapters {tokens} train embedding rows (trainable_token_indices), which "
                     "replace the rows rather than add to them and cannot be weighted.")
  return metas


def _finite(w) -> bool:
  """False for a NaN or infinite weight (values that are no number are left to ``float``)."""
  try:
    return bool(np.isfinite(float(w)))
  except (TypeError, ValueError, OverflowError):
    return True


def _parts(lora, metas, weights, path: str) -> list:
  """``[(weight, target, A, B with the scaling folded in)]`` of the adapters that adapt ``path``."""
  parts = []
  for m, w in zip(metas, weights):
    t = next((t for t in m.targets if t.path == path), None)
    if t is None:
      continue
    f = model.factors(m, t, lora.adapters[m.name][model.LORA][path])
    if f.m is not None or f.bias is not None:
      how = (f"rescales '{path}' by a learned magnitude" if f.m is not None
             else f"adds a LoRA bias to the output of '{path}'")
      raise ValueError(f"Adapter {m.name!r} {how} ({m.variant.name}), which is not a low-rank "
                       "delta and cannot be combined; merge it instead (lojax.merge).")
    parts.append((w, t, f.a, f.b))
  layouts = {(t.shape, t.in_axes, t.stacked) for _, t, _, _ in parts}
  if len(layouts) != 1:
    raise ValueError(f"Adapters disagree on the layout of '{path}': {sorted(layouts)}.")
  return parts


def _linear(path, parts, svd_rank):
  """PEFT's ``"linear"``: ``A = sum c_i A_i``, ``B = sum c_i B_i``, ``c_i = sqrt(w_i s_i)``."""
  del svd_rank
  ranks = {a.shape[-1] for _, _, a, _ in parts}
  if len(ranks) != 1:
    raise ValueError(f"combination_type='linear' needs equal ranks; '{path}' has ranks "
                     f"{sorted(ranks)}. Use 'cat' or 'svd'.")
  neg = [t.path for w, t, _, _ in parts if w * t.scaling < 0]
  if neg:
    raise ValueError(f"combination_type='linear' takes sqrt(weight * scaling), which needs "
                     f"non-negative weights; got a negative product at {neg}.")
  # The factors carry s_i in B; undo it to apply PEFT's sqrt(w_i s_i) to both.
  a_new = sum(np.sqrt(w * t.scaling) * a for w, t, a, _ in parts)
  b_new = sum(np.sqrt(w * t.scaling) * (b / t.scaling) for w, t, _, b in parts)
  return a_new, b_new


def _cat(path, parts, svd_rank):
  """Exactly ``sum_i w_i dW_i``: the weighted factors side by side."""
  del path, svd_rank
  lead = 1 if parts[0][1].stacked else 0
  a_cat = jnp.concatenate([w * a for w, _, a, _ in parts], axis=-1)
  b_cat = jnp.concatenate([b for _, _, _, b in parts], axis=lead)
  return a_cat, b_cat


def _svd(path, parts, svd_rank):
  """The best rank-``svd_rank`` factors of ``sum_i w_i dW_i``, from the stacked factors."""
  a_cat, b_cat = _cat(path, parts, None)
  lead = 1 if parts[0][1].stacked else 0
  k = svd_rank or max(t.r for _, t, _, _ in parts)
  in_shape, out_shape, lead_shape = a_cat.shape[lead:-1], b_cat.shape[lead + 1:], a_cat.shape[:lead]
  a2 = a_cat.reshape(lead_shape + (-1, a_cat.shape[-1]))
  b2 = b_cat.reshape(lead_shape + (b_cat.shape[lead], -1))
  a_k, b_k = _svd_truncate(a2.astype(jnp.float32), b2.astype(jnp.float32), k)
  a_new = a_k.reshape(lead_shape + in_shape + (a_k.shape[-1],)).astype(a_cat.dtype)
  b_new = b_k.reshape(lead_shape + (b_k.shape[-2],) + out_shape).astype(b_cat.dtype)
  return a_new, b_new


_COMBINE = {"cat": _cat, "svd": _svd, "linear": _linear}
