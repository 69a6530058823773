"""Param-tree paths: the one path convention used everywhere in lojax.

A leaf path is the "/"-joined sequence of dict keys, list indices and
attribute names that lead to a leaf, e.g. ``params/h_3/attn/c_attn/kernel``.
Variable boxes (NNX ``Param.value``, linen ``Partitioned.value``) contribute
no component, so an NNX state and a linen param dict of the same model give
the same paths. A *module path* is the path of the dict that holds a kernel:
``params/h_3/attn/c_attn``.
"""

from __future__ import annotations

import os

from typing import Any

import jax

from lojax._src import model


def _component(key: Any) -> str | None:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name == "value" else key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def render(keypath: tuple[Any, ...]) -> str:
  """Renders a jax key path as a "/"-joined lojax path."""
  parts = [c for c in map(_component, keypath) if c is not None]
  return "/".join(parts)


def flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
  """Flattens ``tree`` into (paths, leaves, treedef)."""
  # An encoded (e.g. quantized) kernel is one leaf at its kernel's path.
  try:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=model.is_encoded)
  except (TypeError, ValueError) as e:   # e.g. a dict whose keys do not sort (1 and "a")
    raise TypeError(f"The params must be a pytree JAX can flatten, with str dict keys; "
                    f"flattening failed: {str(e)[:200]}") from e
  paths = [render(kp) for kp, _ in with_path]
  leaves = [leaf for _, leaf in with_path]
  if len(set(paths)) != len(paths):
    seen, dup = set(), []
    for p in paths:
      if p in seen:
        dup.append(p)
      seen.add(p)
    raise ValueError(
        f"The param tree has several leaves with the same path {sorted(set(dup))}; "
        "lojax addresses leaves by their '/'-joined path, so keys must be unique.")
  return paths, leaves, treedef


def split(path: str) -> tuple[str, str]:
  """Splits a leaf path into (module path, leaf name)."""
  module, _, leaf = path.rpartition("/")
  return module, leaf


def module_paths(leaf_paths: list[str]) -> list[str]:
  """Every internal node path (each proper prefix of each leaf path)."""
  out: dict[str, None] = {}
  for p in leaf_paths:
    parts = p.split("/")
    for i in range(1, len(parts)):
      out["/".join(parts[:i])] = None
  return list(out)


def is_under(path: str, module: str) -> bool:
  """Whether ``path`` equals ``module`` or lies below it."""
  return path == module or path.startswith(module + "/")


def directory(value) -> str:
  """``value`` as a filesystem path, or lojax's TypeError naming ``directory``."""
  if not isinstance(value, (str, os.PathLike)):
    raise TypeError(f"`directory` must be a path (str or os.PathLike), got "
                    f"{type(value).__name__}.")
  return os.fspath(value)
