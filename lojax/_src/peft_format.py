"""Hugging Face PEFT's saved-adapter format: export and import without torch.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), with tensors
named ``base_model.model.<torch module name>.<part>``:

========================  =======================  ==========================
lojax (Flax layout)       PEFT tensor              PEFT shape
========================  =======================  ==========================
dense A ``[in..., r]``    ``lora_A.weight``        ``[r, prod(in)]``
dense B ``[r, out...]``   ``lora_B.weight``        ``[prod(out), r]``
conv A ``[k..., cin, r]`` ``lora_A.weight``        ``[r, cin, k...]``
conv B ``[r, cout]``      ``lora_B.weight``        ``[cout, r, 1...]``
embed A ``[num, r]``      ``lora_embedding_A``     ``[r, num]``
embed B ``[r, dim]``      ``lora_embedding_B``     ``[dim, r]``
AdaLoRA P, E, Q           ``lora_A/lora_E/lora_B`` ``[r, in]``/``[r, 1]``/``[out, r]``
========================  =======================  ==========================

An expert kernel ``[E, in..., out...]`` (one expert axis) and a bare array
found by its use are PEFT ``target_parameters`` (PEFT's ``lora.ParamWrapper``):
with ``E`` experts (1 for a 2-D array), ``lora_A.weight [E*r, in]`` (row
``e*r + k``) and ``lora_B.weight [out, r*E]`` (column ``k*E + e``), named after
the module holding the parameter; several adapted parameters of one module
nest, each earlier one (``mapping.parameter_order``) one ``.base_layer``
deeper. A layer of a stacked (``nn.scan``) kernel is exported as its own torch
module (or parameter), and restacked on import. Trained biases are written as full values
(base + delta): ``<name>.base_layer.bias`` for an adapted module (PEFT wraps
it), ``<name>.bias`` otherwise. ``modules_to_save`` copies are written as
PEFT writes them, ``<name>.<leaf>`` (PEFT strips its
``modules_to_save.<adapter>`` infix when saving): Flax ``kernel`` becomes
``weight`` transposed to ``[out, in]`` (unless the torch module keeps
``[in, out]``, like GPT-2's ``Conv1D``: see ``fan_in_fan_out``), ``scale``
and ``embedding`` become ``weight`` as they are.

Torch module names come from a :class:`PeftMapping`. Loading reads only JSON
and safetensors data; nothing from the directory is executed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import inits
from lojax._src.mappings import DEFAULT_MAPPING, PeftMapping
from lojax._src import lora as lora_lib
from lojax._src import model
from lojax._src import paths as P
from lojax._src import spec as spec_lib
from lojax._src.model import AdapterMeta, LoraMeta, LoraParams
from lojax._src.wrap import check_trace_args, kernel_paths, replace_leaves, wrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

def _np(x) -> np.ndarray:
  """``x`` on the host as a contiguous float array safetensors can write."""
  x = np.asarray(jax.device_get(x))
  if x.dtype not in (np.float16, np.float32, np.float64):
    x = x.astype(np.float32)  # e.g. bfloat16, which safetensors.numpy cannot write
  return np.ascontiguousarray(x)


def _single_adapter(lora: LoraParams, adapter_name: str | None) -> str:
  """The adapter to export: ``adapter_name``, else the only active one."""
  if adapter_name is not None:
    lora.meta.adapter(adapter_name)
    return adapter_name
  if len(lora.meta.active) != 1:
    raise ValueError(f"`adapter_name` is required: the active adapters are "
                     f"{list(lora.meta.active)}, and a PEFT directory holds one adapter.")
  return lora.meta.active[0]


def _name_or_raise(mapping: PeftMapping, path: str, layer=None) -> str:
  """The torch name of ``path`` (layer ``layer``); raises if the mapping has none."""
  name = mapping.torch_name(path, layer)
  if name is None:
    key = path if layer is None else f"{path}[{layer}]"
    raise ValueError(f"The mapping has no torch name for '{key}'. Add a rule to "
                     "`mapping.names` that matches it.")
  return name


def _saved_leaf(mapping, module: str, leaf_path: str, x: np.ndarray):
  """(torch leaf suffix, array) of one modules_to_save leaf."""
  rel = leaf_path[len(module) + 1:] if leaf_path != module else ""
  parent, leaf = P.split(leaf_path)
  parts = rel.split("/")[:-1] + [mapping.torch_leaf(leaf)]
  if leaf in mapping.matmul_leaves and x.ndim >= 2:   # (a 1-D leaf of that name is a scale)
    if x.ndim != 2:
      raise ValueError(f"Cannot convert the {x.ndim}-D kernel '{leaf_path}' of "
                       "modules_to_save to a torch weight; only 2-D kernels are supported.")
    if mapping.transposed(parent):
      x = x.T
  return ".".join(parts), x


def save_peft(directory: str | os.PathLike, lora: LoraParams, /, *,
              mapping: PeftMapping | None = None, adapter_name: str | None = None,
              base_model_name_or_path: str | None = None,
              initial: LoraParams | None = None) -> None:
  """Writes one adapter as a PEFT adapter directory (no torch needed).

  Args:
    directory: created if absent; ``adapter_config.json`` and
      ``adapter_model.safetensors`` are (over)written.
    lora: the :class:`LoraParams`.
    mapping: lojax module paths to torch module names (e.g.
      ``lojax.GPT2_MAPPING``); an expert kernel or a bare array is written as
      PEFT's ``target_parameters`` entry :meth:`PeftMapping.parameter_name`
      (see :attr:`PeftMapping.parameter_order` and
      :attr:`PeftMapping.swapped_parameters`). Without it the names are the lojax paths with
      "/" written ".", which no transformers model has, and a warning says
      so; pass ``PeftMapping()`` when those already are the torch names.
    adapter_name: the adapter to write (default: the only active one).
    base_model_name_or_path: recorded in the config (e.g. ``"gpt2"``).
    initial: for a PiSSA or OLoRA adapter, the :class:`LoraParams` that
      :func:`lojax.wrap` returned before training. The adapter is then written
      as a plain LoRA adapter of rank 2r (``A' = [A | A0]``, ``B' = [B; -B0]``,
      alpha doubled, or times sqrt(2) with ``use_rslora``, so the scaling is
      unchanged) whose delta ``s (A B - A0 B0)`` applies to the original,
      untouched base: PEFT's ``save_pretrained(...,
      path_initial_model_for_weight_conversion=...)``. Without it such a file
      keeps ``init_lora_weights="pissa"``/``"olora"``, and loading it (in PEFT
      or :func:`load_peft`) rebuilds the residual base from the original one.

  Raises:
    ValueError: the mapping misses a module or maps two to one name; an
      AdaLoRA adapter on a non-dense kernel; ``initial`` given for another
      kind of adapter, or not the adapter's own initial state; an expert
      kernel or bare array that PEFT cannot adapt as a target parameter
      (several expert axes, a conv or lookup use, ``lora_dropout``, not plain
      LoRA, a module whose parameters' order the mapping does not give).

  >>> import tempfile, jax, jax.numpy as jnp, lojax
  >>> from lojax._src.peft_format import save_peft
  >>> lora = lojax.wrap({"params": {"q": {"kernel": jnp.ones((4, 3))}}},
  ...                   lojax.LoraSpec(r=2, target_modules=["q"]), key=jax.random.key(0))
  >>> save_peft(tempfile.mkdtemp(), lora, mapping=lojax.PeftMapping())
  """
  model.require_lora(lora, "lojax.save_peft")
  from safetensors.numpy import save_file
  directory = P.directory(directory)
  if mapping is not None and not isinstance(mapping, PeftMapping):
    raise TypeError(f"`mapping` must be a lojax.PeftMapping or None, got "
                    f"{type(mapping).__name__}.")
  name = _single_adapter(lora, adapter_name)
  meta = lora.meta.adapter(name)
  if mapping is None:
    mapping = DEFAULT_MAPPING
    example = next((t.path for t in meta.targets), "params/h_0/attn/q")
    warnings.warn(
        f"lojax.save_peft without `mapping=`: the tensors are named after lojax paths with '/' "
        f"written '.' (e.g. {mapping.torch_name(example)!r}), which PEFT cannot apply to a "
        "transformers model. Pass the model family's mapping (e.g. mapping=lojax.GPT2_MAPPING) "
        "or your own lojax.PeftMapping; pass mapping=lojax.PeftMapping() if these already are "
        "the torch module names.", stacklevel=2)
  ad = lora.adapters[name]
  factors = ad["lora"]
  if initial is not None:
    meta, factors = _as_plain_lora(meta, factors, lora.base, initial)
  _check_parameter_targets(meta, mapping)
  out = _Tensors()
  exported = _put_factors(out, meta, factors, mapping)
  _put_biases(out, lora.base, meta, ad["bias"], mapping)
  saved_names = _put_saved_modules(out, meta.modules_to_save, ad["modules_to_save"], mapping)
  config = _config(meta.spec, exported, saved_names, mapping, base_model_name_or_path)
  config["trainable_token_indices"] = _put_tokens(out, meta, ad.get(model.TOKENS, {}), mapping)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_NAME), "w") as fh:
    json.dump(config, fh, indent=2, sort_keys=True)
  save_file(out.arrays, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def _as_plain_lora(meta: AdapterMeta, factors, base, initial) -> tuple[AdapterMeta, dict]:
  """A PiSSA/OLoRA adapter as a plain LoRA one of rank 2r on the original base.

  With ``W = W_res + s A0 B0`` (the init) and ``W_res + s A B`` (trained), the
  delta to W is ``s (A B - A0 B0) = s [A | A0] [B; -B0]``.
  """
  init = meta.spec.init_lora_weights
  if not (inits.rewrites_base(init) and init != "loftq") or meta.variant.name != "lora":
    what = f"a {meta.variant.name} adapter" if meta.variant.name != "lora" else (
        f"`init_lora_weights={init!r}`")
    raise ValueError(
        f"`initial=` converts a PiSSA or OLoRA adapter (plain LoRA, init 'pissa', "
        f"'pissa_niter_<K>' or 'olora') to a plain LoRA one; adapter {meta.name!r} has {what}. "
        "Save it without `initial=`.")
  if not isinstance(initial, LoraParams):
    raise TypeError(f"`initial` must be the LoraParams lojax.wrap returned before training, "
                    f"got {type(initial).__name__}.")
  if meta.name not in initial.meta.names:
    raise ValueError(f"`initial` has no adapter {meta.name!r} (it has "
                     f"{list(initial.meta.names)}); pass the LoraParams lojax.wrap returned.")
  init_meta = initial.meta.adapter(meta.name)
  init_factors = initial.adapters[meta.name][model.LORA]
  problems = []
  if init_meta.targets != meta.targets or init_meta.spec != meta.spec:
    problems.append("its targets or spec differ")
  else:
    base_leaves = dict(zip(*P.flatten(base)[:2]))
    init_leaves = dict(zip(*P.flatten(initial.base)[:2]))
    if changed := [t.path for t in meta.targets if not np.array_equal(
        np.asarray(base_leaves[t.leaf_path]), np.asarray(init_leaves[t.leaf_path]))]:
      problems.append(f"its residual base kernels differ at {changed}")
  if problems:
    raise ValueError(f"`initial` is not the initial state of adapter {meta.name!r}: "
                     f"{'; '.join(problems)}. Pass the LoraParams lojax.wrap returned for "
                     "this adapter, before training.")
  grow = 2 ** 0.5 if meta.spec.use_rslora else 2   # alpha / r (or / sqrt r) unchanged
  targets, out = [], {}
  for t in meta.targets:
    f, f0 = factors[t.path], init_factors[t.path]
    out[t.path] = {
        lora_lib.A: jnp.concatenate([f[lora_lib.A], f0[lora_lib.A].astype(f[lora_lib.A].dtype)],
                                    axis=-1),
        lora_lib.B: jnp.concatenate([f[lora_lib.B], -f0[lora_lib.B].astype(f[lora_lib.B].dtype)],
                                    axis=1 if t.stacked else 0)}
    targets.append(dataclasses.replace(t, r=2 * t.r, alpha=t.alpha * grow))
  spec = dataclasses.replace(meta.spec, r=2 * meta.spec.r, lora_alpha=meta.spec.lora_alpha * grow,
                             init_lora_weights=True)
  return meta.replace(spec=spec, targets=tuple(targets)), out


class _Tensors:
  """The tensors of a PEFT file by name; a name given twice is an error."""

  def __init__(self):
    self.arrays: dict[str, np.ndarray] = {}
    self._owner: dict[str, str] = {}

  def put(self, key: str, value: np.ndarray, source: str) -> None:
    """Adds tensor ``key``, written for the lojax path ``source``."""
    if key in self.arrays:
      raise ValueError(f"The mapping gives '{source}' and '{self._owner[key]}' the same tensor "
                       f"name {key!r}; make `mapping.names` one-to-one.")
    self.arrays[key], self._owner[key] = value, source


def _layer_tensors(to_peft, t, entry) -> Iterator[tuple[int | None, dict[str, np.ndarray]]]:
  """``(layer, {suffix: tensor})`` of each exported layer of one target, in PEFT's layout."""
  entry = {k: _np(x) for k, x in entry.items()}
  layers = [None] if not t.stacked else (t.layers or tuple(range(t.stacked)))
  for j, layer in enumerate(layers):
    yield layer, to_peft(t, entry if layer is None else {k: x[j] for k, x in entry.items()})


def _is_parameter(t) -> bool:
  """Whether PEFT stores ``t``'s adapter as one of its ``target_parameters`` (a
  ``lora.ParamWrapper``): an expert kernel, or a bare array (no module holds it)."""
  return bool(t.expert_axes) or not t.leaf


def _peft_io(variant, t, mapping: PeftMapping):
  """``(to_peft, from_peft)`` of target ``t``: its variant's module layout, or the layout of a
  target parameter."""
  if not _is_parameter(t):
    return variant.to_peft, variant.from_peft
  to_p, from_p = (getattr(variant, k, None) for k in ("to_peft_parameter", "from_peft_parameter"))
  if to_p is None or from_p is None:
    raise ValueError(f"'{t.path}' would be a PEFT target parameter, which a {variant.name} "
                     "adapter cannot be written as; use a plain LoraSpec.")
  swapped = mapping.swapped(t.path)
  return (lambda t, x: to_p(t, x, swapped=swapped)), (lambda t, x: from_p(t, x, swapped=swapped))


def _layers(t) -> list[int | None]:
  """The exported layers of ``t``: None when not stacked."""
  return [None] if not t.stacked else list(t.layers or range(t.stacked))


def _check_parameter_targets(meta, mapping: PeftMapping) -> None:
  """Raises, listing them all, for targets PEFT cannot adapt as ``target_parameters``."""
  problems = []
  for t in meta.targets:
    if not _is_parameter(t):
      continue
    what = "an expert kernel" if t.expert_axes else "a bare array found by its use"
    if t.kind != "dense":
      problems.append(f"  {t.path}: {what} used as a {t.kind} kernel; PEFT's target_parameters "
                      "adapt matmul weights only")
    elif len(t.expert_axes) > 1:
      problems.append(f"  {t.path}: {len(t.expert_axes)} expert axes {list(t.expert_axes)}; "
                      "PEFT adapts 2-D and 3-D parameters (one expert axis) only")
    elif mapping.torch_names(t.path, _layers(t)[0]) is not None:
      problems.append(f"  {t.path}: fused in `mapping.splits`, which target parameters cannot "
                      "be")
    elif (name := mapping.parameter_name(t.path, _layers(t)[0], t.leaf)) and "." not in name:
      problems.append(f"  {t.path}: its torch name {name!r} is a parameter of the top-level "
                      "module, which PEFT cannot adapt; map it into a module")
  if problems:
    raise ValueError("Cannot write these adapters as PEFT `target_parameters` (the form of "
                     "expert kernels and bare arrays):\n" + "\n".join(problems) +
                     "\nSave with lojax.save_adapters, or lojax.save_merged for plain params.")
  if meta.spec.lora_dropout and any(_is_parameter(t) for t in meta.targets):
    raise ValueError(
        f"`lora_dropout={meta.spec.lora_dropout}`, but PEFT's target_parameters (the form of "
        f"{[t.path for t in meta.targets if _is_parameter(t)]}) take no dropout: PEFT would "
        "refuse the file. Save with lojax.save_adapters, or train with lora_dropout=0.")


def _wrappers(names, mapping: PeftMapping) -> dict[str, str]:
  """PEFT's module name for the adapter of each target parameter in ``names``.

  PEFT wraps the adapted parameters of one module in the order the module registers them
  (``mapping.parameter_order``), each wrapper around the previous: the last one is
  ``<module>``, the one before it ``<module>.base_layer``, and so on. Raises ValueError when
  that order is not known.
  """
  by_module: dict[str, list[str]] = {}
  for name in dict.fromkeys(names):
    module, _, param = name.rpartition(".")
    by_module.setdefault(module, []).append(param)
  order, out, unordered = mapping.parameter_order, {}, []
  for module, params in by_module.items():
    if len(params) > 1:
      if missing := [p for p in params if p not in order]:
        unordered.append(f"  {module}: {params} ({missing} not in it)")
        continue
      params = sorted(params, key=order.index)
    for i, param in enumerate(params):
      out[f"{module}.{param}"] = module + ".base_layer" * (len(params) - 1 - i)
  if unordered:
    raise ValueError(
        "These torch modules have several adapted target parameters, and "
        "`mapping.parameter_order` does not say in which order the module registers them "
        "(PEFT nests its wrappers in that order, and the nesting names the tensors):\n" +
        "\n".join(unordered) + "\nPass `PeftMapping(parameter_order=[...])` with the "
        "parameter names in the order the torch module registers them.")
  return out


def _put_factors(out: _Tensors, meta, factors, mapping: PeftMapping) -> list[tuple[Any, str]]:
  """Writes every target's factor tensors; returns ``(target, torch name)`` per exported layer
  (per torch module of a fused kernel, each with its own target)."""
  exported = []
  wrappers = _wrappers([_parameter_name_or_raise(mapping, t, layer) for t in meta.targets
                        if _is_parameter(t) for layer in _layers(t)], mapping)
  for t in meta.targets:
    if _is_parameter(t):
      to_peft = _peft_io(meta.variant, t, mapping)[0]
      for layer, parts in _layer_tensors(to_peft, t, factors[t.path]):
        name = _parameter_name_or_raise(mapping, t, layer)
        for suffix, value in parts.items():
          out.put(f"{PREFIX}{wrappers[name]}.{suffix}", np.ascontiguousarray(value), t.path)
        exported.append((t, name))
      continue
    first = None if not t.stacked else (t.layers or (0,))[0]
    names = mapping.torch_names(t.path, first)
    pieces = ([(None, t, factors[t.path])] if names is None else
              [(c, *piece) for c, piece in enumerate(_fused_pieces(meta, t, factors[t.path],
                                                                   len(names)))])
    for c, part_t, entry in pieces:
      for layer, parts in _layer_tensors(meta.variant.to_peft, part_t, entry):
        tn = (_name_or_raise(mapping, t.path, layer) if c is None
              else mapping.torch_names(t.path, layer)[c])
        for suffix, value in parts.items():
          out.put(f"{PREFIX}{tn}.{suffix}", np.ascontiguousarray(value), t.path)
        exported.append((part_t, tn))
  return exported


def _parameter_name_or_raise(mapping: PeftMapping, t, layer) -> str:
  """The torch parameter name of target ``t`` (layer ``layer``); raises if the mapping has
  none."""
  if mapping.torch_name(t.path, layer) is None:
    _name_or_raise(mapping, t.path, layer)
  return mapping.parameter_name(t.path, layer, t.leaf)


def _fused_pieces(meta, t, entry, n: int) -> list[tuple[Any, dict]]:
  """One ``(target, entry)`` per torch module of a fused kernel: the slices of its first axis.

  Every parameter axis laid out along that kernel axis (B's, DoRA's magnitude) is sliced;
  the others (A) are shared, so each piece's delta is that slice of the kernel's delta.
  """
  piece_t = _piece_target(meta.variant, t, n)
  layout = meta.variant.layout(t)
  pieces = []
  for c in range(n):
    sliced = {}
    for k, x in entry.items():
      roles = layout[k]
      sliced[k] = jnp.take(x, c, axis=roles.index(0)) if 0 in roles else x
    pieces.append((piece_t, sliced))
  return pieces


def _piece_target(variant, t, n: int, r: int | None = None):
  """The target of one of the ``n`` torch modules fused along ``t``'s first kernel axis."""
  where = f"'{t.path}' is fused ({n} torch modules in `mapping.splits`)"
  if not variant.splittable:
    raise ValueError(f"{where}: a {variant.name} adapter cannot be split into the "
                     "modules' adapters (nor joined from them).")
  if 0 not in t.out_axes or t.kernel_shape[0] != n:
    raise ValueError(f"{where}, but its kernel {t.kernel_shape} (input axes {t.in_axes}) does "
                     f"not have {n} slices on an output first axis.")
  lead = 1 if t.stacked else 0
  shifted = lambda axes: tuple(a - 1 for a in axes)
  return dataclasses.replace(t, shape=t.shape[:lead] + t.shape[lead + 1:],
                             in_axes=shifted(t.in_axes), expert_axes=shifted(t.expert_axes),
                             r=t.r if r is None else r)


def _put_biases(out: _Tensors, base, meta, deltas, mapping: PeftMapping) -> None:
  """Writes the trained biases as full values (base + delta), per layer if stacked."""
  base_paths, base_leaves, _ = P.flatten(base)
  base = dict(zip(base_paths, base_leaves))
  adapted = {t.path: t for t in meta.targets}
  for leaf_path, delta in deltas.items():
    module, leaf = P.split(leaf_path)
    b = np.asarray(base[leaf_path])
    full = _np(b + np.asarray(meta.expand_bias(leaf_path, jnp.asarray(delta),
                                               b.shape)).astype(b.dtype))
    if module in adapted:  # PEFT wraps an adapted module: its bias is in `base_layer`
      t = adapted[module]
      if not t.stacked:
        layers = [None]
      else:   # the wrapped layers only: PEFT leaves the others as they are
        layers = list(t.layers) if t.layers is not None else list(range(t.stacked))
      for layer in layers:
        tn = _name_or_raise(mapping, module, layer)
        out.put(f"{PREFIX}{tn}.base_layer.{leaf}", full if layer is None else full[layer],
                leaf_path)
    else:
      out.put(f"{PREFIX}{_name_or_raise(mapping, module)}.{leaf}", full, leaf_path)


def _put_tokens(out: _Tensors, meta, values, mapping: PeftMapping) -> dict | None:
  """Writes trainable token rows as PEFT does; returns the config's
  ``trainable_token_indices`` (``{torch module: rows}``, or None)."""
  rows = {}
  for p, idx in meta.tokens:
    tn = _name_or_raise(mapping, p.rpartition("/")[0])
    out.put(f"{PREFIX}{tn}.{TOKENS_SUFFIX}", np.ascontiguousarray(_np(values[p])), p)
    rows[tn] = list(idx)
  return rows or None


def _put_saved_modules(out: _Tensors, modules, copies, mapping: PeftMapping) -> list[str]:
  """Writes the ``modules_to_save`` copies as PEFT does; returns their torch names."""
  saved_names = []
  for module in modules:
    tn = _name_or_raise(mapping, module)
    saved_names.append(tn)
    for leaf_path, x in copies.items():
      if P.is_under(leaf_path, module):
        suffix, value = _saved_leaf(mapping, module, leaf_path, _np(x))
        out.put(f"{PREFIX}{tn}.{suffix}", np.ascontiguousarray(value), leaf_path)
  return saved_names


def _config(spec, exported: list[tuple[Any, str]], saved_names: list[str], mapping: PeftMapping,
            base_model_name_or_path: str | None) -> dict[str, Any]:
  """The content of ``adapter_config.json``."""
  modules = [(t, tn) for t, tn in exported if not _is_parameter(t)]
  parameters = sorted({tn for t, tn in exported if _is_parameter(t)})
  return {
      "task_type": None if spec.task_type is None else spec_lib.TaskType(spec.task_type).value,
      "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
      "inference_mode": True,
      "r": spec.r,
      "lora_alpha": spec.lora_alpha,
      "lora_dropout": spec.lora_dropout,
      "target_modules": sorted({tn for _, tn in modules}),
      # expert kernels and bare arrays (PEFT's lora.ParamWrapper); written only when there are
      # some, so that a PEFT without the field reads the other files
      **({"target_parameters": parameters} if parameters else {}),
      "exclude_modules": None,
      # PEFT sets it per module as it wraps them (Conv1D True, nn.Linear False, embeddings
      # untouched) and saves the value of the last one; it corrects it per module on load.
      "fan_in_fan_out": next((not mapping.transposed(t.path) for t, _ in reversed(modules)
                              if t.kind != "embed"), False),
      "bias": spec.bias,
      "use_rslora": spec.use_rslora,
      "modules_to_save": saved_names or None,
      "init_lora_weights": spec.init_lora_weights,
      "layers_to_transform": None,
      "layers_pattern": None,
      "alpha_pattern": {tn: t.alpha for t, tn in exported if t.alpha != spec.lora_alpha},
      # lojax adapts every use of a table: with tied embeddings, PEFT must tie the head's
      # adapter to it (without tied embeddings PEFT ignores this)
      "ensure_weight_tying": any(t.kind == "embed" for t, _ in modules),
      "loftq_config": dict(spec.loftq_config),
      **spec.peft_fields({tn: t.r for t, tn in exported}),
  }


# --------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------

# An adapter tensor: `<torch module>.lora_<part>[.weight]`; which parts a layer must have (and
# may have) is its variant's business (Variant.from_peft / to_peft).
_LORA_KEY = re.compile(r"(.+?)\.(lora_[A-Za-z_]+(?:\.weight|\.bias)?)")
# Trainable token rows: `<torch module>.token_adapter.trainable_tokens_delta` ([n, dim]).
TOKENS_SUFFIX = "token_adapter.trainable_tokens_delta"


def _peft_lookup(pattern: Mapping[str, Any] | None, name: str, default):
  """PEFT's rank/alpha_pattern rule: first key with re.match(r'(.*\\.)?(key)$')."""
  for key, value in (pattern or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def _read(directory):
  """``(config, tensors)`` of a PEFT adapter directory; raises if missing or damaged."""
  from safetensors.numpy import load_file
  cfg_path = os.path.join(directory, CONFIG_NAME)
  w_path = os.path.join(directory, WEIGHTS_NAME)
  missing = [p for p in (cfg_path, w_path) if not os.path.isfile(p)]
  if missing:
    raise ValueError(f"Not a PEFT adapter directory: {', '.join(missing)} missing.")
  try:
    with open(cfg_path) as fh:
      config = json.load(fh)
    tensors = load_file(w_path)
  except Exception as e:  # a damaged file
    raise ValueError(f"Could not read the PEFT adapter in {directory} ({type(e).__name__}: "
                     f"{str(e).strip()[:200]}).") from None
  _check_config(cfg_path, config)
  return config, tensors


_is_int, _is_number = spec_lib._is_int, spec_lib._is_real


def _is_names(x) -> bool:
  return isinstance(x, list) and all(isinstance(e, str) for e in x)


def _regexes(x) -> bool:
  try:
    for k in x:
      re.compile(k)
  except re.error:
    return False
  return True


# What each config field lojax reads must be, as JSON (None: the field may be null).
_CONFIG_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "peft_type": ("a string", lambda x: isinstance(x, str)),
    "r": ("an integer >= 1", lambda x: _is_int(x) and x >= 1),
    "lora_alpha": ("a number", _is_number),
    "lora_dropout": ("a number or null", lambda x: x is None or _is_number(x)),
    "use_rslora": ("true or false", lambda x: isinstance(x, bool)),
    "ensure_weight_tying": ("true or false", lambda x: isinstance(x, bool)),
    "use_dora": ("true or false", lambda x: isinstance(x, bool)),
    "fan_in_fan_out": ("true or false", lambda x: isinstance(x, bool)),
    "inference_mode": ("true or false", lambda x: isinstance(x, bool)),
    "bias": ("a string", lambda x: isinstance(x, str)),
    "task_type": ("a string or null", lambda x: x is None or isinstance(x, str)),
    "init_lora_weights": ("true, false or a string", lambda x: isinstance(x, (bool, str))),
    "target_modules": ("a string, a list of strings or null",
                       lambda x: x is None or isinstance(x, str) or _is_names(x)),
    "target_parameters": ("a list of strings or null", lambda x: x is None or _is_names(x)),
    "exclude_modules": ("a string, a list of strings or null",
                        lambda x: x is None or isinstance(x, str) or _is_names(x)),
    "modules_to_save": ("a list of strings or null", lambda x: x is None or _is_names(x)),
    "layers_to_transform": ("an integer, a list of integers or null", lambda x: x is None or _is_int(
        x) or (isinstance(x, list) and all(_is_int(e) for e in x))),
    "layers_pattern": ("a string, a list of strings or null",
                       lambda x: x is None or isinstance(x, str) or _is_names(x)),
    "rank_pattern": ("an object of regular expressions to integers >= 1 (AdaLoRA: to lists "
                     "of booleans), or null",
                     lambda x: x is None or (isinstance(x, dict) and _regexes(x) and all(
                         (_is_int(v) and v >= 1) or (isinstance(v, list) and all(
                             isinstance(e, bool) for e in v)) for v in x.values()))),
    "alpha_pattern": ("an object of regular expressions to numbers, or null",
                      lambda x: x is None or (isinstance(x, dict) and _regexes(x) and all(
                          _is_number(v) for v in x.values()))),
    "loftq_config": ("an object or null", lambda x: x is None or isinstance(x, dict)),
}


def _check_config(cfg_path: str, config) -> None:
  """Raises, listing every field, when the config is not an object of well-typed fields.

  PEFT reads a JSON string ``"false"`` as true and ``int("2")`` nowhere; lojax refuses what
  PEFT itself would misread or fail on, before anything is built.
  """
  if not isinstance(config, dict):
    kind = {list: "an array", type(None): "null", str: "a string", bool: "a boolean"}.get(
        type(config), "a number")
    raise ValueError(f"{cfg_path} holds {kind}, not the JSON object of LoraConfig fields PEFT "
                     "writes. Nothing was loaded.")
  bad = []
  for k, (what, ok) in _CONFIG_TYPES.items():
    if k in config and not ok(config[k]):
      note = (" (a string, which PEFT would read as true)" if what == "true or false"
              and isinstance(config[k], str) else "")
      bad.append(f"  `{k}`: must be {what}; got {config[k]!r}{note}")
  if bad:
    raise ValueError(f"{cfg_path} has fields of the wrong type:\n" + "\n".join(bad) +
                     "\nNothing was loaded.")


def load_peft(directory: str | os.PathLike, params: Any, /, *,
              mapping: PeftMapping = DEFAULT_MAPPING, adapter_name: str = "default",
              apply_fn: Callable | None = None, example_args: Sequence[Any] = (),
              example_kwargs: Mapping[str, Any] | None = None) -> LoraParams:
  """Reads a PEFT adapter directory onto ``params``.

  The targets (and their layouts) come from :func:`lojax.wrap` with a spec
  built from the config, restricted to the modules the file holds; the
  ranks come from the tensors, alphas from ``lora_alpha`` /
  ``alpha_pattern`` (PEFT's lookup rule), and the weights are filled in.
  Biases are read as full values (the delta to ``params`` is stored). An
  AdaLoRA adapter keeps its file ranks with ``ranknum = init_r`` and gets
  ``adalora_step = total_step`` (its ranks were allocated by PEFT). The
  config's ``target_parameters`` (PEFT's rule: a parameter's name or a
  suffix of it) select expert kernels and bare arrays, found by tracing
  ``apply_fn``; their tensors are read as :func:`save_peft` writes them.

  Args:
    directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
    params: the base param tree (or a :class:`LoraParams` to add the adapter
      to, inactive).
    mapping: the :class:`PeftMapping` used to export it.
    adapter_name: name of the loaded adapter.
    apply_fn, example_args, example_kwargs: as for :func:`lojax.wrap`
      (needed for stacked, N-D and conv kernels).

  Returns:
    A :class:`LoraParams` holding the adapter.

  Raises:
    ValueError: the files are missing or damaged; the adapter type is not
      LoRA/AdaLoRA; tensors name modules the mapping does not produce from
      ``params``, or have shapes that do not fit (all are listed).

  >>> import tempfile, jax, jax.numpy as jnp, lojax
  >>> from lojax._src.peft_format import save_peft, load_peft
  >>> params = {"params": {"q": {"kernel": jnp.ones((4, 3))}}}
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["q"]),
  ...                   key=jax.random.key(0))
  >>> d = tempfile.mkdtemp(); save_peft(d, lora, mapping=lojax.PeftMapping())
  >>> load_peft(d, params).adapters["default"]["lora"]["params/q"]["lora_A"].shape
  (4, 2)
  """
  directory = P.directory(directory)
  if not isinstance(mapping, PeftMapping):
    raise TypeError(f"`mapping` must be a lojax.PeftMapping, got {type(mapping).__name__}.")
  if not isinstance(adapter_name, str) or not adapter_name:
    raise TypeError(f"`adapter_name` must be a non-empty str, got {adapter_name!r}.")
  check_trace_args(apply_fn, example_args, example_kwargs)
  config, tensors = _read(directory)
  spec_class = _spec_class(config)
  _refuse_unsupported(config, spec_class)
  base = params.base if isinstance(params, LoraParams) else params
  index = _torch_index(base, mapping, config, apply_fn=apply_fn, example_args=example_args,
                       example_kwargs=example_kwargs)
  token_values = {k: tensors.pop(k) for k in list(tensors) if k.endswith(f".{TOKENS_SUFFIX}")}
  contents = _sort_tensors(directory, tensors, config, index, mapping)
  spec = _spec_from_file(spec_class, config, contents, index, mapping)
  token_values, token_rows = _file_tokens(directory, token_values, config, index)
  spec = dataclasses.replace(spec, trainable_token_indices=token_rows)
  if str(spec.init_lora_weights).startswith("pissa_niter_"):
    warnings.warn(
        f"{directory} was trained with init_lora_weights={spec.init_lora_weights!r}: its "
        "residual base came from a randomized SVD, which lojax (like PEFT on another seed) "
        "rebuilds with other random draws, so the loaded base differs from the trained one by "
        "the SVD's approximation error. For an exact file, export the adapter as plain LoRA "
        "(PEFT's path_initial_model_for_weight_conversion, lojax.save_peft(..., initial=)).",
        stacklevel=2)
  rebuilds = inits.rewrites_base(spec.init_lora_weights)
  if rebuilds and isinstance(params, LoraParams):
    raise ValueError(
        f"{directory} holds a {spec.init_lora_weights!r} adapter, trained on a base that its "
        "init rewrote; these LoraParams share their base with adapters "
        f"{list(params.meta.names)}, which would then compute another model. Load it onto the "
        "plain params, or load a plain LoRA conversion of it (PEFT's "
        "path_initial_model_for_weight_conversion, lojax.save_peft(..., initial=)).")
  # the factors come from the file; the base is rebuilt below for the file's layers only
  drawn = dataclasses.replace(spec, init_lora_weights=True, loftq_config={}) if rebuilds else spec
  wrapped = wrap(params, drawn, key=jax.random.key(0), adapter_name=adapter_name,
                 apply_fn=apply_fn, example_args=example_args, example_kwargs=example_kwargs)
  meta = wrapped.meta.adapter(adapter_name)
  problems: list[str] = []
  targets, weights = _fill_factors(meta.targets, contents.lora, meta.variant, mapping,
                                   problems)
  base = _rebuilt_base(wrapped.base, spec, targets) if rebuilds else wrapped.base
  _check_base_copies(contents.base_copies, base,
                     {t.leaf_path for t in targets} if rebuilds else set(), mapping, problems)
  bias = _fill_biases(meta.replace(targets=tuple(targets)), contents.biases, index.leaves,
                      problems)   # the targets' layers as the file has them
  saved = _fill_saved(wrapped.adapters[adapter_name]["modules_to_save"], contents.saved, problems)
  rows = _fill_saved(wrapped.adapters[adapter_name].get(model.TOKENS, {}), token_values, problems,
                     "trainable tokens")
  if problems:
    raise ValueError(f"The PEFT adapter in {directory} does not fit these params:\n" +
                     "\n".join(problems))
  return _assemble(wrapped, base, adapter_name, spec, targets, weights, bias, saved, rows)


def _file_tokens(directory, values, config, index: _TorchIndex):
  """The file's trainable token rows: ``({table leaf path: rows' values}, the spec's
  trainable_token_indices {module path: rows} or None)``."""
  cfg = config.get("trainable_token_indices")
  if not values and not cfg:
    return {}, None
  problems, out, rows = [], {}, {}
  for key, value in values.items():
    tn = key[len(PREFIX):-len(TOKENS_SUFFIX) - 1] if key.startswith(PREFIX) else None
    path = index.kernels.get(tn, (None,))[0] if tn is not None else None
    idx = (cfg if isinstance(cfg, list) else next(
        (v for k, v in (cfg or {}).items() if tn == k or tn.endswith("." + k)), None)
        if isinstance(cfg, dict) and tn is not None else None)
    if path is None or path not in index.tables:
      problems.append(f"  {key}: no embedding table of these params maps to {tn!r}")
    elif idx is None:
      problems.append(f"  {key}: the config's `trainable_token_indices` ({cfg!r}) names no rows "
                      f"for {tn!r}")
    else:
      leaf = index.tables[path]
      out[leaf], rows[path] = np.asarray(value), list(idx)
  if cfg and not values:
    problems.append(f"  the config trains tokens ({cfg!r}), but the file holds no "
                    f"`{TOKENS_SUFFIX}` tensor")
  if problems:
    raise ValueError(f"The PEFT adapter in {directory} does not fit these params:\n" +
                     "\n".join(problems))
  return out, rows


def _rebuilt_base(base, spec, targets):
  """``base`` with each target's kernel rewritten by ``spec``'s init (PiSSA's or OLoRA's
  residual, LoftQ's quantized kernel) in the target's layers, as PEFT does on load."""
  leaves = dict(zip(*P.flatten(base)[:2]))
  new = {t.leaf_path: inits.init_target(spec, jax.random.key(0), t, leaves[t.leaf_path],
                                        jnp.float32)[2] for t in targets}
  return replace_leaves(base, new)


def _spec_class(config: Mapping[str, Any]) -> type:
  """The spec class that reads this config's ``peft_type``; raises for other types."""
  classes = {cls.peft_type: cls for cls in spec_lib.spec_classes().values()}
  peft_type = config.get("peft_type")
  if peft_type not in classes:
    raise ValueError(f"`peft_type` {peft_type!r} in {CONFIG_NAME} is not supported; lojax "
                     f"reads {' and '.join(sorted(classes))} adapters.")
  return classes[peft_type]


def _refuse_unsupported(config: Mapping[str, Any], spec_class: type) -> None:
  """Raises, naming them, for config keys set to a value that lojax would have to ignore."""
  unset = (None, False, 0, "", [], {})
  bad = sorted(k for k, v in config.items()
               if k not in spec_class.peft_keys() and not any(v == u and type(v) is type(u)
                                                               for u in unset))
  if bad:
    shown = ", ".join(f"`{k}`={config[k]!r}" for k in bad)
    raise ValueError(f"{CONFIG_NAME} sets PEFT options lojax does not support: {shown}. "
                     "lojax would have to ignore them and compute another model. Nothing "
                     "was loaded.")


class _TorchIndex(NamedTuple):
  """The params seen by torch name: kernels (path, layer), modules, and leaves by path;
  ``pieces`` gives the torch modules of a fused kernel their (slice, number of slices)."""
  kernels: dict[str, tuple[str, int | None]]
  modules: dict[str, str]
  leaves: dict[str, Any]
  pieces: dict[str, tuple[int, int]]
  tied: dict[str, str]     # embedding tables the function also multiplies by (tied logits):
                           # module path -> leaf path
  parameters: dict[str, tuple[str, int]]   # the config's target parameters: kernel path ->
                                           # (leaf, number of experts)
  tables: dict[str, str]   # embedding tables: module path -> leaf path


def _torch_index(base, mapping: PeftMapping, config, *, apply_fn, example_args,
                 example_kwargs) -> _TorchIndex:
  """Torch names -> lojax paths, from the params and the mapping; a shared name is an error."""
  infos = kernel_paths(base, apply_fn=apply_fn, example_args=example_args,
                       example_kwargs=example_kwargs, kernel_names=mapping.kernel_names or None)
  leaf_paths, base_leaves, _ = P.flatten(base)
  clashes: list[str] = []
  kernels, pieces = _kernel_names(infos, mapping, clashes)
  parameters = _parameter_names(infos, mapping, config.get("target_parameters") or [], kernels,
                                clashes)
  modules = _module_names(leaf_paths, mapping, clashes)
  if clashes:
    raise ValueError("The mapping gives several modules the same torch name: " +
                     "; ".join(clashes) + ". Make `mapping.names` one-to-one.")
  tied = {p: f"{p}/{info['leaf']}" if info["leaf"] else p for p, info in infos.items()
          if info["tied"]}
  tables = {p: f"{p}/{info['leaf']}" if info["leaf"] else p for p, info in infos.items()
            if info["kind"] == "embed"}
  return _TorchIndex(kernels, modules, dict(zip(leaf_paths, base_leaves)), pieces, tied,
                     parameters, tables)


def _kernel_names(infos, mapping: PeftMapping, clashes: list[str]):
  """Torch name -> (kernel path, layer or None), one per layer of a stacked kernel (one per
  torch module of a fused one); and torch name -> (slice, slices) for the fused ones."""
  kernel_names: dict[str, tuple[str, int | None]] = {}
  pieces: dict[str, tuple[int, int]] = {}
  for path, info in infos.items():
    if _is_parameter_info(info):   # named by the config's target_parameters
      continue
    layers = [None] if not info["stacked"] else list(range(info["stacked"]))
    for layer in layers:
      fused = mapping.torch_names(path, layer)
      names = [mapping.torch_name(path, layer)] if fused is None else list(fused)
      for c, tn in enumerate(names):
        if tn is None:
          continue
        if tn in kernel_names:
          clashes.append(f"{tn} <- {kernel_names[tn]}, {(path, layer)}")
        kernel_names[tn] = (path, layer)
        if fused is not None:
          pieces[tn] = (c, len(fused))
  return kernel_names, pieces


def _is_parameter_info(info) -> bool:
  """:func:`_is_parameter` of a :func:`lojax.kernel_paths` entry."""
  return bool(info["expert_axes"]) or not info["leaf"]


def _parameter_names(infos, mapping: PeftMapping, entries: Sequence[str], kernels,
                     clashes: list[str]) -> dict[str, tuple[str, int]]:
  """Adds to ``kernels`` PEFT's module name of each target parameter the config's
  ``target_parameters`` select (PEFT's rule: the name, or a suffix of it after a "."), per
  layer; returns ``{kernel path: (leaf, number of experts)}`` of those kernels.

  Raises ValueError for an entry that selects nothing these params map to.
  """
  selected: dict[str, tuple[str, int | None]] = {}
  parameters: dict[str, tuple[str, int]] = {}
  hits = dict.fromkeys(entries, 0)
  for path, info in infos.items():
    if not _is_parameter_info(info):
      continue
    kernel_shape = info["shape"][1:] if info["stacked"] else info["shape"]
    for layer in [None] if not info["stacked"] else list(range(info["stacked"])):
      name = mapping.parameter_name(path, layer, info["leaf"])
      matched = [e for e in entries if name is not None and (name == e or
                                                             name.endswith("." + e))]
      for e in matched:
        hits[e] += 1
      if matched:
        selected[name] = (path, layer)
        parameters[path] = (info["leaf"], math.prod(kernel_shape[a] for a in info["expert_axes"]))
  if unmatched := [e for e, n in hits.items() if not n]:
    names = sorted(n for p, i in infos.items() if _is_parameter_info(i) for n in [
        mapping.parameter_name(p, 0 if i["stacked"] else None, i["leaf"])] if n)
    raise ValueError(
        f"`target_parameters` entries {unmatched} in {CONFIG_NAME} select no parameter that "
        f"these params map to (expert kernels and bare arrays found by use; they map to "
        f"{names[:8] or 'none'}). Pass the `mapping` the file was written with, and "
        "`apply_fn`/`example_args` so that lojax finds the expert kernels by tracing.")
  for name, wrapper in _wrappers(selected, mapping).items():
    if wrapper in kernels:
      clashes.append(f"{wrapper} <- {kernels[wrapper]}, {selected[name]}")
    kernels[wrapper] = selected[name]
  return parameters


def _module_names(leaf_paths, mapping: PeftMapping, clashes: list[str]) -> dict[str, str]:
  """Torch name -> module path, for every module of the params."""
  module_names: dict[str, str] = {}
  for module in P.module_paths(leaf_paths):
    tn = mapping.torch_name(module)
    if tn is not None:
      if tn in module_names and module_names[tn] != module:
        clashes.append(f"{tn} <- {module_names[tn]}, {module}")
      module_names.setdefault(tn, module)
  return module_names


class _FileTensors(NamedTuple):
  """The file's tensors sorted by role, keyed by lojax path."""
  lora: dict[str, dict[int | None, dict[str, np.ndarray]]]  # path -> layer -> part -> tensor
  biases: dict[str, dict[int | None, np.ndarray]]  # leaf path -> layer -> full value
  saved: dict[str, np.ndarray]  # leaf path -> modules_to_save value
  saved_modules: set[str]
  base_copies: list[_BaseCopy]   # checked against the base once it is wrapped
  fused: dict[str, tuple[int, float]]  # fused kernel path -> (joined rank, alpha of scaling 1)


def _sort_tensors(directory: str, tensors, config, index: _TorchIndex,
                  mapping: PeftMapping) -> _FileTensors:
  """Sorts the tensors into LoRA parts, biases and modules_to_save; lists every misfit."""
  problems: list[str] = []
  lora_parts, other = _split_lora(tensors, index, problems)
  tying = bool(config.get("ensure_weight_tying"))
  if tying:
    _drop_tied_copies(lora_parts, other, index, problems)
  found, fused = _lora_by_path(lora_parts, index, config, problems)
  for path in sorted(set(found) & set(index.tied)) if not tying else ():
    problems.append(
        f"  {path}: this embedding table also computes the logits (tied embeddings), and "
        "lojax adapts every use of a kernel, but PEFT (without `ensure_weight_tying`, its "
        "default) adapted the lookup only and left the tied head as it was: loading the file "
        "would give another model. Train it in PEFT without the embedding in "
        "`target_modules`, or on a model with untied embeddings.")
  biases, saved, saved_modules, base_copies = _sort_others(other, config.get("modules_to_save") or [], index,
                                              mapping, problems)
  if problems:
    raise ValueError(f"The PEFT adapter in {directory} does not fit these params with this "
                     "mapping:\n" + "\n".join(problems) + "\nPass the `mapping` it was "
                     "exported with and the matching base params.")
  if not found:
    raise ValueError(f"The PEFT adapter in {directory} holds no LoRA tensors.")
  return _FileTensors(found, biases, saved, saved_modules, base_copies, fused)


def _drop_tied_copies(lora_parts, other, index: _TorchIndex, problems: list[str]) -> None:
  """Checks and drops the tied head's copy of an embedding adapter (``ensure_weight_tying``).

  PEFT then saves, beside the table's ``lora_embedding_A/B``, the head's tied adapter
  (``lora_A.weight`` = ``lora_embedding_B`` transposed, ``lora_B.weight`` =
  ``lora_embedding_A`` transposed) and its ``base_layer.weight`` (the table): lojax's
  adapter of the table already computes both uses.
  """
  embeds = {tn: parts for tn, parts in lora_parts.items()
            if tn in index.kernels and index.kernels[tn][0] in index.tied
            and {"lora_embedding_A", "lora_embedding_B"} <= set(parts)}
  for tn, parts in list(lora_parts.items()):
    if tn in index.kernels or set(parts) != {"lora_A.weight", "lora_B.weight"}:
      continue
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    source = next((e for e, ep in embeds.items()
                   if a.shape == ep["lora_embedding_B"].T.shape and b.shape ==
                   ep["lora_embedding_A"].T.shape and np.array_equal(a, ep["lora_embedding_B"].T)
                   and np.array_equal(b, ep["lora_embedding_A"].T)), None)
    if source is None:
      continue
    del lora_parts[tn]
    copy = other.pop(f"{tn}.base_layer.weight", None)
    table = np.asarray(index.leaves[index.tied[index.kernels[source][0]]])
    if copy is not None and (copy.shape != table.shape or not np.array_equal(
        copy.astype(table.dtype), table)):
      problems.append(f"  {PREFIX}{tn}.base_layer.weight: the tied head's copy of the "
                      f"embedding table of {source} differs from the params' table")


def _split_lora(tensors, index: _TorchIndex, problems: list[str]):
  """``({torch module: {LoRA part: tensor}}, {name without prefix: tensor})``.

  ``<module>.lora_<part>`` is a LoRA part unless ``<module>`` is a module of the params that
  holds no kernel (then it is, e.g., a leaf of a saved module named ``lora_...``).
  """
  lora_parts: dict[str, dict[str, np.ndarray]] = {}
  other: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    if not key.startswith(PREFIX):
      problems.append(f"  {key}: does not start with {PREFIX!r}")
      continue
    rest = key[len(PREFIX):]
    value = np.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.floating) and not np.isfinite(value).all():
      problems.append(f"  {key}: holds {np.size(value) - np.isfinite(value).sum()} non-finite "
                      "values (NaN or inf)")
      continue
    m = _LORA_KEY.fullmatch(rest)
    if m and (m.group(1) in index.kernels or m.group(1) not in index.modules):
      if not jnp.issubdtype(value.dtype, jnp.floating):
        problems.append(f"  {key}: a {value.dtype} tensor; LoRA factors are floats")
        continue
      if value.ndim == 0:
        problems.append(f"  {key}: a 0-D tensor; LoRA tensors have at least one axis")
        continue
      lora_parts.setdefault(m.group(1), {})[m.group(2)] = value
    else:
      other[rest] = value
  return lora_parts, other


class _Pieces(NamedTuple):
  """One layer of a fused kernel in a PEFT file: its torch modules' tensors, by slice."""
  n: int                                        # the number of torch modules fused
  parts: dict[int, tuple[float, dict[str, np.ndarray]]]  # slice -> (scaling, PEFT tensors)

  def keys(self) -> set[str]:
    return {k for _, tensors in self.parts.values() for k in tensors}


def _rank_of(tensors: Mapping[str, np.ndarray]) -> int | None:
  a = tensors.get("lora_A", tensors.get("lora_A.weight", tensors.get("lora_embedding_A")))
  return None if a is None else int(a.shape[0])


def _lora_by_path(lora_parts, index: _TorchIndex, config, problems: list[str]):
  """The LoRA parts keyed by kernel path, then layer (None if not stacked): a dict of PEFT
  tensors, or :class:`_Pieces` for a fused kernel; and ``{path: (rank, alpha)}`` of the
  fused kernels, whose torch modules' adapters are joined into one of scaling 1."""
  found: dict[str, dict[int | None, Any]] = {}
  fused: dict[str, dict[int | None, dict[int, tuple[str, dict]]]] = {}
  for tn, parts in lora_parts.items():
    if tn not in index.kernels:
      problems.append(f"  {tn}: no kernel of these params maps to this name")
      continue
    path, layer = index.kernels[tn]
    if tn in index.pieces:
      fused.setdefault(path, {}).setdefault(layer, {})[index.pieces[tn][0]] = (tn, parts)
    else:
      found.setdefault(path, {})[layer] = parts
  alpha0, rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora"))
  joined = {}
  for path, layers in fused.items():
    found[path], rank = {}, 0
    for layer, pieces in layers.items():
      parts = {}
      for c, (tn, tensors) in sorted(pieces.items()):
        r = _rank_of(tensors) or 1
        alpha = _peft_lookup(config.get("alpha_pattern"), tn, alpha0)
        parts[c] = (alpha / (r ** 0.5 if rslora else r), tensors)
      n = index.pieces[next(iter(pieces.values()))[0]][1]
      found[path][layer] = _Pieces(n, parts)
      rank = max(rank, sum(_rank_of(x) or 0 for _, x in parts.values()))
    joined[path] = (rank, rank ** 0.5 if rslora else float(rank))
  return found, joined


def _joined(t, pieces: _Pieces, variant) -> dict[str, np.ndarray]:
  """One layer of a fused kernel's adapter from its torch modules' adapters (exact).

  Module ``c``'s adapter, at scaling 1 (:meth:`Variant.unscaled`), fills slice ``c`` of
  every parameter axis laid out along the fused kernel axis, and its own block of the rank
  axis: ``A = [A_1 | A_2 | ...]``, ``B`` block-diagonal, so the delta of slice ``c`` is
  module ``c``'s. A module absent from the file gets rank 0 there (its slice keeps the
  base); the rank is zero-padded to ``t.r``. Raises ValueError if the tensors do not fit.
  """
  entries, offsets, ranks, offset = {}, {}, {}, 0
  for c, (s, tensors) in pieces.parts.items():
    r = ranks[c] = _rank_of(tensors)
    piece_t = _piece_target(variant, t, pieces.n, r=r)
    entry = variant.from_peft(piece_t, tensors)
    if entry is None:
      raise ValueError(f"slice {c} has incomplete factors ({sorted(tensors)})")
    entries[c], offsets[c] = variant.unscaled(piece_t, entry, s), offset
    offset += r
  if offset > t.r:
    raise ValueError(f"its torch modules' ranks sum to {offset}, more than {t.r}")
  out = {}
  for k, roles in variant.layout(t).items():
    roles = tuple(x for x in roles if x != model.LAYER)
    full = np.zeros(t.shape_of(roles), np.result_type(*(e[k] for e in entries.values())))
    on_rank, on_slice = model.RANK in roles, 0 in roles
    if on_slice and not on_rank and len(entries) != pieces.n:
      raise ValueError(f"{k} has one value per output of every fused module, and the file "
                       f"adapts only {len(entries)} of the {pieces.n}")
    for c, e in entries.items():
      at = [slice(None)] * len(roles)
      if on_rank:
        at[roles.index(model.RANK)] = slice(offsets[c], offsets[c] + ranks[c])
      if on_slice:
        at[roles.index(0)] = c
      full[tuple(at)] = e[k]
    out[k] = full
  return out


class _BaseCopy(NamedTuple):
  """A copy of a base weight PEFT writes beside the adapter (checked after wrapping)."""
  name: str            # the tensor's name in the file
  leaf_path: str       # the lojax leaf it copies
  layer: int | None    # its layer, if the leaf is stacked
  value: np.ndarray


def _base_copy(rest: str, module_t: str, leaf_t: str, value, index: _TorchIndex,
               mapping: PeftMapping, problems: list[str]) -> _BaseCopy | bool:
  """Whether tensor ``rest`` is a copy of a base weight PEFT writes beside the adapter.

  PEFT writes ``<module>.base_layer.weight`` for a targeted embedding or head (its
  ``save_embedding_layers``) and, with ``bias="all"``, ``<module>.original_module.bias``
  for a saved module. lojax keeps the base it is given (rebuilt by a PiSSA/OLoRA/LoftQ init),
  so such a copy must equal that base leaf (:func:`_check_base_copies`). Returns the copy,
  True after a problem, or False when ``rest`` is no such copy.
  """
  owner, suffix = module_t.rpartition(".")[::2]
  if suffix == "base_layer" and leaf_t != "bias" and owner in index.kernels:
    module, layer = index.kernels[owner]
  elif suffix == "original_module" and owner in index.modules:
    module, layer = index.modules[owner], None
  else:
    return False
  leaf = _flax_leaf(module, leaf_t, index.leaves, mapping)
  if leaf is None:
    problems.append(f"  {PREFIX}{rest}: a copy of a base weight that these params do not have")
    return True
  return _BaseCopy(PREFIX + rest, f"{module}/{leaf}", layer, np.asarray(value))


def _check_base_copies(copies: Sequence[_BaseCopy], base, rebuilt: set[str],
                       mapping: PeftMapping, problems: list[str]) -> None:
  """Each copy equals the base leaf (after the torch layout); to float32 rounding where the
  leaf was rebuilt from the original by the init (``rebuilt``)."""
  leaves = dict(zip(*P.flatten(base)[:2]))
  for c in copies:
    module = P.split(c.leaf_path)[0]
    want = np.asarray(model.decode(leaves[c.leaf_path]), np.float32)
    want = want if c.layer is None else want[c.layer]
    _, want = _saved_leaf(mapping, module, c.leaf_path, want)
    got = np.asarray(c.value, np.float32)
    if c.leaf_path in rebuilt:
      same = got.shape == want.shape and np.allclose(
          got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max(initial=0.0)))
    else:
      same = got.shape == want.shape and np.array_equal(got, want)
    if not same:
      how = " as the file's init rebuilds it" if c.leaf_path in rebuilt else ""
      problems.append(f"  {c.name}: the file's copy of the base weight {c.leaf_path} differs "
                      f"from the params'{how} (the adapter was trained on another base); "
                      "lojax does not replace base weights")


def _sort_others(other, saved_entries, index: _TorchIndex, mapping: PeftMapping,
                 problems: list[str]):
  """The non-LoRA tensors as bias values and modules_to_save leaves (Flax layout)."""
  bias_values: dict[str, dict[int | None, np.ndarray]] = {}
  saved_values: dict[str, np.ndarray] = {}
  saved_modules: set[str] = set()
  base_copies: list[_BaseCopy] = []
  for rest, value in other.items():
    module_t, _, leaf_t = rest.rpartition(".")
    if copy := _base_copy(rest, module_t, leaf_t, value, index, mapping, problems):
      if isinstance(copy, _BaseCopy):
        base_copies.append(copy)
      continue
    if module_t.endswith(".modules_to_save"):  # bias="all": the saved copy's leaf, twice
      twin = f"{module_t[: -len('.modules_to_save')]}.{leaf_t}"
      if twin not in other or not np.array_equal(np.asarray(other[twin]), np.asarray(value)):
        problems.append(f"  {PREFIX}{rest}: differs from (or has no) {PREFIX}{twin}, the saved "
                        "module's own copy")
      continue
    if module_t.endswith(".base_layer") and leaf_t == "bias":  # bias of an adapted module
      module_t = module_t[: -len(".base_layer")]
      if module_t in index.kernels:
        path, layer = index.kernels[module_t]
        bias_values.setdefault(f"{path}/bias", {})[layer] = value
      else:
        problems.append(f"  {PREFIX}{rest}: no kernel of these params maps to {module_t!r}")
      continue
    # PEFT wraps every module whose name ends with an entry, at any character ("norm" also
    # saves "input_layernorm"): read its files by its rule
    owner = next((a for a in _ancestors(module_t) if a in index.modules and any(
        a.endswith(e) for e in saved_entries)), None)
    if owner is None and leaf_t == "bias" and module_t in index.modules:
      bias_values.setdefault(f"{index.modules[module_t]}/bias", {})[None] = value
      continue
    if owner is None or module_t not in index.modules:
      problems.append(f"  {PREFIX}{rest}: not a LoRA tensor, and no module of these params "
                      "(bias or modules_to_save) maps to it")
      continue
    saved_modules.add(index.modules[owner])
    lojax_module = index.modules[module_t]
    leaf = _flax_leaf(lojax_module, leaf_t, index.leaves, mapping)
    if leaf is None:
      problems.append(f"  {PREFIX}{rest}: {lojax_module} has no leaf for {leaf_t!r}")
      continue
    if leaf in mapping.matmul_leaves and value.ndim == 2 and mapping.transposed(lojax_module):
      value = value.T
    saved_values[f"{lojax_module}/{leaf}"] = value
  return bias_values, saved_values, saved_modules, base_copies


def _spec_from_file(spec_class, config, contents: _FileTensors, index: _TorchIndex,
                    mapping: PeftMapping):
  """A spec that selects exactly the modules in the file, with the file's ranks and alphas."""
  found = contents.lora
  alpha0 = config.get("lora_alpha", 8)
  ranks, alpha_pattern = {}, {}
  for path, layers in found.items():
    if path in contents.fused:
      ranks[path], alpha = contents.fused[path]
    else:
      leaf, experts = index.parameters.get(path, (None, 1))
      name = (mapping.torch_name(path, next(iter(layers))) if leaf is None else
              mapping.parameter_name(path, next(iter(layers)), leaf))
      alpha = _peft_lookup(config.get("alpha_pattern"), name, alpha0)
      if (r := _rank_of(next(iter(layers.values())))) is not None:
        ranks[path] = max(r // experts, 1)   # a target parameter's lora_A is [E*r, in]
    if alpha != alpha0:
      alpha_pattern[re.escape(path)] = alpha
  fields = dict(
      lora_alpha=alpha0, use_rslora=bool(config.get("use_rslora", False)),
      target_modules=sorted(found), alpha_pattern=alpha_pattern,
      lora_dropout=float(config.get("lora_dropout") or 0.0), bias=config.get("bias", "none"),
      modules_to_save=sorted(contents.saved_modules) or None,
      kernel_names=mapping.kernel_names or None,
      task_type=config.get("task_type") if config.get("task_type") in
      [t.value for t in spec_lib.TaskType] else None)
  return spec_class.from_peft_fields(config, fields, ranks)


def _fill_factors(targets, found, variant, mapping: PeftMapping, problems: list[str]):
  """The file's factors of the spec's targets: ``(targets, {path: factors})``."""
  kept, weights = [], {}
  for t in targets:
    layers = found.get(t.path)
    if layers is None:
      problems.append(f"  {t.path}: selected by the spec but absent from the file")
      continue
    filled = _target_factors(t, layers, variant, mapping, problems)
    if filled is not None:
      t, entry = filled
      weights[t.path] = entry
      kept.append(t)
  return kept, weights


def _target_factors(t, layers, variant, mapping: PeftMapping, problems: list[str]):
  """``(target, factors)`` of one target from its file tensors; None after a problem."""
  try:
    to_peft, from_peft = _peft_io(variant, t, mapping)
  except ValueError as e:
    problems.append(f"  {e}")
    return None
  if t.stacked:
    kept = tuple(sorted(layers))
    t = dataclasses.replace(t, layers=None if len(kept) == t.stacked else kept)
  order = [None] if not t.stacked else list(t.layers or range(t.stacked))
  keys = lambda x: x.keys() if isinstance(x, _Pieces) else set(x)
  try:
    per = [None if i not in layers else _joined(t, layers[i], variant)
           if isinstance(layers[i], _Pieces) else from_peft(t, layers[i])
           for i in order]
  except ValueError as e:  # a reshape that does not fit, or a kernel PEFT cannot adapt so
    shapes = {k: v.shape for i in order if isinstance(layers.get(i), dict)
              for k, v in layers[i].items()}
    problems.append(f"  {t.path}: file gives shapes {shapes or 'of fused modules'}, which do "
                    f"not fit the kernel {t.shape} (in axes {t.in_axes}): {e}")
    return None
  if any(p is None for p in per):
    have = sorted({k for i in order if i in layers for k in keys(layers[i])})
    problems.append(f"  {t.path}: incomplete factors in the file (it has {have})")
    return None
  t = variant.peft_target(t, per[0])
  used = set(to_peft(t, per[0]))
  if extra := sorted({k for i in order for k in keys(layers[i])} - used):
    problems.append(f"  {t.path}: the file has {extra}, which a {variant.name} adapter does "
                    f"not hold (it holds {sorted(used)}); check `peft_type` and `use_dora` in "
                    f"{CONFIG_NAME}")
    return None
  want = variant.shapes(t)
  got = {k: [p[k] for p in per] for k in want}
  return t, _checked_entry(t, got, want, problems)


def _checked_entry(t, got, want, problems: list[str]) -> dict[str, jax.Array]:
  """The factors (stacked if ``t`` is), reporting each shape that differs from ``want``."""
  entry = {}
  for k, xs in got.items():
    x = np.stack(xs) if t.stacked else xs[0]
    if x.shape != want[k]:
      problems.append(f"  {t.path} {k}: file gives shape {x.shape} (Flax layout), the "
                      f"kernel {t.shape} needs {want[k]}")
    entry[k] = jnp.asarray(x)
  return entry


def _fill_biases(meta, values, leaves, problems: list[str]) -> dict[str, jax.Array]:
  """Bias deltas (file value - params) of the spec's bias leaves; zero where the file has none.

  A bias the spec does not train must equal the params' (it is then a harmless copy). A
  stacked bias trained in some layers only (``meta.bias_layers``) takes those layers.
  """
  bias_paths = meta.bias_paths
  bias = {}
  for p in sorted(set(values) - set(bias_paths)):
    b = np.asarray(leaves[p]) if p in leaves else None
    if b is None or not all(np.array_equal(v, b if i is None else b[i])
                            for i, v in values[p].items()):
      problems.append(f"  {p}: the file holds a trained bias for it, but the config's `bias` "
                      "does not train it; set `bias` in adapter_config.json to the mode it was "
                      "trained with ('lora_only' or 'all')")
  for p in bias_paths:
    value = values.get(p)
    b = np.asarray(leaves[p])
    layers = meta.bias_layers(p)
    if layers is not None:
      b = b[np.asarray(layers)]
      if value is not None and set(value) != set(layers):
        problems.append(f"  {p}: file gives the bias of layers {sorted(value)}, the adapter "
                        f"trains layers {list(layers)}")
        continue
    if value is None:
      bias[p] = jnp.zeros(b.shape, b.dtype)
      continue
    full = np.stack([value[i] for i in sorted(value)]) if None not in value else value[None]
    if full.shape != b.shape:
      problems.append(f"  {p}: file gives shape {full.shape}, params have {b.shape}")
      continue
    bias[p] = jnp.asarray((full.astype(b.dtype) - b).astype(b.dtype))
  return bias


def _fill_saved(copies, values, problems: list[str],
                what: str = "modules_to_save") -> dict[str, jax.Array]:
  """The file's values of the ``modules_to_save`` copies (or trainable token rows), in the
  params' dtypes."""
  saved = {}
  for p, x in copies.items():
    value = values.get(p)
    if value is None or value.shape != np.shape(x):
      problems.append(f"  {what} {p}: file gives "
                      f"{'nothing' if value is None else value.shape}, params have "
                      f"{np.shape(x)}")
      continue
    saved[p] = jnp.asarray(value.astype(np.asarray(x).dtype))
  return saved


def _assemble(wrapped: LoraParams, base, adapter_name: str, spec, targets, weights, bias,
              saved, rows) -> LoraParams:
  """``wrapped`` on ``base`` with adapter ``adapter_name`` holding the file's weights and
  targets."""
  meta = wrapped.meta.adapter(adapter_name)
  new_ad = dict(wrapped.adapters[adapter_name], lora=weights, bias=bias, modules_to_save=saved)
  if rows:
    new_ad[model.TOKENS] = rows
  new_ad.update(spec.variant().peft_state(spec))
  new_meta = AdapterMeta(meta.name, spec, tuple(targets), meta.modules_to_save,
                         meta.bias_paths, meta.heads, meta.tokens)
  metas = tuple(new_meta if m.name == adapter_name else m for m in wrapped.meta.adapters)
  return LoraParams(base, dict(wrapped.adapters, **{adapter_name: new_ad}),
                    LoraMeta(metas, wrapped.meta.active))


def _ancestors(name: str) -> list[str]:
  """``name`` and its enclosing torch module names, innermost first."""
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _flax_leaf(module: str, torch_leaf: str, base_by_path, mapping: PeftMapping) -> str | None:
  """The one Flax leaf of ``module`` that torch leaf ``torch_leaf`` names, or None."""
  hits = [c for c in mapping.flax_leaves(torch_leaf) if f"{module}/{c}" in base_by_path]
  return hits[0] if len(hits) == 1 else None
