"""The LoRA tree: a frozen base plus named adapters, and ``wrap``."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import adalora
from lojax._src import analysis
from lojax._src import dora
from lojax._src import inits
from lojax._src import matcher
from lojax._src import paths as P
from lojax._src import quant
from lojax._src import spec as spec_lib

DEFAULT_ADAPTER = "default"


@dataclasses.dataclass(frozen=True)
class TargetMeta:
  """Static description of one adapted kernel."""
  path: str                      # module path, e.g. "params/h_0/attn/c_attn"
  leaf: str                      # "kernel" or "embedding"
  shape: tuple[int, ...]         # full leaf shape (leading layer axis included if stacked)
  kind: str                      # dense | conv | embed
  in_axes: tuple[int, ...]       # per-layer kernel axes on the input side
  stacked: int | None            # number of stacked layers, if any
  layers: tuple[int, ...] | None  # adapted layers of a stacked kernel (None: all)
  r: int
  alpha: float
  scaling: float
  dropout: float

  @property
  def leaf_path(self) -> str:
    return f"{self.path}/{self.leaf}"

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape

  @property
  def out_axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(len(self.kernel_shape)) if a not in self.in_axes)

  @property
  def n_layers(self) -> int | None:
    if not self.stacked:
      return None
    return len(self.layers) if self.layers is not None else self.stacked

  def a_shape(self) -> tuple[int, ...]:
    lead = (self.n_layers,) if self.stacked else ()
    return lead + tuple(self.kernel_shape[a] for a in self.in_axes) + (self.r,)

  def b_shape(self) -> tuple[int, ...]:
    lead = (self.n_layers,) if self.stacked else ()
    return lead + (self.r,) + tuple(self.kernel_shape[a] for a in self.out_axes)

  def sides(self) -> tuple[str, ...]:
    per = tuple("I" if a in self.in_axes else "O" for a in range(len(self.kernel_shape)))
    return (("L",) if self.stacked else ()) + per


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
  name: str
  spec: Any
  targets: tuple[TargetMeta, ...]
  modules_to_save: tuple[str, ...]
  bias_paths: tuple[str, ...]
  heads: tuple[str, ...] = ()

  def target(self, path: str) -> TargetMeta:
    for t in self.targets:
      if t.path == path:
        return t
    raise KeyError(path)


@dataclasses.dataclass(frozen=True)
class LoraMeta:
  adapters: tuple[AdapterMeta, ...]
  active: tuple[str, ...]

  def adapter(self, name: str) -> AdapterMeta:
    for a in self.adapters:
      if a.name == name:
        return a
    names = [a.name for a in self.adapters]
    raise ValueError(f"No adapter named {name!r}; this LoRA tree has adapters {names}.")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(a.name for a in self.adapters)


@jax.tree_util.register_pytree_with_keys_class
class LoraParams:
  """A frozen base param tree plus named LoRA adapters (a pytree).

  Attributes:
    base: the original param tree, never modified by training.
    adapters: ``{name: {"lora": {module path: {"lora_A", "lora_B"}},
      "bias": {leaf path: delta}, "modules_to_save": {leaf path: array}}}``.
      Bias entries are *deltas* added to the base bias; modules_to_save
      entries are full trainable copies of the saved modules' leaves.
    meta: static description (specs, targets, active adapters).

  ``lora.trainable`` is the subtree to differentiate and optimise (the active
  adapters); ``lora.with_trainable(t)`` puts an updated one back.
  """

  def __init__(self, base, adapters, meta: LoraMeta):
    self.base = base
    self.adapters = adapters
    self.meta = meta

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("base"), self.base),
            (jax.tree_util.GetAttrKey("adapters"), self.adapters)), self.meta

  @classmethod
  def tree_unflatten(cls, meta, children):
    return cls(children[0], children[1], meta)

  @property
  def trainable(self) -> dict:
    """The trainable part: ``{active adapter name: its params}``."""
    return {name: self.adapters[name] for name in self.meta.active}

  def with_trainable(self, trainable: Mapping) -> "LoraParams":
    """Returns a copy whose active adapters are replaced by ``trainable``."""
    if set(trainable) != set(self.meta.active):
      raise ValueError(
          f"`trainable` has adapters {sorted(trainable)} but the active adapters are "
          f"{list(self.meta.active)}; pass the tree returned by `lora.trainable`.")
    adapters = dict(self.adapters)
    adapters.update(trainable)
    return LoraParams(self.base, adapters, self.meta)

  def __repr__(self):
    parts = [f"{a.name}{'*' if a.name in self.meta.active else ''}: {len(a.targets)} kernels"
             for a in self.meta.adapters]
    return f"LoraParams({', '.join(parts)})"


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
  if isinstance(params, LoraParams):
    existing = params
    if adapter_name in existing.meta.names:
      raise ValueError(
          f"These params already carry an adapter named {adapter_name!r} (adapters: "
          f"{list(existing.meta.names)}). Pass `adapter_name=` with a new name to add another "
          "adapter, or wrap the original params.")
    base = existing.base
  else:
    existing = None
    base = params
    _check_plain(base)
  if quantize is not None:
    quant.check_method(quantize)
    if existing is not None:
      raise ValueError(
          f"`quantize={quantize!r}` is only for wrapping plain params: the base of these "
          "LoraParams is shared with their adapters. Pass `quantize=` on the first lojax.wrap.")
  infos, layouts = analysis.kernel_infos(base, spec, apply_fn, tuple(example_args), example_kwargs)
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
  _check_layouts(resolution, layouts, leaf_shapes, apply_fn is not None)
  targets = []
  for t in resolution.targets:
    use = layouts[t.path]
    leaf = next(i.leaf for i in infos if i.path == t.path)
    targets.append(TargetMeta(
        path=t.path, leaf=leaf, shape=leaf_shapes[f"{t.path}/{leaf}"], kind=use.kind,
        in_axes=use.in_axes, stacked=use.stacked, layers=t.layers, r=t.r, alpha=t.alpha,
        scaling=t.scaling, dropout=spec.lora_dropout))
  by_path = dict(zip(paths, leaves))
  _check_init(spec, targets, by_path, quantize)
  lora_params, rewritten = {}, {}
  for t in targets:
    if isinstance(spec, adalora.AdaLoraSpec):
      lora_params[t.path] = adalora.init_factors(inits.generator(key, t.path), t, dtype)
      if quantize is not None:
        rewritten[t.leaf_path] = quant.quantize(by_path[t.leaf_path], quantize,
                                                in_axes=t.in_axes, stacked=bool(t.stacked))
      continue
    # One kernel at a time: its NumPy work copies are freed before the next.
    a, b, new = inits.init_target(spec, key, t, by_path[t.leaf_path], dtype, quantize=quantize)
    lora_params[t.path] = {"lora_A": a, "lora_B": b}
    if new is not None:
      rewritten[t.leaf_path] = new
    if spec.use_dora:  # magnitude = column norms of the (rewritten) W + s*A@B
      w = rewritten.get(t.leaf_path, by_path[t.leaf_path])
      w = w.dequantize() if quant.is_quantized(w) else w
      lora_params[t.path][dora.KEY] = dora.init_magnitude(t, w, a, b * t.scaling).astype(dtype)
  if rewritten:
    _, treedef = jax.tree_util.tree_flatten(base, is_leaf=quant.is_quantized)
    base = jax.tree_util.tree_unflatten(
        treedef, [rewritten.get(p, x) for p, x in zip(paths, leaves)])
  bias = {p: jnp.zeros_like(by_path[p]) for p in resolution.bias_paths}
  saved = {p: jnp.array(by_path[p], copy=True) for p in paths
           if any(P.is_under(p, m) for m in resolution.modules_to_save)}
  adapter = {"lora": lora_params, "bias": bias, "modules_to_save": saved}
  if isinstance(spec, adalora.AdaLoraSpec):
    adapter[adalora.STEP_KEY] = jnp.zeros((), jnp.float32)
  meta_entry = AdapterMeta(adapter_name, spec, tuple(targets), resolution.modules_to_save,
                           resolution.bias_paths, tuple(resolution.heads))
  if existing is None:
    return LoraParams(base, {adapter_name: adapter}, LoraMeta((meta_entry,), (adapter_name,)))
  adapters = dict(existing.adapters)
  adapters[adapter_name] = adapter
  meta = LoraMeta(existing.meta.adapters + (meta_entry,), existing.meta.active)
  return LoraParams(base, adapters, meta)


def kernel_paths(params: Any, /, *, apply_fn: Callable | None = None,
                 example_args: Sequence[Any] = (), example_kwargs: Mapping[str, Any] | None = None,
                 ) -> dict[str, dict[str, Any]]:
  """The module paths that hold kernels, with what lojax knows about each.

  Use it to write ``target_modules`` before wrapping. With ``apply_fn`` the
  layouts come from tracing, as in :func:`wrap`.

  Returns:
    ``{module path: {"leaf", "shape", "kind", "in_axes", "stacked"}}`` where
    kind is dense, conv, embed, unknown (N-D kernel not traced) or unused.

  >>> import jax.numpy as jnp, lojax
  >>> lojax.kernel_paths({"enc": {"query": {"kernel": jnp.ones((4, 2))}}})
  {'enc/query': {'leaf': 'kernel', 'shape': (4, 2), 'kind': 'dense', 'in_axes': (0,), 'stacked': None}}
  """
  spec = spec_lib.LoraSpec(target_modules="all-linear")
  infos, layouts = analysis.kernel_infos(params, spec, apply_fn, tuple(example_args),
                                         example_kwargs)
  return {i.path: {"leaf": i.leaf, "shape": i.shape, "kind": layouts[i.path].kind,
                   "in_axes": layouts[i.path].in_axes, "stacked": layouts[i.path].stacked}
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


def _check_layouts(resolution, layouts, leaf_shapes, traced: bool):
  bad = []
  for t in resolution.targets:
    use = layouts[t.path]
    if use.kind in ("unknown", "unused"):
      shape = next(s for p, s in leaf_shapes.items() if P.split(p)[0] == t.path
                   and P.split(p)[1] in P.KERNEL_LEAVES)
      bad.append(f"  {t.path} (shape {shape}): {use.reason}")
  if bad:
    hint = ("Give `spec.kernel_axes={pattern: input axes}` for these kernels." if traced else
            "Pass `apply_fn=model.apply, example_args=(x,)` to lojax.wrap so lojax can trace "
            "how each kernel is contracted, or give `spec.kernel_axes={pattern: input axes}`.")
    raise ValueError("Cannot adapt these kernels:\n" + "\n".join(bad) + "\n" + hint)


def _check_init(spec, targets, by_path, quantize):
  """Raises for inits / quantization that do not fit some targets (all listed)."""
  init = spec.init_lora_weights
  bad = []
  for t in targets:
    n_in = int(np.prod([t.kernel_shape[a] for a in t.in_axes]))
    n_out = int(np.prod([t.kernel_shape[a] for a in t.out_axes]))
    leaf = by_path[t.leaf_path]
    if init == "orthogonal" and t.r % 2:
      bad.append(f"  {t.path}: `init_lora_weights='orthogonal'` needs an even rank, this target "
                 f"has r={t.r} (check `rank_pattern`)")
    if inits.rewrites_base(init) and t.r > min(n_in, n_out):
      bad.append(f"  {t.path}: `init_lora_weights={init!r}` needs r <= min(fan_in, fan_out) = "
                 f"{min(n_in, n_out)}, got r={t.r}")
    if (init == "loftq" or quantize is not None) and t.kind != "dense":
      what = "`init_lora_weights='loftq'`" if init == "loftq" else f"`quantize={quantize!r}`"
      bad.append(f"  {t.path}: {what} supports dense (matmul) kernels only; this is a "
                 f"{t.kind} kernel")
    if init == "loftq":
      bits = spec.loftq_config.get("loftq_bits", 4)
      method = quantize or (leaf.method if quant.is_quantized(leaf) else None)
      if method is not None and (method == "int8") != (bits == 8):
        bad.append(f"  {t.path}: `loftq_config['loftq_bits']={bits}` does not match the "
                   f"quantization {method!r} (4 bits: 'nf4' or 'nf4-dq', 8 bits: 'int8')")
  if init == "loftq" and (odd := sorted({t.scaling for t in targets} - {1.0})):
    warnings.warn(
        f"LoftQ's factors are not divided by the scaling (as in PEFT): at init the model "
        f"computes deq(base) + s*A@B with s = {odd}, which approximates the original "
        "kernels only for s = 1. Set `lora_alpha` equal to `r` (without `use_rslora`).",
        stacklevel=3)
  if bad:
    raise ValueError("Cannot initialise these targets:\n" + "\n".join(bad) +
                     "\nExclude them from `target_modules` (e.g. with `exclude_modules`) or "
                     "change the init / quantization.")
