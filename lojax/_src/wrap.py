"""``wrap``: add a named adapter to a param tree (the orchestration).

The steps, each a function below: find the base (plain params, or the base
of a :class:`LoraParams` that gets another adapter) → learn how the function
uses each kernel (:mod:`analysis`) → choose the targets (:mod:`matcher`) →
let the adapter's variant initialise each target (and rewrite or quantize its
base kernel) → collect bias deltas and ``modules_to_save`` copies → assemble
the :class:`LoraParams`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import analysis
from lojax._src import inits
from lojax._src import matcher
from lojax._src import model
from lojax._src import paths as P
from lojax._src import quant
from lojax._src import spec as spec_lib
from lojax._src import tokens
from lojax._src.model import DEFAULT_ADAPTER, AdapterMeta, LoraMeta, LoraParams, TargetMeta


def wrap(params: Any, spec: Any, /, *, key: jax.Array, adapter_name: str = DEFAULT_ADAPTER,
         apply_fn: Callable | None = None, example_args: Sequence[Any] = (),
         example_kwargs: Mapping[str, Any] | None = None, dtype: Any = jnp.float32,
         quantize: str | None = None) -> LoraParams:
  """Adds LoRA adapters to a param tree.

  Args:
    params: any param pytree (a linen variables dict, an NNX ``State``, a plain
      dict), or a :class:`LoraParams` to add another named adapter to (it
      starts inactive; see :func:`lojax.set_adapter`).
    spec: a :class:`lojax.LoraSpec` choosing and configuring the targets.
    key: PRNG key for the adapters' initialisation.
    adapter_name: name of the new adapter.
    apply_fn: optional; the function that consumes the params, e.g.
      ``model.apply``. When given, lojax traces it once with abstract inputs
      to learn each kernel's input/output axes, conv/embedding use and stacked
      layer axes — required for N-D kernels (DenseGeneral, einsum, conv,
      ``nn.scan``) unless ``spec.kernel_axes`` names their input axes.
    example_args: positional inputs for ``apply_fn`` after the params (arrays
      or ``jax.ShapeDtypeStruct``).
    example_kwargs: keyword inputs for ``apply_fn``.
    dtype: dtype of the adapter weights (float32 by default).
    quantize: ``"nf4"``, ``"nf4-dq"`` (NF4 with double-quantized scales) or
      ``"int8"`` to store the targeted dense kernels of the base quantized
      (QLoRA); they are dequantized inside the wrapped function. Only when
      wrapping plain params.

  Returns:
    A :class:`LoraParams` whose ``trainable`` part holds the new adapter. For
    ``init_lora_weights`` "pissa", "pissa_niter_<K>" and "olora" its ``base``
    holds the residual kernels (the model's output at init is unchanged), for
    "loftq" the quantized LoftQ kernels; other leaves are shared with
    ``params``, which is never modified.

  Raises:
    ValueError: a target matches nothing, is not a matmul/conv/embedding
      kernel, its layout cannot be determined, the adapter name is taken, or
      the init / quantization does not fit a target.

  >>> import jax, jax.numpy as jnp, lojax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> lora.trainable["default"]["lora"]["dense"]["lora_A"].shape
  (4, 2)
  >>> lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]), key=jax.random.key(0),
  ...            quantize="nf4").base["dense"]["kernel"]
  QuantizedArray(nf4, shape=(4, 3), dtype=float32, 36 bytes)
  """
  if not isinstance(spec, spec_lib.LoraSpec):
    raise TypeError(f"`spec` must be a lojax.LoraSpec, got {type(spec).__name__}.")
  dtype = _check_args(key, adapter_name, apply_fn, example_args, example_kwargs, dtype)
  existing, base = _base_of(params, spec, adapter_name, quantize)
  targets, resolution, tables = _targets(base, spec, apply_fn, tuple(example_args),
                                         example_kwargs)
  token_rows = tokens.resolve(spec, tables, targets)
  paths, leaves, _ = P.flatten(base)
  by_path = dict(zip(paths, leaves))
  variant = spec.variant()
  problems = [p for t in targets for p in _check_kernel(t, by_path[t.leaf_path])
              + variant.check_target(t) + inits.check(spec, t, by_path[t.leaf_path], quantize)]
  if problems:
    raise ValueError("Cannot initialise these targets:\n" + "\n".join(problems) +
                     "\nExclude them from `target_modules` (e.g. with `exclude_modules`) or "
                     "change the init / quantization.")
  inits.warn_loftq_scaling(spec, targets)
  if type(variant).bias_delta is not model.Variant.bias_delta and (
      nobias := [t.path for t in targets if t.bias_path not in by_path]):
    warnings.warn(f"lojax: `lora_bias=True`, but {len(nobias)} targeted module(s) have no bias "
                  f"leaf ({', '.join(nobias[:4])}{' ...' if len(nobias) > 4 else ''}): their "
                  "LoRA bias trains and applies, but lojax.merge cannot fold it (as in PEFT).",
                  stacklevel=2)
  factors, rewritten = {}, {}
  for t in targets:  # one kernel at a time: its NumPy work copies are freed before the next
    factors[t.path], new = variant.init(spec, key, t, by_path[t.leaf_path], dtype, quantize)
    if new is not None:
      rewritten[t.leaf_path] = new
  meta = AdapterMeta(adapter_name, spec, tuple(targets), resolution.modules_to_save,
                     resolution.bias_paths, tuple(resolution.heads), token_rows)
  if saved := [p for p, _ in token_rows if any(P.is_under(p, m) for m in meta.modules_to_save)]:
    raise ValueError(f"{saved}: trained in full (modules_to_save) and with trainable tokens; "
                     "pick one.")
  adapter = {model.LORA: factors,
             model.BIAS: {p: inits.zeros(meta.bias_shape(p, np.shape(by_path[p])),
                                         by_path[p].dtype) for p in resolution.bias_paths},
             model.SAVED: {p: jnp.array(by_path[p], copy=True) for p in paths
                           if any(P.is_under(p, m) for m in resolution.modules_to_save)},
             **({model.TOKENS: tokens.init(meta, by_path, dtype)} if token_rows else {}),
             **variant.adapter_state(spec)}
  base = replace_leaves(base, rewritten)
  if existing is None:
    return LoraParams(base, {adapter_name: adapter}, LoraMeta((meta,), (adapter_name,)))
  return existing.with_adapter(meta, adapter)


def check_trace_args(apply_fn, example_args, example_kwargs) -> None:
  """Raises lojax's TypeError unless the arguments that trace the model have their types."""
  if apply_fn is not None and not callable(apply_fn):
    raise TypeError(f"`apply_fn` must be the function that consumes the params (e.g. "
                    f"model.apply) or None, got {type(apply_fn).__name__}.")
  if not isinstance(example_args, (tuple, list)):
    raise TypeError(f"`example_args` must be a tuple of the inputs after the params, e.g. "
                    f"`example_args=(x,)`, got {type(example_args).__name__}.")
  if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
    raise TypeError(f"`example_kwargs` must be a dict or None, got "
                    f"{type(example_kwargs).__name__}.")


def _check_args(key, adapter_name, apply_fn, example_args, example_kwargs, dtype):
  """Raises lojax's TypeError / ValueError for a wrong keyword argument; returns the dtype."""
  if not model.is_prng_key(key):
    raise TypeError(f"`key` must be a JAX PRNG key such as jax.random.key(0), got "
                    f"{type(key).__name__} {key!r:.60}.")
  if not isinstance(adapter_name, str) or not adapter_name:
    raise TypeError(f"`adapter_name` must be a non-empty str, got {adapter_name!r}.")
  check_trace_args(apply_fn, example_args, example_kwargs)
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"`dtype` (of the adapter weights) must be a float dtype such as "
                    f"jnp.float32 or jnp.bfloat16, got {dtype!r}.")
  return dt


def _check_kernel(t, leaf) -> list[str]:
  """Why kernel ``t`` cannot be adapted at all: an integer or bool kernel, a zero-size axis."""
  bad = []
  if not jnp.issubdtype(leaf.dtype, jnp.floating):   # a quantized base has its float dtype
    bad.append(f"  {t.path}: the kernel holds {leaf.dtype} values; only float kernels can be "
               "adapted")
  if 0 in t.shape:
    bad.append(f"  {t.path}: the kernel has a zero-size axis (shape {t.shape}); there is "
               "nothing to adapt")
  return bad


def _base_of(params, spec, adapter_name: str, quantize: str | None):
  """``(existing LoraParams or None, base tree)``; checks the name, ``quantize`` and the init."""
  if quantize is not None:
    quant.check_method(quantize)
  if not isinstance(params, LoraParams):
    _check_plain(params)
    return None, params
  if adapter_name in params.meta.names:
    raise ValueError(
        f"These params already carry an adapter named {adapter_name!r} (adapters: "
        f"{list(params.meta.names)}). Pass `adapter_name=` with a new name to add another "
        "adapter, or wrap the original params.")
  if quantize is not None:
    raise ValueError(
        f"`quantize={quantize!r}` is only for wrapping plain params: the base of these "
        "LoraParams is shared with their adapters. Pass `quantize=` on the first lojax.wrap.")
  if inits.rewrites_base(spec.init_lora_weights):
    raise ValueError(
        f"`init_lora_weights={spec.init_lora_weights!r}` rewrites the base kernels it adapts, "
        f"and the base of these LoraParams is shared with their adapters "
        f"{list(params.meta.names)}, which would then compute another model. Wrap the plain "
        "params, or give this adapter another init. (PiSSA and OLoRA adapters can be "
        "exported as plain LoRA adapters: lojax.save_peft(..., initial=...).)")
  return params, params.base


def _targets(base, spec, apply_fn, example_args, example_kwargs):
  """The :class:`TargetMeta` of every selected kernel, the matcher's resolution, and the
  embedding tables ``{module path: (leaf path, shape)}``."""
  infos, layouts = analysis.kernel_infos(base, spec, apply_fn, example_args, example_kwargs)
  paths, leaves, _ = P.flatten(base)
  leaf_shapes = {p: tuple(np.shape(x)) for p, x in zip(paths, leaves)}
  try:
    resolution = matcher.resolve(spec, infos, P.module_paths(paths), leaf_shapes)
  except ValueError as e:
    unknown = [i.path for i in infos if i.kind == "unknown"]
    if unknown and apply_fn is None:
      raise ValueError(
          f"{e}\nNote: the layout of {len(unknown)} N-D kernel(s) is unknown without tracing "
          f"(e.g. {', '.join(unknown[:3])}), so they are neither linear nor stacked for "
          "targeting. Pass `apply_fn=model.apply, example_args=(x,)` to lojax.wrap.") from None
    raise
  info = {i.path: i for i in infos}
  _check_layouts(resolution, layouts, info, apply_fn is not None)
  targets = []
  for t in resolution.targets:
    use = layouts[t.path]
    targets.append(TargetMeta(
        path=t.path, leaf=info[t.path].leaf, shape=info[t.path].shape, kind=use.kind,
        in_axes=use.in_axes, stacked=use.stacked, layers=t.layers, r=t.r, alpha=t.alpha,
        scaling=t.scaling, dropout=spec.lora_dropout, expert_axes=use.expert_axes))
  tables = {i.path: (f"{i.path}/{i.leaf}" if i.leaf else i.path, i.shape) for i in infos
            if (layouts[i.path].kind if i.path in layouts else i.kind) == "embed"}
  return targets, resolution, tables


def replace_leaves(tree, new: Mapping[str, Any]):
  """``tree`` with the leaves at the paths of ``new`` replaced."""
  if not new:
    return tree
  paths, leaves, treedef = P.flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, [new.get(p, x) for p, x in zip(paths, leaves)])


def kernel_paths(params: Any, /, *, apply_fn: Callable | None = None,
                 example_args: Sequence[Any] = (), example_kwargs: Mapping[str, Any] | None = None,
                 kernel_names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  """The module paths that hold kernels, with what lojax knows about each.

  Use it to write ``target_modules`` before wrapping. With ``apply_fn`` the
  layouts come from tracing, as in :func:`wrap`; ``kernel_names`` adds leaf
  names that mark a kernel, as :attr:`LoraSpec.kernel_names` does.

  Returns:
    A dict, module path -> ``{"leaf", "shape", "kind", "in_axes", "expert_axes",
    "stacked", "tied"}``, where kind is dense, conv, embed, unknown (N-D kernel not
    traced) or unused, ``expert_axes`` are the axes that index a MoE layer's
    experts (each expert gets its own factors), and ``tied`` says that an
    embedding table is also multiplied by (tied output logits: lojax adapts
    both uses).

  >>> import jax.numpy as jnp, lojax
  >>> lojax.kernel_paths({"enc": {"query": {"kernel": jnp.ones((4, 2))}}})
  {'enc/query': {'leaf': 'kernel', 'shape': (4, 2), 'kind': 'dense', 'in_axes': (0,), 'expert_axes': (), 'stacked': None, 'tied': False}}
  """
  check_trace_args(apply_fn, example_args, example_kwargs)
  spec = spec_lib.LoraSpec(target_modules="all-linear", kernel_names=kernel_names)
  infos, layouts = analysis.kernel_infos(params, spec, apply_fn, tuple(example_args),
                                         example_kwargs)
  return {i.path: {"leaf": i.leaf, "shape": i.shape, "kind": layouts[i.path].kind,
                   "in_axes": layouts[i.path].in_axes,
                   "expert_axes": layouts[i.path].expert_axes, "stacked": layouts[i.path].stacked,
                   "tied": layouts[i.path].tied}
          for i in infos}


def _check_plain(base):
  paths, _, _ = P.flatten(base)
  nested = [p for p in paths if any(c in ("lora_A", "lora_B") for c in p.split("/"))]
  if nested:
    raise ValueError(
        "These params already contain LoRA factors at "
        f"{nested[:10]}{' …' if len(nested) > 10 else ''}; lojax never adapts adapters. "
        "Pass the LoraParams returned by lojax.wrap (with a new `adapter_name`) or the "
        "original base params.")


def _check_layouts(resolution, layouts, info, traced: bool):
  bad = [f"  {t.path} (shape {info[t.path].shape}): {layouts[t.path].reason}"
         for t in resolution.targets if layouts[t.path].kind in ("unknown", "unused")]
  if bad:
    hint = ("Give `spec.kernel_axes={pattern: input axes}` for these kernels." if traced else
            "Pass `apply_fn=model.apply, example_args=(x,)` to lojax.wrap so lojax can trace "
            "how each kernel is contracted, or give `spec.kernel_axes={pattern: input axes}`.")
    raise ValueError("Cannot adapt these kernels:\n" + "\n".join(bad) + "\n" + hint)
