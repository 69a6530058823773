"""Tests for lojax._src.spec."""

import copy
import dataclasses
import enum
import json
import math
import pickle
import re

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lojax._src.adalora import AdaLoraSpec
from lojax._src.spec import BIAS_MODES, MAX_ALPHA, MAX_RANK, FrozenDict, LoraSpec, TaskType

T = dict(target_modules=["q_proj", "v_proj"])  # the smallest valid spec


def test_defaults_are_peft_defaults():
  spec = LoraSpec(**T)
  expected = dict(
      r=8, lora_alpha=8, use_rslora=False, exclude_modules=None, layers_to_transform=None,
      layers_pattern=None, rank_pattern=FrozenDict(), alpha_pattern=FrozenDict(),
      lora_dropout=0.0, bias="none", modules_to_save=None, init_lora_weights=True,
      use_dora=False, loftq_config=FrozenDict(), task_type=None,
      finetune_attention_modules=None, finetune_mlp_modules=None,
      finetune_language_layers=None, finetune_vision_layers=None, kernel_axes=FrozenDict())
  for name, value in expected.items():
    got = getattr(spec, name)
    assert got == value and type(got) is type(value), (name, got)
  fields = {f.name: f for f in dataclasses.fields(LoraSpec)}
  assert fields["target_modules"].default is None
  assert all(f.kw_only for f in fields.values())


def test_mapping_inputs_are_copied_into_frozen_dicts():
  user = {"q_proj": 4}
  axes = [0, 1]
  spec = LoraSpec(**T, rank_pattern=user, kernel_axes={"q_proj": axes})
  user["v_proj"] = 2
  axes.append(2)
  assert spec.rank_pattern == {"q_proj": 4} and spec.kernel_axes == {"q_proj": (0, 1)}
  for name in ("rank_pattern", "alpha_pattern", "loftq_config", "kernel_axes"):
    assert type(getattr(spec, name)) is FrozenDict, name


def test_frozen_and_keyword_only():
  spec = LoraSpec(**T)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.r = 4
  with pytest.raises(TypeError):
    LoraSpec(8)


def test_sequences_are_normalised_to_tuples():
  spec = LoraSpec(target_modules={"v_proj", "q_proj"}, exclude_modules=["a", "b"],
                  layers_to_transform=[3, 1, 3], layers_pattern="layers",
                  modules_to_save="classifier", kernel_axes={"conv": [0, 1, 2]})
  assert spec.target_modules == ("q_proj", "v_proj")
  assert spec.exclude_modules == ("a", "b")
  assert spec.layers_to_transform == (1, 3)
  assert spec.layers_pattern == ("layers",)
  assert spec.modules_to_save == ("classifier",)
  assert spec.kernel_axes == {"conv": (0, 1, 2)}
  assert LoraSpec(target_modules="all-linear", layers_to_transform=2).layers_to_transform == 2
  assert LoraSpec(target_modules=r".*q_proj").target_modules == ".*q_proj"


@pytest.mark.parametrize("value", [TaskType.SEQ_CLS, "SEQ_CLS", "seq_cls"])
def test_task_type_is_normalised_to_the_enum(value):
  assert LoraSpec(**T, task_type=value).task_type is TaskType.SEQ_CLS


def test_task_type_members():
  assert [t.value for t in TaskType] == [
      "CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]
  assert all(t.value == t.name for t in TaskType)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), r"`r` must be an int > 0; got r=0"),
    (dict(r=-2), r"`r` must be an int > 0"),
    (dict(r=True), r"`r` must be an int > 0; got r=True"),
    (dict(r=4.0), r"`r` must be an int > 0; got r=4.0"),
    (dict(lora_alpha=math.inf), r"`lora_alpha` must be a finite number; got lora_alpha=inf"),
    (dict(lora_alpha=math.nan), r"`lora_alpha` must be a finite number"),
    (dict(lora_alpha="16"), r"`lora_alpha` must be a finite number; got lora_alpha='16'"),
    (dict(lora_dropout=1.0), r"`lora_dropout` must be a number in \[0, 1\); got lora_dropout=1.0"),
    (dict(lora_dropout=-0.1), r"`lora_dropout` must be a number in \[0, 1\)"),
    (dict(bias="some"), r"`bias` must be one of \('none', 'all', 'lora_only'\); got bias='some'"),
    (dict(use_rslora=1), r"`use_rslora` must be True or False; got 1"),
    (dict(use_dora="yes"), r"`use_dora` must be True or False"),
    (dict(rank_pattern={"q_proj": 0}), r"`rank_pattern\['q_proj'\]` must be an int > 0; got 0"),
    (dict(rank_pattern={"q_proj": 2.5}), r"`rank_pattern\['q_proj'\]` must be an int > 0"),
    (dict(alpha_pattern={"q_proj": math.inf}),
     r"`alpha_pattern\['q_proj'\]` must be a finite number; got inf"),
    (dict(rank_pattern={"q_(proj": 4}),
     r"`rank_pattern` key 'q_\(proj' is not a valid regular expression"),
    (dict(alpha_pattern={"[": 4}), r"`alpha_pattern` key '\[' is not a valid regular expression"),
    (dict(kernel_axes={"conv": ()}), r"`kernel_axes\['conv'\]` must be a non-empty tuple"),
    (dict(kernel_axes={"conv": (0, 0)}), r"of distinct ints >= 0; got \(0, 0\)"),
    (dict(kernel_axes={"conv": (-1,)}), r"`kernel_axes\['conv'\]` must be"),
    (dict(layers_to_transform=-1), r"`layers_to_transform` entries must be ints >= 0; got -1"),
    (dict(layers_to_transform=[0, "1"]), r"entries must be ints >= 0; got '1'"),
    (dict(layers_to_transform=[]), r"`layers_to_transform` must be an int or a non-empty list"),
    (dict(layers_pattern="layers"),
     r"`layers_pattern=\['layers'\]` was given without `layers_to_transform`"),
    (dict(layers_pattern="(", layers_to_transform=1),
     r"`layers_pattern` entry '\(' is not a valid regular expression"),
    (dict(exclude_modules="*x"), r"`exclude_modules` '\*x' is not a valid regular expression"),
    (dict(modules_to_save=[1]), r"`modules_to_save` entries must be non-empty str; got 1"),
    (dict(modules_to_save=5), r"`modules_to_save` must be None, a str or a list of str"),
    (dict(loftq_config={"loftq_bits": 3}), r"`loftq_config\['loftq_bits'\]` must be 4 or 8; got 3"),
    (dict(loftq_config={"loftq_iter": 0}), r"`loftq_config\['loftq_iter'\]` must be an int >= 1"),
    (dict(loftq_config={"bits": 4}), r"`loftq_config` has unknown keys \['bits'\]"),
    (dict(loftq_config={"loftq_bits": "4", 1: 2}),
     r"(?s)has unknown keys \['1'\].*`loftq_config\['loftq_bits'\]` must be 4 or 8; got '4'"),
    (dict(init_lora_weights="loftq"), r"`init_lora_weights='loftq'` needs `loftq_config`"),
    (dict(init_lora_weights="orthogonal", r=7), r"'orthogonal'` needs an even `r`; got r=7"),
    (dict(task_type="CLS"),
     r"`task_type` must be None or one of \['CAUSAL_LM'.*got task_type='CLS'"),
])
def test_invalid_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoraSpec(**{**T, **kwargs})


@pytest.mark.parametrize("init", ["eva", "PISSA", "pissa_niter_0", "pissa_niter_", "pissa_niter_x",
                                  1, None])
def test_invalid_init_lists_valid_values(init):
  with pytest.raises(ValueError, match=r"`init_lora_weights` must be one of True, False, "
                     r"'gaussian', 'pissa', 'pissa_niter_<K>' .*'orthogonal'; got"):
    LoraSpec(**T, init_lora_weights=init)


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "pissa_niter_4",
                                  "pissa_niter_16", "olora", "orthogonal"])
def test_valid_init(init):
  assert LoraSpec(**T, init_lora_weights=init).init_lora_weights == init


def test_loftq_with_config_is_valid():
  spec = LoraSpec(**T, init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 2})
  assert spec.loftq_config == {"loftq_bits": 8, "loftq_iter": 2}


def test_target_modules_regex_must_compile():
  with pytest.raises(ValueError, match=r"`target_modules` '\.\*\(q' is not a valid regular"):
    LoraSpec(target_modules=".*(q")
  with pytest.raises(ValueError, match=r"`target_modules=\[\]` selects nothing"):
    LoraSpec(target_modules=[])


def test_no_target_asks_for_target_modules_or_a_group():
  with pytest.raises(ValueError, match=r"No target given: pass `target_modules` \(a list of "
                     r"module names, a regex, or 'all-linear'\), or set a group flag"):
    LoraSpec()


def test_groups_are_an_alternative_to_target_modules():
  with pytest.raises(ValueError, match=r"`target_modules` and the group flags "
                     r"\(finetune_mlp_modules\) are alternatives"):
    LoraSpec(target_modules="all-linear", finetune_mlp_modules=True)
  assert LoraSpec(finetune_vision_layers=False).target_modules is None
  with pytest.raises(ValueError, match=r"`finetune_attention_modules=False` and "
                     r"`finetune_mlp_modules=False` select nothing"):
    LoraSpec(finetune_attention_modules=False, finetune_mlp_modules=False)
  with pytest.raises(ValueError, match=r"`finetune_language_layers=False` and "
                     r"`finetune_vision_layers=False` select nothing"):
    LoraSpec(finetune_language_layers=False, finetune_vision_layers=False)
  with pytest.raises(ValueError, match=r"flags must be None, True or False; got "
                     r"finetune_mlp_modules='yes'"):
    LoraSpec(finetune_mlp_modules="yes")


def test_all_problems_are_reported_together():
  with pytest.raises(ValueError, match=r"\(3 problems\)") as info:
    LoraSpec(**T, r=0, lora_dropout=2.0, bias="x")
  message = str(info.value)
  assert "`r`" in message and "`lora_dropout`" in message and "`bias`" in message


def test_equal_specs_hash_equal_and_work_as_dict_keys():
  a = LoraSpec(**T, rank_pattern={"q_proj": 4, "v_proj": 2}, alpha_pattern={"q_proj": 8})
  b = LoraSpec(target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 2, "q_proj": 4},
               alpha_pattern={"q_proj": 8})
  assert a == b and hash(a) == hash(b)
  assert {a: "x"}[b] == "x"
  assert a != LoraSpec(**T, rank_pattern={"q_proj": 4, "v_proj": 3}, alpha_pattern={"q_proj": 8})
  assert a != LoraSpec(**T, rank_pattern={"q_proj": 4, "v_proj": 2})
  assert LoraSpec(**T) != LoraSpec(**T, kernel_axes={"q_proj": (0,)})
  assert LoraSpec(**T) != "spec"


def test_spec_is_usable_as_static_jit_argument():
  jax = pytest.importorskip("jax")
  traces = []

  def f(x, spec):
    traces.append(spec)
    return x * spec.scaling(spec.r, spec.lora_alpha)

  g = jax.jit(f, static_argnums=1)
  a = LoraSpec(**T, r=4, lora_alpha=8, rank_pattern={"q_proj": 2})
  assert float(g(1.0, a)) == 2.0
  assert float(g(1.0, LoraSpec(**T, r=4, lora_alpha=8, rank_pattern={"q_proj": 2}))) == 2.0
  assert len(traces) == 1
  assert float(g(1.0, LoraSpec(**T, r=4, lora_alpha=4))) == 1.0
  assert len(traces) == 2


def test_scaling():
  assert LoraSpec(**T).scaling(16, 8) == 0.5
  assert LoraSpec(**T, use_rslora=True).scaling(16, 8) == 2.0
  assert LoraSpec(**T, use_rslora=True).scaling(2, 3) == pytest.approx(3 / math.sqrt(2))


def test_task_type_adds_optional_modules_to_save():
  assert LoraSpec(**T).effective_modules_to_save() == ()
  assert LoraSpec(**T, task_type="CAUSAL_LM").effective_modules_to_save() == ()
  for task in ("SEQ_CLS", "TOKEN_CLS"):
    spec = LoraSpec(**T, task_type=task, modules_to_save=["pooler"])
    assert spec.effective_modules_to_save() == ("pooler", "classifier", "score")
    assert spec.optional_modules_to_save() == ("classifier", "score")
  qa = LoraSpec(**T, task_type=TaskType.QUESTION_ANS)
  assert qa.effective_modules_to_save() == ("qa_outputs",)
  assert qa.optional_modules_to_save() == ("qa_outputs",)
  # A name the user gives is required, even if the task would add it too.
  user = LoraSpec(**T, task_type="SEQ_CLS", modules_to_save=["score"])
  assert user.effective_modules_to_save() == ("score", "classifier")
  assert user.optional_modules_to_save() == ("classifier",)


def test_to_dict_from_dict_round_trip_through_json():
  spec = LoraSpec(r=4, lora_alpha=16.5, target_modules=["q", "v"], exclude_modules="x.*",
                  layers_to_transform=[0, 2], layers_pattern=["layers"],
                  rank_pattern={"q": 2}, alpha_pattern={"v": 3.0}, lora_dropout=0.1,
                  bias="lora_only", modules_to_save=["head"], init_lora_weights="loftq",
                  loftq_config={"loftq_bits": 4, "loftq_iter": 1}, task_type="SEQ_CLS",
                  kernel_axes={"conv": (0, 1)}, use_dora=True, use_rslora=True)
  d = spec.to_dict()
  assert d["task_type"] == "SEQ_CLS" and type(d["task_type"]) is str
  assert d["target_modules"] == ["q", "v"] and d["layers_to_transform"] == [0, 2]
  assert d["kernel_axes"] == {"conv": [0, 1]}
  assert set(d) == {f.name for f in dataclasses.fields(LoraSpec)}
  back = LoraSpec.from_dict(json.loads(json.dumps(d)))
  assert back == spec and hash(back) == hash(spec)
  assert back.kernel_axes == {"conv": (0, 1)} and back.task_type is TaskType.SEQ_CLS
  groups = LoraSpec(finetune_attention_modules=True, finetune_vision_layers=False)
  assert LoraSpec.from_dict(json.loads(json.dumps(groups.to_dict()))) == groups


def test_from_dict_rejects_unknown_keys():
  d = LoraSpec(**T).to_dict() | {"peft_type": "LORA", "fan_in_fan_out": False}
  with pytest.raises(ValueError, match=r"not LoraSpec fields: \['fan_in_fan_out', 'peft_type'\]"):
    LoraSpec.from_dict(d)
  with pytest.raises(TypeError, match=r"`data` must be a dict; got list"):
    LoraSpec.from_dict([])


# --- Immutability --------------------------------------------------------------------------

MAPPINGS = ("rank_pattern", "alpha_pattern", "loftq_config", "kernel_axes")
MUTATIONS = {
    "setitem": lambda m: m.__setitem__("q_proj", 1),
    "delitem": lambda m: m.__delitem__("q_proj"),
    "update": lambda m: m.update({"q_proj": 1}),
    "pop": lambda m: m.pop("q_proj"),
    "popitem": lambda m: m.popitem(),
    "clear": lambda m: m.clear(),
    "setdefault": lambda m: m.setdefault("new", 1),
    "ior": lambda m: m.__ior__({"q_proj": 1}),
    "setattr": lambda m: setattr(m, "_data", {}),
    "reinit": lambda m: m.__init__({}),
}


def _full_spec():
  return LoraSpec(**T, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 2.0},
                  init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2},
                  kernel_axes={"q_proj": (0, 1)})


@pytest.mark.parametrize("field", MAPPINGS)
@pytest.mark.parametrize("how", MUTATIONS)
def test_mapping_fields_refuse_every_mutation(field, how):
  spec = _full_spec()
  before, h = spec.to_dict(), hash(spec)
  with pytest.raises(TypeError, match=rf"`{field}` is immutable: a LoraSpec is a hashable value "
                     rf".*`dataclasses.replace\(spec, {field}=\{{...\}}\)`"):
    MUTATIONS[how](getattr(spec, field))
  assert spec.to_dict() == before and hash(spec) == h


def test_item_assignment_of_the_issue_is_refused():
  spec = LoraSpec(**T, rank_pattern={"q_proj": 4})
  h = hash(spec)
  with pytest.raises(TypeError, match=r"rank_pattern=spec.rank_pattern \| \{key: value\}"):
    spec.rank_pattern["q_proj"] = -3
  assert spec.rank_pattern["q_proj"] == 4 and hash(spec) == h


def test_sequence_fields_are_tuples_and_copied():
  names, layers = ["q_proj", "v_proj"], [0, 2]
  spec = LoraSpec(target_modules=names, exclude_modules=["x"], layers_to_transform=layers,
                  layers_pattern=["h"], modules_to_save=["head"])
  names.append("k_proj")
  layers.append(5)
  for name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "modules_to_save"):
    assert type(getattr(spec, name)) is tuple, name
  assert spec.target_modules == ("q_proj", "v_proj") and spec.layers_to_transform == (0, 2)


def test_replace_builds_a_new_validated_spec():
  spec = _full_spec()
  new = dataclasses.replace(spec, rank_pattern=spec.rank_pattern | {"v_proj": 2})
  assert new.rank_pattern == {"q_proj": 4, "v_proj": 2} and type(new.rank_pattern) is FrozenDict
  assert spec.rank_pattern == {"q_proj": 4}
  assert new != spec and dataclasses.replace(spec) == spec
  assert hash(dataclasses.replace(spec)) == hash(spec)
  with pytest.raises(ValueError, match=r"`rank_pattern\['v_proj'\]` must be an int > 0; got -3"):
    dataclasses.replace(spec, rank_pattern={"v_proj": -3})
  ada = AdaLoraSpec(init_r=8, target_r=4, total_step=10, target_modules=["q_proj"])
  assert dataclasses.replace(ada, tinit=2).tinit == 2


def test_frozen_dict_equality_hash_and_copies():
  a, b = FrozenDict({"x": 1, "y": (0, 1)}), FrozenDict({"y": (0, 1), "x": 1})
  assert a == b and hash(a) == hash(b) and a == {"x": 1, "y": (0, 1)} == a
  assert a != FrozenDict({"x": 2, "y": (0, 1)}) and a != {"x": 1} and a != [("x", 1)]
  assert len({a, b, FrozenDict({"x": 1})}) == 2
  assert dict({"z": 0} | a) == {"z": 0, "x": 1, "y": (0, 1)} and type({"z": 0} | a) is dict
  spec = _full_spec()
  for other in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec), copy.copy(spec)):
    assert other == spec and hash(other) == hash(spec)
    with pytest.raises(TypeError, match=r"`kernel_axes` is immutable"):
      other.kernel_axes["q_proj"] = (0,)
  with pytest.raises(TypeError, match=r"A FrozenDict is immutable; build a new one"):
    a["x"] = 3


def test_hash_is_stable_across_construction_order_and_value_types():
  a = LoraSpec(**T, rank_pattern={"q_proj": 4, "v_proj": 2}, kernel_axes={"q_proj": [0, 1]})
  b = LoraSpec(**T, rank_pattern={"v_proj": np.int64(2), "q_proj": 4},
               kernel_axes={"q_proj": (np.int32(0), 1)})
  assert a == b and hash(a) == hash(b) and len({a, b}) == 1


# --- Round trip: every spec equals its from_dict(to_dict()) ------------------------------------

_NAME = st.text(alphabet="abqv_", min_size=1, max_size=5)  # also a valid regex key
_NAMES = st.lists(_NAME, min_size=1, max_size=3)
_FLAG = st.sampled_from([None, True, False, np.bool_(True), np.bool_(False)])
_INITS = [True, False, np.bool_(False), "gaussian", "pissa", "pissa_niter_4", "olora", "loftq",
          "orthogonal"]


def _np(strategy, *types):
  """The value as given, or as one of the NumPy scalar types."""
  return st.one_of(strategy, *(strategy.map(t) for t in types))


@st.composite
def spec_kwargs(draw, ada=False):
  kw = {}
  init = True if ada else draw(st.sampled_from(_INITS))
  r = draw(st.integers(1, 64)) * (2 if init == "orthogonal" else 1)
  kw["r"] = draw(_np(st.just(r), np.int64, np.int32))
  kw["lora_alpha"] = draw(st.one_of(
      _np(st.integers(-64, 512), np.int64),
      _np(st.floats(-1e6, 1e6, allow_nan=False, width=32), np.float32, np.float64)))
  if not ada:
    kw["use_rslora"] = draw(_np(st.booleans(), np.bool_))
    kw["use_dora"] = draw(_np(st.booleans(), np.bool_))
    kw["init_lora_weights"] = init
  target = draw(st.one_of(st.none(), _NAMES, _NAMES.map(set), st.just("all-linear"),
                          _NAME.map(lambda n: f".*{n}"),
                          _NAMES.map(lambda v: list(map(np.str_, v)))))
  if target is None:
    flags = dict(zip(("finetune_attention_modules", "finetune_mlp_modules",
                      "finetune_language_layers", "finetune_vision_layers"),
                     draw(st.tuples(_FLAG, _FLAG, _FLAG, _FLAG))))
    if all(v is None for v in flags.values()):
      flags["finetune_attention_modules"] = True
    for a, b in (("finetune_attention_modules", "finetune_mlp_modules"),
                 ("finetune_language_layers", "finetune_vision_layers")):
      if flags[a] is not None and flags[b] is not None and not flags[a] and not flags[b]:
        flags[a] = True
    kw.update(flags)
  else:
    kw["target_modules"] = target
  kw["exclude_modules"] = draw(st.one_of(st.none(), _NAMES, _NAME.map(lambda n: f"{n}.*")))
  lt = draw(st.one_of(st.none(), _np(st.integers(0, 40), np.int64),
                      st.lists(_np(st.integers(0, 40), np.int64), min_size=1, max_size=4),
                      st.sets(st.integers(0, 40), min_size=1, max_size=4),
                      st.integers(1, 5).map(range)))
  kw["layers_to_transform"] = lt
  if lt is not None:
    kw["layers_pattern"] = draw(st.one_of(st.none(), _NAME, _NAMES, st.just(""), st.just([])))
  kw["rank_pattern"] = draw(st.dictionaries(_NAME, _np(st.integers(1, 64), np.int64),
                                            max_size=3))
  kw["alpha_pattern"] = draw(st.dictionaries(_NAME, st.one_of(
      st.integers(-8, 64), _np(st.floats(-1e4, 1e4, allow_nan=False, width=32), np.float32)),
      max_size=3))
  kw["lora_dropout"] = draw(_np(st.integers(0, 99).map(lambda i: i / 100), np.float32))
  kw["bias"] = draw(_np(st.sampled_from(BIAS_MODES), np.str_))
  kw["modules_to_save"] = draw(st.one_of(st.none(), _NAME, _NAMES, st.just([])))
  loftq = st.fixed_dictionaries({}, optional={
      "loftq_bits": _np(st.sampled_from([4, 8]), np.int64),
      "loftq_iter": _np(st.integers(1, 5), np.int32)})
  kw["loftq_config"] = draw(loftq.filter(bool) if init == "loftq" else loftq)
  kw["task_type"] = draw(st.one_of(st.none(), st.sampled_from(list(TaskType)),
                                   st.sampled_from([t.value.lower() for t in TaskType])))
  kw["kernel_axes"] = draw(st.dictionaries(_NAME, st.one_of(
      _np(st.integers(0, 3), np.int64),
      st.lists(_np(st.integers(0, 3), np.int32), min_size=1, max_size=3,
               unique_by=int).map(tuple))))
  if ada:
    init_r = draw(st.integers(1, 16))
    tinit, tfinal = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    kw.update(init_r=draw(_np(st.just(init_r), np.int64)), target_r=draw(st.integers(1, init_r)),
              tinit=tinit, tfinal=tfinal,
              total_step=draw(_np(st.integers(tinit + tfinal + 1, 1000), np.int64)),
              deltaT=draw(st.integers(1, 5)), beta1=draw(_np(st.floats(0.01, 0.99), np.float64)),
              beta2=draw(st.floats(0.01, 0.99)), orth_reg_weight=draw(st.floats(0, 2)))
  return kw


_PLAIN = (str, int, float, bool, type(None))


def _assert_plain_json(value, where="to_dict()"):
  if isinstance(value, dict):
    for k, v in value.items():
      assert type(k) is str, (where, k)
      _assert_plain_json(v, f"{where}[{k!r}]")
  elif isinstance(value, list):
    for i, v in enumerate(value):
      _assert_plain_json(v, f"{where}[{i}]")
  else:
    assert type(value) in _PLAIN, (where, value, type(value))


def _assert_normal_form(spec):
  for f in dataclasses.fields(spec):
    v = getattr(spec, f.name)
    if isinstance(v, FrozenDict):
      for k, x in v.items():
        assert type(k) is str and type(x) in _PLAIN + (tuple,), (f.name, k, x)
        assert all(type(i) is int for i in x) if type(x) is tuple else True, (f.name, x)
    elif type(v) is tuple:
      assert all(type(i) in (str, int) for i in v), (f.name, v)
    else:
      assert type(v) in _PLAIN + (TaskType,), (f.name, v, type(v))
  for name in MAPPINGS:
    assert type(getattr(spec, name)) is FrozenDict, name


def _check_round_trip(spec):
  _assert_normal_form(spec)
  d = spec.to_dict()
  _assert_plain_json(d)
  text = json.dumps(d, allow_nan=False)
  for data in (d, json.loads(text)):
    back = type(spec).from_dict(data)
    assert type(back) is type(spec)
    assert back == spec and hash(back) == hash(spec), (spec, back)
    assert json.dumps(back.to_dict(), allow_nan=False) == text
  assert dataclasses.replace(spec) == spec


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(spec_kwargs())
def test_every_spec_survives_to_dict_from_dict_and_json(kw):
  _check_round_trip(LoraSpec(**kw))


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(spec_kwargs(ada=True))
def test_every_adalora_spec_survives_to_dict_from_dict_and_json(kw):
  spec = AdaLoraSpec(**kw)
  _check_round_trip(spec)
  assert spec.r == int(kw["init_r"]) and type(spec.total_step) is int


@pytest.mark.parametrize("kwargs", [
    dict(layers_to_transform=3), dict(layers_to_transform=[3]),
    dict(layers_to_transform=range(2), layers_pattern="h"),
    dict(task_type="seq_cls"), dict(task_type=TaskType.CAUSAL_LM),
    dict(exclude_modules=""), dict(modules_to_save=[]), dict(lora_alpha=MAX_ALPHA, r=MAX_RANK),
])
def test_round_trip_edge_cases(kwargs):
  _check_round_trip(LoraSpec(**{**T, **kwargs}))
  groups = LoraSpec(finetune_mlp_modules=np.bool_(True), finetune_language_layers=False)
  _check_round_trip(groups)
  assert groups.finetune_mlp_modules is True


# --- Normalisation: NumPy values, arrays, empty strings, huge numbers -------------------------

def test_numpy_scalars_are_stored_as_python_values():
  spec = LoraSpec(r=np.int64(8), lora_alpha=np.float32(16), use_rslora=np.bool_(True),
                  target_modules=[np.str_("q_proj")], layers_to_transform=[np.int64(1), 0],
                  layers_pattern=np.str_("h"), rank_pattern={np.str_("q_proj"): np.int32(4)},
                  alpha_pattern={"q_proj": np.float16(0.5)}, lora_dropout=np.float32(0.25),
                  bias=np.str_("all"), init_lora_weights=np.str_("loftq"),
                  loftq_config={"loftq_bits": np.int64(8), "loftq_iter": np.int8(2)},
                  kernel_axes={"q_proj": (np.int64(0), np.int16(1)), "v": np.int64(2)},
                  task_type=np.str_("CAUSAL_LM"))
  got = {"r": spec.r, "lora_alpha": spec.lora_alpha, "use_rslora": spec.use_rslora,
         "lora_dropout": spec.lora_dropout, "bias": spec.bias,
         "init_lora_weights": spec.init_lora_weights}
  assert got == {"r": 8, "lora_alpha": 16.0, "use_rslora": True, "lora_dropout": 0.25,
                 "bias": "all", "init_lora_weights": "loftq"}
  assert [type(v) for v in got.values()] == [int, float, bool, float, str, str]
  assert type(spec.target_modules[0]) is str and type(spec.layers_pattern[0]) is str
  assert [type(i) for i in spec.layers_to_transform] == [int, int]
  assert [type(k) for k in spec.rank_pattern] == [str]
  assert type(spec.rank_pattern["q_proj"]) is int
  assert type(spec.alpha_pattern["q_proj"]) is float
  assert [type(v) for v in spec.loftq_config.values()] == [int, int]
  assert spec.kernel_axes == {"q_proj": (0, 1), "v": (2,)}
  assert all(type(i) is int for v in spec.kernel_axes.values() for i in v)
  assert spec.task_type is TaskType.CAUSAL_LM
  assert LoraSpec(**T, layers_to_transform=np.int64(2)).layers_to_transform == 2
  assert type(LoraSpec(**T, layers_to_transform=np.int64(2)).layers_to_transform) is int
  json.dumps(spec.to_dict(), allow_nan=False)
  _check_round_trip(spec)


_TEXT_FIELDS = [
    ("target_modules", ["q_proj", "v_proj"],
     r"`target_modules` must be None, a str or a list of str; got .*\.tolist\(\)"),
    ("exclude_modules", ["x"], r"`exclude_modules` must be None, a str or a list of str"),
    ("modules_to_save", ["head"], r"`modules_to_save` must be None, a str or a list of str"),
    ("layers_pattern", ["h"], r"`layers_pattern` must be None, a str or a list of str"),
    ("bias", "none", r"`bias` must be one of \('none', 'all', 'lora_only'\); got bias="),
    ("init_lora_weights", "orthogonal", r"`init_lora_weights` must be one of True, False"),
    ("task_type", "SEQ_CLS", r"`task_type` must be None or one of \['CAUSAL_LM'"),
]
_NUMBER_FIELDS = [
    ("r", 8, r"`r` must be an int > 0; got r="),
    ("lora_alpha", 16.0, r"`lora_alpha` must be a finite number; got lora_alpha="),
    ("use_dora", True, r"`use_dora` must be True or False; got "),
    ("layers_to_transform", [0, 1], r"`layers_to_transform` must be an int or a non-empty list"),
]


def test_str_subclasses_are_stored_as_str():
  class Name(str, enum.Enum):
    Q = "q_proj"
    H = "h"
    NONE = "none"

  spec = LoraSpec(target_modules=[Name.Q], modules_to_save=Name.Q, layers_pattern=[Name.H],
                  layers_to_transform=0, bias=Name.NONE, rank_pattern={Name.Q: 2})
  values = [spec.target_modules[0], spec.modules_to_save[0], spec.layers_pattern[0], spec.bias,
            *spec.rank_pattern]
  assert values == ["q_proj", "q_proj", "h", "none", "q_proj"]
  assert [type(v) for v in values] == [str] * 5
  _check_round_trip(spec)


@pytest.mark.parametrize("make, field, value, match",
                         [(np.array, *c) for c in _TEXT_FIELDS + _NUMBER_FIELDS] +
                         [(jnp.array, *c) for c in _NUMBER_FIELDS])  # JAX has no str arrays
def test_arrays_get_an_error_naming_the_field(make, field, value, match):
  kwargs = {**T, field: make(value)}
  if field == "layers_pattern":
    kwargs["layers_to_transform"] = 0
  with pytest.raises(ValueError, match=match):
    LoraSpec(**kwargs)


@pytest.mark.parametrize("make", [np.array, jnp.array], ids=["numpy", "jax"])
def test_numeric_arrays_in_str_fields_name_the_field(make):
  with pytest.raises(ValueError, match=r"`target_modules` must be None, a str or a list of str; "
                     r"got .*\(ArrayImpl|ndarray\)"):
    LoraSpec(target_modules=make([1, 2]))
  with pytest.raises(ValueError, match=r"(?s)\(2 problems\).*`bias` must be one of.*"
                     r"`init_lora_weights` must be one of"):
    LoraSpec(**T, bias=make([0, 1]), init_lora_weights=make([1, 0]))


def test_empty_strings():
  # layers_pattern: empty means unset, as in PEFT.
  for empty in ("", [], ()):
    spec = LoraSpec(**T, layers_pattern=empty, layers_to_transform=[0])
    assert spec.layers_pattern is None
    _check_round_trip(spec)
    assert LoraSpec(**T, layers_pattern=empty).layers_pattern is None
  with pytest.raises(ValueError, match=r"`modules_to_save=''` names no module. Pass None for "
                     r"none, or names such as `modules_to_save=\['classifier'\]`"):
    LoraSpec(**T, modules_to_save="")
  with pytest.raises(ValueError, match=r"`modules_to_save` entries must be non-empty str; got ''"):
    LoraSpec(**T, modules_to_save=[""])
  with pytest.raises(ValueError, match=r"`layers_pattern` entries must be non-empty str; got ''"):
    LoraSpec(**T, layers_pattern=["h", ""], layers_to_transform=[0])
  with pytest.raises(ValueError, match=r"`target_modules=''` selects nothing"):
    LoraSpec(target_modules="")


@pytest.mark.parametrize("kwargs, match", [
    (dict(lora_alpha=1e300),
     r"`lora_alpha` must be a number with magnitude <= 3.403e\+38, so that the scaling alpha / r "
     r"stays finite in float32; got lora_alpha=1e\+300"),
    (dict(lora_alpha=-1e39), r"`lora_alpha` must be a number with magnitude <= 3.403e\+38"),
    (dict(lora_alpha=10**400), r"`lora_alpha` must be a number with magnitude <= 3.403e\+38.*; "
     r"got lora_alpha=1000+ \.\.\.>"),
    (dict(lora_alpha=np.float64(1e300)), r"`lora_alpha` must be a number with magnitude"),
    (dict(alpha_pattern={"q_proj": 1e300}),
     r"`alpha_pattern\['q_proj'\]` must be a number with magnitude <= 3.403e\+38"),
    (dict(r=2**70), r"`r` must be at most 2\*\*31 - 1 \(a rank never exceeds the smaller "
     r"dimension of the kernel it adapts\); got r=1180591620717411303424"),
    (dict(r=MAX_RANK + 1), r"`r` must be at most 2\*\*31 - 1"),
    (dict(rank_pattern={"q_proj": 2**70}), r"`rank_pattern\['q_proj'\]` must be at most 2\*\*31"),
])
def test_absurdly_large_numbers_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoraSpec(**{**T, **kwargs})


def test_adalora_huge_init_r_is_rejected_through_lora_spec():
  with pytest.raises(ValueError, match=r"`r` must be at most 2\*\*31 - 1"):
    AdaLoraSpec(init_r=2**70, target_r=1, total_step=10, **T)


@pytest.mark.parametrize("value", [5, 2.5, {"h": 1}, b"h"])
def test_layers_pattern_of_the_wrong_type_gets_lojax_error(value):
  with pytest.raises(ValueError, match=r"`layers_pattern` must be None, a str or a list of str; "
                     rf"got {re.escape(repr(value))}"):
    LoraSpec(**T, layers_pattern=value, layers_to_transform=[0])
  with pytest.raises(ValueError, match=r"`layers_pattern` must be None, a str or a list of str"):
    LoraSpec(**T, layers_pattern=value)  # without layers_to_transform too


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers_pattern="(?i)h", layers_to_transform=[0]),
     r"`layers_pattern` entry '\(\?i\)h' cannot be part of a larger regular expression "
     r"\(global flags not at the start.*Use a scoped flag such as `\(\?i:...\)`"),
    (dict(rank_pattern={"(?i)q_proj": 2}),
     r"`rank_pattern` key '\(\?i\)q_proj' cannot be part of a larger regular expression"),
    (dict(kernel_axes={"^(?s)q_proj": 0}),
     r"`kernel_axes` key '\^\(\?s\)q_proj' cannot be part of a larger regular expression"),
])
def test_global_regex_flags_are_rejected_where_the_matcher_embeds_patterns(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoraSpec(**{**T, **kwargs})
  scoped = LoraSpec(**T, layers_pattern="(?i:h)", rank_pattern={"(?i:q)_proj": 2},
                    layers_to_transform=[0])
  assert scoped.layers_pattern == ("(?i:h)",)
