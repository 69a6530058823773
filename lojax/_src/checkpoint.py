"""Orbax checkpoints of LoRA adapters: save the trained part, restore onto a base.

A checkpoint step holds only what training changes — every saved adapter's
factors, bias deltas, ``modules_to_save`` copies and AdaLoRA step counter —
plus, optionally, the optimizer state, and a JSON record of the metadata:
each spec (its class name and :meth:`LoraSpec.to_dict`), every
:class:`TargetMeta` field, the adapter names, the active set, a fingerprint of
the base (path, shape and dtype of every leaf the adapters touch) and the
shape, dtype and CRC-32 of every stored array. The base is never written.

The JSON carries its own digest, ``"sha256"``: the SHA-256 (hex) of the UTF-8
canonical JSON of every other field (``json.dumps(..., sort_keys=True,
separators=(",", ":"))``), so anyone can check it without lojax. Restoring
reads the metadata file itself, refusing before a byte is read a file that is
a symbolic link, not a regular file, or larger than :data:`MAX_METADATA_BYTES`;
then it verifies the digest (any edit, even of one ``"scaling"``, is refused;
metadata without a digest, as written before lojax stored one, is refused with
how to save it again) and the form of every field (each array's shape a list
of sizes, its dtype a numeric NumPy dtype, every array of the structure
recorded), and checks it against the params given (a freshly initialised base,
or a :class:`LoraParams` wrapped with the intended spec); any difference is
reported at once, before an array is read. Every damaged step raises a
ValueError naming the step and the steps available. Loading never runs code
from the checkpoint: JSON and array data only, no pickle. (The digest guards
against damage and stray edits, not against someone who rewrites it too.)

Orbax writes each step into a temporary directory and renames it when
complete, so a save that is interrupted (even by SIGKILL) never damages the
previous good step. Param paths contain "/", which Orbax reads as nesting:
the stored tree is flat, one entry per array, named by its key path with each
component escaped by :func:`escape_key` (only ``[A-Za-z0-9_-]`` remain) and
joined with ".", e.g. ``default.lora.params-2f-h_0-2f-attn-2f-c_attn.lora_A``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from lojax._src import merge as merge_lib
from lojax._src import paths as P
from lojax._src import spec as spec_lib
from lojax._src.model import AdapterMeta, LoraMeta, LoraParams, TargetMeta, name_list

FORMAT = "lojax.adapters"
VERSION = 1
_TARGET_FIELDS = ("path", "leaf", "shape", "kind", "in_axes", "stacked", "layers", "r", "alpha",
                  "scaling", "dropout", "expert_axes")
_SAFE = re.compile(r"[A-Za-z0-9_]")
_DIGEST = "sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_META_ITEM, _META_FILE = "meta", "metadata"  # Orbax's JsonSave writes <step>/meta/metadata

MAX_METADATA_BYTES = 256 << 20
"""The largest metadata file :meth:`AdapterCheckpointer.restore` reads (256 MiB).

Real metadata takes about 2-4 KiB per adapted kernel with an Adam state (paths,
target fields, shape/dtype/checksum of each array and moment), so this admits
some 60,000 kernels, more than a per-expert, per-layer MoE needs; a larger
file is refused unread as damaged.
"""


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
          "heads": list(meta.heads), "tokens": [[p, list(rows)] for p, rows in meta.tokens]}


def _adapter_from_json(d: Mapping) -> AdapterMeta:
  cls = spec_lib.spec_classes().get(d["spec_class"])
  if cls is None:
    known = sorted(spec_lib.spec_classes())
    raise ValueError(f"unknown spec class {d['spec_class']!r} (known: {known})")
  return AdapterMeta(d["name"], cls.from_dict(d["spec"]),
                     tuple(_target_from_json(t) for t in d["targets"]),
                     tuple(d["modules_to_save"]), tuple(d["bias_paths"]), tuple(d["heads"]),
                     tuple((p, tuple(int(i) for i in rows)) for p, rows in d.get("tokens", ())))


def _names(lora: LoraParams, adapter_names) -> tuple[str, ...]:
  if adapter_names is None:
    return tuple(lora.meta.active)
  adapter_names = name_list(adapter_names, "lojax checkpoint", "adapter_names")
  for n in adapter_names:
    lora.meta.adapter(n)  # raises for an unknown name
  return adapter_names


def _fingerprint(lora: LoraParams, names) -> dict:
  """{leaf path: {shape, dtype}} of every base leaf the adapters read or replace."""
  paths, leaves, _ = P.flatten(lora.base)
  by_path = dict(zip(paths, leaves))
  wanted = []
  for name in names:
    meta = lora.meta.adapter(name)
    wanted += [t.leaf_path for t in meta.targets]
    wanted += list(lora.adapters[name]["bias"]) + list(lora.adapters[name]["modules_to_save"])
    wanted += [p for p, _ in meta.tokens]
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


def _digest(meta: Mapping) -> str:
  """SHA-256 (hex) of the canonical JSON of every field but the digest itself."""
  body = {k: v for k, v in meta.items() if k != _DIGEST}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _signed(meta: Mapping) -> dict:
  """The metadata as it will read back (tuples as lists, keys as strings), with its digest."""
  try:
    plain = json.loads(json.dumps(meta))
  except (TypeError, ValueError) as e:
    raise TypeError(f"The checkpoint metadata is not JSON-serialisable ({e}); a spec or target "
                    "field holds a value JSON cannot store (e.g. a NumPy scalar). Pass plain "
                    "Python values in the spec.") from None
  plain[_DIGEST] = _digest(plain)
  return plain


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def _another_step(steps: Sequence[int]) -> str:
  return f"Restore another step (available: {list(steps)}), or save again."


def _damaged(where: str, what: str, steps: Sequence[int]) -> ValueError:
  """The error for a damaged step: what is wrong, then the steps still available."""
  return ValueError(f"The checkpoint in {where} is incomplete or corrupt: {what}. "
                    + _another_step(steps))


def _kind(x) -> str:
  names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
  return f"{names.get(type(x), 'number')} {json.dumps(x)[:60]}"


def _read_meta_file(path: str, where: str, steps: Sequence[int]) -> dict:
  """Reads the metadata JSON, refusing links, non-files and oversized files unread."""
  try:
    st = os.lstat(path)
  except FileNotFoundError:
    raise _damaged(where, f"its metadata file {path} is missing", steps) from None
  except OSError as e:
    raise _damaged(where, f"its metadata file {path} cannot be examined ({e})", steps) from None
  if stat.S_ISLNK(st.st_mode):
    raise _damaged(where, f"its metadata file {path} is a symbolic link (to "
                   f"{os.readlink(path)!r}); lojax writes a regular file and does not follow "
                   "links there, so it was not read", steps)
  if not stat.S_ISREG(st.st_mode):
    raise _damaged(where, f"its metadata file {path} is not a regular file (mode "
                   f"{stat.filemode(st.st_mode)}), so it was not read", steps)
  too_big = (f"its metadata file {path} is larger than any lojax metadata (over "
             f"MAX_METADATA_BYTES = {MAX_METADATA_BYTES} bytes), so it was not read")
  if st.st_size > MAX_METADATA_BYTES:
    raise _damaged(where, too_big.replace("(over", f"({st.st_size} bytes, over"), steps)
  flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
  try:
    fd = os.open(path, flags)  # no link followed, no wait on a FIFO swapped in since lstat
    with os.fdopen(fd, "rb") as f:
      if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        raise _damaged(where, f"its metadata file {path} is not a regular file", steps)
      data = f.read(MAX_METADATA_BYTES + 1)
  except OSError as e:
    raise _damaged(where, f"its metadata file {path} cannot be read ({e})", steps) from None
  if len(data) > MAX_METADATA_BYTES:
    raise _damaged(where, too_big, steps)
  try:
    meta = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise _damaged(where, f"its metadata is not valid JSON ({type(e).__name__}: "
                   f"{str(e)[:200]})", steps) from None
  if not isinstance(meta, dict):
    raise _damaged(where, f"its metadata is a JSON {_kind(meta)}, not an object", steps)
  return meta


def _check_step_files(step_dir: str, where: str, steps: Sequence[int]) -> None:
  """Refuses a step whose files Orbax would read without bound: any symbolic link or
  non-regular file in it, or a file outside the array data folders (``d/``) larger than
  :data:`MAX_METADATA_BYTES` (Orbax's own metadata, e.g. ``adapters/_METADATA``)."""
  bad = []
  for root, dirs, files in os.walk(step_dir, onerror=lambda e: bad.append(f"  {e}")):
    for name in dirs + files:
      path = os.path.join(root, name)
      try:
        st = os.lstat(path)
      except OSError as e:
        bad.append(f"  {path}: cannot be examined ({e})")
        continue
      if stat.S_ISLNK(st.st_mode):
        bad.append(f"  {path}: a symbolic link (to {os.readlink(path)!r})")
      elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        bad.append(f"  {path}: not a regular file (mode {stat.filemode(st.st_mode)})")
      elif (stat.S_ISREG(st.st_mode) and os.path.basename(root) != "d"
            and st.st_size > MAX_METADATA_BYTES):
        bad.append(f"  {path}: {st.st_size} bytes, larger than any metadata "
                   f"(MAX_METADATA_BYTES = {MAX_METADATA_BYTES})")
  if bad:
    raise ValueError(f"The checkpoint in {where} is incomplete or corrupt: files lojax does "
                     "not write, refused before Orbax reads them:\n" + "\n".join(bad) + "\n"
                     + _another_step(steps))


def _check_digest(meta: Mapping, where: str, steps: Sequence[int]) -> None:
  recorded = meta.get(_DIGEST)
  if recorded is None:
    raise _damaged(where, "its metadata has no SHA-256 digest (field \"sha256\"): it was "
                   "written by an older lojax, which stored none, or the field was removed. "
                   "lojax restores only checked metadata: restore the step with the lojax that "
                   "wrote it and save it again with this one (`save_adapters` or "
                   "`AdapterCheckpointer.save` write the digest)", steps)
  if not isinstance(recorded, str) or not _HEX64.fullmatch(recorded):
    raise _damaged(where, f"its SHA-256 digest is not 64 hex digits (found "
                   f"{_kind(recorded)})", steps)
  computed = _digest(meta)
  if computed != recorded:
    raise _damaged(where, f"its SHA-256 digest does not match its content (recorded "
                   f"{recorded[:16]}..., computed {computed[:16]}...): the metadata was edited "
                   "or damaged after it was saved", steps)


def _entry_problems(label: str, d, checksum: bool) -> list[str]:
  """The problems of one recorded array description {shape, dtype[, crc32]}."""
  if not isinstance(d, dict):
    return [f"  {label}: expected an object with shape and dtype, found {_kind(d)}"]
  problems = []
  shape = d.get("shape")
  if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
    problems.append(f"  {label}: shape must be a list of sizes >= 0, found {_kind(shape)}")
  dtype = d.get("dtype")
  try:
    ok = isinstance(dtype, str) and str(np.dtype(dtype)) == dtype and bool(
        jax.numpy.issubdtype(np.dtype(dtype), np.number) or np.dtype(dtype) == np.bool_)
  except TypeError:
    ok = False
  if not ok:
    problems.append(f"  {label}: dtype must name a numeric or bool NumPy dtype, found "
                    f"{_kind(dtype)}")
  crc = d.get("crc32")
  if checksum and not (type(crc) is int and 0 <= crc < 2**32):
    problems.append(f"  {label}: crc32 must be an int in [0, 2**32), found {_kind(crc)}")
  return problems


def _leaves(structure, prefix: str, out: list, problems: list) -> None:
  for k, v in structure.items():
    if isinstance(v, dict):
      _leaves(v, f"{prefix}{k}/", out, problems)
    elif isinstance(v, str):
      out.append(v)
    else:
      problems.append(f"  structure {prefix}{k}: expected an array key or an object, found "
                      f"{_kind(v)}")


def _meta_problems(meta: Mapping, step: int) -> list[str]:
  """Every malformed field of digest-checked metadata (an empty list when well formed)."""
  problems = []
  if type(meta.get("step")) is not int or meta["step"] != step:
    problems.append(f"  step: the metadata records step {_kind(meta.get('step'))}, but lies "
                    f"in step {step}")
  kinds = {"adapters": list, "active": list, "base_fingerprint": dict, "structure": dict,
           "arrays": dict, "opt_state": (dict, type(None))}
  for key, want in kinds.items():
    if key not in meta:
      problems.append(f"  {key}: missing")
    elif not isinstance(meta[key], want):
      expected = {list: "a list", dict: "an object"}.get(want, "an object or null")
      problems.append(f"  {key}: expected {expected}, found {_kind(meta[key])}")
  if problems:
    return problems
  arrays, opt = meta["arrays"], meta["opt_state"]
  for k, d in arrays.items():
    problems += _entry_problems(f"arrays {unescape_key(k)}", d, True)
  for k, d in (opt or {}).items():
    problems += _entry_problems(f"opt_state {unescape_key(k)}", d, True)
  for p, d in meta["base_fingerprint"].items():
    problems += _entry_problems(f"base_fingerprint {p}", d, False)
  used = []
  _leaves(meta["structure"], "", used, problems)
  for k in used:
    if k not in arrays:
      problems.append(f"  structure {unescape_key(k)}: no such array in `arrays`")
  for k in sorted(set(arrays) - set(used)):
    problems.append(f"  arrays {unescape_key(k)}: not in the structure")
  names = []
  for i, a in enumerate(meta["adapters"]):
    if isinstance(a, dict) and isinstance(a.get("name"), str):
      names.append(a["name"])
    else:
      problems.append(f"  adapters[{i}]: expected an object with a string name, found "
                      f"{_kind(a)}")
  if set(meta["structure"]) != set(names):
    problems.append(f"  structure: holds adapters {sorted(meta['structure'])}, the metadata "
                    f"describes {names}")
  for n in meta["active"]:
    if n not in names:
      problems.append(f"  active: {_kind(n)} is not a saved adapter ({names})")
  return problems


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
    for f in ("modules_to_save", "bias_paths", "tokens"):
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
    raise ValueError(f"The {kind} in {where} is corrupt:\n" + "\n".join(bad) + "\n"
                     + _another_step(steps))


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
    self.directory = os.path.abspath(P.directory(directory))
    if isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int) or (
        save_interval_steps < 1):
      raise ValueError(f"`save_interval_steps` must be an int >= 1; got {save_interval_steps!r}.")
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
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"`step` must be an int >= 0; got {step!r}.")
    step = int(step)
    names = _names(lora, adapter_names)
    if not names:
      raise ValueError("No adapter to save: none is active. Pass `adapter_names=` (the "
                       f"adapters are {list(lora.meta.names)}) or activate one with "
                       "lojax.set_adapter.")
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(f"`step={step}` is not newer than the latest saved step {latest} in "
                       f"{self.directory}; steps must increase (delete the directory to "
                       "start over).")
    stored = _stored_adapters(lora, names)
    opt_flat = None if opt_state is None else dict(_flat_keys(opt_state))
    meta = _signed(_metadata(lora, names, step, stored, opt_flat))
    items = {"adapters": ocp.args.StandardSave(stored), _META_ITEM: ocp.args.JsonSave(meta)}
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
        checkpoint is incomplete or corrupt (its metadata file a link, not a
        regular file, over :data:`MAX_METADATA_BYTES`, without a digest or
        not matching it, or malformed; its arrays not matching their
        checksums), naming the steps still available.
    """
    self._manager.wait_until_finished()  # a step still being saved is read once committed
    steps = self.all_steps()
    if not steps:
      raise ValueError(f"No checkpoint in {self.directory}: it holds no completed step. "
                       "Check the path, or save first.")
    if step is None:
      step = steps[-1]
    if step not in steps:
      raise ValueError(f"No step {step} in {self.directory}; available steps: {steps}.")
    where = f"{self.directory} (step {step})"
    step_dir = os.path.join(self.directory, str(step))
    meta = _read_meta_file(os.path.join(step_dir, _META_ITEM, _META_FILE), where, steps)
    if meta.get("format") != FORMAT:
      raise _damaged(where, f"its metadata is not a lojax adapter checkpoint's (format "
                     f"{_kind(meta.get('format'))}, expected {FORMAT!r})", steps)
    if meta.get("version") != VERSION:
      raise _damaged(where, f"its metadata has format version {_kind(meta.get('version'))}; "
                     f"this lojax reads {VERSION}", steps)
    _check_digest(meta, where, steps)
    problems = _meta_problems(meta, step)
    if problems:
      raise ValueError(f"The checkpoint in {where} is incomplete or corrupt: its metadata is "
                       f"malformed ({len(problems)} problem(s)):\n" + "\n".join(problems)
                       + "\n" + _another_step(steps))
    try:
      saved = tuple(_adapter_from_json(a) for a in meta["adapters"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise _damaged(where, f"its metadata describes an adapter lojax cannot rebuild "
                     f"({type(e).__name__}: {e})", steps) from None
    active = tuple(meta["active"])
    fingerprint, arrays, opt_desc = meta["base_fingerprint"], meta["arrays"], meta["opt_state"]
    structure = meta["structure"]

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
    _check_step_files(step_dir, where, steps)
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
          f"({type(e).__name__}: {first}). " + _another_step(self.all_steps())) from None

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
  directory = os.path.abspath(P.directory(directory))
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
  directory = os.path.abspath(P.directory(directory))
  if os.path.exists(directory) and not overwrite:
    raise ValueError(f"`directory` {directory} already exists; pass `overwrite=True` to "
                     "replace it, or choose a new directory.")
  merged = merge_lib.merge(lora, adapter_names=adapter_names, safe_merge=safe_merge)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory, merged, force=overwrite)
    ckpt.wait_until_finished()
