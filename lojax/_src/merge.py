"""merge / unmerge: fold adapters into plain params and take them out again."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import adalora
from lojax._src import dora
from lojax._src import paths as P
from lojax._src import quant
from lojax._src import tagged as tg
from lojax._src.apply import factors
from lojax._src.lora import LoraParams, TargetMeta


def kernel_delta(t: TargetMeta, params: dict, dtype) -> jax.Array:
  """The scaled delta ``s * A@B`` of one target in its kernel's layout."""
  a, b = factors(t, params)
  shell = tg.Tagged(jax.ShapeDtypeStruct(t.shape, dtype), t.leaf_path, t.sides(),
                    (tg.Term(a, b),), None)
  return tg.delta(shell, dtype)


def _names(lora: LoraParams, adapter_names):
  if adapter_names is None:
    return tuple(lora.meta.active)
  if isinstance(adapter_names, str):
    adapter_names = (adapter_names,)
  for n in adapter_names:
    lora.meta.adapter(n)  # raises for unknown names
  return tuple(adapter_names)


def _apply(lora: LoraParams, params, adapter_names, sign: float, safe: bool):
  paths, leaves, treedef = P.flatten(params)
  index = {p: i for i, p in enumerate(paths)}
  leaves = quant.dequantize_leaves(leaves)
  base_paths, base_leaves, _ = P.flatten(lora.base)
  base_by_path = dict(zip(base_paths, quant.dequantize_leaves(base_leaves)))
  touched = set()
  saved_by: dict[str, str] = {}
  for name in _names(lora, adapter_names):
    meta = lora.meta.adapter(name)
    ad = lora.adapters[name]
    for t in meta.targets:
      i = index[t.leaf_path]
      w = leaves[i]
      entry = ad["lora"][t.path]
      if dora.KEY in entry:
        a, b = factors(t, entry)
        if sign > 0:
          new = dora.merged_kernel(t, w, a, b, entry[dora.KEY])
        else:
          new = dora.unmerged_kernel(t, w, base_by_path[t.leaf_path], a, b, entry[dora.KEY])
        leaves[i] = new.astype(w.dtype)
      else:
        d = kernel_delta(t, entry, jnp.promote_types(w.dtype, jnp.float32))
        leaves[i] = (w.astype(d.dtype) + sign * d).astype(w.dtype)
      touched.add(t.leaf_path)
    for p, d in ad["bias"].items():
      i = index[p]
      leaves[i] = (leaves[i] + sign * d.astype(leaves[i].dtype)).astype(leaves[i].dtype)
      touched.add(p)
    for p, x in ad["modules_to_save"].items():
      if p in saved_by:
        raise ValueError(
            f"Adapters {saved_by[p]!r} and {name!r} both hold a trained copy of '{p}' "
            "(modules_to_save); merge only one of them.")
      saved_by[p] = name
      leaves[index[p]] = x if sign > 0 else base_by_path[p]
      touched.add(p)
  if safe:
    bad = [p for p in sorted(touched) if not _finite(leaves[index[p]], p)]
    if bad:
      raise ValueError(
          "Merging produced non-finite values (NaN or inf) in " + ", ".join(bad) +
          "; the adapters are broken (check the learning rate / loss). Nothing was merged.")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _finite(x, path) -> bool:
  if isinstance(x, jax.core.Tracer):
    raise ValueError(f"`safe_merge=True` needs concrete arrays to check '{path}'; call "
                     "lojax.merge outside jax.jit (or use safe_merge=False inside it).")
  return bool(np.all(np.isfinite(np.asarray(x))))


def merge(lora: LoraParams, /, *, adapter_names: str | Sequence[str] | None = None,
          safe_merge: bool = False) -> Any:
  """Folds adapters into the base: plain params for ``model.apply`` / export.

  Each adapted kernel becomes ``W + s*A@B``, trained biases ``b + delta``,
  saved modules their trained copies — PEFT's ``merge_and_unload``. The
  result has the structure of ``lora.base``.

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
  adalora.warn_if_unallocated(lora)
  return _apply(lora, lora.base, adapter_names, 1.0, safe_merge)


def unmerge(params: Any, lora: LoraParams, /, *,
            adapter_names: str | Sequence[str] | None = None) -> Any:
  """Takes adapters back out of merged params (inverse of :func:`merge`).

  Kernels get ``W' - s*A@B``, biases ``b' - delta`` and saved modules their
  base values, so ``unmerge(merge(lora), lora)`` equals ``lora.base`` up to
  float rounding.

  >>> import jax, jax.numpy as jnp, lojax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> restored = lojax.unmerge(lojax.merge(lora), lora)
  """
  return _apply(lora, params, adapter_names, -1.0, False)
