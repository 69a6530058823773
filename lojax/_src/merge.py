"""merge / unmerge: fold adapters into plain params and take them out again."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np

from lojax._src import model
from lojax._src import paths as P
from lojax._src import tokens
from lojax._src.model import LoraParams


def _names(lora: LoraParams, adapter_names):
  if adapter_names is None:
    return tuple(lora.meta.active)
  adapter_names = model.name_list(adapter_names, "lojax.merge / unmerge", "adapter_names")
  for n in adapter_names:
    lora.meta.adapter(n)  # raises for unknown names
  return tuple(adapter_names)


def _apply(lora: LoraParams, params, adapter_names, sign: float, safe: bool):
  """``params`` with the adapters added (``sign`` 1) or taken out (-1), leaf by leaf."""
  paths, leaves, treedef = P.flatten(params)
  index = {p: i for i, p in enumerate(paths)}
  floats = [model.decode(x) for x in leaves]
  base_paths, base_leaves, _ = P.flatten(lora.base)
  base_by_path = dict(zip(base_paths, base_leaves))
  touched = set()
  saved_by: dict[str, str] = {}
  names = _names(lora, adapter_names)
  if sign < 0:   # `params` is the caller's tree: it must have the leaves the adapters change
    shape_of = {p: np.shape(model.decode(x)) for p, x in zip(base_paths, base_leaves)}
    bad = []
    for name in names:
      meta, ad = lora.meta.adapter(name), lora.adapters[name]
      for p in sorted({t.leaf_path for t in meta.targets} | set(ad[model.BIAS]) |
                      set(ad[model.SAVED]) | {p for p, _ in meta.tokens}):
        if p not in index:
          bad.append(f"  {p}: missing")
        elif np.shape(floats[index[p]]) != shape_of[p]:
          bad.append(f"  {p}: shape {np.shape(floats[index[p]])}, the base has {shape_of[p]}")
    if bad:
      raise ValueError("`params` is not a merged tree of these adapters' base:\n" +
                       "\n".join(bad[:20]) + "\nPass what lojax.merge(lora) returned.")
  for name in names:
    meta = lora.meta.adapter(name)
    variant = meta.variant
    ad = lora.adapters[name]
    for t in meta.targets:
      i = index[t.leaf_path]
      w, entry = floats[i], ad[model.LORA][t.path]
      base_w = None if sign > 0 else model.decode(base_by_path[t.leaf_path])
      floats[i] = _folded(variant, t, sign, w, entry, base_w)
      touched.add(t.leaf_path)
      c = variant.bias_delta(t, entry)
      if c is not None:   # lora_bias: into the module's own bias
        j = _module_bias(t, index, floats, np.shape(c), name)
        floats[j] = (floats[j] + sign * c.astype(floats[j].dtype)).astype(floats[j].dtype)
        touched.add(paths[j])
    for p, rows in meta.tokens:   # trainable tokens: the rows themselves (exact)
      i = index[p]
      values = ad[model.TOKENS][p] if sign > 0 else model.decode(base_by_path[p])[np.asarray(rows)]
      floats[i] = tokens.write(floats[i], rows, values)
      touched.add(p)
    for p, d in ad[model.BIAS].items():
      i = index[p]
      d = meta.expand_bias(p, d.astype(floats[i].dtype), floats[i].shape)
      floats[i] = (floats[i] + sign * d).astype(floats[i].dtype)
      touched.add(p)
    for p, x in ad[model.SAVED].items():
      if p in saved_by:
        raise ValueError(
            f"Adapters {saved_by[p]!r} and {name!r} both hold a trained copy of '{p}' "
            "(modules_to_save); merge only one of them.")
      saved_by[p] = name
      floats[index[p]] = x if sign > 0 else model.decode(base_by_path[p])
      touched.add(p)
  if safe:
    bad = [p for p in sorted(touched) if not _finite(floats[index[p]], p)]
    if bad:
      raise ValueError(
          "Merging produced non-finite values (NaN or inf) in " + ", ".join(bad) +
          "; the adapters are broken (check the learning rate / loss). Nothing was merged.")
  if sign < 0:  # the base as it was: an encoded (e.g. quantized) kernel is stored so again
    for p in touched:
      if model.is_encoded(base := base_by_path.get(p)):
        floats[index[p]] = base.encode_like(floats[index[p]])
  return jax.tree_util.tree_unflatten(treedef, floats)


def _fold(variant, t, sign, w, entry, base_w):
  new = variant.merge(t, w, entry) if sign > 0 else variant.unmerge(t, w, entry, base_w)
  return new.astype(w.dtype)


# One compiled program per variant, kernel layout and shapes (the target's path is not part of
# the math, so the layers of a model share it), instead of one per op of an eager merge.
_fold_jit = functools.partial(jax.jit, static_argnums=(0, 1, 2))(_fold)


def _folded(variant, t, sign, w, entry, base_w):
  """``variant.merge`` (``sign`` 1) or ``unmerge`` (-1) of one target, in ``w``'s dtype."""
  try:
    return _fold_jit(variant, dataclasses.replace(t, path="", leaf=""), sign, w, entry, base_w)
  except (ValueError, TypeError):
    return _fold(variant, t, sign, w, entry, base_w)   # the error, naming the target


def _module_bias(t, index, floats, shape, name: str) -> int:
  """The leaf index of the bias of ``t``'s module, which a LoRA bias merges into."""
  p = t.bias_path
  if p not in index:
    raise ValueError(
        f"Adapter {name!r} has a LoRA bias (`lora_bias=True`) on '{t.path}', whose module has "
        "no bias leaf to merge it into (as PEFT, lojax cannot merge it). Keep the adapter "
        "unmerged (lojax.lorafy), or give the module a bias.")
  if np.shape(floats[index[p]]) != tuple(shape):
    raise ValueError(f"The bias '{p}' has shape {np.shape(floats[index[p]])}; the LoRA bias of "
                     f"adapter {name!r} has {tuple(shape)}: they cannot be merged.")
  return index[p]


def _finite(x, path) -> bool:
  if isinstance(x, jax.core.Tracer):
    raise ValueError(f"`safe_merge=True` needs concrete arrays to check '{path}'; call "
                     "lojax.merge outside jax.jit (or use safe_merge=False inside it).")
  return bool(np.all(np.isfinite(np.asarray(x))))


def merge(lora: LoraParams, /, *, adapter_names: str | Sequence[str] | None = None,
          safe_merge: bool = False) -> Any:
  """Folds adapters into the base: plain params for ``model.apply`` / export.

  Each adapted kernel becomes ``W + s*A@B`` (with ``lora_bias``, its module's
  bias ``+ s*b``; a module without a bias raises), trained biases ``b + delta``,
  saved modules their trained copies — PEFT's ``merge_and_unload``. The
  result has the structure of ``lora.base``. Called outside ``jax.jit``, each
  kernel is folded by one compiled program per variant and kernel layout
  (shared by a model's layers).

  Args:
    lora: the LoRA tree.
    adapter_names: adapters to merge (default: the active ones).
    safe_merge: check every merged leaf for NaN/inf and raise instead.

  Returns:
    A param tree with the same structure as the base.

  Raises:
    ValueError: ``safe_merge`` found non-finite values, or an unknown name.

  >>> import jax, jax.numpy as jnp, lojax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> lojax.merge(lora)["dense"]["kernel"].shape
  (4, 3)
  """
  _check_lora("lora", lora)
  for meta in lora.meta.adapters:
    meta.variant.check_trained(meta.name, lora.adapters[meta.name])
  return _apply(lora, lora.base, adapter_names, 1.0, safe_merge)


def unmerge(lora: LoraParams, params: Any, /, *,
            adapter_names: str | Sequence[str] | None = None) -> Any:
  """Takes adapters back out of merged params (inverse of :func:`merge`).

  Kernels get ``W' - s*A@B`` (DoRA: ``W' * n/m - s*A@B``), biases
  ``b' - delta`` and saved modules their base values, so
  ``unmerge(lora, merge(lora))`` equals ``lora.base`` up to float rounding.
  A base kernel stored encoded (e.g. a quantized QLoRA base) comes back
  encoded the same way.

  >>> import jax, jax.numpy as jnp, lojax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> restored = lojax.unmerge(lora, lojax.merge(lora))
  """
  _check_lora("lora", lora)
  if isinstance(params, LoraParams):
    raise TypeError("`params` must be the merged param tree, got a LoraParams; the order is "
                    "`lojax.unmerge(lora, merged_params)` (the same as lojax.merge's).")
  return _apply(lora, params, adapter_names, -1.0, False)


def _check_lora(arg: str, lora: Any) -> None:
  if not isinstance(lora, LoraParams):
    raise TypeError(f"`{arg}` must be the LoraParams returned by lojax.wrap, got "
                    f"{type(lora).__name__}. (lojax.unmerge takes `(lora, merged_params)`.)")
