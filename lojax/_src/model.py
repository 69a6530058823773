"""The data model: a frozen base, named adapters, and what is static about them.

This module is the vocabulary every other lojax module speaks, and it imports
nothing from lojax. The pipeline it serves::

  LoraSpec ─► matcher ─► targets (TargetMeta) ─► variant.init ─► LoraParams
                                                                   │
      lorafy: trace fn ─► interpreter + primitive table ◄─ variant.factors
      merge / unmerge ◄─ variant.merge, variant.unmerge
      checkpoints, PEFT files, shardings ◄─ variant.layout (and the metadata)

* :class:`LoraParams` is the pytree: ``base`` (the user's param tree, never
  trained) and ``adapters`` ``{name: {"lora": {module path: {param: array}},
  "bias": {leaf path: delta}, "modules_to_save": {leaf path: array},
  "trainable_tokens": {leaf path: rows}, ...}}``;
  its static :class:`LoraMeta` says which adapters exist and which are active.
* :class:`TargetMeta` describes one adapted leaf: where it is, its shape, which
  of its axes are input axes, which are expert axes (a MoE layer's ``[E, in,
  out]`` experts: each expert has its own factors), whether a leading axis
  stacks layers. The leaf may have any name (``kernel``, ``embedding``, ``w``,
  ``weight``, ...).
* A :class:`Variant` (plain LoRA, DoRA, AdaLoRA: one module each) says what
  parameters a target holds and how they become the factors ``A``, ``B`` of
  the compute path, a merged kernel, PEFT tensors. Everything else asks the
  variant of an adapter (``AdapterMeta.variant``); nothing tests for a key.
* :class:`EncodedArray` is a base leaf stored in another form (a quantized
  kernel): lojax reads it through :func:`decode` and writes a changed kernel
  back in the same form with :meth:`EncodedArray.encode_like`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_ADAPTER = "default"
LORA, BIAS, SAVED = "lora", "bias", "modules_to_save"   # the groups of one adapter's dict
TOKENS = "trainable_tokens"   # a group present only when the spec trains embedding rows

# The roles of a parameter's axes (see Variant.layout): a stacked layer axis,
# the rank axis, or an int: that axis of the (per-layer) kernel (an input,
# output or expert axis of it).
LAYER, RANK = "layer", "rank"


class EncodedArray:
  """A base leaf stored in another form, e.g. a quantized kernel.

  Subclasses are pytree nodes with ``shape`` and ``dtype`` of the kernel they
  stand for; lojax treats each as one leaf at the kernel's path.
  """

  shape: tuple[int, ...]
  dtype: Any

  def decode(self, dtype: Any = None) -> jax.Array:
    """The float kernel (jit-able)."""
    raise NotImplementedError

  def encode_like(self, x: Any) -> "EncodedArray":
    """``x`` (a float kernel of this shape) stored the way this leaf is."""
    raise NotImplementedError

  def layer(self) -> "EncodedArray":
    """A stacked leaf whose stored arrays hold one layer (a scan's slice of them) as that
    layer's own leaf. Subclasses that stack layers along every stored array's axis 0
    implement it; then a scan over the stack decodes one layer per step."""
    raise NotImplementedError

  def stored_specs(self, kernel_spec: Sequence[Any]) -> "EncodedArray":
    """This leaf with a partition-spec entry list for each stored array in place of the
    array, given the entries (one per kernel axis) a float kernel would be sharded by.

    The default replicates every stored array; a subclass whose layout follows the
    kernel's axes shards them like the kernel.
    """
    children, treedef = jax.tree_util.tree_flatten(self)
    return jax.tree_util.tree_unflatten(treedef, [[None] * np.ndim(c) for c in children])


def is_encoded(x: Any) -> bool:
  """Whether ``x`` is an :class:`EncodedArray` (an ``is_leaf`` for tree walks)."""
  return isinstance(x, EncodedArray)


def decode(x: Any) -> Any:
  """The float value of a base leaf (``x`` itself unless it is encoded)."""
  return x.decode() if isinstance(x, EncodedArray) else x


@dataclasses.dataclass(frozen=True)
class TargetMeta:
  """Static description of one adapted leaf."""
  path: str                      # module path, e.g. "params/h_0/attn/c_attn"
  leaf: str                      # the leaf's name under it ("kernel", "w", ...); "" when the
                                 # leaf is its own module (path is then the leaf path)
  shape: tuple[int, ...]         # full leaf shape (leading layer axis included if stacked)
  kind: str                      # dense | conv | embed
  in_axes: tuple[int, ...]       # per-layer kernel axes on the input side
  stacked: int | None            # number of stacked layers, if any
  layers: tuple[int, ...] | None  # adapted layers of a stacked kernel (None: all)
  r: int
  alpha: float
  scaling: float
  dropout: float
  expert_axes: tuple[int, ...] = ()  # per-layer kernel axes that index experts: each expert
                                     # has its own A and B (both factors carry these axes)

  @property
  def leaf_path(self) -> str:
    return f"{self.path}/{self.leaf}" if self.leaf else self.path

  @property
  def bias_path(self) -> str | None:
    """The leaf path of the module's bias (``<module>/bias``), or None for a bare array."""
    return f"{self.path}/bias" if self.leaf else None

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """The shape of one layer's kernel."""
    return self.shape[1:] if self.stacked else self.shape

  @property
  def out_axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(len(self.kernel_shape))
                 if a not in self.in_axes and a not in self.expert_axes)

  @property
  def n_experts(self) -> int:
    """The number of experts (1 without expert axes)."""
    return math.prod(self.kernel_shape[a] for a in self.expert_axes)

  @property
  def n_layers(self) -> int | None:
    """Adapted layers of a stacked kernel (None when not stacked)."""
    if not self.stacked:
      return None
    return len(self.layers) if self.layers is not None else self.stacked

  @property
  def fan_in(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.in_axes)

  @property
  def fan_out(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.out_axes)

  def a_roles(self) -> tuple:
    """Axis roles of factor A: ``[L?, experts..., in..., r]``."""
    return self.lead_roles() + self.in_axes + (RANK,)

  def b_roles(self) -> tuple:
    """Axis roles of factor B: ``[L?, experts..., r, out...]``."""
    return self.lead_roles() + (RANK,) + self.out_axes

  def lead_roles(self) -> tuple:
    """The axes both factors carry, leading: a stacked layer axis, then the expert axes."""
    return ((LAYER,) if self.stacked else ()) + self.expert_axes

  def shape_of(self, roles: tuple) -> tuple[int, ...]:
    """The shape of a parameter whose axes have ``roles``."""
    size = {LAYER: self.n_layers, RANK: self.r}
    return tuple(size[x] if isinstance(x, str) else self.kernel_shape[x] for x in roles)

  def a_shape(self) -> tuple[int, ...]:
    return self.shape_of(self.a_roles())

  def b_shape(self) -> tuple[int, ...]:
    return self.shape_of(self.b_roles())

  def sides(self) -> tuple[str, ...]:
    """Per leaf axis: "L" (stacked layers), "E" (experts), "I" (input side) or "O" (output)."""
    per = tuple("I" if a in self.in_axes else "E" if a in self.expert_axes else "O"
                for a in range(len(self.kernel_shape)))
    return (("L",) if self.stacked else ()) + per

  def expand_layers(self, x):
    """Scatters per-adapted-layer values ``[n_layers, ...]`` into the full stack."""
    if not self.stacked or self.layers is None:
      return x
    full = jnp.zeros((self.stacked,) + x.shape[1:], x.dtype)
    return full.at[jnp.asarray(self.layers)].set(x)


@dataclasses.dataclass(frozen=True)
class Factors:
  """One target's delta for the compute path, in the kernel's own layout.

  ``a`` is ``[L?, E..., in..., r]``, ``b`` ``[L?, E..., r, out...]`` with the scaling
  folded in, so the delta is ``a @ b``; ``m`` (DoRA) is a magnitude laid out
  like ``b`` with a rank axis of size 1: the adapted kernel is then
  ``m / ||W + a@b|| * (W + a@b)``, the norm over the input axes. ``bias``
  (``lora_bias``) is laid out like ``m``, the scaling folded in: it is added to
  the output of each matmul or conv that consumes the kernel, not to the kernel.
  ``rows`` (trainable tokens): ``a`` is the one-hot selector of these rows of the
  kernel's input axis, so a consumer may index instead of multiplying by it.
  """
  a: Any
  b: Any
  m: Any = None
  bias: Any = None
  rows: tuple[int, ...] | None = None


class Variant:
  """What one kind of adapter stores per target and how it computes.

  A variant is a stateless singleton (static metadata: it must hash and
  compare by identity). Plain LoRA implements every method; DoRA and AdaLoRA
  extend it. ``entry`` below is one target's ``{param name: array}``.
  """

  name: str = "variant"
  # Whether a target's adapter splits along an output axis into independent adapters of the
  # slices (each slice's delta is the slice of the delta), and joins back (PEFT files of
  # fused kernels: PeftMapping.splits).
  splittable: bool = False

  def layout(self, t: TargetMeta) -> dict[str, tuple]:
    """``{param name: axis roles}`` of one target's parameters (shapes, shardings)."""
    raise NotImplementedError

  def shapes(self, t: TargetMeta) -> dict[str, tuple[int, ...]]:
    """``{param name: shape}`` of one target's parameters."""
    return {k: t.shape_of(roles) for k, roles in self.layout(t).items()}

  def init(self, spec: Any, key: Any, t: TargetMeta, kernel: Any, dtype: Any,
           quantize: str | None) -> tuple[dict, Any]:
    """``(entry, new base leaf or None)`` for one target at wrap time."""
    raise NotImplementedError

  def check_target(self, t: TargetMeta) -> list[str]:
    """Why this variant cannot adapt ``t``: one indented line per problem (wrap time)."""
    return []

  def _refuse_experts(self, t: TargetMeta, label: str) -> list[str]:
    """A :meth:`check_target` for variants without per-expert math (PEFT has none either)."""
    if not t.expert_axes:
      return []
    return [f"  {t.path}: {label} does not adapt expert kernels (axes {list(t.expert_axes)} "
            f"index experts; PEFT's `target_parameters` has no {label} either): use a plain "
            "LoraSpec"]

  def peft_buffers(self, t: TargetMeta) -> int:
    """Scalars PEFT's model holds for ``t`` besides its tensors (frozen ``nn.Parameter``s
    that PEFT counts in all params, e.g. AdaLoRA's ``ranknum``, one per torch module)."""
    return 0

  def adapter_state(self, spec: Any) -> dict:
    """Adapter-level bookkeeping arrays (not parameters; not counted)."""
    return {}

  def factors(self, t: TargetMeta, entry: Mapping) -> Factors:
    """The compute path's :class:`Factors` (full layer stack) of one target."""
    raise NotImplementedError

  def merge(self, t: TargetMeta, w: Any, entry: Mapping) -> Any:
    """The merged float kernel of one target, from its float base kernel ``w``."""
    raise NotImplementedError

  def unmerge(self, t: TargetMeta, merged: Any, entry: Mapping, base_w: Any) -> Any:
    """The float kernel before :meth:`merge`, given the merged one."""
    raise NotImplementedError

  def bias_delta(self, t: TargetMeta, entry: Mapping) -> Any:
    """What merging adds to the bias of ``t``'s module (``[L?, out...]``, the full stack),
    or None when the variant holds no bias of its own."""
    return None

  def check_trained(self, name: str, adapter: Mapping) -> None:
    """Warns about an adapter trained the wrong way (called before merges, resizes)."""

  # PEFT files: one layer of one target at a time (a stacked kernel's layer is its own
  # torch module), as NumPy arrays.
  def to_peft(self, t: TargetMeta, layer: Mapping[str, Any]) -> dict[str, Any]:
    """``{PEFT tensor suffix: tensor}`` of one layer's parameters (raises if PEFT has none)."""
    raise NotImplementedError

  def from_peft(self, t: TargetMeta, tensors: Mapping[str, Any]) -> dict[str, Any] | None:
    """One layer's parameters from its PEFT tensors; None if one is missing.

    Raises ValueError when the tensors do not fit the target.
    """
    raise NotImplementedError

  def unscaled(self, t: TargetMeta, entry: Mapping[str, Any], scaling: float) -> dict:
    """``entry`` of a target whose scaling is ``scaling``, as the same delta at scaling 1
    (one layer or the whole stack; PEFT files of fused kernels, hotswap)."""
    raise NotImplementedError

  def peft_target(self, t: TargetMeta, layer: Mapping[str, Any]) -> TargetMeta:
    """The target as a PEFT file's layer ``layer`` describes it (e.g. its kept rank)."""
    return t

  def peft_state(self, spec: Any) -> dict:
    """:meth:`adapter_state` of an adapter read from a PEFT file."""
    return self.adapter_state(spec)

  def __repr__(self):
    return f"<lojax variant {self.name}>"


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
  """Static description of one named adapter."""
  name: str
  spec: Any
  targets: tuple[TargetMeta, ...]
  modules_to_save: tuple[str, ...]
  bias_paths: tuple[str, ...]
  heads: tuple[str, ...] = ()
  tokens: tuple[tuple[str, tuple[int, ...]], ...] = ()   # (table leaf path, trained rows)

  @property
  def variant(self) -> Variant:
    return self.spec.variant()

  def target(self, path: str) -> TargetMeta:
    for t in self.targets:
      if t.path == path:
        return t
    raise KeyError(path)

  def replace(self, **changes) -> "AdapterMeta":
    return dataclasses.replace(self, **changes)

  def bias_layers(self, path: str) -> tuple[int, ...] | None:
    """The stacked layers a trained bias covers, or None for the whole leaf.

    With ``bias="lora_only"`` the bias of an adapted stacked kernel is trained in
    its adapted layers only (``layers_to_transform``), as PEFT trains the biases
    of the torch modules it wraps: the delta is then ``[n_layers, ...]``.
    """
    if getattr(self.spec, "bias", None) != "lora_only":
      return None
    module = path.rpartition("/")[0]
    t = next((t for t in self.targets if t.path == module and t.leaf), None)
    return t.layers if t is not None and t.stacked and t.layers is not None else None

  def bias_shape(self, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the bias delta of leaf ``path`` (of ``shape``)."""
    layers = self.bias_layers(path)
    return tuple(shape) if layers is None else (len(layers),) + tuple(shape[1:])

  def expand_bias(self, path: str, delta: Any, shape: tuple[int, ...]) -> Any:
    """The bias delta of leaf ``path`` scattered into the leaf's ``shape`` (zeros elsewhere)."""
    layers = self.bias_layers(path)
    if layers is None:
      return delta
    return jnp.zeros(shape, delta.dtype).at[jnp.asarray(layers)].set(delta)


@dataclasses.dataclass(frozen=True)
class LoraMeta:
  """The adapters of a :class:`LoraParams` and which of them are active."""
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
    adapters: ``{name: {"lora": {module path: {"lora_A", "lora_B", ...}},
      "bias": {leaf path: delta}, "modules_to_save": {leaf path: array}}}``.
      Bias entries are *deltas* added to the base bias; modules_to_save
      entries are full trainable copies of the saved modules' leaves. What a
      target holds besides ``lora_A`` / ``lora_B`` depends on the adapter's
      variant (``lora_E`` for AdaLoRA, ``lora_magnitude`` for DoRA).
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
    """Returns a copy whose active adapters are replaced by ``trainable``.

    Each adapter's tree must have the structure of ``lora.trainable``'s (the same targets,
    biases and saved modules); anything else is an error, never silently ignored.
    """
    if not isinstance(trainable, Mapping) or set(trainable) != set(self.meta.active):
      got = (sorted(map(repr, trainable)) if isinstance(trainable, Mapping)
             else type(trainable).__name__)
      raise ValueError(
          f"`trainable` has adapters {got} but the active adapters are "
          f"{list(self.meta.active)}; pass the tree returned by `lora.trainable`.")
    for name in self.meta.active:
      if jax.tree.structure(trainable[name]) != jax.tree.structure(self.adapters[name]):
        got, want = _keys(trainable[name]), _keys(self.adapters[name])
        raise ValueError(
            f"`trainable[{name!r}]` does not have the structure of adapter {name!r}: it adds "
            f"{sorted(got - want)[:6]} and lacks {sorted(want - got)[:6]}; pass a tree like "
            "`lora.trainable` (e.g. its gradients or optimizer updates applied to it).")
      bad = [f"{k}: {np.shape(x)} {getattr(x, 'dtype', type(x).__name__)}, expected "
             f"{np.shape(y)} {y.dtype}" for (k, x), y in zip(
                 ((jax.tree_util.keystr(kp), x) for kp, x in
                  jax.tree_util.tree_flatten_with_path(trainable[name])[0]),
                 jax.tree.leaves(self.adapters[name]))
             if np.shape(x) != np.shape(y) or not (
                 hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) ==
                 jnp.issubdtype(y.dtype, jnp.inexact))]
      if bad:
        raise ValueError(f"`trainable[{name!r}]` has leaves of other shapes or kinds than "
                         f"adapter {name!r}: " + "; ".join(bad[:5]))
    adapters = dict(self.adapters)
    adapters.update(trainable)
    return LoraParams(self.base, adapters, self.meta)

  def with_adapter(self, meta: AdapterMeta, params: Mapping) -> "LoraParams":
    """A copy with adapter ``meta.name`` added (inactive) or replaced."""
    adapters = dict(self.adapters)
    adapters[meta.name] = params
    if meta.name in self.meta.names:
      metas = tuple(meta if m.name == meta.name else m for m in self.meta.adapters)
    else:
      metas = self.meta.adapters + (meta,)
    return LoraParams(self.base, adapters, LoraMeta(metas, self.meta.active))

  def __repr__(self):
    parts = [f"{a.name}{'*' if a.name in self.meta.active else ''}: {len(a.targets)} kernels"
             for a in self.meta.adapters]
    return f"LoraParams({', '.join(parts)})"


def _keys(tree) -> set[str]:
  """The "/"-joined key paths of ``tree``'s leaves."""
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def name_list(value: Any, fn: str, arg: str) -> tuple[str, ...]:
  """``value`` (an adapter name or a list of them) as a tuple of distinct str, or lojax's error."""
  if isinstance(value, str):
    return (str.__str__(value),)
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise TypeError(f"{fn}: `{arg}` must be an adapter name or a list of names, got "
                    f"{value!r:.80}.")
  names = tuple(str.__str__(v) for v in value)
  if len(set(names)) != len(names):
    raise ValueError(f"{fn}: adapter names are repeated in `{arg}`={list(names)}.")
  return names


def is_prng_key(x: Any) -> bool:
  """Whether ``x`` is a JAX PRNG key: a typed key, or a legacy ``uint32[2]`` one."""
  return isinstance(x, jax.Array) and (jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or (
      x.dtype == jnp.uint32 and x.shape == (2,)))


def require_lora(value: Any, fn: str, arg: str = "lora") -> None:
  """Raises lojax's TypeError unless ``value`` is a :class:`LoraParams`."""
  if not isinstance(value, LoraParams):
    raise TypeError(f"{fn}: `{arg}` must be the LoraParams returned by lojax.wrap, got "
                    f"{type(value).__name__}.")


def factors(meta: AdapterMeta, t: TargetMeta, entry: Mapping) -> Factors:
  """One target's :class:`Factors`, as its adapter's variant computes them."""
  return meta.variant.factors(t, entry)
