"""Which kernels a :class:`LoraSpec` adapts: :func:`resolve` and its rules.

Every problem is collected and raised in one ``ValueError``; no rule may match
nothing silently. A *module path* is the "/"-joined tree path of the dict that
holds a kernel: ``params/h_3/attn/c_attn`` (linen), ``layers/3/attn/query``
(NNX lists give a bare digit component).

Names (PEFT's rules, with "/" for "."). A str ``target_modules`` or
``exclude_modules`` is a regex that must ``re.fullmatch`` the module path; a
list entry matches a path equal to it or ending in ``"/" + entry`` (entries
may contain "/": ``"attn/c_attn"``). ``modules_to_save`` uses the list rule;
those modules and everything below them are never targets. A kernel is
excluded when its path or an enclosing module's path matches
``exclude_modules``. Both win over ``target_modules``.

PEFT names. A list entry, pattern key or ``layers_pattern`` without "/" made
of identifiers and layer numbers joined by dots (``"h.1.attn.c_attn"``) is a
PEFT module name: each dot is a separator ("/" or "." in the path; before a
number also linen's "_"), never a regex wildcard (``spec.peft_name_regex``).
A str regex without "/" also matches when it fullmatches the path with its
"/" written "." (``params.h_1.attn``), or with linen's ``h_1`` also written
``h.1`` (``params.h.1.attn``).

Output heads. ``"all-linear"`` adapts every dense (matmul) kernel except the
output heads. A kernel is a head when (a) the last component of its path is
in :data:`HEAD_NAMES`, or (b) it is a 2-D dense kernel outside the repeated blocks (its
path has no layer index and it is not stacked) whose output size (last axis)
equals the vocabulary size: the number of rows of the largest ``embedding``
leaf (the token table, not a position table). A model with tied
embeddings computes its logits with the embedding matrix: it has no head
kernel and nothing is left out. Embeddings and convolutions are never in
``"all-linear"``; name them in a list to adapt them.

Groups. Without ``target_modules`` the ``finetune_*`` flags pick from the
``"all-linear"`` set. In each pair (attention / MLP, language / vision) an
unset flag counts as True only when the other one is not set to True: so
``finetune_attention_modules=True`` alone adapts attention only, and
``finetune_mlp_modules=False`` alone adapts attention too. *Attention*: a component
(any case, linen suffixes like ``_0`` ignored) is in :data:`ATTENTION_NAMES` or
starts with one of :data:`ATTENTION_PREFIXES`, or the last component is in
:data:`ATTENTION_LAST` (a projection name). *MLP*: a component is in
:data:`MLP_NAMES`, or the last is in :data:`MLP_LAST`. Attention wins if both
hold. *Vision* tower: a component contains one of :data:`VISION_PARTS`;
everything else is the *language* tower. (The docs render these tables.)

Layers. A path's layer index comes from its first numbered component: all
digits (``layers/3``) or ending in ``_<digits>`` or ``.<digits>`` (``h_3``,
``Block_2``, ``blocks.0``). With ``layers_pattern`` only ``<pattern>/<digits>``,
``<pattern>_<digits>`` or ``<pattern>.<digits>`` count, the pattern possibly
spanning components (``model/layers``); use it when an outer module carries a
number (``Encoder_0/Block_3``).
A path without an index never matches ``layers_to_transform``. Stacked
kernels (layers scanned into a leading axis) use positions along that axis,
unless ``layers_pattern`` finds an index in the path (so linen auto-names such
as ``ScanBlock_0`` are not read as layer 0).

Pattern keys (``rank_pattern``, ``alpha_pattern``, ``kernel_axes``). A key
matches a path when ``re.fullmatch(rf"(?:.*/)?(?:{key})", path)`` holds, i.e.
it matches a whole "/"-separated tail; a key starting with ``^`` must match
the whole path. Among the matching keys of one dict the most specific wins:
the one matching the longest tail (a ``^`` key: the whole path), then the
longer key, then the lexicographically smaller one. Dict order never matters:
``{"c_attn": 4, "h_8/attn/c_attn": 16}`` gives ``params/h_8/attn/c_attn``
r=16 and every other ``c_attn`` r=4. A key that matches no target is an error.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from lojax._src.spec import ALL_LINEAR, GROUP_FLAGS, LoraSpec, compile_pattern_key, peft_name_regex

_V = TypeVar("_V")

HEAD_NAMES = frozenset(
    {"lm_head", "head", "output_head", "out_head", "classifier", "score", "qa_outputs", "logits"})
KINDS = ("dense", "conv", "embed", "unknown")
ATTENTION_NAMES = frozenset({"attn", "attention", "self_attn", "self_attention", "cross_attn",
                         "cross_attention", "encdecattention", "mha"})
ATTENTION_PREFIXES = ("multiheaddotproductattention", "multiheadattention")
ATTENTION_LAST = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv",
                        "c_attn", "wq", "wk", "wv", "wo", "out_proj"})
MLP_NAMES = frozenset({"mlp", "ffn", "feed_forward", "feedforward", "mlpblock"})
MLP_LAST = frozenset({"fc1", "fc2", "c_fc", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3",
                       "wi", "wi_0", "wi_1", "dense_h_to_4h", "dense_4h_to_h", "intermediate"})
VISION_PARTS = ("vision", "visual", "vit", "image_encoder", "img")
_DIGITS = re.compile(r"[0-9]+")
_SUFFIX_INDEX = re.compile(r".*[_.]([0-9]+)")  # h_3, Block_2, blocks.0 (one path component)
_LINEN_INDEX = re.compile(r"_([0-9]+)(?=/|$)")  # h_3/attn -> h.3/attn in a PEFT-style name


@dataclasses.dataclass(frozen=True)
class KernelInfo:
  """One kernel of the parameter tree, as seen by :func:`resolve`.

  Attributes:
    path: Module path, e.g. ``"params/h_0/attn/c_attn"``.
    leaf: Leaf name (``"kernel"``, ``"embedding"``, ``"w"``, ...), or ``""``
      when the leaf is its own module (``path`` is then its leaf path).
    shape: Full leaf shape, including a leading layer axis if stacked.
    kind: ``"dense"``, ``"conv"``, ``"embed"`` or ``"unknown"`` (an N-D
      kernel whose use is not known).
    stacked: Size of the leading layer axis of scanned layers, else None.
    out_size: The size of its output side (the product of its output axes,
      per layer), when known from tracing; else None (the last axis is taken).
    named: Whether its name marks it as a kernel (``kernel``, ``w``, ...), as
      opposed to a leaf found only by its use.
    experts: Whether it has expert axes (a MoE layer's ``[E, in, out]``).
      ``"all-linear"`` and the group flags choose among dense kernels that are
      named or, found by use, have no expert axes (a bare projection array, as
      gemma's MLP holds): PEFT's ``all-linear`` adapts ``Linear`` modules, not
      the expert parameters ``target_parameters`` names.

  >>> KernelInfo("params/h_0/attn/c_attn", "kernel", (64, 192), "dense").shape
  (64, 192)
  """

  path: str
  leaf: str
  shape: tuple[int, ...]
  kind: str
  stacked: int | None = None
  named: bool = True
  out_size: int | None = None
  experts: bool = False

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    if self.kind not in KINDS:
      raise ValueError(f"`kind` must be one of {KINDS}; got kind={self.kind!r} "
                       f"for {self.path!r}.")
    if self.stacked is not None and (not self.shape or self.shape[0] != self.stacked):
      raise ValueError(f"`stacked={self.stacked}` must equal the leading axis of "
                       f"shape={self.shape} for {self.path!r}.")


@dataclasses.dataclass(frozen=True)
class Target:
  """One kernel to adapt.

  Attributes:
    path: Module path of the kernel.
    r: Rank.
    alpha: Alpha.
    scaling: ``spec.scaling(r, alpha)``.
    layers: For a stacked kernel, the positions along the layer axis to
      adapt; None means all of them (or not stacked).

  >>> Target("params/h_0/attn/c_attn", r=8, alpha=16, scaling=2.0).layers is None
  True
  """

  path: str
  r: int
  alpha: float
  scaling: float
  layers: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Resolution:
  """What :func:`resolve` decided.

  Attributes:
    targets: Adapted kernels, sorted by path.
    modules_to_save: Module paths copied and trained in full.
    bias_paths: Full leaf paths (``"<module>/bias"``) of trainable biases.
    heads: Module paths recognised as output heads.

  >>> Resolution(targets=(), modules_to_save=(), bias_paths=(), heads=()).targets
  ()
  """

  targets: tuple[Target, ...]
  modules_to_save: tuple[str, ...]
  bias_paths: tuple[str, ...]
  heads: tuple[str, ...]


def _coverage(key: str, path: str) -> int | None:
  """Length of the longest "/"-separated tail of ``path`` that ``key`` matches."""
  rx = compile_pattern_key(key)  # re caches compiled patterns
  if key.startswith("^"):
    return len(path) if rx.fullmatch(path) else None
  for start in [0] + [i + 1 for i, c in enumerate(path) if c == "/"]:
    if rx.fullmatch(path, start):
      return len(path) - start
  return None


def lookup(pattern: Mapping[str, _V], path: str) -> tuple[str, _V] | None:
  """The most specific key of ``pattern`` that matches ``path``, with its value.

  Keys follow the rule in the module docstring: a key must match a whole
  "/"-separated tail of the path (``^key``: the whole path); the longest
  matched tail wins, then the longer key, then the smaller key.

  Args:
    pattern: ``{regex key: value}``, e.g. ``spec.rank_pattern``.
    path: A module path.

  Returns:
    ``(key, value)`` of the winning key, or None if no key matches.

  >>> lookup({"c_attn": 4, "h_8/attn/c_attn": 16}, "params/h_8/attn/c_attn")
  ('h_8/attn/c_attn', 16)
  """
  ranked = [((-cover, -len(key), key), key, value) for key, value in pattern.items()
            if (cover := _coverage(key, path)) is not None]
  return min(ranked)[1:] if ranked else None  # keys are unique: values are never compared


def layer_index(path: str, layers_pattern: Sequence[str] | None = None) -> int | None:
  """The layer index in ``path``, read as described in the module docstring.

  >>> layer_index("params/h_3/attn/c_attn"), layer_index("layers/2/mlp/fc1")
  (3, 2)
  """
  parts = path.split("/")
  for i, part in enumerate(parts):
    if layers_pattern is None:
      if _DIGITS.fullmatch(part):
        return int(part)
      if m := _SUFFIX_INDEX.fullmatch(part):
        return int(m.group(1))
      continue
    nxt = parts[i + 1] if i + 1 < len(parts) else ""
    # The pattern may span components ending at this one: "model/layers" (or PEFT's dotted
    # "model.layers") before "/3".
    spans = ["/".join(parts[j:i + 1]) for j in range(i, -1, -1)]
    for pat in (peft_name_regex(p) or p for p in layers_pattern):
      if _DIGITS.fullmatch(nxt) and any(re.fullmatch(pat, s) for s in spans):
        return int(nxt)
      for span in spans:
        if m := re.fullmatch(rf"(?:{pat})[_.](?P<lojax_layer>[0-9]+)", span):
          return int(m.group("lojax_layer"))  # by name: the pattern may hold groups of its own
  return None


def list_match(entry: str) -> Callable[[str], bool]:
  """The list rule: the path is ``entry`` or ends in ``"/" + entry`` (a PEFT name: its parts)."""
  if rx := peft_name_regex(entry):
    return re.compile(rf"(?:.*/)?(?:{rx})").fullmatch
  return lambda path: path == entry or path.endswith("/" + entry)


def _regex_match(pattern: str) -> Callable[[str], bool]:
  """The regex rule: ``pattern`` fullmatches the path or, without "/", its dotted form."""
  rx = re.compile(pattern)
  if "/" in pattern:
    return rx.fullmatch
  return lambda path: bool(rx.fullmatch(path) or any(rx.fullmatch(d) for d in _dotted(path)))


def _dotted(path: str) -> tuple[str, str]:
  """A path written as PEFT names it: "." between components, linen's ``h_3`` also as ``h.3``."""
  return path.replace("/", "."), _LINEN_INDEX.sub(r".\1", path).replace("/", ".")


def _under(path: str, roots: Iterable[str]) -> bool:
  return any(path == r or path.startswith(r + "/") for r in roots)


def _closest(word: str, candidates: Iterable[str], n: int = 10) -> list[str]:
  """Up to ``n`` candidates, most similar to ``word`` first (difflib ratio).

  Paths that differ only in their numbers (one per layer) are shown once.
  """
  k = word.count("/") + 1

  def score(c: str) -> float:
    tail = "/".join(c.split("/")[-k:])
    return max(difflib.SequenceMatcher(None, word, c).ratio(),
               difflib.SequenceMatcher(None, word, tail).ratio())

  return _distinct(sorted(set(candidates), key=lambda c: (-score(c), c)))[:n]


def _distinct(paths: Iterable[str]) -> list[str]:
  """The first of each set of paths that differ only in their numbers (layers)."""
  firsts: dict[str, str] = {}
  for p in paths:
    firsts.setdefault(re.sub(r"[0-9]+", "#", p), p)
  return list(firsts.values())


def _fmt(paths: Iterable[str], n: int = 10) -> str:
  paths = list(paths)
  more = f", ... ({len(paths) - n} more)" if len(paths) > n else ""
  return ", ".join(paths[:n]) + more if paths else "(none)"


def _group(path: str) -> str | None:
  raw = [p.lower() for p in path.split("/")]
  parts = raw + [re.sub(r"_[0-9]+$", "", p) for p in raw]  # linen names: MlpBlock_0
  if (any(p in ATTENTION_NAMES or p.startswith(ATTENTION_PREFIXES) for p in parts)
          or raw[-1] in ATTENTION_LAST):
    return "attention"
  if any(p in MLP_NAMES for p in parts) or raw[-1] in MLP_LAST:
    return "mlp"
  return None


def _is_vision(path: str) -> bool:
  return any(v in p for p in path.lower().split("/") for v in VISION_PARTS)


def _select_groups(spec: LoraSpec, linear: list[KernelInfo], problems: list[str]):
  """The dense kernels chosen by the ``finetune_*`` flags (see module doc)."""
  given = [getattr(spec, f) for f in GROUP_FLAGS]

  def on(i, j):  # flag i, paired with flag j
    return given[i] if given[i] is not None else given[j] is not True

  attn, mlp, language, vision = on(0, 1), on(1, 0), on(2, 3), on(3, 2)
  groups = {g for g, on in (("attention", attn), ("mlp", mlp)) if on}
  towers = {t for t, on in ((False, language), (True, vision)) if on}
  chosen = [k for k in linear if _group(k.path) in groups and _is_vision(k.path) in towers]
  if not chosen:
    flags = ", ".join(f"{f}={getattr(spec, f)}" for f in GROUP_FLAGS)
    problems.append(
        f"The group flags ({flags}) selected no kernel. Attention kernels have a path "
        "component such as 'attn', 'attention', 'self_attn' or a last component such as "
        "'q_proj', 'query', 'c_attn'; MLP kernels have a component 'mlp', 'ffn', "
        "'feed_forward' or a last component such as 'fc1', 'c_fc', 'up_proj', 'wi'; vision "
        "kernels have a component containing 'vision', 'visual', 'vit', 'image_encoder' or "
        f"'img'. Candidates (dense kernels that are not heads): {_fmt(k.path for k in linear)}."
        " Pass `target_modules` instead.")
  return chosen


def _explain(what: str, word: str, hits: list[str], kernel_paths: list[str],
             leaf_shapes: Mapping[str, tuple[int, ...]]) -> str:
  """Why a target entry selected no kernel, given the non-kernel modules it hit."""
  if not hits:
    return (f"{what} matched no module path. Module paths that hold kernels, closest "
            f"first: {_fmt(_closest(word, kernel_paths))}.")
  details = []
  for m in hits[:5]:
    leaves = [f"{p[len(m) + 1:]} {tuple(s)}" for p, s in leaf_shapes.items()
              if p.rpartition("/")[0] == m]
    below = [k for k in kernel_paths if k.startswith(m + "/")]
    details.append(f"{m} (leaves: {', '.join(leaves)})" if leaves
                   else f"{m} (holds no leaf; kernels below it: {_fmt(below, 5)})")
  return (f"{what} matched only module paths that are not a matmul kernel: "
          f"{'; '.join(details)}. Target a module that holds a kernel: a leaf named `kernel`, "
          "`embedding`, `w`, `weight` or one of `kernel_names`, or (with `apply_fn`) any leaf "
          "a matmul, conv or lookup takes as its weight; `lojax.kernel_paths` lists them.")


def _requested(spec: LoraSpec, kernels: list[KernelInfo], heads: list[str],
               all_modules: list[str], leaf_shapes, problems: list[str]) -> list[KernelInfo]:
  """The kernels named by ``target_modules`` or chosen by the group flags."""
  tm = spec.target_modules
  kernel_paths = [k.path for k in kernels]
  if tm is None or tm == ALL_LINEAR:
    linear = [k for k in kernels if k.kind == "dense" and (k.named or not k.experts)
              and k.path not in heads]
    if tm is None:
      return _select_groups(spec, linear, problems)
    if not linear:
      problems.append("`target_modules='all-linear'` found no dense kernel that is not an "
                      f"output head. Kernels: {_fmt(kernel_paths)}; heads: {_fmt(heads)}.")
    return linear
  if isinstance(tm, str):
    rules = [(f"`target_modules` regex {tm!r}", tm, _regex_match(tm))]
  else:
    rules = [(f"`target_modules` entry {e!r}", e, list_match(e)) for e in tm]
  matched: dict[str, KernelInfo] = {}
  for what, word, rule in rules:
    hits = [k for k in kernels if rule(k.path)]
    if not hits:
      others = _distinct(m for m in all_modules if rule(m))
      problems.append(_explain(what, word, others, kernel_paths, leaf_shapes))
    matched.update((k.path, k) for k in hits)
  return sorted(matched.values(), key=lambda k: k.path)


def _pick_layers(spec: LoraSpec, chosen: list[KernelInfo], problems: list[str]):
  """Applies ``layers_to_transform``; returns ``[(kernel, layers or None)]``."""
  lt = spec.layers_to_transform
  if lt is None or not chosen:
    return [(k, None) for k in chosen]
  wanted = {lt} if isinstance(lt, int) else set(lt)
  pats = spec.layers_pattern
  picked, available = [], set()
  for k in chosen:
    idx = layer_index(k.path, pats)
    if k.stacked and (idx is None or pats is None):
      available.update(range(k.stacked))
      layers = tuple(i for i in sorted(wanted) if i < k.stacked)
      if layers:
        picked.append((k, None if len(layers) == k.stacked else layers))
    elif idx is not None:
      available.add(idx)
      if idx in wanted:
        picked.append((k, None))
  if missing := sorted(wanted - available):
    how = (f"with `layers_pattern={list(pats)!r}`" if pats
           else "(components like 'h_3', 'layers_3' or 'layers/3', or stacked layers)")
    problems.append(
        f"`layers_to_transform` indices {missing} select no layer. Layer indices found in "
        f"the targeted paths {how}: {sorted(available) or 'none'}. Targeted paths: "
        f"{_fmt(k.path for k in chosen)}.")
  return picked


def resolve(spec: LoraSpec, kernels: Sequence[KernelInfo], module_paths: Sequence[str],
            leaf_shapes: Mapping[str, tuple[int, ...]]) -> Resolution:
  """Decides which kernels ``spec`` adapts, with which rank and alpha.

  The rules are stated in the module docstring.

  Args:
    spec: The LoRA spec.
    kernels: Every kernel of the tree.
    module_paths: Every internal node path of the tree.
    leaf_shapes: Every leaf's full "/" path mapped to its shape.

  Returns:
    A :class:`Resolution`.

  Raises:
    ValueError: listing every problem at once: entries of ``target_modules``,
      ``exclude_modules`` or ``modules_to_save`` that match nothing, matched
      leaves that are not matrices, ``layers_to_transform`` indices that
      select no layer, pattern keys that match no target.

  >>> k = [KernelInfo("params/h_0/attn/c_attn", "kernel", (4, 12), "dense")]
  >>> res = resolve(LoraSpec(target_modules=["c_attn"]), k, ["params/h_0/attn/c_attn"],
  ...               {"params/h_0/attn/c_attn/kernel": (4, 12)})
  >>> [(t.path, t.r) for t in res.targets]
  [('params/h_0/attn/c_attn', 8)]
  """
  if not isinstance(spec, LoraSpec):
    raise TypeError(f"`spec` must be a LoraSpec; got {type(spec).__name__}.")
  kernels = _sorted_kernels(kernels)
  all_modules = sorted(set(module_paths) | {k.path for k in kernels})
  problems: list[str] = []
  saved_roots = _saved_roots(spec, all_modules, problems)
  excluded = _excluded(spec, kernels, all_modules, problems)
  heads = _heads(kernels, leaf_shapes)
  n_problems = len(problems)
  matched = _requested(spec, kernels, heads, all_modules, leaf_shapes, problems)
  chosen = [k for k in matched if k.path not in excluded and not _under(k.path, saved_roots)]
  _check_matrices(chosen, problems)
  picked = _pick_layers(spec, chosen, problems)
  targeting_failed = len(problems) > n_problems
  if not picked and not problems:
    problems.append(_nothing_left(matched, excluded, saved_roots))
  targets = _targets(spec, picked)
  if targets and not targeting_failed:  # keys are only judged against a sound target set
    _check_pattern_keys(spec, targets, problems)
  _raise_problems(problems)
  return Resolution(targets=tuple(targets), modules_to_save=tuple(saved_roots),
                    bias_paths=_bias_paths(spec, targets, leaf_shapes, saved_roots),
                    heads=tuple(sorted(heads)))


def _sorted_kernels(kernels: Sequence[KernelInfo]) -> list[KernelInfo]:
  """The candidate kernels sorted by path; a path listed twice is an error."""
  kernels = sorted(kernels, key=lambda k: k.path)
  if dup := sorted(p for p, n in collections.Counter(k.path for k in kernels).items() if n > 1):
    raise ValueError(f"`kernels` lists these module paths more than once: {dup}.")
  return kernels


def _saved_roots(spec: LoraSpec, all_modules: list[str], problems: list[str]) -> list[str]:
  """The outermost ``modules_to_save`` modules (trained in full, never targets)."""
  optional = set(spec.optional_modules_to_save())  # names a task adds may match nothing
  saved: set[str] = set()
  for entry in spec.effective_modules_to_save():
    hits = [m for m in all_modules if list_match(entry)(m)]
    if not hits and entry not in optional:
      problems.append(f"`modules_to_save` entry {entry!r} matched no module path. Closest "
                      f"module paths: {_fmt(_closest(entry, all_modules))}.")
    saved.update(hits)
  return sorted(m for m in saved if not _under(m, saved - {m}))


def _excluded(spec: LoraSpec, kernels: list[KernelInfo], all_modules: list[str],
              problems: list[str]) -> set[str]:
  """Kernel paths that ``exclude_modules`` removes: the path or an enclosing module matches."""
  ex = spec.exclude_modules
  rules = [] if ex is None else ([(ex, _regex_match(ex))] if isinstance(ex, str)
                                 else [(e, list_match(e)) for e in ex])
  for word, rule in rules:
    if not any(rule(m) for m in all_modules):
      kind = "regex" if isinstance(ex, str) else "entry"
      problems.append(f"`exclude_modules` {kind} {word!r} matched no module path. Closest "
                      f"module paths: {_fmt(_closest(word, all_modules))}.")
  return {k.path for k in kernels if any(
      rule(k.path.rsplit("/", n)[0]) for n in range(k.path.count("/") + 1) for _, rule in rules)}


def _heads(kernels: list[KernelInfo], leaf_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
  """Paths of the output heads: by name, or by output size = vocabulary (module doc)."""
  tables = [s for p, s in leaf_shapes.items() if p.rpartition("/")[2] == "embedding" and len(s) == 2]
  vocab = max((s[0] for s in tables), default=None)
  return [k.path for k in kernels if k.path.rpartition("/")[2].lower() in HEAD_NAMES or (
      k.kind == "dense" and k.stacked is None and len(k.shape) == 2 and vocab is not None
      and (k.shape[1] if k.out_size is None else k.out_size) == vocab
      and layer_index(k.path) is None)]


def _check_matrices(chosen: list[KernelInfo], problems: list[str]) -> None:
  """Reports chosen leaves with fewer than 2 axes per layer."""
  if flat := [f"{k.path} {k.shape}" for k in chosen if len(k.shape) - bool(k.stacked) < 2]:
    problems.append(f"`target_modules` matched leaves that are not matrices (at least 2 axes "
                    f"per layer are needed): {', '.join(flat)}. Remove or exclude them.")


def _nothing_left(matched: list[KernelInfo], excluded: set[str], saved_roots: list[str]) -> str:
  """The problem when exclusions removed every match."""
  return ("No kernel is left to adapt: every match was removed by `exclude_modules` or "
          f"`modules_to_save`. Matched: {_fmt(k.path for k in matched)}; excluded: "
          f"{_fmt(sorted(excluded))}; modules_to_save: {_fmt(saved_roots)}.")


def _targets(spec: LoraSpec,
             picked: list[tuple[KernelInfo, tuple[int, ...] | None]]) -> list[Target]:
  """One :class:`Target` per picked kernel, with its ``rank_pattern``/``alpha_pattern`` values."""
  targets = []
  for k, layers in picked:
    r = (lookup(spec.rank_pattern, k.path) or (None, spec.r))[1]
    alpha = (lookup(spec.alpha_pattern, k.path) or (None, spec.lora_alpha))[1]
    targets.append(Target(k.path, r=r, alpha=alpha, scaling=spec.scaling(r, alpha),
                          layers=layers))
  return targets


def _check_pattern_keys(spec: LoraSpec, targets: list[Target], problems: list[str]) -> None:
  """Reports ``rank_pattern``/``alpha_pattern``/``kernel_axes`` keys that match no target."""
  for name in ("rank_pattern", "alpha_pattern", "kernel_axes"):
    for key in getattr(spec, name):
      if not any(_coverage(key, t.path) is not None for t in targets):
        problems.append(
            f"`{name}` key {key!r} matches no targeted module path. Closest targeted "
            f"paths: {_fmt(_closest(key, [t.path for t in targets]))}. Keys are "
            "regexes matched against a '/'-separated tail of the path.")


def _raise_problems(problems: list[str]) -> None:
  """Raises one ``ValueError`` listing every problem, if there is any."""
  if problems:
    head = ("Cannot resolve LoRA targets: " if len(problems) == 1 else
            f"Cannot resolve LoRA targets ({len(problems)} problems):\n  - ")
    raise ValueError(head + "\n  - ".join(problems))


def _bias_paths(spec: LoraSpec, targets: list[Target], leaf_shapes: Mapping[str, tuple[int, ...]],
                saved_roots: list[str]) -> tuple[str, ...]:
  """The trainable bias leaves that ``spec.bias`` selects, sorted."""
  if spec.bias == "all":
    bias = [p for p in leaf_shapes
            if p.rpartition("/")[2] == "bias" and not _under(p, saved_roots)]
  else:
    bias = [f"{t.path}/bias" for t in targets
            if spec.bias == "lora_only" and f"{t.path}/bias" in leaf_shapes]
  return tuple(sorted(bias))
