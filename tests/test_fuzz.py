"""Fuzz suite (issue 21 item 5): bad input gets lojax's own error, damaged files never load.

Property-based tests (hypothesis) over

* ``LoraSpec`` / ``AdaLoraSpec`` built from fuzzed field values (ints, floats with NaN, inf and
  huge values, NumPy / JAX scalars and arrays, strings with regex metacharacters and PEFT dotted
  names, lists, dicts, None, bools);
* ``lojax.wrap`` on fuzzed small param trees (random shapes with zero-size axes, float32 /
  bfloat16 / int32 / bool leaves, nested and odd names, stacked leading axes) with fuzzed specs
  and keyword arguments;
* the other public entry points (merge, unmerge, set_adapter, delete_adapter, disable_adapters,
  count_parameters, trainable_mask, partition_labels, add_weighted_adapter, adapter_ids,
  hotswap, adalora_resize, lorafy and its wrapper's ``lora_*`` arguments, ``with_trainable``,
  the checkpoint and PEFT functions) fed fuzzed or wrong-type arguments;
* PEFT adapter directories written by ``lojax.save_peft`` whose ``adapter_config.json`` and
  ``adapter_model.safetensors`` are then damaged, read with ``lojax.load_peft``;

asserting the only outcomes are success (with cheap sanity checks: finite outputs from finite
inputs, ``from_dict(to_dict())`` round trips, a loaded PEFT file saves back to the same tensors
and scalings) or a ValueError / TypeError raised by lojax itself: the innermost frame of the
traceback is a ``raise`` statement in a file of the ``lojax`` package. A ValueError a lojax line
gets from Python (``float("x")``) or from NumPy / JAX is not lojax's own error.

A fault-injection test kills a child process that saves adapter checkpoints (SIGKILL at seeded
random moments) and checks that every completed step restores bit-exactly and that no step
restores wrong data.

Crashes found and not fixed yet are listed in KNOWN below: an input that fails with a matching
signature is skipped (so CI stays green) and counted; empty the list as fixes land.

Runs (all tests carry the ``fuzz`` marker; the default example counts fit the CI budget and are
deterministic, ``derandomize=True``)::

  python -m pytest -q tests/test_fuzz.py -p no:randomly                 # CI: ~35 s
  LOJAX_FUZZ_EXAMPLES=2000 LOJAX_FUZZ_KILLS=20 python -m pytest -m fuzz tests/test_fuzz.py

``LOJAX_FUZZ_EXAMPLES=N`` sets every property test's ``max_examples`` to N (the default counts
are in EXAMPLES), ``LOJAX_FUZZ_KILLS=N`` the number of kills. ``LOJAX_FUZZ_COLLECT=1`` records
every distinct crash instead of stopping at the first (listed on stderr at the end: add
``-s``; the tests then pass), and ``LOJAX_FUZZ_STATS=path.json`` writes the counts (inputs
tried, successes, lojax errors, known and new crashes per test, KNOWN entries hit) to a file.
``LOJAX_FUZZ_STRICT=1`` ignores KNOWN (to see which entries still fail).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lojax
from lojax._src.model import LoraParams

sys.path.insert(0, os.path.dirname(__file__))
import gpt  # noqa: E402

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore::UserWarning")]


class Known(NamedTuple):
  """A crash found by this suite and not fixed yet: matching failures are skipped."""
  where: str    # the entry point (the `where` of `call` / `problem`), a regex
  match: str    # a regex searched in "<ExceptionType>: <message> @ <innermost frame>"
  reason: str   # one line: what is wrong


KNOWN: list[Known] = []   # every crash found so far is fixed


# --------------------------------------------------------------------------
# The harness: run a call, classify its outcome
# --------------------------------------------------------------------------

EXAMPLES = {"spec": 200, "adalora_spec": 120, "wrap": 50, "entry_points": 160, "peft": 80}
LOJAX_DIR = os.path.dirname(os.path.realpath(lojax.__file__)) + os.sep
COLLECT = os.environ.get("LOJAX_FUZZ_COLLECT") == "1"
STATS: dict[str, dict[str, int]] = {}
CRASHES: dict[tuple, str] = {}   # signature -> first reproducer (LOJAX_FUZZ_COLLECT)


def fuzz_settings(name: str):
  n = int(os.environ.get("LOJAX_FUZZ_EXAMPLES", EXAMPLES[name]))
  return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                  print_blob=False, suppress_health_check=list(HealthCheck))


class _Skip(Exception):
  """Ends an example whose failure is a KNOWN (or, when collecting, recorded) crash."""


@functools.cache
def _raise_lines(filename: str) -> frozenset[int]:
  """The line numbers covered by ``raise`` statements in a source file."""
  with open(filename) as fh:
    tree = ast.parse(fh.read())
  return frozenset(line for node in ast.walk(tree) if isinstance(node, ast.Raise)
                   for line in range(node.lineno, node.end_lineno + 1))


def _frame(e: BaseException) -> str:
  tb = traceback.extract_tb(e.__traceback__)
  if not tb:
    return "?"
  f = tb[-1]
  path = os.path.realpath(f.filename)
  short = path[len(LOJAX_DIR) - len("lojax/"):] if path.startswith(LOJAX_DIR) else path
  return f"{short}:{f.lineno} in {f.name}"


def lojax_raised(e: BaseException) -> bool:
  """True for a ValueError/TypeError raised by a ``raise`` statement of lojax itself."""
  if not isinstance(e, (ValueError, TypeError)):
    return False
  tb = traceback.extract_tb(e.__traceback__)
  if not tb:
    return False
  f = tb[-1]
  path = os.path.realpath(f.filename)
  return path.startswith(LOJAX_DIR) and f.lineno in _raise_lines(path)


def _stat(test: str, key: str) -> None:
  s = STATS.setdefault(test, {})
  s[key] = s.get(key, 0) + 1


def _test_name() -> str:
  return os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]


def short(x: Any, depth: int = 0) -> str:
  """A compact repr for reproducers: arrays as their constructor, long reprs cut."""
  if isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer):
    mod = "np" if isinstance(x, np.ndarray) else "jnp"
    if getattr(x.dtype, "name", "").startswith("key"):
      return f"jax.random.key(...) {x.shape}"
    if x.size <= 4:
      return f"{mod}.asarray({np.asarray(x).tolist()!r}, {x.dtype.name!r})"
    return f"{mod}.zeros({x.shape}, {x.dtype.name!r})"
  if isinstance(x, LoraParams):
    return f"<LoraParams adapters={list(x.meta.names)} active={list(x.meta.active)}>"
  if depth > 3:
    return "..."
  if isinstance(x, dict):
    return "{" + ", ".join(f"{k!r}: {short(v, depth + 1)}" for k, v in x.items()) + "}"
  if isinstance(x, (list, tuple)) and len(x) < 20:
    body = ", ".join(short(v, depth + 1) for v in x)
    return f"[{body}]" if isinstance(x, list) else f"({body}{',' if len(x) == 1 else ''})"
  if callable(x) and hasattr(x, "__name__"):
    return x.__name__
  s = repr(x)
  return s if len(s) < 300 else s[:295] + " ...>"


def _known(where: str, text: str) -> Known | None:
  if os.environ.get("LOJAX_FUZZ_STRICT") == "1":
    return None
  for k in KNOWN:
    if re.fullmatch(k.where, where) and re.search(k.match, text, re.S):
      return k
  return None


def problem(where: str, what: str, repro: str, exc: BaseException | None = None) -> None:
  """Fails the example (a crash or a wrong result) unless it is a KNOWN crash."""
  text = what if exc is None else f"{type(exc).__name__}: {exc} @ {_frame(exc)}"
  test = _test_name()
  if k := _known(where, text):
    _stat(test, "known")
    _stat("KNOWN entries hit", k.reason)
    raise _Skip
  _stat(test, "new crashes")
  sig = (where, type(exc).__name__ if exc else what.split(":")[0],
         _frame(exc) if exc else "")
  if COLLECT:
    CRASHES.setdefault(sig, f"{repro}\n    -> {text[:400]}")
    raise _Skip
  msg = f"{where}: {text[:2000]}\nReproducer: {repro}"
  if exc is not None:
    raise AssertionError(msg) from exc
  raise AssertionError(msg)


CALLS: list[str] = []   # the calls of the current example, for reproducers


def call(where: str, fn, *args, **kwargs):
  """``(True, result)``, or ``(False, error)`` for lojax's own ValueError/TypeError."""
  shown = [short(a) for a in args] + [f"{k}={short(v)}" for k, v in kwargs.items()]
  repro = f"{where}({', '.join(shown)})"
  CALLS.append(repro)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with np.errstate(all="ignore"):
        return True, fn(*args, **kwargs)
  except _Skip:
    raise
  except Exception as e:  # noqa: BLE001 - classified here
    if lojax_raised(e):
      if os.environ.get("LOJAX_FUZZ_DEBUG") and re.fullmatch(os.environ["LOJAX_FUZZ_DEBUG"], where):
        print(f"--- {repro[:300]}\n    refused: {str(e)[:300]}", file=sys.stderr)
      return False, e
    problem(where, "", repro, e)


def fuzz(fn):
  """Counts the examples of a property test and ends KNOWN crashes quietly."""
  @functools.wraps(fn)
  def run(*args, **kwargs):
    test = fn.__name__
    _stat(test, "inputs")
    CALLS.clear()
    try:
      fn(*args, **kwargs)
    except _Skip:
      return
  return run


@pytest.fixture(scope="module", autouse=True)
def _report():
  yield
  if path := os.environ.get("LOJAX_FUZZ_STATS"):
    with open(path, "w") as fh:
      json.dump({"stats": STATS, "crashes": {" | ".join(k): v for k, v in CRASHES.items()}},
                fh, indent=1)
  if CRASHES:
    print(f"\n{len(CRASHES)} distinct crashes:", file=sys.stderr)
    for k, v in CRASHES.items():
      print(f"{' | '.join(k)}\n    {v}", file=sys.stderr)


def test_harness_tells_lojax_errors_from_foreign_ones():
  def error(fn):
    try:
      fn()
    except Exception as e:  # noqa: BLE001
      return e
  assert lojax_raised(error(lambda: lojax.LoraSpec(r=0, target_modules=["q"])))
  assert not lojax_raised(error(lambda: int("x")))                      # Python's
  assert not lojax_raised(error(lambda: jnp.zeros(3) + jnp.zeros(4)))   # JAX's
  assert not lojax_raised(error(lambda: {}["k"]))                       # not Value/TypeError
  ok, e = call("LoraSpec", lojax.LoraSpec, r=0, target_modules=["q"])
  assert not ok and isinstance(e, ValueError)
  if not COLLECT:
    with pytest.raises(AssertionError, match="Reproducer: int"):
      call("int", int, "x")


# --------------------------------------------------------------------------
# Value strategies
# --------------------------------------------------------------------------

REGEXY = ["(?i)h", "(h|blocks)", "[", "*", "a**", "(?P<x>h)", "\\", ".*", "^h_0", "h.0.attn",
          "model.layers.3.q_proj", "transformer.h.1.attn.c_attn", "all-linear", "", " ", "é",
          "a/b", "(?i:h)", r"h\d+", "$", "|", "()", "(?<=a)b", "\x00", "q", "dense", "layers",
          "h", "kernel", "bias", "(?x) q # c", "q{2,1}", ".", "\\1", "(?P=x)", "lm_head"]
names = st.one_of(st.sampled_from(REGEXY),
                  st.text(alphabet="ab_./[]()*+?|^$\\{}0123-é", max_size=8))
small_ints = st.integers(-3, 20)
numbers = st.one_of(
    small_ints, st.integers(-2**80, 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, -1e300, 3.5e38, 3.4e38, 2**70, 2**31, 2**31 - 1, 2**63, 0.5, 1e-320,
                     -0.0, 0.999999, 1.0, float("nan"), float("inf")]))
scalars = st.one_of(st.none(), st.booleans(), numbers, names)
np_scalars = st.one_of(
    small_ints.map(np.int64), small_ints.map(np.int32), st.booleans().map(np.bool_),
    st.floats(allow_nan=True, width=32).map(np.float32), numbers.filter(
        lambda v: isinstance(v, float)).map(np.float64), names.map(np.str_),
    st.integers(0, 255).map(np.uint8))
_ARRAYS = [lambda: np.array([1, 2]), lambda: np.array(3), lambda: np.array(["q", "v"]),
           lambda: np.array("q"), lambda: np.array([], int), lambda: np.array([[0.5]]),
           lambda: jnp.asarray(2), lambda: jnp.asarray([1.0, 2.0]), lambda: jnp.asarray(True),
           lambda: jnp.asarray(0.1), lambda: jnp.asarray([0, 1]), lambda: np.array([True]),
           lambda: jax.random.key(0), lambda: np.float32(np.nan)]
arrays = st.sampled_from(range(len(_ARRAYS))).map(lambda i: _ARRAYS[i]())
atoms = st.one_of(scalars, np_scalars, arrays)
wild = st.recursive(
    atoms, lambda c: st.one_of(st.lists(c, max_size=3), st.tuples(c, c),
                               st.dictionaries(st.one_of(names, small_ints), c, max_size=3),
                               st.frozensets(st.one_of(names, small_ints), max_size=3)),
    max_leaves=6)


class mix:
  """A field's plausible values (valid and invalid ones a user would write); see spec_kwargs."""

  def __init__(self, *strategies):
    self.plausible = st.one_of(*strategies)


name_lists = st.lists(st.sampled_from(["q", "v", "dense", "kernel", "h.0.attn", "lm_head",
                                       "classifier", "", "a/b", "(?i)q"]), max_size=3)
SPEC_FIELDS = {
    "r": mix(st.integers(1, 16), st.sampled_from([2**31 - 1, 2**31, 0, -1])),
    "lora_alpha": mix(st.integers(-4, 64), st.floats(-100, 100),
                      st.sampled_from([3.4e38, 3.5e38, 1e300, 2**200])),
    "use_rslora": mix(st.booleans()),
    "use_dora": mix(st.booleans()),
    "target_modules": mix(name_lists, st.sampled_from(REGEXY), st.none()),
    "exclude_modules": mix(name_lists, st.sampled_from(REGEXY)),
    "layers_to_transform": mix(st.integers(0, 3), st.lists(st.integers(-1, 3), max_size=3)),
    "layers_pattern": mix(st.sampled_from(["h", "layers", ["h", "layers"], "(?i)h",
                                           "(h|blocks)", "", [], ["("], "h.0"])),
    "rank_pattern": mix(st.dictionaries(names, st.integers(-1, 8), max_size=2)),
    "alpha_pattern": mix(st.dictionaries(names, numbers, max_size=2)),
    "lora_dropout": mix(st.floats(0, 1), st.sampled_from([0.0, 0.1, 1.0, -0.1])),
    "bias": mix(st.sampled_from(["none", "all", "lora_only", "None", "ALL"])),
    "modules_to_save": mix(name_lists, st.sampled_from(["", "classifier"])),
    "init_lora_weights": mix(st.sampled_from(
        [True, False, "gaussian", "pissa", "pissa_niter_2", "pissa_niter_0", "olora", "loftq",
         "orthogonal", "eva", "PISSA", "true"])),
    "loftq_config": mix(st.sampled_from([{}, {"loftq_bits": 4, "loftq_iter": 1},
                                         {"loftq_bits": 3}, {"loftq_iter": 0}, {"x": 1}])),
    "task_type": mix(st.sampled_from([None, "CAUSAL_LM", "seq_cls", "SEQ_CLS", "junk",
                                      lojax.TaskType.TOKEN_CLS])),
    **{f: mix(st.sampled_from([None, True, False])) for f in (
        "finetune_attention_modules", "finetune_mlp_modules", "finetune_language_layers",
        "finetune_vision_layers")},
    "kernel_axes": mix(st.sampled_from([{}, {"q": (0,)}, {"q": [0, 1]}, {"q": 0},
                                        {"q": (0, 0)}, {"q": ()}, {"(": (0,)}])),
    "kernel_names": mix(st.sampled_from([None, ["proj_weight"], ["bias"], ["a/b"], [], "w"])),
}
ADA_FIELDS = {
    "init_r": mix(st.integers(0, 16)),
    "target_r": mix(st.integers(0, 16)),
    "tinit": mix(st.integers(0, 5)),
    "tfinal": mix(st.integers(0, 5)),
    "deltaT": mix(st.integers(0, 5)),
    "beta1": mix(st.floats(0, 1)),
    "beta2": mix(st.floats(0, 1)),
    "orth_reg_weight": mix(st.floats(0, 2), st.sampled_from([float("nan"), float("inf")])),
    "total_step": mix(st.integers(1, 100), st.none()),
}


def spec_kwargs(fields, required=("target_modules",)):
  """Keyword arguments: plausible values only, or each field plausible or wild."""
  def kwargs(pick):
    return st.fixed_dictionaries(
        {k: pick(fields[k]) for k in required},
        optional={k: pick(v) for k, v in fields.items() if k not in required})
  return st.one_of(kwargs(lambda m: m.plausible), kwargs(lambda m: st.one_of(m.plausible, wild)))


def check_spec(where: str, cls, spec, repro: str) -> None:
  """A built spec is a JSON-serialisable, hashable value that round-trips."""
  try:
    hash(spec)
  except Exception as e:  # noqa: BLE001
    problem(where, "unhashable spec", repro, e)
  d = spec.to_dict()
  try:
    text = json.dumps(d, allow_nan=False)
  except (TypeError, ValueError) as e:
    problem(where, f"to_dict() not JSON-serialisable: {e}: {short(d)}", repro)
  ok, back = call(f"{cls.__name__}.from_dict", cls.from_dict, json.loads(text))
  if not ok:
    problem(where, f"from_dict(to_dict()) refuses an accepted spec: {back}", repro)
  if back != spec or hash(back) != hash(spec):
    problem(where, f"from_dict(to_dict()) != spec: {short(back.to_dict())}", repro)
  if pickle.loads(pickle.dumps(spec)) != spec:
    problem(where, "pickle round trip changes the spec", repro)
  for r, alpha in [(spec.r, spec.lora_alpha)] + [(v, spec.lora_alpha)
                                                 for v in spec.rank_pattern.values()] + [
      (spec.r, v) for v in spec.alpha_pattern.values()]:
    s = spec.scaling(r, alpha)
    if not np.isfinite(np.float32(s)):
      problem(where, f"scaling({r}, {alpha}) = {s} is not finite in float32", repro)


# --------------------------------------------------------------------------
# (a) specs
# --------------------------------------------------------------------------

@fuzz_settings("spec")
@given(spec_kwargs(SPEC_FIELDS))
@fuzz
def test_lora_spec_construction(kw):
  ok, spec = call("LoraSpec", lojax.LoraSpec, **kw)
  _stat("test_lora_spec_construction", "successes" if ok else "lojax errors")
  if ok:
    check_spec("LoraSpec", lojax.LoraSpec, spec, f"LoraSpec(**{short(kw)})")


def _problems(e: Exception) -> list[str]:
  text = str(e)
  if "\n  - " in text:
    return [p.strip() for p in text.split("\n  - ")[1:]]
  return [text.split(": ", 1)[1]] if ": " in text else [text]


@fuzz_settings("adalora_spec")
@given(spec_kwargs(SPEC_FIELDS), spec_kwargs(ADA_FIELDS, required=("total_step",)))
@fuzz
def test_adalora_spec_construction(kw, ada):
  kw = {k: v for k, v in kw.items() if k != "r"}
  repro = f"AdaLoraSpec(**{short({**kw, **ada})})"
  ok, spec = call("AdaLoraSpec", lojax.AdaLoraSpec, **kw, **ada)
  if ok:
    _stat("test_adalora_spec_construction", "successes")
    check_spec("AdaLoraSpec", lojax.AdaLoraSpec, spec, repro)
    return
  _stat("test_adalora_spec_construction", "lojax errors")
  # Every problem of the LoRA part is reported too, not only AdaLoRA's own fields.
  init_r = ada.get("init_r", 12)
  if isinstance(init_r, (int, np.integer)) and not isinstance(init_r, bool) and init_r >= 1:
    base_kw = dict(kw, r=init_r)
    for f in ("use_rslora", "use_dora", "init_lora_weights"):
      base_kw.pop(f, None)   # AdaLoRA's own rules for these
    lok, lerr = call("LoraSpec", lojax.LoraSpec, **base_kw)
    if not lok:
      missing = [p for p in _problems(lerr) if p not in str(spec)]
      if missing:
        problem("AdaLoraSpec", f"reports only some problems: misses {missing[:3]} "
                f"(got: {str(spec)[:300]})", repro)


# --------------------------------------------------------------------------
# (b) wrap on fuzzed trees, with fuzzed specs and keyword arguments
# --------------------------------------------------------------------------

MODULE_NAMES = ["q", "v", "dense", "h_0", "h_1", "h", "layers", "attn", "mlp", "c_fc",
                "wte"] * 3 + ["lm_head", "classifier", "0", "a.b", "x/y", "", "kernel", "lora_A",
                              "é"]
LEAF_NAMES = ["kernel"] * 4 + ["embedding", "w", "weight", "bias", "scale", "proj_weight"]
DTYPES = [jnp.float32] * 4 + [jnp.bfloat16, jnp.int32, jnp.bool_]


@st.composite
def param_trees(draw, clean: bool):
  """A small param dict: random module paths, leaves of random shapes and dtypes (``clean``:
  the usual names, float32 / bfloat16 matrices with nonzero sizes, some stacked)."""
  tree: dict = {}
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  for _ in range(draw(st.integers(1, 4))):
    path = draw(st.lists(st.sampled_from(MODULE_NAMES[:11] if clean else MODULE_NAMES),
                         min_size=1, max_size=3))
    leaf = draw(st.sampled_from(LEAF_NAMES[:5] + ["bias"] if clean else LEAF_NAMES))
    stacked = draw(sometimes(5))
    if leaf == "bias" or leaf == "scale":
      shape = draw(st.tuples(st.integers(1 if clean else 0, 4)))
    else:
      ndim = draw(st.sampled_from([2] if clean else [2] * 6 + [0, 1, 3, 4]))
      shape = tuple(draw(st.lists(st.sampled_from([2, 3, 4] if clean else [2, 3, 4] * 3 + [1, 0]),
                                  min_size=ndim, max_size=ndim)))
    if stacked:
      shape = (draw(st.integers(1, 3)),) + shape
    dtype = draw(st.sampled_from(DTYPES[:5] if clean else DTYPES))
    if dtype == jnp.bool_:
      value = rng.integers(0, 2, shape).astype(bool)
    elif dtype == jnp.int32:
      value = rng.integers(-3, 4, shape)
    else:
      value = rng.standard_normal(shape) * 0.5
    node = tree
    for name in path:
      if not isinstance(node.get(name, {}), dict):
        break
      node = node.setdefault(name, {})
    else:
      if leaf not in node:
        node[leaf] = jnp.asarray(value, dtype)
  if draw(st.booleans()):
    tree = {"params": tree}
  return tree


def sometimes(k: int):
  """True about once in ``k`` draws (and False when shrinking)."""
  return st.sampled_from([False] * (k - 1) + [True])


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def generic_apply(params, x):
  """A scalar function of every float leaf: matmuls of kernels (leading axes as layers),
  embedding lookups, sums of the others; ``x`` (any float array) scales the inputs."""
  out = jnp.sum(x).astype(jnp.float32)
  c = jnp.mean(x).astype(jnp.float32) if jnp.size(x) else jnp.float32(1)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not _is_float(leaf):
      continue
    name = str(getattr(path[-1], "key", path[-1]))
    leaf = leaf.astype(jnp.float32)
    if name == "embedding" and leaf.ndim == 2 and leaf.shape[0]:
      out = out + jnp.sum(jnp.take(leaf, jnp.array([0, leaf.shape[0] - 1]), axis=0)) * c
    elif leaf.ndim >= 2 and name != "bias":
      v = jnp.full(leaf.shape[-2], c)
      out = out + jnp.sum(jnp.einsum("i,...io->...o", v, leaf))
    else:
      out = out + jnp.sum(leaf)
  return out


def no_arg_apply(params):
  return generic_apply(params, jnp.ones(2))


X = jnp.asarray([0.5, -1.0], jnp.float32)
KEY = jax.random.key(0)
wild_keys = st.sampled_from([None, 0, "k", 1.5, jax.random.PRNGKey(0), jax.random.key(1),
                             np.array([0, 1], np.uint32), jnp.zeros((3,)),
                             jax.random.split(KEY, 2), np.uint32(7), [0, 1]])
wild_names = st.one_of(st.sampled_from(["b", "default", "", "a/b", "x.y", None, 5, b"b",
                                        np.str_("c"), ["x"], np.array("d"), "__base__",
                                        "lora", "é"]), names)
wild_dtypes = st.sampled_from([jnp.bfloat16, "float16", np.float64, jnp.int32, "junk", None, 5,
                               bool, "bfloat16", jnp.dtype("float32"), np.complex64, object,
                               jnp.float8_e4m3fn])
wild_apply = st.sampled_from([None, generic_apply, 5, "f", no_arg_apply, lambda p, x: None,
                              lambda p, x: (x, p)])
wild_example_args = st.sampled_from([(X,), (), X, 5, None, [X], (X, X), ("s",),
                                     (jax.ShapeDtypeStruct((2,), jnp.float32),),
                                     (jnp.zeros((0,)),)])


@st.composite
def wrap_specs(draw, tree, clean: bool):
  """A spec aimed at the tree (its names and paths) or at nothing, often with options."""
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  mods = sorted({str(getattr(k, "key", k)) for p in paths for k in p[:-1]}) or ["q"]
  kernel_paths = [[str(getattr(k, "key", k)) for k in p[:-1]] for p in paths if len(p) > 1
                  and str(getattr(p[-1], "key", "")) in ("kernel", "embedding", "w", "weight")]
  kernels = sorted({p[-1] for p in kernel_paths}) or mods
  full = sorted({"/".join(p) for p in kernel_paths}) or mods
  target = draw(st.lists(st.sampled_from(full), min_size=1, max_size=3) if clean else st.one_of(
      st.lists(st.sampled_from(kernels), min_size=1, max_size=3),
      st.lists(st.sampled_from(mods), min_size=1, max_size=3),
      st.just("all-linear"), st.sampled_from([".*", "(?:.*/)?" + re.escape(mods[-1]), "nope"]),
      st.lists(st.sampled_from(REGEXY[:12]), min_size=1, max_size=2)))
  kw = dict(r=draw(st.sampled_from([1, 2] if clean else [1, 2, 4, 64])), target_modules=target,
            lora_alpha=draw(st.sampled_from([1, 8, -4, 1e4, 3e38])))
  options = {
      "use_dora": st.booleans(), "use_rslora": st.booleans(),
      "bias": st.sampled_from(["none", "all", "lora_only"]),
      "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora",
                                            "orthogonal", "pissa_niter_1"]),
      "modules_to_save": st.lists(st.sampled_from(mods), min_size=1, max_size=2),
      "layers_to_transform": st.sampled_from([0, [0, 1], [2]]),
      "layers_pattern": st.sampled_from(["h", "layers", ["h", "layers"]]),
      "rank_pattern": st.dictionaries(st.sampled_from(kernels), st.integers(1, 3), max_size=1),
      "alpha_pattern": st.dictionaries(st.sampled_from(kernels), st.sampled_from([2, 1e30]),
                                       max_size=1),
      "exclude_modules": st.lists(st.sampled_from(mods), min_size=1, max_size=1),
      "kernel_axes": st.dictionaries(st.sampled_from(kernels),
                                     st.sampled_from([(0,), (0, 1), (1,), (2,)]), max_size=1),
      "kernel_names": st.just(["proj_weight"]),
      "lora_dropout": st.sampled_from([0.0, 0.5]),
  }
  for k, v in options.items():
    if draw(sometimes(12 if clean else 6)):
      kw[k] = draw(v)
  if draw(sometimes(6)):
    kw.pop("r")
    kw["init_lora_weights"] = True
    kw.pop("use_dora", None), kw.pop("use_rslora", None)
    return lojax.AdaLoraSpec, dict(kw, init_r=draw(st.sampled_from([1, 2, 4])), target_r=1,
                                   total_step=10)
  return lojax.LoraSpec, kw


def _close(a, b, tol) -> bool:
  a, b = float(a), float(b)
  return abs(a - b) <= tol * (1 + abs(a) + abs(b))


@fuzz_settings("wrap")
@given(st.data())
@fuzz
def test_wrap(data):
  clean = data.draw(st.booleans(), "clean?")
  tree = data.draw(param_trees(clean), "params")
  cls, spec_kw = data.draw(wrap_specs(tree, clean), "spec")
  ok, spec = call(cls.__name__, cls, **spec_kw)
  if not ok:
    _stat("test_wrap", "spec refused")
    return
  kw: dict[str, Any] = {"key": KEY}
  for name, strategy in () if clean else (("key", wild_keys), ("adapter_name", wild_names),
                         ("dtype", wild_dtypes), ("apply_fn", wild_apply),
                         ("example_args", wild_example_args)):
    if data.draw(sometimes(8), f"set {name}?"):
      kw[name] = data.draw(strategy, name)
  if "apply_fn" not in kw and data.draw(sometimes(2), "trace?"):
    kw.update(apply_fn=generic_apply, example_args=(X,))
  repro = f"lojax.wrap({short(tree)}, {cls.__name__}(**{short(spec_kw)}), **{short(kw)})"
  ok, lora = call("wrap", lojax.wrap, tree, spec, **kw)
  if not ok:
    _stat("test_wrap", "lojax errors")
    return
  _stat("test_wrap", "successes")
  if not isinstance(lora, LoraParams) or kw.get("adapter_name", "default") not in lora.meta.names:
    problem("wrap", f"returned {short(lora)}", repro)
  # Finite base, finite and moderate scalings: finite adapters and outputs.
  finite_base = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
                    if _is_float(x))
  moderate = all(abs(t.scaling) <= 1e4 for m in lora.meta.adapters for t in m.targets)
  bad = [short(x) for x in jax.tree.leaves(lora.adapters)
         if _is_float(x) and not bool(jnp.all(jnp.isfinite(x)))]
  if finite_base and bad:
    problem("wrap", f"non-finite adapter weights from a finite base: {bad[:3]}", repro)
  for where, fn in (("count_parameters", lojax.count_parameters),
                    ("trainable_mask", lojax.trainable_mask)):
    ok, _ = call(where, fn, lora)
    if not ok:
      problem(where, f"refuses a fresh LoraParams: {_}", repro)
  if spec.lora_dropout:
    return
  ok, y = call("lorafy", lojax.lorafy(generic_apply), lora, X)
  if not ok:
    return  # lojax refuses this use (e.g. a kernel read in a way it cannot factorize)
  ok, merged = call("merge", lojax.merge, lora)
  if not ok:
    problem("merge", f"refuses a fresh LoraParams: {merged}", repro)
  y_merged = generic_apply(merged, X)
  low = any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((tree, lora.adapters)))
  tol = 3e-2 if low else 1e-4
  if finite_base and moderate:
    if not bool(jnp.isfinite(y)):
      problem("lorafy", f"non-finite output {y} from finite params and inputs", repro)
    if not _close(y, y_merged, tol):
      problem("lorafy", f"lorafy output {float(y)} != merged model's {float(y_merged)}", repro)
    if spec.init_lora_weights is True and not _close(y, generic_apply(tree, X), tol):
      problem("lorafy", f"output at init {float(y)} != base model's "
              f"{float(generic_apply(tree, X))} (B = 0)", repro)
  ok, back = call("unmerge", lojax.unmerge, lora, merged)
  if not ok:
    problem("unmerge", f"refuses merge's output: {back}", repro)
  if finite_base and moderate and not _close(generic_apply(back, X), generic_apply(lora.base, X),
                                             tol):
    problem("unmerge", "unmerge(lora, merge(lora)) computes another model than the base", repro)


# --------------------------------------------------------------------------
# (c) the other entry points, with fuzzed and wrong-type arguments
# --------------------------------------------------------------------------

def ep_apply(p, x):
  """The model of the entry-point tests: an embedding, two dense kernels and a head."""
  q = p["params"]
  e = jnp.take(q["emb"]["embedding"], jnp.array([0, 4]), axis=0)
  h = (x + e) @ q["q"]["kernel"] + q["q"]["bias"] + x @ q["v"]["kernel"]
  return h @ q["head"]["kernel"]


EP_X = jnp.asarray(np.linspace(-1, 1, 8).reshape(2, 4), jnp.float32)


def _randomized(lora, seed):
  leaves, treedef = jax.tree.flatten(lora.adapters)
  rng = np.random.default_rng(seed)
  new = [jnp.asarray(rng.standard_normal(x.shape) * 0.3, x.dtype) if _is_float(x) else x
         for x in leaves]
  return LoraParams(lora.base, jax.tree.unflatten(treedef, new), lora.meta)


class EP(NamedTuple):
  base: Any
  lora: LoraParams        # adapters default (active), b, dora, saved, ada
  loras: dict             # name -> LoraParams with other active sets
  servers: dict           # hotswap servers
  news: dict              # hotswap candidates (each on the same base)
  ada_state: Any          # an optimizer state of lojax.adalora for adapter "ada"


@functools.cache
def ep() -> EP:
  rng = np.random.default_rng(0)
  base = {"params": {"q": {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal(3)},
                     "v": {"kernel": rng.standard_normal((4, 3))},
                     "emb": {"embedding": rng.standard_normal((5, 4))},
                     "head": {"kernel": rng.standard_normal((3, 2))}}}
  base = jax.tree.map(lambda x: jnp.asarray(x * 0.5, jnp.float32), base)
  specs = {
      "default": lojax.LoraSpec(r=2, target_modules=["q", "v", "emb"], bias="lora_only"),
      "b": lojax.LoraSpec(r=1, lora_alpha=3, target_modules=["q"], use_rslora=True),
      "dora": lojax.LoraSpec(r=2, target_modules=["q", "v"], use_dora=True),
      "saved": lojax.LoraSpec(r=1, target_modules=["v"], modules_to_save=["head"]),
      "ada": lojax.AdaLoraSpec(init_r=2, target_r=1, total_step=10, target_modules=["q"]),
      "drop": lojax.LoraSpec(r=1, target_modules=["v"], lora_dropout=0.5),
  }
  lora = None
  for i, (name, spec) in enumerate(specs.items()):
    lora = lojax.wrap(base if lora is None else lora, spec, key=jax.random.key(i),
                      adapter_name=name)
  lora = _randomized(lora, 1)
  loras = {"default": lora}
  for active in (("b",), ("default", "b"), ("dora",), ("saved",), ("ada",), ("drop",),
                 ("default", "drop"), ()):
    loras["+".join(active) or "none"] = lojax.set_adapter(lora, list(active))
  news = {}
  for name, spec in [("r1", specs["b"]), ("r8", lojax.LoraSpec(r=8, target_modules=["q"])),
                     ("dora", specs["dora"]), ("head", lojax.LoraSpec(target_modules=["head"])),
                     ("bias", lojax.LoraSpec(r=2, target_modules=["q"], bias="all"))]:
    news[name] = _randomized(lojax.wrap(base, spec, key=jax.random.key(7)), 2)
  news["two"] = lora
  servers = {"lora": lojax.wrap(base, lojax.LoraSpec(r=4, target_modules=["q", "v", "emb"],
                                                     bias="lora_only"), key=jax.random.key(9)),
             "dora": lojax.wrap(base, lojax.LoraSpec(r=4, target_modules=["q", "v"],
                                                     use_dora=True), key=jax.random.key(9))}
  import optax
  tx = lojax.adalora(optax.sgd(0.1), specs["ada"], adapter_name="ada")
  ada_state = tx.init(loras["ada"].trainable)
  return EP(base, lora, loras, servers, news, ada_state)


ADAPTER_NAMES = ["default", "b", "dora", "saved", "ada", "drop", "nope", "", "__base__"]
adapter_name_args = st.one_of(
    st.sampled_from(ADAPTER_NAMES), st.lists(st.sampled_from(ADAPTER_NAMES), max_size=3),
    st.tuples(st.sampled_from(ADAPTER_NAMES)), wild_names, wild)
weight_args = st.one_of(st.lists(st.one_of(st.floats(-2, 2), numbers), max_size=3),
                        st.lists(st.one_of(np_scalars, arrays), max_size=2), wild)


def lora_args(data, label="lora"):
  """Mostly a LoraParams of the fixture, sometimes something else."""
  e = ep()
  if data.draw(sometimes(6), f"{label}: not a LoraParams?"):
    return data.draw(st.one_of(st.sampled_from([e.base, None, 5, "lora", [e.lora], e.lora.adapters,
                                                e.lora.trainable]), wild), label)
  return e.loras[data.draw(st.sampled_from(sorted(e.loras)), label)]


def _tree_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree) if _is_float(x))


def _as_names(names):
  if names is None:
    return None
  return (names,) if isinstance(names, str) else tuple(names)


def _merged_delta(lora, names):
  """{leaf path: merged - base} of ``names`` (via lojax.merge)."""
  m = lojax.merge(lora, adapter_names=list(names))
  flat = dict(jax.tree_util.tree_flatten_with_path(m)[0])
  base = dict(jax.tree_util.tree_flatten_with_path(lora.base)[0])
  return {k: np.asarray(flat[k], np.float64) - np.asarray(base[k], np.float64) for k in base}


def _op_merge(data, repro):
  lora = lora_args(data)
  kw = {}
  if data.draw(st.booleans(), "adapter_names?"):
    kw["adapter_names"] = data.draw(adapter_name_args, "adapter_names")
  if data.draw(sometimes(3), "safe_merge?"):
    kw["safe_merge"] = data.draw(st.one_of(st.booleans(), wild), "safe_merge")
  ok, out = call("merge", lojax.merge, lora, **kw)
  if not ok:
    return
  if jax.tree.structure(out) != jax.tree.structure(lora.base):
    problem("merge", "the merged tree has another structure than the base", repro())
  if not _tree_finite(out):
    problem("merge", "non-finite merged weights from finite adapters", repro())
  names = _as_names(kw.get("adapter_names"))
  if names is not None and len(set(names)) != len(names):
    problem("merge", f"repeated adapter names {list(names)} accepted (merged twice?)", repro())
  if names is not None and names and not any(lora.meta.adapter(n).spec.__class__.__name__ ==
                                             "AdaLoraSpec" for n in names):
    ok, active = call("set_adapter", lojax.set_adapter, lora, list(names))
    if ok:
      want = lojax.lorafy(ep_apply)(active, EP_X, lora_deterministic=True)
      got = ep_apply(out, EP_X)
      if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        problem("merge", "merged model != lorafy of the same adapters", repro())


def _op_unmerge(data, repro):
  e = ep()
  lora = lora_args(data)
  names = data.draw(st.one_of(st.none(), adapter_name_args), "adapter_names")
  merged = lojax.merge(e.lora, adapter_names=["default"])
  flat, treedef = jax.tree_util.tree_flatten(merged)
  other = {"params": {k: v for k, v in merged["params"].items() if k != "v"}}
  extra = {"params": dict(merged["params"], w={"kernel": jnp.ones((4, 3))})}
  transposed = jax.tree.map(lambda x: x.T if x.ndim == 2 else x, merged)
  params = data.draw(st.one_of(
      st.sampled_from([merged, merged, e.base, other, extra, transposed, merged["params"],
                       {"params": {}}, jax.tree.unflatten(treedef, [x[..., :1] for x in flat]),
                       jax.tree.map(lambda x: x.astype(jnp.bfloat16), merged), e.lora]),
      wild), "params")
  kw = {} if names is None else {"adapter_names": names}
  ok, out = call("unmerge", lojax.unmerge, lora, params, **kw)
  if not ok:
    return
  shapes = jax.tree.map(lambda x: np.shape(x), params)
  if jax.tree.map(lambda x: np.shape(x), out) != shapes:
    problem("unmerge", "the result has other shapes than the params it was given", repro())
  if params is merged and lora is e.lora and _as_names(names) in (None, ("default",)):
    if not np.allclose(ep_apply(out, EP_X), ep_apply(e.base, EP_X), rtol=1e-4, atol=1e-4):
      problem("unmerge", "unmerge(lora, merge(lora)) is not the base", repro())


def _op_set_adapter(data, repro):
  lora = lora_args(data)
  names = data.draw(adapter_name_args, "names")
  ok, out = call("set_adapter", lojax.set_adapter, lora, names)
  if ok and out.meta.active != _as_names(names):
    problem("set_adapter", f"active {out.meta.active} for names {short(names)}", repro())
  if ok:
    _check_lorafy(out, {}, repro)


def _op_delete_adapter(data, repro):
  lora = lora_args(data)
  name = data.draw(adapter_name_args, "name")
  ok, out = call("delete_adapter", lojax.delete_adapter, lora, name)
  if ok and (name in out.meta.names or len(out.meta.names) != len(lora.meta.names) - 1
             or set(out.adapters) != set(out.meta.names)):
    problem("delete_adapter", f"names {out.meta.names} after deleting {short(name)}", repro())


def _op_simple(data, repro):
  where, fn = data.draw(st.sampled_from([
      ("count_parameters", lojax.count_parameters), ("trainable_mask", lojax.trainable_mask),
      ("partition_labels", lojax.partition_labels), ("disable_adapters", lojax.disable_adapters),
      ("print_trainable_parameters", lambda x: None)]), "function")
  lora = lora_args(data)
  ok, out = call(where, fn, lora)
  if not ok:
    return
  if where == "count_parameters" and not (0 <= out.trainable <= out.total):
    problem(where, f"{out}", repro())
  if where in ("trainable_mask", "partition_labels") and (
      jax.tree.structure(out) != jax.tree.structure(lora)):
    problem(where, "the labels do not have the LoRA tree's structure", repro())


def _op_add_weighted(data, repro):
  lora = lora_args(data)
  adapters = data.draw(st.one_of(st.lists(st.sampled_from(ADAPTER_NAMES[:6]), min_size=1,
                                          max_size=3), adapter_name_args), "adapters")
  n = len(adapters) if isinstance(adapters, list) else 1
  weights = data.draw(st.one_of(st.lists(st.floats(-2, 2), min_size=n, max_size=n),
                                weight_args), "weights")
  name = data.draw(st.one_of(st.just("mix"), adapter_name_args), "adapter_name")
  kw = {}
  if data.draw(st.booleans(), "combination_type?"):
    kw["combination_type"] = data.draw(st.one_of(st.sampled_from(["cat", "svd", "linear"]), wild),
                                       "combination_type")
  if data.draw(sometimes(3), "svd_rank?"):
    kw["svd_rank"] = data.draw(st.one_of(st.integers(-1, 8), wild), "svd_rank")
  ok, out = call("add_weighted_adapter", lojax.add_weighted_adapter, lora, adapters, weights,
                 name, **kw)
  if not ok:
    return
  if name not in out.meta.names or not _tree_finite(out.adapters[name]):
    problem("add_weighted_adapter", "the new adapter is missing or not finite", repro())
  if kw.get("combination_type") == "cat":  # exact: the weighted sum of the deltas
    got = _merged_delta(out, [name])
    parts = [_merged_delta(lora, [a]) for a in adapters]
    for k, d in got.items():
      want = sum(float(w) * p[k] for w, p in zip(weights, parts))
      if not np.allclose(d, want, rtol=1e-4, atol=1e-4):
        problem("add_weighted_adapter", f"'cat' of {adapters} x {weights} is not the weighted "
                f"sum of their deltas at {jax.tree_util.keystr(k)}", repro())


def _op_adapter_ids(data, repro):
  lora = lora_args(data)
  names = data.draw(adapter_name_args, "names")
  ok, ids = call("adapter_ids", lojax.adapter_ids, lora, names)
  if not ok:
    return
  n = len(lora.meta.active)
  if ids.dtype != jnp.int32 or ids.ndim != 1 or not bool(jnp.all((ids >= -1) & (ids < n))):
    problem("adapter_ids", f"ids {ids} for {short(names)} ({n} active)", repro())
  _check_lorafy(lora, {"lora_adapter_ids": ids} if ids.shape == (2,) else {}, repro)


def _op_hotswap(data, repro):
  e = ep()
  server = data.draw(st.sampled_from(sorted(e.servers)), "server")
  server = e.servers[server] if not data.draw(sometimes(8), "wild server?") else lora_args(data)
  new = e.news[data.draw(st.sampled_from(sorted(e.news)), "new")]
  if data.draw(sometimes(8), "wild new?"):
    new = lora_args(data, "new")
  kw = {}
  for k in ("adapter_name", "source_name"):
    if data.draw(sometimes(3), f"{k}?"):
      kw[k] = data.draw(adapter_name_args, k)
  ok, out = call("hotswap", lojax.hotswap, server, new, **kw)
  if not ok:
    return
  if jax.tree.structure(out) != jax.tree.structure(server) or jax.tree.map(
      lambda x: (x.shape, x.dtype), out.adapters) != jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                   server.adapters):
    problem("hotswap", "the result does not have the server's structure (it would recompile)",
            repro())
  src = kw.get("source_name") or new.meta.names[0]
  want = lojax.lorafy(ep_apply)(lojax.set_adapter(new, src), EP_X)
  got = lojax.lorafy(ep_apply)(out, EP_X)
  if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
    problem("hotswap", "the swapped server computes another model than the new adapter",
            repro())


def _check_lorafy(lora, kw, repro):
  ok, y = call("lorafy", lojax.lorafy(ep_apply), lora, EP_X, **kw)
  if ok and not (y.shape == (2, 2) and bool(jnp.all(jnp.isfinite(y)))):
    problem("lorafy", f"output {y} (finite params and inputs)", repro())


def _op_lorafy(data, repro):
  if data.draw(sometimes(4), "fuzz lorafy itself?"):
    fn = data.draw(st.one_of(st.sampled_from([ep_apply, None, 5, "f", len]), wild), "fn")
    kw = {"remat": data.draw(st.one_of(st.booleans(), wild), "remat")}
    ok, f = call("lorafy", lojax.lorafy, fn, **kw)
    if not ok:
      return
    ok, y = call("lorafy", f, ep().lora, EP_X)
    return
  lora = lora_args(data)
  kw = {}
  if data.draw(sometimes(2), "lora_rng?"):
    kw["lora_rng"] = data.draw(st.one_of(wild_keys, st.just(KEY)), "lora_rng")
  if data.draw(sometimes(2), "lora_adapter_ids?"):
    kw["lora_adapter_ids"] = data.draw(st.one_of(
        st.sampled_from([jnp.asarray([0, -1]), jnp.asarray([1, 0]), jnp.asarray([5, 0]),
                         np.array([0, 0]), np.array([0.5, 0]), jnp.asarray([0]), [0, -1],
                         jnp.asarray([[0, 0]]), jnp.asarray(0), np.array([-2, 0]),
                         np.array([True, False]), jnp.asarray([2**40, 0], jnp.int64)
                         if jax.config.jax_enable_x64 else np.array([2**40, 0])]), wild),
        "lora_adapter_ids")
  if data.draw(sometimes(3), "lora_deterministic?"):
    kw["lora_deterministic"] = data.draw(st.one_of(st.booleans(), wild), "lora_deterministic")
  _check_lorafy(lora, kw, repro)


def _op_with_trainable(data, repro):
  lora = lora_args(data)
  if not isinstance(lora, LoraParams):
    return
  t = lora.trainable
  cands = [t, jax.tree.map(lambda x: x * 2, t), {**t, "zzz": {}}, {}, None, [t], 5]
  if t:
    name = sorted(t)[0]
    ad = t[name]
    cands += [{**t, name: {**ad, "lora": {**ad["lora"], "extra": ad["lora"][sorted(
                  ad["lora"])[0]]}}},
              {**t, name: {**ad, "lora": {}}},
              {**t, name: jax.tree.map(lambda x: x[..., :1] if np.ndim(x) else x, ad)},
              {**t, name: jax.tree.map(lambda x: x.astype(jnp.int32), ad)}]
  new = data.draw(st.one_of(st.sampled_from(cands), wild), "trainable")
  ok, out = call("with_trainable", lora.with_trainable, new)
  if not ok:
    return
  shapes = lambda tree: jax.tree.map(lambda x: (np.shape(x), jnp.asarray(x).dtype), tree)
  if jax.tree.structure(out.trainable) != jax.tree.structure(t):
    problem("with_trainable", "the trainable part changed structure", repro())
  elif shapes(out.trainable) != shapes(t):
    problem("with_trainable", "accepted adapters of other shapes or dtypes (nothing checks them "
            "before a jitted step fails or computes garbage)", repro())


def _op_adalora_resize(data, repro):
  e = ep()
  lora = lora_args(data)
  state = data.draw(st.one_of(st.sampled_from([e.ada_state, None, {}, (), [e.ada_state]]), wild),
                    "opt_state")
  kw = {}
  if data.draw(sometimes(2), "adapter_name?"):
    kw["adapter_name"] = data.draw(adapter_name_args, "adapter_name")
  ok, out = call("adalora_resize", lojax.adalora_resize, lora, state, **kw)
  if ok and not isinstance(out, LoraParams):
    problem("adalora_resize", f"returned {short(out)}", repro())


def _op_checkpoint(data, repro):
  e = ep()
  lora = lora_args(data)
  with tempfile.TemporaryDirectory() as d:
    how = data.draw(st.sampled_from(["save_adapters", "checkpointer", "restore"]), "how")
    if how == "save_adapters":
      kw = {"step": data.draw(st.one_of(st.integers(-1, 3), wild), "step")}
      for k, s in (("adapter_names", adapter_name_args), ("max_to_keep", wild)):
        if data.draw(sometimes(3), f"{k}?"):
          kw[k] = data.draw(s, k)
      target = data.draw(st.sampled_from([d, os.path.join(d, "x"), 5, None]), "directory")
      ok, _ = call("save_adapters", lojax.save_adapters, target, lora, **kw)
      if ok:
        ok, back = call("restore_adapters", lojax.restore_adapters, target, e.base)
        if not ok:
          problem("restore_adapters", f"cannot restore what save_adapters wrote: {back}", repro())
        names = _as_names(kw.get("adapter_names")) or lora.meta.active
        for n in names:
          if not same_tree(back.adapters[n], lora.adapters[n]):
            problem("restore_adapters", f"adapter {n!r} restored with other values", repro())
    elif how == "checkpointer":
      kw = {k: data.draw(st.one_of(st.integers(-1, 3), wild), k)
            for k in ("max_to_keep", "save_interval_steps") if data.draw(st.booleans(), k + "?")}
      ok, ckpt = call("AdapterCheckpointer", lojax.AdapterCheckpointer, d, **kw,
                      async_save=False)
      if ok:
        with ckpt:
          step = data.draw(st.one_of(st.integers(-1, 3), wild), "step")
          call("AdapterCheckpointer.save", ckpt.save, step, lora, force=True)
    else:
      lojax.save_adapters(d, e.lora, step=1)
      params = data.draw(st.one_of(st.sampled_from([e.base, e.lora, e.loras["b"], None, {},
                                                    e.news["r1"]]), wild), "params")
      kw = {}
      if data.draw(sometimes(2), "step?"):
        kw["step"] = data.draw(st.one_of(st.integers(-1, 3), wild), "step")
      if data.draw(sometimes(4), "opt_state_template?"):
        kw["opt_state_template"] = data.draw(wild, "opt_state_template")
      target = data.draw(st.sampled_from([d, os.path.join(d, "1"), os.path.join(d, "nope"), 5]),
                         "directory")
      ok, back = call("restore_adapters", lojax.restore_adapters, target, params, **kw)
      if ok and not same_tree(back.adapters["default"], e.lora.adapters["default"]):
        problem("restore_adapters", "restored other values", repro())


def _op_peft_functions(data, repro):
  e = ep()
  with tempfile.TemporaryDirectory() as d:
    lora = lora_args(data)
    kw = {}
    if data.draw(sometimes(3), "mapping?"):
      kw["mapping"] = data.draw(st.one_of(st.sampled_from([lojax.GPT2_MAPPING, None, {}, "gpt2"]),
                                          wild), "mapping")
    if data.draw(sometimes(3), "adapter_name?"):
      kw["adapter_name"] = data.draw(adapter_name_args, "adapter_name")
    ok, _ = call("save_peft", lojax.save_peft, d, lora, **kw)
    if not ok:
      lojax.save_peft(d, e.news["r1"])
    params = data.draw(st.one_of(st.sampled_from([e.base, e.lora, None, {}, e.base["params"]]),
                                 wild), "params")
    kw = {}
    for k, s in (("adapter_name", adapter_name_args), ("apply_fn", wild_apply),
                 ("example_args", wild_example_args)):
      if data.draw(sometimes(4), f"{k}?"):
        kw[k] = data.draw(s, k)
    call("load_peft", lojax.load_peft, data.draw(st.sampled_from([d, 5, None, "/nonexistent"]),
                                                 "directory"), params, **kw)


def same_tree(a, b) -> bool:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(np.asarray(x).dtype == np.asarray(y).dtype and
                          np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


OPS = {"merge": _op_merge, "unmerge": _op_unmerge, "set_adapter": _op_set_adapter,
       "delete_adapter": _op_delete_adapter, "simple": _op_simple,
       "add_weighted_adapter": _op_add_weighted, "adapter_ids": _op_adapter_ids,
       "hotswap": _op_hotswap, "lorafy": _op_lorafy, "with_trainable": _op_with_trainable,
       "adalora_resize": _op_adalora_resize, "checkpoint": _op_checkpoint,
       "peft_functions": _op_peft_functions}


@fuzz_settings("entry_points")
@given(st.data())
@fuzz
def test_entry_points(data):
  op = data.draw(st.sampled_from(sorted(OPS)), "op")
  _stat("test_entry_points", f"op {op}")

  def repro():
    return " ; ".join(CALLS)[:3000]
  OPS[op](data, repro)


# --------------------------------------------------------------------------
# (d) PEFT adapter directories: written by save_peft, then damaged
# --------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


class Peft(NamedTuple):
  model: Any
  params: Any
  ids: Any
  sources: dict   # name -> (config dict, {tensor name: np.ndarray})
  wrapped: LoraParams   # the params with another adapter, to load onto


@functools.cache
def peft_sources() -> Peft:
  from safetensors.numpy import load_file
  model = gpt.GPT(vocab=16, d=8, heads=2, layers=2, max_len=8)
  ids = jnp.asarray(np.arange(8).reshape(2, 4) % 16, jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids)   # no compilation
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, s.dtype), shapes)
  specs = {
      "lora": lojax.LoraSpec(r=2, target_modules=["c_attn", "c_fc", "wte", "lm_head"],
                             rank_pattern={"c_fc": 1}, alpha_pattern={"lm_head": 3},
                             modules_to_save=["ln_f"], bias="lora_only"),
      "dora": lojax.LoraSpec(r=2, target_modules=["c_attn", "c_proj"], use_dora=True,
                             use_rslora=True),
      "adalora": lojax.AdaLoraSpec(init_r=2, target_r=1, total_step=10,
                                   target_modules=["c_attn"]),
  }
  sources = {}
  for name, spec in specs.items():
    lora = _randomized(lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                                  example_args=(ids,)), 3)
    with tempfile.TemporaryDirectory() as d:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lojax.save_peft(d, lora, mapping=lojax.GPT2_MAPPING)
      with open(os.path.join(d, "adapter_config.json")) as fh:
        config = json.load(fh)
      sources[name] = (config, load_file(os.path.join(d, "adapter_model.safetensors")))
  wrapped = lojax.wrap(params, lojax.LoraSpec(r=1, target_modules=["c_proj"]),
                       key=jax.random.key(1), adapter_name="other")
  return Peft(model, params, ids, sources, wrapped)


CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern",
               "alpha_pattern", "use_rslora", "use_dora", "layers_to_transform", "layers_pattern",
               "modules_to_save", "init_lora_weights", "bias", "task_type", "fan_in_fan_out",
               "lora_dropout", "loftq_config", "inference_mode", "init_r", "target_r", "tinit",
               "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
               "megatron_config", "use_qalora", "runtime_config", "layer_replication", "zzz"]
json_atoms = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(-2**70, 2**70),
                       st.floats(allow_nan=True, allow_infinity=True), names,
                       st.sampled_from(["LORA", "ADALORA", "IA3", "lora", "false", "true", "1",
                                        "gaussian", "pissa", "olora", "loftq", "eva"]))
json_wild = st.recursive(json_atoms, lambda c: st.one_of(
    st.lists(c, max_size=3), st.dictionaries(names, c, max_size=3)), max_leaves=6)
TENSOR_NAMES = ["../../etc/passwd", "/abs/path", "a/b.lora_A.weight", "", ".", "lora_A.weight",
                PEFT_PREFIX + "transformer.h.7.attn.c_attn.lora_A.weight",
                PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_A.default.weight",
                PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_magnitude_vector",
                PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_E",
                PEFT_PREFIX + "transformer.h.0.attn.c_attn.ranknum",
                PEFT_PREFIX + "transformer.h.0.attn.c_attn.base_layer.weight",
                PEFT_PREFIX + "transformer.wpe.weight", PEFT_PREFIX + "lm_head.weight",
                PEFT_PREFIX + "transformer.h.0.ln_1.weight",
                PEFT_PREFIX + "transformer.h.0.mlp.c_fc.bias",
                "transformer.h.0.attn.c_attn.lora_A.weight", PEFT_PREFIX + "x" * 300]
PLAUSIBLE_CONFIG = {
    "r": st.integers(1, 4), "lora_alpha": st.one_of(st.integers(-4, 64), st.floats(-10, 10)),
    "use_rslora": st.booleans(), "use_dora": st.booleans(), "fan_in_fan_out": st.booleans(),
    "bias": st.sampled_from(["none", "all", "lora_only"]),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora"]),
    "target_modules": st.sampled_from([["c_attn"], "all-linear", ".*c_attn", ["lm_head", "wte"],
                                       None]),
    "alpha_pattern": st.sampled_from([{}, {"lm_head": 5}, {"c_attn": 2}, {"h.0.attn.c_attn": 4},
                                      {"transformer.h.1.attn.c_attn": 7.5}, {"(": 1}, None]),
    "rank_pattern": st.sampled_from([{}, {"c_attn": 1}, {"lm_head": 3}, None]),
    "layers_to_transform": st.sampled_from([None, [0], 1, [0, 1]]),
    "layers_pattern": st.sampled_from([None, "h", ["h"]]),
    "modules_to_save": st.sampled_from([None, ["transformer.ln_f"], ["ln_f"], ["lm_head"]]),
    "lora_dropout": st.sampled_from([0.0, 0.1, None]),
    "inference_mode": st.booleans(), "task_type": st.sampled_from([None, "CAUSAL_LM"]),
    "base_model_name_or_path": st.sampled_from(["gpt2", None]),
    "init_r": st.integers(1, 4), "target_r": st.integers(1, 2), "total_step": st.integers(1, 20),
    "tinit": st.integers(0, 3), "beta1": st.floats(0.1, 0.9),
}
peft_mutations = st.one_of(
    st.sampled_from(sorted(PLAUSIBLE_CONFIG)).flatmap(
        lambda k: st.tuples(st.just("set"), st.just(k), PLAUSIBLE_CONFIG[k])),
    st.tuples(st.just("set"), st.sampled_from(CONFIG_KEYS), json_wild),
    st.tuples(st.just("del"), st.sampled_from(CONFIG_KEYS)),
    st.tuples(st.just("config_raw"), st.sampled_from(
        ["[]", "null", '"x"', "3", "true", "{", "", "\x00\xff", '{"peft_type": "LORA"', "[{}]",
         '{"r": NaN}', "{}", '{"peft_type": "LORA", "r": 2}', '{"peft_type": null}'])),
    st.tuples(st.just("rename"), st.integers(0, 100), st.one_of(
        st.sampled_from(TENSOR_NAMES), st.sampled_from(["swap_ab", "strip_prefix", "upper",
                                                        "suffix", "layer"]))),
    st.tuples(st.just("del_tensor"), st.integers(0, 100)),
    st.tuples(st.just("add_tensor"), st.sampled_from(TENSOR_NAMES),
              st.sampled_from([(), (2,), (2, 8), (0, 8), (8, 2)])),
    st.tuples(st.just("reshape"), st.integers(0, 100), st.sampled_from(
        ["transpose", "0-d", "add_axis", "drop_last", "grow_rank", "flatten", "empty"])),
    st.tuples(st.just("dtype"), st.integers(0, 100), st.sampled_from(
        ["float16", "float64", "int32", "int8", "uint8", "bool", "bfloat16", "int64"])),
    st.tuples(st.just("values"), st.integers(0, 100), st.sampled_from(
        [np.nan, np.inf, -np.inf, 3e38, 0.0, -0.0, 1e-45, 0.25])),
    st.tuples(st.just("weights_raw"), st.sampled_from(
        ["truncate", "empty", "garbage", "header", "huge_header"])),
)


def _mutate_tensor(x: np.ndarray, how: str) -> np.ndarray:
  if x.ndim == 0 and how != "add_axis":
    return x.reshape(1)
  if how == "transpose":
    return x.T.copy()
  if how == "0-d":
    return np.asarray(x.reshape(-1)[0] if x.size else 0.0, x.dtype)
  if how == "add_axis":
    return x[None]
  if how == "drop_last":
    return x[..., :-1].copy()
  if how == "grow_rank":
    return np.concatenate([x, x], axis=0)
  if how == "flatten":
    return x.reshape(-1).copy()
  return np.zeros((0,) + x.shape[1:], x.dtype)


def _rename(name: str, how: str) -> str:
  if how == "swap_ab":
    return name.replace("lora_A", "lora_X").replace("lora_B", "lora_A").replace("lora_X", "lora_B")
  if how == "strip_prefix":
    return name[len(PEFT_PREFIX):]
  if how == "upper":
    return name.upper()
  if how == "suffix":
    return name + ".weight"
  if how == "layer":
    return name.replace("h.0", "h.1") if "h.0" in name else name.replace("h.1", "h.0")
  return how


def _write_peft(d: str, config, tensors, raw_config, raw_weights) -> None:
  from safetensors.numpy import save_file
  with open(os.path.join(d, "adapter_config.json"), "w") as fh:
    fh.write(raw_config if raw_config is not None else json.dumps(config))
  path = os.path.join(d, "adapter_model.safetensors")
  save_file(tensors, path, metadata={"format": "pt"})
  if raw_weights:
    data = open(path, "rb").read()
    if raw_weights == "truncate":
      data = data[:len(data) // 2]
    elif raw_weights == "empty":
      data = b""
    elif raw_weights == "garbage":
      data = bytes(range(256)) * 4
    elif raw_weights == "header":
      data = data[:8] + data[8:40].replace(b"{", b"[") + data[40:]
    else:
      data = (2**62).to_bytes(8, "little") + data[8:]
    with open(path, "wb") as fh:
      fh.write(data)


def _gpt_base_bias(params, torch_name: str):
  """The base value of a GPT-2 bias tensor name (None when it names no bias of the base)."""
  m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.*?)(?:\.base_layer)?\.bias", torch_name)
  if not m:
    return None
  path = re.sub(r"^transformer\.h\.(\d+)\.", r"h_\1.", m.group(1))
  node = params["params"]
  for part in re.sub(r"^transformer\.", "", path).split("."):
    node = node.get(part) if isinstance(node, dict) else None
  return np.asarray(node["bias"]) if isinstance(node, dict) and "bias" in node else None


def _peft_scalings(config, tensors) -> dict[str, float]:
  """PEFT's scaling of every LoRA module of a file, from its config (PEFT's lookup rule)."""
  out = {}
  for name, x in tensors.items():
    m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.*)\.lora_(?:A\.weight|embedding_A)", name)
    if not m:
      continue
    mod, r = m.group(1), x.shape[0]
    alpha = config.get("lora_alpha", 8)
    for key, value in (config.get("alpha_pattern") or {}).items():
      if re.match(rf"(.*\.)?({key})$", mod):
        alpha = value
        break
    out[mod] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
  return out


@fuzz_settings("peft")
@given(st.sampled_from(["lora", "dora", "adalora"]), st.lists(peft_mutations, max_size=3),
       st.sampled_from(["params", "params", "params", "traced", "lora"]))
@fuzz
def test_load_peft_damaged_files(source, mutations, onto):
  from safetensors.numpy import load_file
  pf = peft_sources()
  config, tensors = pf.sources[source]
  config, tensors = json.loads(json.dumps(config)), dict(tensors)
  raw_config = raw_weights = None
  for m in mutations:
    names_ = sorted(tensors)
    kind = m[0]
    if kind == "set":
      config[m[1]] = m[2]
    elif kind == "del":
      config.pop(m[1], None)
    elif kind == "config_raw":
      raw_config = m[1]
    elif kind == "weights_raw":
      raw_weights = m[1]
    elif not names_:
      continue
    elif kind == "rename":
      old = names_[m[1] % len(names_)]
      tensors[_rename(old, m[2])] = tensors.pop(old)
    elif kind == "del_tensor":
      tensors.pop(names_[m[1] % len(names_)])
    elif kind == "add_tensor":
      tensors[m[1]] = np.ones(m[2], np.float32)
    elif kind == "reshape":
      k = names_[m[1] % len(names_)]
      tensors[k] = _mutate_tensor(tensors[k], m[2])
    elif kind == "dtype":
      k = names_[m[1] % len(names_)]
      tensors[k] = tensors[k].astype(jnp.bfloat16 if m[2] == "bfloat16" else m[2])
    elif kind == "values":
      k = names_[m[1] % len(names_)]
      x = tensors[k].copy()
      try:
        if x.size:
          x.reshape(-1)[0] = m[2]
      except (OverflowError, ValueError):   # NaN, inf or a huge int in an integer tensor:
        pass                                # a damage that cannot be written
      tensors[k] = x
  kw: dict[str, Any] = {"mapping": lojax.GPT2_MAPPING}
  params = pf.params
  if onto == "traced":
    kw.update(apply_fn=pf.model.apply, example_args=(pf.ids,))
  elif onto == "lora":
    params = pf.wrapped
    kw["adapter_name"] = "peft"
  with tempfile.TemporaryDirectory() as d:
    try:
      _write_peft(d, config, tensors, raw_config, raw_weights)
    except Exception:  # noqa: BLE001 - a damage safetensors cannot write: not under test
      return
    ok, lora = call("load_peft", lojax.load_peft, d, params, **kw)
    repro = f"{source} file with {short(mutations)}; " + CALLS[-1]
    if not ok:
      _stat("test_load_peft_damaged_files", "lojax errors")
      return
    _stat("test_load_peft_damaged_files", "successes")
    file_tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
    with open(os.path.join(d, "adapter_config.json")) as fh:
      file_config = json.load(fh)
    name = kw.get("adapter_name", "default")
    if not isinstance(lora, LoraParams) or name not in lora.meta.names:
      problem("load_peft", f"returned {short(lora)}", repro)
    # Never wrong data: the loaded adapter saves back to the file's tensors and scalings.
    with tempfile.TemporaryDirectory() as d2:
      ok, err = call("save_peft", lojax.save_peft, d2, lora, mapping=lojax.GPT2_MAPPING,
                     adapter_name=name)
      if not ok:
        problem("load_peft", f"the loaded adapter cannot be saved again: {err}", repro)
      back = load_file(os.path.join(d2, "adapter_model.safetensors"))
      with open(os.path.join(d2, "adapter_config.json")) as fh:
        back_config = json.load(fh)
    # A trained bias the file lacks is the base's (as in PEFT): saved back with the base value.
    invented = sorted(k for k in set(back) - set(file_tensors)
                      if not np.array_equal(back[k], _gpt_base_bias(pf.params, k)))
    # A bias the config does not train may be in the file if it equals the base (a copy).
    dropped = sorted(k for k in set(file_tensors) - set(back)
                     if not np.array_equal(file_tensors[k], _gpt_base_bias(pf.params, k)))
    if dropped or invented:
      problem("load_peft", f"loaded tensors {dropped[:4]} were dropped, {invented[:4]} "
              "invented", repro)
    for k, x in file_tensors.items():
      x, y = np.asarray(x, np.float32), np.asarray(back[k], np.float32)
      if x.shape != y.shape:
        same = x.size == y.size and np.array_equal(x.reshape(-1), y.reshape(-1), equal_nan=True)
        problem("load_peft", f"tensor {k} of shape {x.shape} accepted as {y.shape} (PEFT "
                f"refuses a tensor of another shape){'' if same else ', values scrambled'}",
                repro)
      # a bias is stored as a delta to the base: rounding
      tol = (1e-6, 1e-6) if k.endswith(".bias") else (0, 0)
      if not np.allclose(x, y, *tol, equal_nan=True):
        problem("load_peft", f"tensor {k} {x.shape} loaded as other values", repro)
    if file_config.get("peft_type") == "LORA":
      want, got = _peft_scalings(file_config, file_tensors), _peft_scalings(back_config, back)
      for mod, s in want.items():
        if not math.isclose(s, got.get(mod, math.nan), rel_tol=1e-6):
          problem("load_peft", f"{mod}: the file's scaling is {s} (PEFT's reading of the "
                  f"config), the loaded adapter's {got.get(mod)}", repro)


# --------------------------------------------------------------------------
# Fault injection: SIGKILL a process saving checkpoints, then restore
# --------------------------------------------------------------------------

KILL_CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, lojax
    from kill_tree import lora
    ckpt = lojax.AdapterCheckpointer(sys.argv[1], max_to_keep=3, async_save=True)
    step = ckpt.latest_step() or 0
    print("ready", step, flush=True)
    while True:
      step += 1
      t = jax.tree.map(lambda x: jnp.full(x.shape, float(step), x.dtype), lora.trainable)
      if step % 4 == 0:   # a blocking save beside the asynchronous ones
        ckpt.wait_until_finished()
        lojax.save_adapters(sys.argv[1], lora.with_trainable(t), step=step, max_to_keep=3)
      else:
        ckpt.save(step, lora.with_trainable(t))
      if step % 2 == 0:
        ckpt.wait_until_finished()
        print("committed", step, flush=True)
      else:
        print("started", step, flush=True)
""")
KILL_TREE = textwrap.dedent("""
    import jax, jax.numpy as jnp, lojax
    params = {"w": {"kernel": jnp.zeros((256, 256)), "bias": jnp.zeros(256)},
              "e": {"embedding": jnp.zeros((128, 256))}}
    lora = lojax.wrap(params, lojax.LoraSpec(r=32, target_modules=["w", "e"], bias="all"),
                      key=jax.random.key(0))
""")


def test_sigkill_during_saves_never_loads_wrong_data(tmp_path):
  """Kills (SIGKILL) a child saving steps whose every adapter leaf is the step number, at seeded
  random moments, restarts it on the same directory, and after each kill restores every visible
  step: completed steps restore bit-exactly; any other step is invisible or refused with lojax's
  ValueError naming the available steps."""
  kills = int(os.environ.get("LOJAX_FUZZ_KILLS", 4))
  (tmp_path / "kill_tree.py").write_text(KILL_TREE)
  (tmp_path / "child.py").write_text(KILL_CHILD)
  ckdir = str(tmp_path / "ck")
  sys.path.insert(0, str(tmp_path))
  try:
    import kill_tree
  finally:
    sys.path.remove(str(tmp_path))
  params = kill_tree.params
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), kill_tree.lora.trainable)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]),
             JAX_PLATFORMS="cpu")
  rng = random.Random(0)
  log = []
  committed_ever = 0
  for kill in range(kills):
    proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), ckdir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
      deadline = time.time() + 60
      while not any(x.startswith("ready") for x in lines):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the child never got ready"
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 0.8))  # a random moment of the save loop
      assert proc.poll() is None, f"the saving child died on its own:\n{proc.stderr.read()}"
      proc.send_signal(signal.SIGKILL)
      proc.wait(30)
    finally:
      if proc.poll() is None:
        proc.kill()
    reader.join(5)
    # "<word> <step>" lines; the kill can cut the last one short, and libraries print too.
    said = [x.split() for x in lines]
    said = [(w[0], int(w[1])) for w in said if len(w) == 2 and w[1].isdigit()]
    committed = max([n for w, n in said if w == "committed"], default=0)
    started = max([n for w, n in said if w in ("committed", "started")], default=0)
    committed_ever = max(committed_ever, committed)
    with lojax.AdapterCheckpointer(ckdir, max_to_keep=None, async_save=False) as ckpt:
      steps = ckpt.all_steps()
    outcome = {"kill": kill, "committed": committed, "started": started, "visible": steps,
               "exact": [], "refused": []}
    if committed_ever:  # a completed step is never lost (only older steps are rotated out)
      assert committed_ever in steps or len([s for s in steps if s > committed_ever]) >= 3, outcome
    # Completed steps among the newest three must restore; an older one may be half deleted
    # by the rotation (max_to_keep=3) the kill interrupted, a newer one half written.
    kept = [s for s in steps[-3:] if s <= committed_ever]
    for step in steps:
      ok, back = call("restore_adapters", lojax.restore_adapters, ckdir, params, step=step)
      if not ok:
        assert re.search(r"available: \[", str(back)), (step, str(back))
        assert step not in kept, f"completed step {step} refused: {back}\n{outcome}\n{log}"
        outcome["refused"].append(step)
        continue
      got = jax.tree.map(lambda x: (x.shape, x.dtype), back.trainable)
      assert got == shapes, (step, got)
      bad = [k for k, x in jax.tree_util.tree_flatten_with_path(back.trainable)[0]
             if not np.array_equal(np.asarray(x), np.full(x.shape, float(step), x.dtype))]
      assert not bad, f"step {step} restored wrong data at {bad[:3]} ({outcome})"
      outcome["exact"].append(step)
    ok, err = call("restore_adapters", lojax.restore_adapters, ckdir, params,
                   step=max(steps, default=0) + 1)
    assert not ok and re.search(r"No step|No checkpoint", str(err)), err
    ok, latest = call("restore_adapters", lojax.restore_adapters, ckdir, params)
    if kept:
      assert ok and np.all(np.asarray(jax.tree.leaves(latest.trainable)[0]) == max(steps)), latest
    log.append(outcome)
  STATS["test_sigkill_during_saves_never_loads_wrong_data"] = {
      "kills": kills, "restores": sum(len(o["visible"]) for o in log),
      "exact": sum(len(o["exact"]) for o in log),
      "refused": sum(len(o["refused"]) for o in log),
      "log": log}
  assert committed_ever >= 2, f"the child never completed a step: {log}"
