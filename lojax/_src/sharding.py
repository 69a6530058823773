"""Shardings for LoRA trees and their optimizer states, derived from the base.

The rule (Megatron-friendly: no adapter ever needs a gathered base kernel):

* ``lora_A [L?, in..., r]`` takes the kernel's input-axis shardings, the rank
  axis replicated;
* ``lora_B [L?, r, out...]`` the rank axis replicated and the kernel's
  output-axis shardings;
* generally, every parameter of a target (AdaLoRA's ``lora_E [L?, r]``,
  DoRA's ``lora_magnitude [L?, out...]``, ...) follows the axis roles its
  variant declares (``Variant.layout``): a kernel axis takes that axis's
  sharding, the rank axis is replicated;
* a stacked layer axis keeps the kernel's layer-axis sharding (dense, N-D,
  conv and embedding kernels all follow the same rule);
* bias deltas and ``modules_to_save`` copies take their base leaf's sharding;
* anything else (step counters) is replicated.

An axis whose size the mesh axes do not divide is replicated instead. The
optimizer state follows the params it mirrors (see
:func:`opt_state_shardings`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lojax._src import model
from lojax._src import paths as P
from lojax._src.model import LoraParams, TargetMeta

PS = PartitionSpec


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, (jax.sharding.Sharding, PartitionSpec)) or (
      hasattr(x, "get_partition_spec") and hasattr(x, "names"))


def _to_spec(x, path: str) -> tuple[PartitionSpec, Any]:
  """(spec, mesh or None) of one entry of ``base_shardings``."""
  if x is None:
    return PS(), None
  if isinstance(x, NamedSharding):
    return x.spec, x.mesh
  if isinstance(x, PartitionSpec):
    return x, None
  if hasattr(x, "get_partition_spec"):  # a flax Partitioned box (mesh axis names)
    return x.get_partition_spec(), getattr(x, "mesh", None)
  if isinstance(x, jax.sharding.Sharding) and x.is_fully_replicated:
    return PS(), None
  raise TypeError(f"`base_shardings` at '{path}' is a {type(x).__name__}; expected a "
                  "jax.sharding.NamedSharding, a PartitionSpec, None (replicated) or a flax "
                  "Partitioned box.")


def _axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return int(np.prod([mesh.shape[n] for n in names]))


def _fit(mesh, entries, shape) -> PartitionSpec:
  """``entries`` as a spec for ``shape``; an axis the mesh does not divide is replicated."""
  out = [e if shape[i] % _axis_size(mesh, e) == 0 else None for i, e in enumerate(entries)]
  while out and out[-1] is None:
    out.pop()
  return PS(*out)


def _padded(spec: PartitionSpec, ndim: int) -> list:
  entries = list(spec)
  if len(entries) > ndim:
    raise ValueError(f"PartitionSpec {spec} has more entries than the leaf has axes ({ndim}).")
  return entries + [None] * (ndim - len(entries))


def _param_entries(t: TargetMeta, roles: tuple, kernel_spec: PartitionSpec) -> list:
  """The spec entries of a target parameter whose axes have ``roles`` (see Variant.layout)."""
  entries = _padded(kernel_spec, len(t.shape))
  per = entries[1:] if t.stacked else entries
  return [entries[0] if x == model.LAYER else None if x == model.RANK else per[x]
          for x in roles]


def lora_shardings(lora: LoraParams, base_shardings: Any, /, *, mesh: Any = None,
                   replicate: bool = False,
                   override: Callable[[str, NamedSharding], Any] | None = None,
                   gather_codes_over: str | Sequence[str] | None = None) -> LoraParams:
  """Shardings for every leaf of ``lora``, derived from the base params' shardings.

  Args:
    lora: the :class:`lojax.LoraParams` to shard.
    base_shardings: the base params' shardings, matched to ``lora.base`` by
      leaf path (``None``: all replicated): a tree of ``NamedSharding``, ``PartitionSpec`` or ``None``
      (replicated) leaves, or the boxed variables of a linen model built
      with ``nn.with_partitioning`` (their ``Partitioned`` boxes are read;
      unboxed leaves are replicated).
      For logical axis names, pass
      ``nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, rules)``.
    mesh: the mesh; required unless ``base_shardings`` holds NamedShardings.
    replicate: replicate every adapter leaf (the base keeps its shardings).
    override: optional ``f(path, sharding) -> sharding | PartitionSpec | None``
      called for each adapter leaf with its "/"-joined path in
      ``lora.adapters`` (e.g. ``default/lora/params/h_0/attn/c_attn/lora_A``)
      and the derived sharding; a non-None result replaces it.
    gather_codes_over: mesh axis name(s) the base is split over for FSDP
      (e.g. ``"fsdp"``). A quantized kernel (``wrap(..., quantize=)``) is
      stored split like the float kernel; with this, each use inside
      ``jax.jit`` first gathers its codes and scales over these axes (to the
      sharding the stored arrays have without them) and decodes the gathered
      kernel, so FSDP moves the 4-bit codes rather than the decoded floats
      (as FSDP with QLoRA does in PyTorch). Without it XLA decodes each
      device's shard and gathers the float kernel. Place the params with
      :func:`shard`, which carries this to the quantized kernels.

  Returns:
    A :class:`lojax.LoraParams` of ``NamedSharding`` leaves with the
    structure of ``lora``: give it to :func:`shard` or to ``jax.jit``'s
    ``in_shardings``/``out_shardings``; ``.trainable`` holds the trainable
    part's shardings.

  Raises:
    ValueError: no mesh can be found, or a base leaf lojax needs has no
      sharding in ``base_shardings``.

  The rule: ``lora_A`` takes the kernel's input-axis shardings and ``lora_B``
  its output-axis shardings, the rank axis replicated in both; a stacked
  layer axis keeps the kernel's layer-axis sharding; AdaLoRA's ``lora_E``
  is replicated except that layer axis; bias deltas and ``modules_to_save``
  copies take their base leaf's sharding; an axis the mesh does not divide is
  replicated.

  >>> import jax, jax.numpy as jnp, lojax
  >>> from jax.sharding import PartitionSpec as P
  >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((4, 6))}},
  ...                   lojax.LoraSpec(r=2, target_modules=["d"]), key=jax.random.key(0))
  >>> s = lojax.lora_shardings(lora, {"d": {"kernel": P(None, "model")}}, mesh=mesh)
  >>> s.adapters["default"]["lora"]["d"]["lora_B"].spec
  P(None, 'model')
  """
  by_path, mesh = _base_specs(lora, base_shardings, mesh)
  paths, leaves, treedef = P.flatten(lora.base)
  over = (() if gather_codes_over is None else (gather_codes_over,)
          if isinstance(gather_codes_over, str) else tuple(gather_codes_over))
  unknown = [a for a in over if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"`gather_codes_over` names {unknown}, which the mesh does not have "
                     f"(its axes: {list(mesh.axis_names)}).")
  base = jax.tree_util.tree_unflatten(
      treedef, [_encoded_sharding(mesh, by_path[p], x, over) if model.is_encoded(x)
                else _named(mesh, by_path[p], np.shape(x)) for p, x in zip(paths, leaves)])
  adapters = {name: _adapter_shardings(lora.meta.adapter(name), ad, by_path, mesh, replicate,
                                       override)
              for name, ad in lora.adapters.items()}
  return LoraParams(base, adapters, lora.meta)


def _encoded_sharding(mesh, spec: PartitionSpec, x, over: tuple = ()):
  """An encoded (quantized) kernel's node with a NamedSharding for each stored array;
  with ``over``, also the shardings its stored arrays are gathered to before decoding (the
  same without the mesh axes ``over``)."""
  specs = x.stored_specs(_padded(spec, len(x.shape)))
  is_spec = lambda e: isinstance(e, list)
  arrays = jax.tree_util.tree_leaves(x)
  entries, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
  node = jax.tree_util.tree_unflatten(
      treedef, [NamedSharding(mesh, _fit(mesh, e, np.shape(a))) for e, a in zip(entries, arrays)])
  if not over:
    return node
  if not hasattr(node, "with_gather"):
    raise ValueError(f"`gather_codes_over` applies to lojax's quantized kernels; "
                     f"{type(x).__name__} cannot gather its stored arrays.")

  def without(e):
    axes = tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a is not None and
                 a not in over)
    return None if not axes else axes[0] if len(axes) == 1 else axes

  gather = {n: (s, NamedSharding(mesh, PS(*[without(e) for e in s.spec])))
            for n, s in node.data.items()}
  return node.with_gather(gather)


def _named(mesh, spec: PartitionSpec, shape) -> NamedSharding:
  return NamedSharding(mesh, _fit(mesh, _padded(spec, len(shape)), tuple(shape)))


def _base_specs(lora: LoraParams, base_shardings, mesh):
  """``({base leaf path: PartitionSpec}, mesh)`` from the user's ``base_shardings``."""
  paths = P.flatten(lora.base)[0]
  if base_shardings is None:
    given_paths, given = paths, [None] * len(paths)
  else:
    given_paths, given, _ = _flatten_specs(base_shardings)
    if any(hasattr(x, "get_partition_spec") for x in given):
      # Boxed linen variables: a leaf without a Partitioned box is replicated.
      given = [None if hasattr(x, "shape") and hasattr(x, "dtype") else x for x in given]
  by_path = {}
  for p, x in zip(given_paths, given):
    spec, m = _to_spec(x, p)
    if m is not None:
      mesh = mesh if mesh is not None else m
    by_path[p] = spec
  if mesh is None:
    raise ValueError("No mesh: `base_shardings` holds no NamedSharding; pass `mesh=` "
                     "(e.g. jax.make_mesh((2, 4), ('data', 'model'))).")
  missing = [p for p in paths if p not in by_path]
  if missing:
    raise ValueError(
        f"`base_shardings` has no entry for {len(missing)} leaf path(s) of the base params: "
        f"{missing[:10]}{' …' if len(missing) > 10 else ''}. Give a sharding (or None for "
        "replicated) for every leaf, in a tree with the base params' paths.")
  return by_path, mesh


def _adapter_shardings(meta, ad, by_path, mesh, replicate: bool, override):
  """The shardings of one adapter's tree (see the module docstring for the rule)."""
  targets = {t.path: t for t in meta.targets}
  rep = NamedSharding(mesh, PS())

  def derived(path: str, shape) -> NamedSharding:
    group, _, rest = path.partition("/")
    if replicate:
      return rep
    if group in (model.BIAS, model.SAVED) and rest in by_path:
      return _named(mesh, by_path[rest], shape)
    if group == model.TOKENS and rest in by_path:   # a few rows: the table's other axes
      spec = _padded(by_path[rest], len(shape))
      return NamedSharding(mesh, _fit(mesh, [None] + list(spec)[1:], tuple(shape)))
    if group == model.LORA:
      module, leaf = P.split(rest)
      t = targets.get(module)
      roles = None if t is None else meta.variant.layout(t).get(leaf)
      if roles is not None:
        entries = _param_entries(t, roles, by_path[t.leaf_path])
        return NamedSharding(mesh, _fit(mesh, entries, shape))
    return rep

  def leaf_sharding(keypath, x):
    path = P.render(keypath)
    sharding = derived(path, tuple(np.shape(x)))
    if override is not None:
      new = override(f"{meta.name}/{path}", sharding)
      if isinstance(new, PartitionSpec):
        new = NamedSharding(mesh, new)
      sharding = sharding if new is None else new
    return sharding

  return jax.tree_util.tree_map_with_path(leaf_sharding, ad)


def _flatten_specs(tree):
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec_leaf)
  return [P.render(kp) for kp, _ in with_path], [x for _, x in with_path], treedef


def shard(lora: LoraParams, shardings: LoraParams, /) -> LoraParams:
  """Places ``lora`` on devices with ``shardings`` (from :func:`lora_shardings`).

  >>> import jax, jax.numpy as jnp, lojax
  >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((4, 6))}},
  ...                   lojax.LoraSpec(r=2, target_modules=["d"]), key=jax.random.key(0))
  >>> lora = lojax.shard(lora, lojax.lora_shardings(lora, None, mesh=mesh))

  Quantized kernels take the ``gather`` of their shardings (``lora_shardings(...,
  gather_codes_over=...)``), so ``lora`` and ``shardings`` have the same structure for
  ``jax.jit``'s ``in_shardings``.
  """
  paths, leaves, treedef = P.flatten(lora.base)
  by_path = dict(zip(*P.flatten(shardings.base)[:2]))
  leaves = [x.with_gather(getattr(by_path.get(p), "gather", None))
            if hasattr(x, "with_gather") else x for p, x in zip(paths, leaves)]
  lora = LoraParams(jax.tree_util.tree_unflatten(treedef, leaves), lora.adapters, lora.meta)
  return jax.device_put(lora, shardings)


def opt_state_shardings(tx: Any, trainable_shardings: Any, trainable: Any, /) -> Any:
  """Shardings for ``tx.init(trainable)``, following the params each leaf mirrors.

  Works for any optax optimizer (and :func:`lojax.adalora`) without knowing
  its state: the state is built abstractly (``jax.eval_shape``) and each
  array leaf takes the sharding of the trainable leaf whose path is the
  longest suffix of the state leaf's path with the same shape (``mu``,
  ``nu``, AdaLoRA's importance EMAs, ...). Leaves that mirror no param
  (counts, masks, scalars) are replicated.

  Args:
    tx: an optax ``GradientTransformation``.
    trainable_shardings: shardings of ``trainable`` (``shardings.trainable``
      of :func:`lora_shardings`).
    trainable: the trainable params (``lora.trainable``) or their
      ``jax.ShapeDtypeStruct`` s.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tx.init(trainable)``.

  >>> import jax, jax.numpy as jnp, lojax, optax
  >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((4, 6))}},
  ...                   lojax.LoraSpec(r=2, target_modules=["d"]), key=jax.random.key(0))
  >>> s = lojax.lora_shardings(lora, None, mesh=mesh)
  >>> tx = optax.adamw(1e-3)
  >>> state_s = lojax.opt_state_shardings(tx, s.trainable, lora.trainable)
  """
  p_paths, p_leaves, _ = P.flatten(trainable)
  s_paths, s_leaves, _ = _flatten_specs(trainable_shardings)
  sharding_of = dict(zip(s_paths, s_leaves))
  params = [(p.split("/"), tuple(np.shape(x)), sharding_of.get(p)) for p, x in
            zip(p_paths, p_leaves)]
  meshes = [s.mesh for s in s_leaves if isinstance(s, NamedSharding)]
  if not meshes:
    raise ValueError("`trainable_shardings` holds no NamedSharding; pass "
                     "`lora_shardings(...).trainable`.")
  rep = NamedSharding(meshes[0], PS())
  state = jax.eval_shape(tx.init, trainable)

  def pick(keypath, x):
    parts = P.render(keypath).split("/")
    shape = tuple(np.shape(x))
    best, found = 0, set()
    for comps, pshape, s in params:
      if pshape != shape or s is None:
        continue
      n = 0
      while n < min(len(parts), len(comps)) and parts[-1 - n] == comps[-1 - n]:
        n += 1
      if n > best:
        best, found = n, {s}
      elif n == best and n:
        found.add(s)
    return found.pop() if best and len(found) == 1 else rep

  return jax.tree_util.tree_map_with_path(pick, state)
