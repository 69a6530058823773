"""LoRA configuration: :class:`LoraSpec` and :class:`TaskType`.

Field names and defaults are those of Hugging Face PEFT's ``LoraConfig``, so a
PEFT configuration carries over unchanged. A spec is a frozen, hashable value:
it is validated once, when it is built, and can be used as static data under
``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
GROUP_FLAGS = ("finetune_attention_modules", "finetune_mlp_modules",
               "finetune_language_layers", "finetune_vision_layers")
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


def compile_pattern_key(key: str) -> re.Pattern[str]:
  """Compiles a ``rank_pattern`` / ``alpha_pattern`` / ``kernel_axes`` key.

  A leading ``^`` (anchor at the start of the path) is stripped; the caller
  decides where the key may start. Raises ``re.error`` for a bad regex.

  >>> compile_pattern_key("^h_0/attn").pattern
  'h_0/attn'
  """
  return re.compile(key[1:] if key.startswith("^") else key)


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _number(x: Any) -> int | float:
  return int(x) if _is_int(x) else float(x)


def _names(field: str, value: Any, problems: list[str], *, str_ok: bool) -> Any:
  """Normalises a "str or sequence of str" field; records problems."""
  if value is None:
    return None
  if isinstance(value, str):
    return value if str_ok else (value,)
  if isinstance(value, (set, frozenset)):
    items = tuple(sorted(value, key=str))
  elif isinstance(value, (list, tuple)):
    items = tuple(value)
  else:
    problems.append(f"`{field}` must be None, a str or a list of str; got {value!r} "
                    f"({type(value).__name__}). Pass e.g. `{field}=['q_proj', 'v_proj']`.")
    return value
  if bad := [v for v in items if not isinstance(v, str) or not v]:
    problems.append(f"`{field}` entries must be non-empty str; got {', '.join(map(repr, bad))}.")
  return items


def _check_regex(what: str, pattern: str, problems: list[str]) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    problems.append(f"{what} {pattern!r} is not a valid regular expression ({e}). "
                    "Escape special characters with `re.escape` or fix the pattern.")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LoraSpec:
  """What to adapt with LoRA, and how. Names and defaults follow PEFT.

  Attributes:
    r: LoRA rank, an int > 0.
    lora_alpha: Scaling numerator: the update is scaled by ``alpha / r``.
    use_rslora: Scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
    target_modules: ``"all-linear"`` (every matmul kernel but the output head),
      another str (a regex that must ``re.fullmatch`` the "/"-joined module
      path), or a list (a path equal to an entry or ending in "/" + entry).
    exclude_modules: Modules never adapted: a regex (str) or a list, as above.
    layers_to_transform: Keep only these layer indices (int or list).
    layers_pattern: Name(s) of the layer list, e.g. ``"layers"`` or ``"h"``;
      only valid together with ``layers_to_transform``.
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
    loftq_config: ``{"loftq_bits": 4 or 8, "loftq_iter": int >= 1}``.
    task_type: A :class:`TaskType` or its name.
    finetune_attention_modules: Group flag (attention projections); the
      four group flags are an alternative to ``target_modules``.
    finetune_mlp_modules: Group flag (MLP projections).
    finetune_language_layers: Group flag (language tower).
    finetune_vision_layers: Group flag (vision tower).
    kernel_axes: lojax-specific: ``{key: input_axes}`` for N-D kernels whose
      module path the key matches (same key rule as ``rank_pattern``).

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
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  lora_dropout: float = 0.0
  bias: str = "none"
  modules_to_save: None | Sequence[str] = None
  init_lora_weights: bool | str = True
  use_dora: bool = False
  loftq_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  task_type: None | TaskType | str = None
  finetune_attention_modules: None | bool = None
  finetune_mlp_modules: None | bool = None
  finetune_language_layers: None | bool = None
  finetune_vision_layers: None | bool = None
  kernel_axes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    p: list[str] = []  # every problem found; raised together at the end

    def set_(name: str, value: Any) -> None:
      object.__setattr__(self, name, value)

    if not _is_int(self.r) or self.r <= 0:
      p.append(f"`r` must be an int > 0; got r={self.r!r}. Pass e.g. `r=8`.")
    else:
      set_("r", int(self.r))
    if not _is_real(self.lora_alpha) or not math.isfinite(self.lora_alpha):
      p.append(f"`lora_alpha` must be a finite number; got lora_alpha={self.lora_alpha!r}. "
               "Pass e.g. `lora_alpha=16`.")
    else:
      set_("lora_alpha", _number(self.lora_alpha))
    for name in ("use_rslora", "use_dora"):
      if not isinstance(getattr(self, name), bool):
        p.append(f"`{name}` must be True or False; got {getattr(self, name)!r}.")
    d = self.lora_dropout
    if not _is_real(d) or not 0.0 <= d < 1.0:
      p.append(f"`lora_dropout` must be a number in [0, 1); got lora_dropout={d!r}. "
               "Use 0.0 for no dropout.")
    else:
      set_("lora_dropout", float(d))
    if self.bias not in BIAS_MODES:
      p.append(f"`bias` must be one of {BIAS_MODES}; got bias={self.bias!r}.")

    for name, str_ok in (("target_modules", True), ("exclude_modules", True),
                         ("layers_pattern", False), ("modules_to_save", False)):
      set_(name, _names(name, getattr(self, name), p, str_ok=str_ok))
    tm = self.target_modules
    if isinstance(tm, str) and tm != ALL_LINEAR:
      _check_regex("`target_modules`", tm, p)
    if tm == ():
      p.append("`target_modules=[]` selects nothing. Pass module names, a regex, or "
               "'all-linear'.")
    if isinstance(self.exclude_modules, str):
      _check_regex("`exclude_modules`", self.exclude_modules, p)
    for pat in self.layers_pattern or ():
      if isinstance(pat, str):
        _check_regex("`layers_pattern` entry", pat, p)

    lt = self.layers_to_transform
    items = (lt,) if _is_int(lt) else lt
    if lt is None:
      if self.layers_pattern is not None:
        p.append(f"`layers_pattern={list(self.layers_pattern)!r}` was given without "
                 "`layers_to_transform`. Pass the layer indices to keep, e.g. "
                 "`layers_to_transform=[0, 1]`, or drop `layers_pattern`.")
    elif not isinstance(items, (list, tuple, set, frozenset)) or not items:
      p.append(f"`layers_to_transform` must be an int or a non-empty list of ints; got "
               f"{lt!r}. Pass e.g. `layers_to_transform=[0, 1]`.")
    elif bad := [i for i in items if not _is_int(i) or i < 0]:
      p.append("`layers_to_transform` entries must be ints >= 0; got "
               f"{', '.join(map(repr, bad))}.")
    else:
      set_("layers_to_transform",
           int(lt) if _is_int(lt) else tuple(sorted({int(i) for i in items})))

    for name, check, expected in (
        ("rank_pattern", _positive_int, "an int > 0"),
        ("alpha_pattern", _finite, "a finite number"),
        ("kernel_axes", _axes, "a non-empty tuple of distinct ints >= 0"),
    ):
      set_(name, _pattern_dict(name, getattr(self, name), check, expected, p))

    init = self.init_lora_weights
    if not (isinstance(init, bool) or (isinstance(init, str) and (
            init in _INIT_NAMES or _PISSA_NITER.fullmatch(init)))):
      p.append(f"`init_lora_weights` must be one of {_INIT_VALID}; got "
               f"init_lora_weights={init!r}.")
    if init == "orthogonal" and _is_int(self.r) and self.r % 2:
      p.append(f"`init_lora_weights='orthogonal'` needs an even `r`; got r={self.r}. "
               f"Use r={self.r + 1} or another init.")
    lc = self.loftq_config
    if not isinstance(lc, Mapping):
      p.append(f"`loftq_config` must be a dict; got {lc!r} ({type(lc).__name__}).")
    else:
      set_("loftq_config", dict(lc))
      if unknown := sorted(map(str, set(lc) - set(_LOFTQ_KEYS))):
        p.append(f"`loftq_config` has unknown keys {unknown}; valid keys are "
                 f"{list(_LOFTQ_KEYS)}.")
      if not (_is_int(bits := lc.get("loftq_bits", 4)) and bits in (4, 8)):
        p.append(f"`loftq_config['loftq_bits']` must be 4 or 8; got {bits!r}.")
      if not (_is_int(it := lc.get("loftq_iter", 1)) and it >= 1):
        p.append(f"`loftq_config['loftq_iter']` must be an int >= 1; got {it!r}.")
      if init == "loftq" and not lc:
        p.append("`init_lora_weights='loftq'` needs `loftq_config`, e.g. "
                 "`loftq_config={'loftq_bits': 4, 'loftq_iter': 1}`.")

    tt = self.task_type
    if tt is not None and not isinstance(tt, TaskType):
      try:
        set_("task_type", TaskType(tt.upper() if isinstance(tt, str) else tt))
      except ValueError:
        p.append(f"`task_type` must be None or one of {[t.value for t in TaskType]}; "
                 f"got task_type={tt!r}.")

    p.extend(_check_groups(self))
    if p:
      head = "Invalid LoraSpec: " if len(p) == 1 else f"Invalid LoraSpec ({len(p)} problems):\n  - "
      raise ValueError(head + "\n  - ".join(p))

  def _canonical(self) -> tuple:
    return tuple((f.name, _freeze(getattr(self, f.name))) for f in dataclasses.fields(self))

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
    """A JSON-friendly dict of all fields (enums as str, tuples as lists).

    >>> LoraSpec(target_modules=["q"], task_type="CAUSAL_LM").to_dict()["task_type"]
    'CAUSAL_LM'
    """
    return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LoraSpec:
    """Rebuilds a spec from :meth:`to_dict` output.

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
      raise ValueError(f"`data` has keys that are not LoraSpec fields: {unknown}. Valid "
                       f"fields: {names}. Remove the extra keys before calling `from_dict`.")
    return cls(**data)


def _positive_int(v: Any) -> int | None:
  return int(v) if _is_int(v) and v > 0 else None


def _finite(v: Any) -> int | float | None:
  return _number(v) if _is_real(v) and math.isfinite(v) else None


def _pattern_dict(name: str, value: Any, check, expected: str, p: list[str]) -> Any:
  """Validates a ``{regex key: value}`` field; returns a plain dict copy."""
  if not isinstance(value, Mapping):
    p.append(f"`{name}` must be a dict; got {value!r} ({type(value).__name__}).")
    return value
  out = {}
  for key, v in value.items():
    if not isinstance(key, str) or not key:
      p.append(f"`{name}` keys must be non-empty str; got key {key!r}.")
      continue
    try:
      compile_pattern_key(key)
    except re.error as e:
      p.append(f"`{name}` key {key!r} is not a valid regular expression ({e}). "
               "Escape special characters with `re.escape` or fix the key.")
    if (out.setdefault(key, check(v))) is None:
      p.append(f"`{name}[{key!r}]` must be {expected}; got {v!r}.")
  return out


def _check_groups(spec: LoraSpec) -> list[str]:
  """Checks ``target_modules`` against the ``finetune_*`` group flags."""
  p = []
  flags = {name: getattr(spec, name) for name in GROUP_FLAGS}
  if bad := [f"{k}={v!r}" for k, v in flags.items() if v is not None and not isinstance(v, bool)]:
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


def _axes(v: Any) -> tuple[int, ...] | None:
  items = (v,) if _is_int(v) else v
  if not isinstance(items, (list, tuple)) or not items:
    return None
  if not all(_is_int(i) and i >= 0 for i in items) or len(set(items)) != len(items):
    return None
  return tuple(int(i) for i in items)


def _freeze(value: Any) -> Any:
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _jsonable(value: Any) -> Any:
  if isinstance(value, enum.Enum):
    return value.value
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value
