"""LoRA configuration: :class:`LoraSpec` and :class:`TaskType`.

Field names and defaults are those of Hugging Face PEFT's ``LoraConfig``, so a
PEFT configuration carries over unchanged. A spec is a deeply immutable,
hashable value: it is validated and normalised once, when it is built, and can
be used as static data under ``jax.jit`` and stored as checkpoint metadata.

Normal form. Whatever was passed, a spec holds only Python values: NumPy
scalars become ``int`` / ``float`` / ``bool`` / ``str``, sequences become
tuples, mappings become :class:`FrozenDict`, ``task_type`` a :class:`TaskType`.
So ``spec.to_dict()`` is always JSON-serialisable and
``LoraSpec.from_dict(spec.to_dict()) == spec`` (with equal hashes).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from lojax._src import dora
from lojax._src import lora

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
GROUP_FLAGS = ("finetune_attention_modules", "finetune_mlp_modules",
               "finetune_language_layers", "finetune_vision_layers")
MAX_RANK = 2**31 - 1  # far above any real rank: r never exceeds a kernel's smaller dimension
MAX_ALPHA = float(np.finfo(np.float32).max)  # so alpha / r (r >= 1) is finite in float32
_INIT_NAMES = ("gaussian", "pissa", "olora", "loftq", "orthogonal")
_INIT_VALID = ("True, False, 'gaussian', 'pissa', 'pissa_niter_<K>' (K a positive int), "
               "'olora', 'loftq', 'orthogonal'")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
_LOFTQ_KEYS = ("loftq_bits", "loftq_iter")


class TaskType(str, enum.Enum):
  """The kind of model being adapted, as in PEFT.

  The LoRA math is the same for every task. ``SEQ_CLS`` and ``TOKEN_CLS`` add
  the classification head (``classifier`` / ``score``) to the modules trained
  in full, ``QUESTION_ANS`` adds ``qa_outputs``.

  >>> TaskType("SEQ_CLS") is TaskType.SEQ_CLS
  True
  """

  CAUSAL_LM = "CAUSAL_LM"
  SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
  SEQ_CLS = "SEQ_CLS"
  TOKEN_CLS = "TOKEN_CLS"
  QUESTION_ANS = "QUESTION_ANS"
  FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


_TASK_MODULES = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PEFT_NAME = re.compile(rf"{_IDENT}(?:\.(?:{_IDENT}|[0-9]+))+")


def peft_name_regex(name: str) -> str | None:
  """The regex over module paths that a PEFT (torch) module name stands for.

  A name without "/" made of identifiers and layer numbers joined by dots
  (``"h.1.attn.c_attn"``, ``"model.layers"``) is a PEFT module name: each dot
  is a path separator, written "/" or "." in the path, and a dot before a
  number may also be linen's "_" (``h_1``). Anything else is not one (None).

  >>> rx = peft_name_regex("h.1.attn.c_attn")
  >>> [bool(re.fullmatch(rx, p)) for p in ("h/1/attn/c_attn", "h_1/attn/c_attn", "h.1/attn/c_attn",
  ...                                      "hx1yattn/c_attn")]
  [True, True, True, False]
  >>> peft_name_regex("c_attn") is None, peft_name_regex(".*[.]q_proj") is None
  (True, True)
  """
  if not isinstance(name, str) or not _PEFT_NAME.fullmatch(name):
    return None
  first, *rest = name.split(".")
  return re.escape(first) + "".join(
      ("[/._]" if part.isdigit() else "[/.]") + re.escape(part) for part in rest)


def compile_pattern_key(key: str) -> re.Pattern[str]:
  """Compiles a ``rank_pattern`` / ``alpha_pattern`` / ``kernel_axes`` key.

  A leading ``^`` (anchor at the start of the path) is stripped; the caller
  decides where the key may start. A PEFT module name (see
  :func:`peft_name_regex`) is read as one, its dots as separators, not as
  regex wildcards. Raises ``re.error`` for a bad regex.

  >>> compile_pattern_key("^h_0/attn").pattern
  'h_0/attn'
  >>> compile_pattern_key("h.8.attn").pattern
  'h[/._]8[/.]attn'
  """
  body = key[1:] if key.startswith("^") else key
  return re.compile(peft_name_regex(body) or body)


class FrozenDict(Mapping):
  """An immutable, hashable mapping: the type of a spec's dict fields.

  It reads like a dict (``[]``, ``get``, ``items``, ``len``, ``in``, ``|``)
  and equals a dict with the same items, whatever their order; its hash
  ignores order too. Every mutating method raises ``TypeError``. Convert with
  ``dict(...)``; serialise a whole spec with :meth:`LoraSpec.to_dict`.

  >>> spec = LoraSpec(target_modules=["q"], rank_pattern={"q": 4})
  >>> spec.rank_pattern == {"q": 4}, spec.rank_pattern
  (True, FrozenDict({'q': 4}))
  >>> spec.rank_pattern["q"] = 2
  Traceback (most recent call last):
  TypeError: `rank_pattern` is immutable: ...
  >>> dataclasses.replace(spec, rank_pattern=spec.rank_pattern | {"q": 2}).rank_pattern
  FrozenDict({'q': 2})
  """

  # Not a dict subclass: a dict whose mutators raise breaks code written for dicts, and
  # dict's C-level methods (`dict.__setitem__(d, ...)`) would still mutate it. Not a
  # MappingProxyType: it neither hashes nor pickles.
  __slots__ = ("_data", "_field", "_hash")

  def __init__(self, data: Mapping | Any = (), field: str | None = None):
    if hasattr(self, "_data"):
      self._refuse()
    object.__setattr__(self, "_data", dict(data))
    object.__setattr__(self, "_field", field)
    object.__setattr__(self, "_hash", None)

  def __getitem__(self, key):
    return self._data[key]

  def __iter__(self) -> Iterator:
    return iter(self._data)

  def __len__(self) -> int:
    return len(self._data)

  def __eq__(self, other: object) -> bool:
    if isinstance(other, FrozenDict):
      return self._data == other._data
    if isinstance(other, Mapping):
      return self._data == dict(other.items())
    return NotImplemented

  def __hash__(self) -> int:
    if self._hash is None:
      object.__setattr__(self, "_hash", hash(frozenset(self._data.items())))
    return self._hash

  def __repr__(self) -> str:
    return f"FrozenDict({self._data!r})"

  def __or__(self, other):  # a new FrozenDict, as frozenset | set is a new frozenset
    if not isinstance(other, Mapping):
      return NotImplemented
    return FrozenDict({**self._data, **other}, self._field)

  def __ror__(self, other):
    return {**other, **self._data} if isinstance(other, Mapping) else NotImplemented

  def __reduce__(self):
    return (FrozenDict, (self._data, self._field))

  def _refuse(self, *args, **kwargs):
    f = self._field
    if f is None:
      raise TypeError("A FrozenDict is immutable; build a new one instead, e.g. "
                      "`FrozenDict({**d, key: value})` or `d | {key: value}`.")
    raise TypeError(
        f"`{f}` is immutable: a LoraSpec is a hashable value (a jit cache key and "
        "checkpoint metadata), so its fields never change after construction. Build a new "
        f"spec instead: `dataclasses.replace(spec, {f}={{...}})`, e.g. "
        f"`dataclasses.replace(spec, {f}=spec.{f} | {{key: value}})`.")

  __setitem__ = __delitem__ = __setattr__ = __delattr__ = __ior__ = _refuse
  update = pop = popitem = clear = setdefault = _refuse


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LoraSpec:
  """What to adapt with LoRA, and how. Names and defaults follow PEFT.

  Attributes:
    r: LoRA rank, an int > 0.
    lora_alpha: Scaling numerator: the update is scaled by ``alpha / r``.
      ``|lora_alpha|`` must not exceed the float32 maximum (~3.4e38).
    use_rslora: Scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
    target_modules: ``"all-linear"`` (every matmul kernel but the output head),
      another str (a regex that must ``re.fullmatch`` the "/"-joined module
      path), or a list (a path equal to an entry or ending in "/" + entry).
    exclude_modules: Modules never adapted: a regex (str) or a list, as above.
    layers_to_transform: Keep only these layer indices (int or list).
    layers_pattern: Name(s) of the layer list, e.g. ``"layers"`` or ``"h"``;
      only valid together with ``layers_to_transform``. ``""`` and ``[]``
      mean unset (None), as in PEFT.
    rank_pattern: Per-module rank, ``{key: r}``; keys are regexes matched at
      a "/" boundary of the module path (the most specific key wins).
    alpha_pattern: Per-module alpha, looked up independently of the rank.
    lora_dropout: Dropout rate on the adapter input, in [0, 1).
    bias: ``"none"``, ``"all"`` (every bias trainable) or ``"lora_only"``
      (biases of adapted modules trainable).
    modules_to_save: Modules trained in full (e.g. a classifier head).
    init_lora_weights: ``True``, ``False``, ``"gaussian"``, ``"pissa"``,
      ``"pissa_niter_<K>"``, ``"olora"``, ``"loftq"`` or ``"orthogonal"``.
    use_dora: Weight-decomposed LoRA (DoRA).
    lora_bias: A trainable bias on ``lora_B`` (zero at init): a dense or conv module
      computes ``x@W + s*((x@A)@B + b)``; merging adds ``s*b`` to the module's bias.
      Not with DoRA, and only with ``init_lora_weights`` True or False (as in PEFT).
    trainable_token_indices: Embedding rows trained on their own (e.g. new special
      tokens) without training the whole table: a list of row indices (of the input
      embedding: a table named ``embed_tokens``, else the table with the most rows) or
      ``{module: [indices]}`` (module names as in ``target_modules`` lists). The rows
      change in every use of the table (lookups and tied logits).
    loftq_config: ``{"loftq_bits": 4 or 8, "loftq_iter": int >= 1}``.
    task_type: A :class:`TaskType` or its name.
    finetune_attention_modules: Group flag (attention projections); the
      four group flags are an alternative to ``target_modules``.
    finetune_mlp_modules: Group flag (MLP projections).
    finetune_language_layers: Group flag (language tower).
    finetune_vision_layers: Group flag (vision tower).
    kernel_axes: lojax-specific: ``{key: input_axes}`` for N-D kernels whose
      module path the key matches (same key rule as ``rank_pattern``).
    kernel_names: lojax-specific: leaf names that mark a kernel, besides
      ``kernel``, ``embedding``, ``w`` and ``weight`` (e.g. ``["proj_weight"]``).

  The dict fields are stored as :class:`FrozenDict` and the sequences as
  tuples: a spec never changes. Derive a new one with ``dataclasses.replace``.

  Raises:
    ValueError: listing every invalid field, what was received and expected.

  >>> spec = LoraSpec(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
  >>> spec.target_modules, spec.scaling(spec.r, spec.lora_alpha)
  (('q_proj', 'v_proj'), 2.0)
  """

  r: int = 8
  lora_alpha: float = 8
  use_rslora: bool = False
  target_modules: None | str | Sequence[str] = None
  exclude_modules: None | str | Sequence[str] = None
  layers_to_transform: None | int | Sequence[int] = None
  layers_pattern: None | str | Sequence[str] = None
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=FrozenDict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=FrozenDict)
  lora_dropout: float = 0.0
  bias: str = "none"
  modules_to_save: None | Sequence[str] = None
  init_lora_weights: bool | str = True
  use_dora: bool = False
  lora_bias: bool = False
  trainable_token_indices: None | Sequence[int] | Mapping[str, Sequence[int]] = None
  loftq_config: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
  task_type: None | TaskType | str = None
  finetune_attention_modules: None | bool = None
  finetune_mlp_modules: None | bool = None
  finetune_language_layers: None | bool = None
  finetune_vision_layers: None | bool = None
  kernel_axes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=FrozenDict)
  kernel_names: None | Sequence[str] = None

  peft_type: ClassVar[str] = "LORA"   # the `peft_type` of the PEFT config this spec writes

  def __post_init__(self):
    p: list[str] = []  # every problem found; raised together at the end

    def set_(name: str, value: Any) -> None:
      object.__setattr__(self, name, value)

    for f in dataclasses.fields(self):  # NumPy scalars anywhere (subclass fields too)
      set_(f.name, _py(getattr(self, f.name)))
    _check_numbers(self, set_, p)
    _check_names(self, set_, p)
    _check_layers(self, set_, p)
    for name, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha),
                        ("kernel_axes", _axes)):
      set_(name, _pattern_dict(name, getattr(self, name), check, p))
    _check_init(self, set_, p)
    _check_tokens(self, set_, p)
    _check_task(self, set_, p)
    p.extend(_check_groups(self))
    if p:
      head = "Invalid LoraSpec: " if len(p) == 1 else f"Invalid LoraSpec ({len(p)} problems):\n  - "
      raise ValueError(head + "\n  - ".join(p))

  def _canonical(self) -> tuple:
    # Every field is hashable once validated (mappings are FrozenDicts, whose equality
    # and hash ignore order).
    return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))

  def __eq__(self, other: object) -> bool:
    if type(other) is not type(self):
      return NotImplemented
    return self._canonical() == other._canonical()

  def __hash__(self) -> int:
    return hash(self._canonical())

  def scaling(self, r: int, alpha: float) -> float:
    """The factor ``s`` that multiplies ``B @ A``.

    Args:
      r: Rank of the adapter.
      alpha: Its alpha.

    Returns:
      ``alpha / r``, or ``alpha / sqrt(r)`` when ``use_rslora`` is set.

    >>> LoraSpec(target_modules="all-linear", use_rslora=True).scaling(16, 8)
    2.0
    """
    return alpha / math.sqrt(r) if self.use_rslora else alpha / r

  def variant(self):
    """The adapter variant this spec makes: plain LoRA, or DoRA with ``use_dora``.

    A subclass for another kind of adapter returns its own (see ``model.Variant``).

    >>> LoraSpec(target_modules="all-linear", use_dora=True).variant().name
    'dora'
    """
    if self.use_dora:
      return dora.DORA
    return lora.LORA_BIAS if self.lora_bias else lora.LORA

  def peft_fields(self, ranks: Mapping[str, int]) -> dict[str, Any]:
    """This spec's own entries of a PEFT ``adapter_config.json``.

    Args:
      ranks: ``{torch module name: rank}`` of the exported targets.

    >>> LoraSpec(r=4, target_modules=["q"]).peft_fields({"q": 4, "k": 2})
    {'peft_type': 'LORA', 'use_dora': False, 'lora_bias': False, 'rank_pattern': {'k': 2}}
    """
    return {"peft_type": self.peft_type, "use_dora": self.use_dora, "lora_bias": self.lora_bias,
            "rank_pattern": {tn: r for tn, r in ranks.items() if r != self.r}}

  @classmethod
  def from_peft_fields(cls, config: Mapping[str, Any], fields: Mapping[str, Any],
                       ranks: Mapping[str, int]) -> "LoraSpec":
    """The spec of a PEFT config.

    Args:
      config: the config as read from ``adapter_config.json``.
      fields: the entries every spec shares, already derived from the file.
      ranks: ``{module path: rank}`` found in the file's tensors.
    """
    r0 = int(config.get("r", 8))
    init = _init_on_load(config.get("init_lora_weights", True))
    return cls(**fields, r=r0,
               rank_pattern={re.escape(p): r for p, r in ranks.items() if r != r0},
               init_lora_weights=init,
               loftq_config=(config.get("loftq_config") or {}) if init == "loftq" else {},
               use_dora=bool(config.get("use_dora", False)),
               lora_bias=bool(config.get("lora_bias", False)))

  @classmethod
  def peft_keys(cls) -> frozenset[str]:
    """The ``adapter_config.json`` keys this spec class reads or may ignore.

    ``load_peft`` refuses a config that sets any other key (a PEFT option
    lojax does not support, such as ``layer_replication``), naming it. A
    subclass's own fields are its own keys.

    >>> "r" in LoraSpec.peft_keys(), "layer_replication" in LoraSpec.peft_keys()
    (True, False)
    """
    shared = {f.name for f in dataclasses.fields(LoraSpec)}
    return _PEFT_KEYS | {f.name for f in dataclasses.fields(cls) if f.name not in shared}

  def effective_modules_to_save(self) -> tuple[str, ...]:
    """``modules_to_save`` plus the head names implied by ``task_type``.

    >>> LoraSpec(target_modules="all-linear", task_type="SEQ_CLS").effective_modules_to_save()
    ('classifier', 'score')
    """
    return tuple(self.modules_to_save or ()) + self.optional_modules_to_save()

  def optional_modules_to_save(self) -> tuple[str, ...]:
    """The names added by ``task_type``; it is no error if they are absent.

    >>> LoraSpec(target_modules="all-linear", task_type="QUESTION_ANS").optional_modules_to_save()
    ('qa_outputs',)
    """
    user = set(self.modules_to_save or ())
    return tuple(m for m in _TASK_MODULES.get(self.task_type, ()) if m not in user)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict of all fields (enums as str, tuples as lists).

    >>> LoraSpec(target_modules=["q"], task_type="CAUSAL_LM").to_dict()["task_type"]
    'CAUSAL_LM'
    """
    return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LoraSpec:
    """Rebuilds a spec from :meth:`to_dict` output (also after a JSON round trip).

    Raises:
      ValueError: if ``data`` has keys that are not ``LoraSpec`` fields.

    >>> spec = LoraSpec(target_modules=["q"], rank_pattern={"q": 4})
    >>> LoraSpec.from_dict(spec.to_dict()) == spec
    True
    """
    if not isinstance(data, Mapping):
      raise TypeError(f"`data` must be a dict; got {type(data).__name__}.")
    names = [f.name for f in dataclasses.fields(cls)]
    if unknown := sorted(str(k) for k in data if k not in names):
      raise ValueError(f"`data` has keys that are not {cls.__name__} fields: {unknown}. Valid "
                       f"fields: {names}. Remove the extra keys before calling `from_dict`.")
    return cls(**data)


# --------------------------------------------------------------------------
# Validation steps of LoraSpec.__post_init__; each records problems in `p`
# and stores the normalised values with `set_`.
# --------------------------------------------------------------------------

def spec_classes() -> dict[str, type]:
  """lojax's spec classes (LoraSpec and its subclasses in lojax, e.g. AdaLoraSpec) by name.

  These are the classes checkpoints store and PEFT files are read with; a user's own
  subclass of LoraSpec is not one of them.

  >>> sorted(spec_classes())[-1]
  'LoraSpec'
  """
  out, todo = {}, [LoraSpec]
  while todo:
    cls = todo.pop()
    if cls.__module__.startswith("lojax._src.") and "peft_type" in vars(cls):
      out[cls.__name__] = cls
    todo.extend(cls.__subclasses__())
  return out


# PEFT LoraConfig keys load_peft reads (the targets, ranks and layouts come from the tensors and
# the mapping), and those with no effect on the adapter's numbers (bookkeeping, runtime options,
# the options of features that are off).
def _init_on_load(init):
  """The ``init_lora_weights`` a spec read from a PEFT file gets.

  The factors come from the file, so an init that only draws them becomes
  ``True``; one that rewrote the base kernels (PiSSA, OLoRA, LoftQ) is kept,
  so that :func:`lojax.wrap` rebuilds the base the factors were trained on,
  as PEFT's ``from_pretrained`` does. Any other init is refused.
  """
  if (init is True or init is False or init in ("gaussian", "pissa", "olora", "loftq")
      or (isinstance(init, str) and _PISSA_NITER.fullmatch(init))):
    return init
  if init in ("orthogonal", "eva"):
    return True
  raise ValueError(
      f"`init_lora_weights`={init!r} in adapter_config.json is not supported: lojax rebuilds "
      "the base an adapter was trained on for 'pissa', 'pissa_niter_<K>', 'olora' and 'loftq' "
      "only, and loading the factors without that step would compute another model. Nothing "
      "was loaded.")


_PEFT_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "loftq_config", "use_dora", "lora_bias", "trainable_token_indices", "megatron_core",
    "qalora_group_size", "runtime_config",
    "ensure_weight_tying", "target_parameters",
    "eva_config"})   # EVA only chose the factors and ranks the file holds (lojax.eva_init)


def _check_numbers(spec: LoraSpec, set_, p: list[str]) -> None:
  r, why = _rank(spec.r)
  if why:
    p.append(f"`r` must be {why}; got r={_show(spec.r)}. Pass e.g. `r=8`.")
  else:
    set_("r", r)
  alpha, why = _alpha(spec.lora_alpha)
  if why:
    p.append(f"`lora_alpha` must be {why}; got lora_alpha={_show(spec.lora_alpha)}. "
             "Pass e.g. `lora_alpha=16`.")
  else:
    set_("lora_alpha", alpha)
  for name in ("use_rslora", "use_dora", "lora_bias"):
    if not isinstance(getattr(spec, name), bool):
      p.append(f"`{name}` must be True or False; got {_show(getattr(spec, name))}.")
  if spec.lora_bias is True and spec.use_dora is True:
    p.append("`lora_bias=True` does not combine with `use_dora=True` (nor in PEFT); set one "
             "of them to False.")
  if spec.lora_bias is True and not isinstance(spec.init_lora_weights, bool):
    p.append("`lora_bias=True` needs `init_lora_weights` True or False (as in PEFT: the other "
             f"inits rewrite the base from its kernel alone); got "
             f"{_show(spec.init_lora_weights)}.")
  d = spec.lora_dropout
  if not _is_real(d) or not 0.0 <= d < 1.0:
    p.append(f"`lora_dropout` must be a number in [0, 1); got lora_dropout={_show(d)}. "
             "Use 0.0 for no dropout.")
  else:
    set_("lora_dropout", float(d))
  if not (isinstance(spec.bias, str) and spec.bias in BIAS_MODES):
    p.append(f"`bias` must be one of {BIAS_MODES}; got bias={_show(spec.bias)}.")
  else:
    set_("bias", _str(spec.bias))


def _check_names(spec: LoraSpec, set_, p: list[str]) -> None:
  lp = spec.layers_pattern
  if isinstance(lp, (str, list, tuple)) and not lp:  # PEFT: an empty layers_pattern is unset
    set_("layers_pattern", None)
  for name, str_ok in (("target_modules", True), ("exclude_modules", True),
                       ("layers_pattern", False), ("modules_to_save", False),
                       ("kernel_names", False)):
    set_(name, _names(name, getattr(spec, name), p, str_ok=str_ok))
  if isinstance(spec.kernel_names, tuple):
    if bad := [n for n in spec.kernel_names if isinstance(n, str) and ("/" in n or n == "bias")]:
      p.append(f"`kernel_names` entries are leaf names (one path component, not 'bias'); got "
               f"{', '.join(map(repr, bad))}.")
  tm = spec.target_modules
  if isinstance(tm, (str, tuple)) and not tm:
    p.append(f"`target_modules={_jsonable(tm)!r}` selects nothing. Pass module names, a "
             "regex, or 'all-linear'.")
  elif isinstance(tm, str) and tm != ALL_LINEAR:
    _check_regex("`target_modules`", tm, p)
  if isinstance(spec.exclude_modules, str):
    _check_regex("`exclude_modules`", spec.exclude_modules, p)
  if isinstance(spec.layers_pattern, tuple):
    for pat in spec.layers_pattern:
      if isinstance(pat, str) and pat:
        _check_regex("`layers_pattern` entry", pat, p, embedded=True)


def _check_layers(spec: LoraSpec, set_, p: list[str]) -> None:
  lt = spec.layers_to_transform
  items = (lt,) if _is_int(lt) else lt
  if lt is None:
    if isinstance(spec.layers_pattern, tuple):
      p.append(f"`layers_pattern={list(spec.layers_pattern)!r}` was given without "
               "`layers_to_transform`. Pass the layer indices to keep, e.g. "
               "`layers_to_transform=[0, 1]`, or drop `layers_pattern`.")
  elif not isinstance(items, (list, tuple, set, frozenset, range)) or not items:
    p.append(f"`layers_to_transform` must be an int or a non-empty list of ints; got "
             f"{_show(lt)}. Pass e.g. `layers_to_transform=[0, 1]`.")
  elif bad := [i for i in map(_py, items) if not _is_int(i) or i < 0]:
    p.append("`layers_to_transform` entries must be ints >= 0; got "
             f"{', '.join(map(_show, bad))}.")
  else:
    set_("layers_to_transform",
         int(lt) if _is_int(lt) else tuple(sorted({int(i) for i in items})))


def _check_init(spec: LoraSpec, set_, p: list[str]) -> None:
  init = spec.init_lora_weights
  name = _str(init) if isinstance(init, str) else None  # compared below; never an array
  if not (isinstance(init, bool) or (name and (
          name in _INIT_NAMES or _PISSA_NITER.fullmatch(name)))):
    p.append(f"`init_lora_weights` must be one of {_INIT_VALID}; got "
             f"init_lora_weights={_show(init)}.")
  elif name:
    set_("init_lora_weights", name)
  init = name
  if init == "orthogonal" and _is_int(spec.r) and spec.r % 2:
    p.append(f"`init_lora_weights='orthogonal'` needs an even `r`; got r={spec.r}. "
             f"Use r={spec.r + 1} or another init.")
  lc = spec.loftq_config
  if not isinstance(lc, Mapping):
    p.append(f"`loftq_config` must be a dict; got {_show(lc)} ({type(lc).__name__}).")
    return
  n = len(p)
  if unknown := sorted(map(str, set(lc) - set(_LOFTQ_KEYS))):
    p.append(f"`loftq_config` has unknown keys {unknown}; valid keys are "
             f"{list(_LOFTQ_KEYS)}.")
  if not (_is_int(bits := lc.get("loftq_bits", 4)) and bits in (4, 8)):
    p.append(f"`loftq_config['loftq_bits']` must be 4 or 8; got {_show(bits)}.")
  if not (_is_int(it := lc.get("loftq_iter", 1)) and it >= 1):
    p.append(f"`loftq_config['loftq_iter']` must be an int >= 1; got {_show(it)}.")
  if init == "loftq" and not lc:
    p.append("`init_lora_weights='loftq'` needs `loftq_config`, e.g. "
             "`loftq_config={'loftq_bits': 4, 'loftq_iter': 1}`.")
  if len(p) == n:  # valid: known str keys, int values
    set_("loftq_config", FrozenDict({_str(k): int(v) for k, v in lc.items()}, "loftq_config"))


def _check_tokens(spec: LoraSpec, set_, p: list[str]) -> None:
  """``trainable_token_indices``: None, row indices, or ``{module name: row indices}``."""
  tti = spec.trainable_token_indices

  def rows(what: str, v) -> tuple[int, ...] | None:
    ok = isinstance(v, (list, tuple)) and v and all(_is_int(i) and i >= 0 for i in v)
    if not ok:
      p.append(f"{what} must be a non-empty list of row indices (ints >= 0); got {_show(v)}.")
      return None
    if len(set(v)) != len(v):
      p.append(f"{what} repeats rows: {_show(v)}.")
      return None
    return tuple(int(i) for i in v)

  if tti is None:
    return
  if isinstance(tti, Mapping):
    out = {}
    for k, v in tti.items():
      if not isinstance(k, str) or not k:
        p.append(f"`trainable_token_indices` keys are module names (str); got {_show(k)}.")
      elif (r := rows(f"`trainable_token_indices[{k!r}]`", v)) is not None:
        out[_str(k)] = r
    if not tti:
      p.append("`trainable_token_indices={}` selects nothing; pass None or {module: [rows]}.")
    set_("trainable_token_indices", FrozenDict(out, "trainable_token_indices"))
  elif (r := rows("`trainable_token_indices`", tti)) is not None:
    set_("trainable_token_indices", r)


def _check_task(spec: LoraSpec, set_, p: list[str]) -> None:
  tt = spec.task_type
  if tt is None or isinstance(tt, TaskType):
    return
  try:
    if not isinstance(tt, str):
      raise ValueError
    set_("task_type", TaskType(tt.upper()))
  except ValueError:
    p.append(f"`task_type` must be None or one of {[t.value for t in TaskType]}; "
             f"got task_type={_show(tt)}.")


def _check_groups(spec: LoraSpec) -> list[str]:
  """Checks ``target_modules`` against the ``finetune_*`` group flags."""
  p = []
  flags = {name: getattr(spec, name) for name in GROUP_FLAGS}
  if bad := [f"{k}={_show(v)}" for k, v in flags.items()
             if v is not None and not isinstance(v, bool)]:
    p.append(f"The `finetune_*` flags must be None, True or False; got {', '.join(bad)}.")
  given = [k for k, v in flags.items() if v is not None]
  if spec.target_modules is not None and given:
    p.append(f"`target_modules` and the group flags ({', '.join(given)}) are alternatives; "
             "pass one or the other.")
  if spec.target_modules is None and not given:
    p.append("No target given: pass `target_modules` (a list of module names, a regex, or "
             "'all-linear'), or set a group flag such as `finetune_attention_modules=True`.")
  for a, b in (GROUP_FLAGS[:2], GROUP_FLAGS[2:]):
    if flags[a] is False and flags[b] is False:
      p.append(f"`{a}=False` and `{b}=False` select nothing; set at least one to True "
               "(or leave it unset).")
  return p


# --------------------------------------------------------------------------
# Value checks and normalisation
# --------------------------------------------------------------------------

def _py(x: Any) -> Any:
  """A NumPy scalar (bool, int, float, str) as the Python value; anything else as is."""
  if isinstance(x, (np.bool_, np.integer, np.floating, np.str_)):
    return x.item()
  return x


def _str(x: str) -> str:
  return str.__str__(x)  # the exact-str value of a str subclass (np.str_, a str enum)


def _show(x: Any, limit: int = 80) -> str:
  s = repr(x)
  return s if len(s) <= limit else s[:limit - 5] + " ...>"


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _rank(v: Any) -> tuple[int | None, str | None]:
  if not _is_int(v) or v <= 0:
    return None, "an int > 0"
  if v > MAX_RANK:
    return None, ("at most 2**31 - 1 (a rank never exceeds the smaller dimension of the "
                  "kernel it adapts)")
  return int(v), None


def _alpha(v: Any) -> tuple[int | float | None, str | None]:
  if not _is_real(v):
    return None, "a finite number"
  try:
    f = float(v)
  except OverflowError:  # an int beyond float range
    f = math.inf if v > 0 else -math.inf
  else:
    if not math.isfinite(f):
      return None, "a finite number"
  if abs(f) > MAX_ALPHA:
    return None, (f"a number with magnitude <= {MAX_ALPHA:.4g}, so that the scaling "
                  "alpha / r stays finite in float32")
  return (int(v) if _is_int(v) else f), None


def _axes(v: Any) -> tuple[tuple[int, ...] | None, str | None]:
  why = "a non-empty tuple of distinct ints >= 0"
  items = (v,) if _is_int(v) else v
  if not isinstance(items, (list, tuple)) or not items:
    return None, why
  items = [_py(i) for i in items]
  if not all(_is_int(i) and i >= 0 for i in items) or len(set(items)) != len(items):
    return None, why
  return tuple(int(i) for i in items), None


def _pattern_dict(name: str, value: Any, check, p: list[str]) -> Any:
  """Validates a ``{regex key: value}`` field; returns a :class:`FrozenDict` copy."""
  if not isinstance(value, Mapping):
    p.append(f"`{name}` must be a dict; got {_show(value)} ({type(value).__name__}).")
    return value
  out = {}
  for key, v in value.items():
    key, v = _py(key), _py(v)
    if not isinstance(key, str) or not key:
      p.append(f"`{name}` keys must be non-empty str; got key {_show(key)}.")
      continue
    key = _str(key)
    _check_regex(f"`{name}` key", key, p, embedded=True, caret=True)
    out[key], why = check(v)
    if why:
      p.append(f"`{name}[{key!r}]` must be {why}; got {_show(v)}.")
  return FrozenDict(out, name)


def _names(field: str, value: Any, problems: list[str], *, str_ok: bool) -> Any:
  """Normalises a "str or sequence of str" field; records problems."""
  if value is None:
    return None
  if isinstance(value, str):
    if not value and not str_ok:
      problems.append(f"`{field}=''` names no module. Pass None for none, or names such as "
                      f"`{field}=['classifier']`.")
      return value
    return _str(value) if str_ok else (_str(value),)
  if isinstance(value, (set, frozenset)):
    items = tuple(sorted(value, key=str))
  elif isinstance(value, (list, tuple)):
    items = tuple(map(_py, value))
  else:
    hint = " Convert an array with `.tolist()`." if hasattr(value, "shape") else ""
    problems.append(f"`{field}` must be None, a str or a list of str; got {_show(value)} "
                    f"({type(value).__name__}). Pass e.g. `{field}=['q_proj', 'v_proj']`.{hint}")
    return value
  if bad := [v for v in items if not isinstance(v, str) or not v]:
    problems.append(f"`{field}` entries must be non-empty str; got {', '.join(map(_show, bad))}.")
    return items
  return tuple(map(_str, items))


def _check_regex(what: str, pattern: str, problems: list[str], *, embedded: bool = False,
                 caret: bool = False) -> None:
  """Records a problem if ``pattern`` does not compile.

  ``embedded``: it must also compile inside ``(?:...)``; ``caret``: a leading
  ``^`` is an anchor the matcher strips (see :func:`compile_pattern_key`).
  """
  body = pattern[1:] if caret and pattern.startswith("^") else pattern
  try:
    re.compile(body)
  except re.error as e:
    problems.append(f"{what} {pattern!r} is not a valid regular expression ({e}). "
                    "Escape special characters with `re.escape` or fix the pattern.")
    return
  if embedded:  # the matcher embeds it in a larger regex, e.g. (?:.*/)?(?:key)
    try:
      re.compile(f"(?:{body})")
    except re.error as e:
      problems.append(f"{what} {pattern!r} cannot be part of a larger regular expression "
                      f"({e}). Use a scoped flag such as `(?i:...)` instead of `(?i)`.")


def _jsonable(value: Any) -> Any:
  if isinstance(value, enum.Enum):
    return value.value
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value
