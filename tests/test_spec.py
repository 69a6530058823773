"""Tests for lojax._src.spec."""

import dataclasses
import json
import math

import pytest

from lojax._src.spec import LoraSpec, TaskType

T = dict(target_modules=["q_proj", "v_proj"])  # the smallest valid spec


def test_defaults_are_peft_defaults():
  spec = LoraSpec(**T)
  expected = dict(
      r=8, lora_alpha=8, use_rslora=False, exclude_modules=None, layers_to_transform=None,
      layers_pattern=None, rank_pattern={}, alpha_pattern={}, lora_dropout=0.0, bias="none",
      modules_to_save=None, init_lora_weights=True, use_dora=False, loftq_config={},
      task_type=None, finetune_attention_modules=None, finetune_mlp_modules=None,
      finetune_language_layers=None, finetune_vision_layers=None, kernel_axes={})
  for name, value in expected.items():
    got = getattr(spec, name)
    assert got == value and type(got) is type(value), (name, got)
  fields = {f.name: f for f in dataclasses.fields(LoraSpec)}
  assert fields["target_modules"].default is None
  assert all(f.kw_only for f in fields.values())


def test_mapping_defaults_are_not_shared_and_inputs_are_copied():
  a, b = LoraSpec(**T), LoraSpec(**T)
  assert a.rank_pattern is not b.rank_pattern
  user = {"q_proj": 4}
  spec = LoraSpec(**T, rank_pattern=user)
  user["v_proj"] = 2
  assert spec.rank_pattern == {"q_proj": 4}
  assert type(spec.rank_pattern) is dict


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
