"""Orbax checkpoints of LoRA adapters: save the trained part, restore onto a base.

A checkpoint step holds only what training changes — every saved adapter's
factors, bias deltas, ``modules_to_save`` copies and AdaLoRA step counter —
plus, optionally, the optimizer state, and a JSON record of the metadata:
each spec (its class name and :meth:`LoraSpec.to_dict`), every
:class:`TargetMeta` field, the adapter names, the active set, a fingerprint of
the base (path, shape and dtype of every leaf the adapters touch) and the
shape, dtype and CRC-32 of every stored array. The base is never written.

Restoring reads the JSON first and checks it against the params given (a
freshly initialised base, or a :class:`LoraParams` wrapped with the intended
spec); any difference is reported at once, before an array is read. Loading
never runs code from the checkpoint: JSON and array data only, no pickle.

Orbax writes each step into a temporary directory and renames it when
complete, so a save that is interrupted (even by SIGKILL) never damages the
previous good step. Param paths contain "/", which Orbax reads as nesting:
the stored tree is flat, one entry per array, named by its key path with each
component escaped by :func:`escape_key` (only ``[A-Za-z0-9_-]`` remain) and
joined with ".", e.g. ``default.lora.params-2f-h_0-2f-attn-2f-c_attn.lora_A``.
"""

from __future__ import annotations

import os
import re
import zlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from lojax._src import merge as merge_lib
from lojax._src import paths as P
from lojax._src import spec as spec_lib
from lojax._src.model import AdapterMeta, LoraMeta, LoraParams, TargetMeta

FORMAT = "lojax.adapters"
VERSION = 1
_TARGET_FIELDS = ("path", "leaf", "shape", "kind", "in_axes", "stacked", "layers", "r", "alpha",
                  "scaling", "dropout", "expert_axes")
_SAFE = re.compile(r"[A-Za-z0-9_]")


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------

def escape_key(key: str) -> str:
  """Escapes a tree key for storage: every character outside ``[A-Za-z0-9_]``
  becomes ``-`` plus its code point in hex and ``-`` (reversible).

  >>> escape_key("params/h_0/attn")
  'params-2f-h_0-2f-attn'
  >>> unescape_key(escape_key("a-b/c.d"))
  'a-b/c.d'
  """
  return "".join(c if _SAFE.fullmatch(c) else f"-{ord(c):x}-" for c in key)


def unescape_key(key: str) -> str:
  """Inverse of :func:`escape_key`."""
  return re.sub(r"-([0-9a-f]+)-", lambda m: chr(int(m.group(1), 16)), key)


def _stored_key(keypath) -> str:
  """A key path as stored: each component escaped, joined with "."."""
  parts = []
  for k in keypath:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(escape_key(str(getattr(k, attr))))
        break
    else:
      parts.append(escape_key(str(k)))
  return ".".join(parts)


def _flat_keys(tree: Any) -> list[tuple[str, Any]]:
  """(stored key, leaf) for every leaf; keys unique by construction."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(_stored_key(kp), x) for kp, x in flat]


def _structure(tree: Mapping) -> dict:
  """The nested dict with each leaf replaced by its stored key (empty dicts kept)."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: _stored_key(kp), tree)


def _fill(structure: Mapping, flat: Mapping) -> dict:
  return {k: _fill(v, flat) if isinstance(v, Mapping) else flat[v] for k, v in structure.items()}


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------

def _dtype(x) -> str:
  return str(np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype))


def _describe(x, checksum: bool) -> dict:
  out = {"shape": list(np.shape(x)), "dtype": _dtype(x)}
  if checksum:
    out["crc32"] = _crc(x)
  return out


def _crc(x) -> int:
  return zlib.crc32(np.ascontiguousarray(np.asarray(jax.device_get(x))).tobytes())


def _target_json(t: TargetMeta) -> dict:
  return {f: getattr(t, f) for f in _TARGET_FIELDS}


def _target_from_json(d: Mapping) -> TargetMeta:
  tup = lambda v: None if v is None else tuple(v)  # noqa: E731
  return TargetMeta(path=d["path"], leaf=d["leaf"], shape=tuple(d["shape"]), kind=d["kind"],
                    in_axes=tuple(d["in_axes"]), stacked=d["stacked"], layers=tup(d["layers"]),
                    r=d["r"], alpha=d["alpha"], scaling=d["scaling"], dropout=d["dropout"],
                    expert_axes=tuple(d.get("expert_axes", ())))


def _adapter_json(meta: AdapterMeta) -> dict:
  cls = type(meta.spec).__name__
  if spec_lib.spec_classes().get(cls) is not type(meta.spec):
    raise TypeError(f"Adapter {meta.name!r} has a spec of type {cls}, which lojax checkpoints "
                    f"cannot store; supported: {sorted(spec_lib.spec_classes())}.")
  return {"name": meta.name, "spec_class": cls, "spec": meta.spec.to_dict(),
          "targets": [_target_json(t) for t in meta.targets],
          "modules_to_save": list(meta.modules_to_save), "bias_paths": list(meta.bias_paths),
          "heads": list(meta.heads)}


def _adapter_from_json(d: Mapping) -> AdapterMeta:
  cls = spec_lib.spec_classes().get(d["spec_class"])
  if cls is None:
    known = sorted(spec_lib.spec_classes())
    raise ValueError(f"unknown spec class {d['spec_class']!r} (known: {known})")
  return AdapterMeta(d["name"], cls.from_dict(d["spec"]),
                     tuple(_target_from_json(t) for t in d["targets"]),
                     tuple(d["modules_to_save"]), tuple(d["bias_paths"]), tuple(d["heads"]))


def _names(lora: LoraParams, adapter_names) -> tuple[str, ...]:
  if adapter_names is None:
    return tuple(lora.meta.active)
  if isinstance(adapter_names, str):
    adapter_names = (adapter_names,)
  for n in adapter_names:
    lora.meta.adapter(n)  # raises for an unknown name
  return tuple(adapter_names)


def _fingerprint(lora: LoraParams, names) -> dict:
  """{leaf path: {shape, dtype}} of every base leaf the adapters read or replace."""
  paths, leaves, _ = P.flatten(lora.base)
  by_path = dict(zip(paths, leaves))
  wanted = []
  for name in names:
    meta = lora.meta.adapter(name)
    wanted += [t.leaf_path for t in meta.targets]
    wanted += list(lora.adapters[name]["bias"]) + list(lora.adapters[name]["modules_to_save"])
  return {p: _describe(by_path[p], False) for p in dict.fromkeys(wanted)}


def _metadata(lora, names, step, stored, opt_flat) -> dict:
  subtree = {n: lora.adapters[n] for n in names}
  return {
      "format": FORMAT, "version": VERSION, "step": int(step),
      "adapters": [_adapter_json(lora.meta.adapter(n)) for n in names],
      "active": [n for n in lora.meta.active if n in names],
      "base_fingerprint": _fingerprint(lora, names),
      "structure": _structure(subtree),
      "arrays": {k: _describe(x, True) for k, x in stored.items()},
      "opt_state": None if opt_flat is None else {
          k: _describe(x, True) for k, x in opt_flat.items()},
  }


def _stored_adapters(lora: LoraParams, names) -> dict:
  return dict(_flat_keys({n: lora.adapters[n] for n in names}))


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def _diff_base(fingerprint: Mapping, params) -> list[str]:
  paths, leaves, _ = P.flatten(params)
  have = {p: _describe(x, False) for p, x in zip(paths, leaves)}
  problems = []
  for p, want in fingerprint.items():
    got = have.get(p)
    if got is None:
      problems.append(f"  {p}: missing from the params (checkpoint expects shape "
                      f"{tuple(want['shape'])}, {want['dtype']})")
    elif got != want:
      problems.append(f"  {p}: params have shape {tuple(got['shape'])}, {got['dtype']}; the "
                      f"checkpoint was made for shape {tuple(want['shape'])}, {want['dtype']}")
  return problems


def _diff_meta(saved: Sequence[AdapterMeta], active, template: LoraParams) -> list[str]:
  problems = []
  saved_names = [a.name for a in saved]
  if set(saved_names) != set(template.meta.names):
    problems.append(f"  adapters: checkpoint has {saved_names}, the given LoraParams has "
                    f"{list(template.meta.names)}")
  if tuple(active) != tuple(n for n in template.meta.active if n in saved_names):
    problems.append(f"  active adapters: checkpoint {list(active)}, given "
                    f"{list(template.meta.active)}")
  for a in saved:
    if a.name not in template.meta.names:
      continue
    b = template.meta.adapter(a.name)
    if type(a.spec) is not type(b.spec):
      problems.append(f"  [{a.name}] spec class: checkpoint {type(a.spec).__name__}, given "
                      f"{type(b.spec).__name__}")
    else:
      da, db = a.spec.to_dict(), b.spec.to_dict()
      for k in da:
        if da[k] != db[k]:
          problems.append(f"  [{a.name}] spec.{k}: checkpoint {da[k]!r}, given {db[k]!r}")
    ta = {t.path: t for t in a.targets}
    tb = {t.path: t for t in b.targets}
    for p in sorted(set(ta) | set(tb)):
      if p not in tb:
        problems.append(f"  [{a.name}] target {p}: in the checkpoint, not in the given params")
      elif p not in ta:
        problems.append(f"  [{a.name}] target {p}: in the given params, not in the checkpoint")
      else:
        for f in _TARGET_FIELDS:
          if getattr(ta[p], f) != getattr(tb[p], f):
            problems.append(f"  [{a.name}] target {p}.{f}: checkpoint {getattr(ta[p], f)!r}, "
                            f"given {getattr(tb[p], f)!r}")
    for f in ("modules_to_save", "bias_paths"):
      if getattr(a, f) != getattr(b, f):
        problems.append(f"  [{a.name}] {f}: checkpoint {list(getattr(a, f))}, given "
                        f"{list(getattr(b, f))}")
  return problems


def _check_arrays(kind: str, described: Mapping, restored: Mapping, where: str,
                  steps: Sequence[int]) -> None:
  bad = []
  for k, want in described.items():
    x = restored.get(k)
    if x is None:
      bad.append(f"  {unescape_key(k)}: missing")
    elif _describe(x, True) != want:
      bad.append(f"  {unescape_key(k)}: stored data does not match its recorded "
                 "shape/dtype/checksum")
  if bad:
    raise ValueError(f"The {kind} in {where} is corrupt:\n" + "\n".join(bad) +
                     f"\nRestore another step (available: {list(steps)}), or save again.")


# --------------------------------------------------------------------------
# The checkpointer
# --------------------------------------------------------------------------

class AdapterCheckpointer:
  """Saves and restores adapter checkpoints in a directory of numbered steps.

  A thin layer over ``orbax.checkpoint.CheckpointManager``: keeps the last
  ``max_to_keep`` steps, saves asynchronously (``save`` returns once the
  arrays are copied to host memory; call :meth:`wait_until_finished` before
  exiting) and commits each step atomically.

  Args:
    directory: where the steps live (created if absent).
    max_to_keep: keep only the newest N steps (None keeps all).
    save_interval_steps: :meth:`save` skips steps that are not a multiple of
      this (unless ``force=True``).
    async_save: save in a background thread.

  >>> import tempfile, jax, jax.numpy as jnp, lojax
  >>> from lojax._src.checkpoint import AdapterCheckpointer
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> with AdapterCheckpointer(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
  ...   _ = ckpt.save(10, lora)
  ...   restored = ckpt.restore(params)
  >>> bool((restored.trainable["default"]["lora"]["dense"]["lora_A"] ==
  ...       lora.trainable["default"]["lora"]["dense"]["lora_A"]).all())
  True
  """

  def __init__(self, directory: str | os.PathLike, /, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"`max_to_keep` must be None or an int >= 1; got {max_to_keep!r}.")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, lora: LoraParams, /, *, opt_state: Any = None,
           adapter_names: str | Sequence[str] | None = None, force: bool = False) -> bool:
    """Saves the adapters (and optionally the optimizer state) as ``step``.

    Args:
      step: the training step (an int >= 0; steps must increase).
      lora: the :class:`LoraParams`.
      opt_state: the optimizer state to save with it (any pytree of arrays,
        e.g. from ``optax.adamw`` or :func:`lojax.adalora`).
      adapter_names: adapters to save (default: the active ones).
      force: save even if ``step`` is off the ``save_interval_steps`` grid.

    Returns:
      Whether a save was started.

    Raises:
      TypeError: ``lora`` is not a LoraParams.
      ValueError: an unknown adapter name, or ``step`` is not newer than the
        latest saved step.
    """
    if not isinstance(lora, LoraParams):
      raise TypeError(f"`lora` must be the LoraParams returned by lojax.wrap; got "
                      f"{type(lora).__name__}.")
    names = _names(lora, adapter_names)
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(f"`step={step}` is not newer than the latest saved step {latest} in "
                       f"{self.directory}; steps must increase (delete the directory to "
                       "start over).")
    stored = _stored_adapters(lora, names)
    opt_flat = None if opt_state is None else dict(_flat_keys(opt_state))
    meta = _metadata(lora, names, step, stored, opt_flat)
    items = {"adapters": ocp.args.StandardSave(stored), "meta": ocp.args.JsonSave(meta)}
    if opt_flat is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_flat)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, params: Any, /, *, step: int | None = None,
              opt_state_template: Any = None, shardings: Any = None,
              opt_state_shardings: Any = None):
    """Restores a step onto ``params``.

    Args:
      params: the base param tree the adapters were trained on (e.g. freshly
        initialised or loaded pretrained weights), or a :class:`LoraParams`
        wrapped with the intended spec, whose metadata must then match.
      step: the step to restore (default: the latest).
      opt_state_template: an optimizer state of the right structure (e.g.
        ``tx.init(lora.trainable)``); when given, the saved optimizer state
        is restored into it.
      shardings: optional shardings for the restored adapters, a tree like the
        LoRA tree (``lojax.lora_shardings(...)``), e.g. for another mesh shape
        than the one that saved.
      opt_state_shardings: optional shardings for the optimizer state
        (``lojax.opt_state_shardings(...)``).

    Returns:
      The :class:`LoraParams`, or ``(lora, opt_state)`` when
      ``opt_state_template`` is given.

    Raises:
      ValueError: no checkpoint / no such step; the checkpoint does not fit
        ``params`` (every difference is listed; nothing is loaded); the
        checkpoint is incomplete or corrupt.
    """
    steps = self.all_steps()
    if not steps:
      raise ValueError(f"No checkpoint in {self.directory}: it holds no completed step. "
                       "Check the path, or save first.")
    if step is None:
      step = steps[-1]
    if step not in steps:
      raise ValueError(f"No step {step} in {self.directory}; available steps: {steps}.")
    where = f"{self.directory} (step {step})"
    meta = self._read(step, {"meta": ocp.args.JsonRestore()}, where)["meta"]
    try:
      if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
      if meta.get("version") != VERSION:
        raise ValueError(f"format version {meta.get('version')!r}; this lojax reads {VERSION}")
      saved = tuple(_adapter_from_json(a) for a in meta["adapters"])
      active = tuple(meta["active"])
      fingerprint, arrays, opt_desc = meta["base_fingerprint"], meta["arrays"], meta["opt_state"]
      structure = meta["structure"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise ValueError(f"The metadata in {where} is not a lojax adapter checkpoint or is "
                       f"damaged ({type(e).__name__}: {e}). Restore another step (available: "
                       f"{self.all_steps()}), or save again.") from None

    base = params.base if isinstance(params, LoraParams) else params
    problems = _diff_base(fingerprint, base)
    if isinstance(params, LoraParams):
      problems += _diff_meta(saved, active, params)
    if opt_state_template is not None:
      if opt_desc is None:
        problems.append("  opt_state: `opt_state_template` was given but the checkpoint holds "
                        "no optimizer state (save with `opt_state=`)")
      else:
        problems += _diff_opt(opt_desc, opt_state_template)
    if problems:
      raise ValueError(
          f"The checkpoint in {where} does not fit the given params ({len(problems)} "
          "difference(s)):\n" + "\n".join(problems) +
          "\nRestore onto the base (and spec/optimizer) it was trained with. Nothing was loaded.")

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = lambda d: jax.ShapeDtypeStruct(tuple(d["shape"]), np.dtype(d["dtype"]),  # noqa
                                              sharding=device)
    items = {"adapters": ocp.args.StandardRestore({k: abstract(d) for k, d in arrays.items()})}
    if opt_state_template is not None:
      opt_tmpl = {k: abstract(d) for k, d in opt_desc.items()}
      items["opt_state"] = ocp.args.StandardRestore(opt_tmpl)
    out = self._read(step, items, where)
    _check_arrays("adapter data", arrays, out["adapters"], where, self.all_steps())
    adapters = _fill(structure, out["adapters"])
    if shardings is not None:  # adapters are small: restore, then place them
      adapters = jax.device_put(adapters, getattr(shardings, "adapters", shardings))
    lora = LoraParams(base, adapters, LoraMeta(saved, active))
    if opt_state_template is None:
      return lora
    _check_arrays("optimizer state", opt_desc, out["opt_state"], where, self.all_steps())
    treedef = jax.tree_util.tree_structure(opt_state_template)
    restored = [out["opt_state"][k] for k, _ in _flat_keys(opt_state_template)]
    opt_state = jax.tree_util.tree_unflatten(treedef, restored)
    if opt_state_shardings is not None:
      opt_state = jax.device_put(opt_state, opt_state_shardings)
    return lora, opt_state

  def _read(self, step, items, where):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax / tensorstore / json errors of a damaged step
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise ValueError(
          f"Could not read the checkpoint in {where}: it is incomplete or corrupt "
          f"({type(e).__name__}: {first}). Restore another step (available: "
          f"{self.all_steps()}) or save again.") from None

  def latest_step(self) -> int | None:
    """The newest completed step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All completed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def wait_until_finished(self) -> None:
    """Blocks until every started save is committed to disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _diff_opt(described: Mapping, template) -> list[str]:
  have = {k: _describe(x, False) for k, x in _flat_keys(template)}
  problems = []
  for k in sorted(set(described) | set(have)):
    want = described.get(k)
    got = have.get(k)
    if want is None:
      problems.append(f"  opt_state {unescape_key(k)}: in the template, not in the checkpoint")
    elif got is None:
      problems.append(f"  opt_state {unescape_key(k)}: in the checkpoint, not in the template")
    elif (got["shape"], got["dtype"]) != (want["shape"], want["dtype"]):
      problems.append(f"  opt_state {unescape_key(k)}: template has shape "
                      f"{tuple(got['shape'])}, {got['dtype']}; checkpoint "
                      f"{tuple(want['shape'])}, {want['dtype']}")
  return problems


# --------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------

def save_adapters(directory: str | os.PathLike, lora: LoraParams, /, *, step: int,
                  opt_state: Any = None, adapter_names: str | Sequence[str] | None = None,
                  max_to_keep: int | None = None) -> None:
  """Saves the adapters (and optionally the optimizer state) as ``step``; blocks.

  For periodic saves during training, keep one :class:`AdapterCheckpointer`
  (asynchronous) instead.

  Args:
    directory: the checkpoint directory (steps are subdirectories).
    lora: the :class:`LoraParams`.
    step: the training step.
    opt_state: optional optimizer state to save with it.
    adapter_names: adapters to save (default: the active ones).
    max_to_keep: delete older steps beyond the newest N.

  >>> import tempfile, jax, jax.numpy as jnp, lojax
  >>> from lojax._src.checkpoint import save_adapters, restore_adapters
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> d = tempfile.mkdtemp()
  >>> save_adapters(d, lora, step=1)
  >>> restore_adapters(d, params)
  LoraParams(default*: 1 kernels)
  """
  with AdapterCheckpointer(directory, max_to_keep=max_to_keep, async_save=False) as ckpt:
    ckpt.save(step, lora, opt_state=opt_state, adapter_names=adapter_names, force=True)


def restore_adapters(directory: str | os.PathLike, params: Any, /, *, step: int | None = None,
                     opt_state_template: Any = None, shardings: Any = None,
                     opt_state_shardings: Any = None):
  """Restores adapters saved by :func:`save_adapters` onto ``params``.

  See :meth:`AdapterCheckpointer.restore` for the arguments and errors.
  Returns the :class:`LoraParams`, or ``(lora, opt_state)`` when
  ``opt_state_template`` is given.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise ValueError(f"No checkpoint directory at {directory}.")
  with AdapterCheckpointer(directory, max_to_keep=None, async_save=False) as ckpt:
    return ckpt.restore(params, step=step, opt_state_template=opt_state_template,
                        shardings=shardings, opt_state_shardings=opt_state_shardings)


def save_merged(directory: str | os.PathLike, lora: LoraParams, /, *,
                adapter_names: str | Sequence[str] | None = None, safe_merge: bool = True,
                overwrite: bool = False) -> None:
  """Merges the adapters into the base and saves the full params with Orbax.

  The result is a plain param tree, restorable without lojax with
  ``orbax.checkpoint.StandardCheckpointer().restore(directory)``.

  Args:
    directory: target directory (must not exist unless ``overwrite``).
    lora: the :class:`LoraParams`.
    adapter_names: adapters to merge (default: the active ones).
    safe_merge: refuse to save NaN/inf weights (see :func:`lojax.merge`).
    overwrite: replace an existing directory.

  Raises:
    ValueError: ``directory`` exists and ``overwrite`` is False, or the
      merge produced non-finite values.

  >>> import tempfile, os, jax, jax.numpy as jnp, lojax
  >>> from lojax._src.checkpoint import save_merged
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> save_merged(os.path.join(tempfile.mkdtemp(), "merged"), lora)
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise ValueError(f"`directory` {directory} already exists; pass `overwrite=True` to "
                     "replace it, or choose a new directory.")
  merged = merge_lib.merge(lora, adapter_names=adapter_names, safe_merge=safe_merge)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory, merged, force=overwrite)
    ckpt.wait_until_finished()
