"""Tests for lojax._src.matcher."""

import math

import pytest

from lojax._src.matcher import KernelInfo, Target, layer_index, lookup, resolve
from lojax._src.spec import LoraSpec

V, D = 100, 16


class Tree:
  """A hand-built description of a parameter tree, as resolve() receives it."""

  def __init__(self):
    self.kernels, self.modules, self.leaves = [], set(), {}

  def _mod(self, path):
    parts = path.split("/")
    self.modules.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))

  def kernel(self, path, shape, kind="dense", leaf="kernel", stacked=None, bias=True):
    self._mod(path)
    self.kernels.append(KernelInfo(path, leaf, shape, kind, stacked))
    self.leaves[f"{path}/{leaf}"] = shape
    if bias and kind != "embed":
      self.leaves[f"{path}/bias"] = shape[-1:]
    return self

  def leaf(self, path, shape):
    self._mod(path.rpartition("/")[0])
    self.leaves[path] = shape
    return self

  def resolve(self, **kwargs):
    return resolve(LoraSpec(**kwargs), self.kernels, sorted(self.modules), self.leaves)


def gpt(n=10, tied=False, head="lm_head"):
  t = Tree().kernel("params/wte", (V, D), "embed", "embedding")
  t.kernel("params/wpe", (32, D), "embed", "embedding")
  for i in range(n):
    b = f"params/h_{i}"
    t.leaf(f"{b}/ln_1/scale", (D,)).leaf(f"{b}/ln_1/bias", (D,))
    t.kernel(f"{b}/attn/c_attn", (D, 3 * D)).kernel(f"{b}/attn/c_proj", (D, D))
    t.kernel(f"{b}/mlp/c_fc", (D, 4 * D)).kernel(f"{b}/mlp/c_proj", (4 * D, D))
  if not tied:
    t.kernel(f"params/{head}", (D, V), bias=False)
  return t


def paths(res):
  return [t.path for t in res.targets]


GPT_LINEAR = sorted(f"params/h_{i}/{m}" for i in range(10)
                    for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"))


# --- all-linear and heads ----------------------------------------------------

def test_all_linear_leaves_out_untied_lm_head_and_embeddings():
  res = gpt().resolve(target_modules="all-linear")
  assert paths(res) == GPT_LINEAR
  assert res.heads == ("params/lm_head",)
  assert all(t.r == 8 and t.alpha == 8 and t.scaling == 1.0 and t.layers is None
             for t in res.targets)


def test_all_linear_with_tied_embeddings_excludes_nothing():
  res = gpt(tied=True).resolve(target_modules="all-linear")
  assert paths(res) == GPT_LINEAR
  assert res.heads == ()


def test_head_found_by_vocabulary_size():
  res = gpt(head="decoder").resolve(target_modules="all-linear")
  assert res.heads == ("params/decoder",)
  assert "params/decoder" not in paths(res)


@pytest.mark.parametrize("name", ["head", "classifier", "score", "qa_outputs", "logits",
                                  "out_head", "output_head", "LM_HEAD"])
def test_head_found_by_name(name):
  t = gpt(tied=True).kernel(f"params/{name}", (D, 3))
  res = t.resolve(target_modules="all-linear")
  assert res.heads == (f"params/{name}",)
  assert paths(res) == GPT_LINEAR


def test_explicit_targets_may_be_embeddings_convs_and_heads():
  t = gpt().kernel("params/conv", (3, 3, 4, 8), "conv")
  res = t.resolve(target_modules=["wte", "conv", "lm_head"])
  assert paths(res) == ["params/conv", "params/lm_head", "params/wte"]
  assert "params/conv" not in paths(t.resolve(target_modules="all-linear"))


# --- target_modules rules and errors ------------------------------------------

def test_list_entries_match_at_slash_boundaries():
  t = gpt()
  assert paths(t.resolve(target_modules=["attn/c_attn"])) == [
      f"params/h_{i}/attn/c_attn" for i in range(10)]
  assert paths(t.resolve(target_modules=["params/h_3/mlp/c_fc"])) == ["params/h_3/mlp/c_fc"]
  with pytest.raises(ValueError, match=r"`target_modules` entry 'proj' matched no module path"):
    t.resolve(target_modules=["proj"])  # "c_proj" does not end in "/proj"


def test_regex_must_fullmatch_the_module_path():
  t = gpt()
  assert paths(t.resolve(target_modules=r".*h_[0-2]/attn/c_attn")) == [
      "params/h_0/attn/c_attn", "params/h_1/attn/c_attn", "params/h_2/attn/c_attn"]
  with pytest.raises(ValueError, match=r"`target_modules` regex 'c_attn' matched no module "
                     r"path\. Module paths that hold kernels, closest first: "
                     r"params/h_0/attn/c_attn"):
    t.resolve(target_modules="c_attn")
  # A regex that matches only the start of a path selects nothing there (no re.match).
  assert paths(t.resolve(target_modules=r".*attn")) == sorted(
      f"params/h_{i}/attn/c_attn" for i in range(10))
  with pytest.raises(ValueError, match=r"regex 'params/h_1' matched only module paths that are "
                     r"not a matmul kernel: params/h_1 \(holds no leaf"):
    t.resolve(target_modules=r"params/h_1")


def test_all_bad_entries_are_reported_in_one_error():
  with pytest.raises(ValueError, match=r"\(3 problems\)") as info:
    gpt().resolve(target_modules=["c_atn", "ln_1", "attn", "c_fc"])
  msg = str(info.value)
  assert "`target_modules` entry 'c_atn' matched no module path. Module paths that hold " \
         "kernels, closest first: params/h_0/attn/c_attn" in msg
  assert "entry 'ln_1' matched only module paths that are not a matmul kernel: " \
         "params/h_0/ln_1 (leaves: scale (16,), bias (16,))" in msg
  assert "params/h_0/attn (holds no leaf; kernels below it: params/h_0/attn/c_attn, " \
         "params/h_0/attn/c_proj)" in msg
  assert "'c_fc'" not in msg
  assert "params/h_1/attn/c_attn" not in msg  # one path per layer-less shape, not ten


def test_targeting_a_vector_is_an_error_with_path_and_shape():
  t = gpt().kernel("params/gate", (D,), "unknown")
  with pytest.raises(ValueError, match=r"not matrices .*: params/gate \(16,\)"):
    t.resolve(target_modules=["c_attn", "gate"])
  assert len(t.resolve(target_modules=["c_attn", "gate"], exclude_modules=["gate"]).targets) == 10
  s = Tree().kernel("params/layers/gate", (4, D), "unknown", stacked=4)
  with pytest.raises(ValueError, match=r"params/layers/gate \(4, 16\)"):
    s.resolve(target_modules=["gate"])


# --- exclude_modules and modules_to_save ---------------------------------------

def test_exclude_wins_over_targets():
  t = gpt()
  assert paths(t.resolve(target_modules="all-linear", exclude_modules=["c_proj"])) == [
      p for p in GPT_LINEAR if not p.endswith("c_proj")]
  # A regex that matches an enclosing module excludes everything below it.
  res = t.resolve(target_modules=["c_attn"], exclude_modules=r"params/h_[0-7]")
  assert paths(res) == ["params/h_8/attn/c_attn", "params/h_9/attn/c_attn"]
  res = t.resolve(target_modules="all-linear", exclude_modules=["mlp"])
  assert all("/attn/" in p for p in paths(res)) and len(res.targets) == 20


def test_exclude_errors():
  with pytest.raises(ValueError, match=r"`exclude_modules` entry 'c_prj' matched no module "
                     r"path\. Closest module paths: params/h_0/attn/c_proj"):
    gpt().resolve(target_modules=["c_attn"], exclude_modules=["c_prj"])
  with pytest.raises(ValueError, match=r"`exclude_modules` regex 'nothing' matched no module"):
    gpt().resolve(target_modules=["c_attn"], exclude_modules="nothing")
  with pytest.raises(ValueError, match=r"No kernel is left to adapt: every match was removed "
                     r"by `exclude_modules` or `modules_to_save`"):
    gpt().resolve(target_modules=["c_attn"], exclude_modules=["attn"])


def test_modules_to_save_wins_over_targets_and_covers_subtrees():
  t = gpt()
  res = t.resolve(target_modules=["c_attn", "lm_head"], modules_to_save=["lm_head"])
  assert "params/lm_head" not in paths(res) and len(res.targets) == 10
  assert res.modules_to_save == ("params/lm_head",)
  res = t.resolve(target_modules="all-linear", modules_to_save=["h_0", "h_0/attn"])
  assert res.modules_to_save == ("params/h_0",)
  assert paths(res) == [p for p in GPT_LINEAR if not p.startswith("params/h_0/")]


def test_modules_to_save_unknown_entry_is_an_error_with_closest_paths():
  with pytest.raises(ValueError, match=r"`modules_to_save` entry 'lm_haed' matched no module "
                     r"path\. Closest module paths: params/lm_head"):
    gpt().resolve(target_modules=["c_attn"], modules_to_save=["lm_haed"])


def test_task_type_heads_are_saved_when_present_and_optional_otherwise():
  res = gpt(tied=True).kernel("params/score", (D, 2)).resolve(
      target_modules="all-linear", task_type="SEQ_CLS")
  assert res.modules_to_save == ("params/score",)
  assert paths(res) == GPT_LINEAR
  res = gpt(tied=True).resolve(target_modules="all-linear", task_type="SEQ_CLS")
  assert res.modules_to_save == ()
  with pytest.raises(ValueError, match=r"`modules_to_save` entry 'classifier' matched no"):
    gpt().resolve(target_modules="all-linear", task_type="SEQ_CLS",
                  modules_to_save=["classifier"])


# --- groups ------------------------------------------------------------------

def vlm():
  t = Tree().kernel("language_model/embed_tokens", (V, D), "embed", "embedding")
  for i in range(2):
    b = f"language_model/layers_{i}"
    for m in ("self_attn/q_proj", "self_attn/o_proj", "mlp/gate_proj", "mlp/down_proj"):
      t.kernel(f"{b}/{m}", (D, D))
    v = f"vision_tower/blocks/{i}"
    for m in ("MultiHeadDotProductAttention_0/query", "MlpBlock_0/Dense_0", "attn/qkv"):
      t.kernel(f"{v}/{m}", (D, D))
  t.kernel("projector/linear_1", (D, D)).kernel("lm_head", (D, V))
  return t


def test_groups_select_attention_mlp_language_vision():
  t = vlm()
  everything = t.resolve(finetune_attention_modules=True, finetune_mlp_modules=True)
  assert len(everything.targets) == 14
  # An unset flag is True only when its pair partner is not set to True.
  assert paths(t.resolve(finetune_attention_modules=True)) == paths(
      t.resolve(finetune_mlp_modules=False))
  assert not {"projector/linear_1", "lm_head"} & set(paths(everything))
  attn = paths(t.resolve(finetune_mlp_modules=False))
  assert attn == sorted(p for p in paths(everything)
                        if "attn" in p.lower() or "Attention" in p)
  assert len(attn) == 8
  language = paths(t.resolve(finetune_vision_layers=False))
  assert language == sorted(p for p in paths(everything) if p.startswith("language_model"))
  vision_mlp = paths(t.resolve(finetune_language_layers=False, finetune_attention_modules=False))
  assert vision_mlp == ["vision_tower/blocks/0/MlpBlock_0/Dense_0",
                        "vision_tower/blocks/1/MlpBlock_0/Dense_0"]


def test_groups_that_select_nothing_explain_the_rules():
  t = Tree().kernel("params/Dense_0", (D, D)).kernel("params/Dense_1", (D, D))
  with pytest.raises(ValueError, match=r"The group flags \(finetune_attention_modules=True, "
                     r".*\) selected no kernel\. Attention kernels have a path component such "
                     r"as 'attn'.*Candidates .*: params/Dense_0, params/Dense_1\. Pass "
                     r"`target_modules` instead"):
    t.resolve(finetune_attention_modules=True)


# --- layers_to_transform ---------------------------------------------------------

def test_layer_index_rules():
  assert layer_index("params/h_3/attn/c_attn") == 3
  assert layer_index("model/layers/12/attn/query") == 12
  assert layer_index("params/Block_2/Dense_0") == 2
  assert layer_index("params/lm_head") is None
  assert layer_index("stage_0/blocks/2/attn", None) == 0
  assert layer_index("stage_0/blocks/2/attn", ["blocks"]) == 2
  assert layer_index("enc/layers_4/mlp/experts_1/wi", ["layers"]) == 4
  assert layer_index("enc/layer_4/mlp/experts_1/wi", ["layers"]) is None
  # recurrentgemma writes the index inside one component: `blocks.3`
  assert layer_index("params/blocks.3/mlp/ffw_up") == 3
  assert layer_index("params/stage_1/blocks.3/mlp", ["blocks"]) == 3
  # a group of the user's pattern is not the layer number
  assert layer_index("params/h_3/attn", ["(h|blocks)"]) == 3
  assert layer_index("params/blocks.2/attn", ["(h|blocks)"]) == 2
  # a pattern spanning components, as PEFT's own tests write it
  for pat in ("model/layers", "model.layers"):
    assert layer_index("params/model/layers/3/self_attn/q_proj", [pat]) == 3
    assert layer_index("params/vision/model/layers/1/attn", [pat]) == 1
  assert layer_index("params/encoder/layers/3/attn", ["model/layers"]) is None


def test_layers_to_transform_with_linen_names():
  t = gpt()
  assert paths(t.resolve(target_modules=["c_attn"], layers_to_transform=[3, 1])) == [
      "params/h_1/attn/c_attn", "params/h_3/attn/c_attn"]
  assert paths(t.resolve(target_modules="all-linear", layers_to_transform=2)) == [
      p for p in GPT_LINEAR if p.startswith("params/h_2/")]  # lm_head has no index


def test_layers_to_transform_filters_exact_matches_and_unindexed_paths():
  t = gpt()
  res = t.resolve(target_modules=["c_attn", "params/lm_head"], layers_to_transform=[0])
  assert paths(res) == ["params/h_0/attn/c_attn"]
  with pytest.raises(ValueError, match=r"`layers_to_transform` indices \[0\] select no layer\. "
                     r"Layer indices found in the targeted paths .*: \[5\]"):
    t.resolve(target_modules=["params/h_5/attn/c_attn"], layers_to_transform=[0])
  with pytest.raises(ValueError, match=r"indices \[10, 11\] select no layer.*\[0, 1, 2, 3, 4, "
                     r"5, 6, 7, 8, 9\]"):
    t.resolve(target_modules=["c_attn"], layers_to_transform=[1, 10, 11])


def test_layers_to_transform_with_nnx_digit_components_and_layers_pattern():
  t = Tree()
  for i in range(3):
    t.kernel(f"stage_0/blocks/{i}/attn/query", (D, D))
    t.kernel(f"stage_1/blocks/{i}/attn/query", (D, D))
  assert paths(t.resolve(target_modules=["query"], layers_to_transform=[1],
                         layers_pattern="blocks")) == [
      "stage_0/blocks/1/attn/query", "stage_1/blocks/1/attn/query"]
  # Without a pattern the first numbered component (the stage) is read.
  assert paths(t.resolve(target_modules=["query"], layers_to_transform=[1])) == [
      f"stage_1/blocks/{i}/attn/query" for i in range(3)]
  with pytest.raises(ValueError, match=r"indices \[1\] select no layer\. .*with "
                     r"`layers_pattern=\['layers'\]`: none"):
    t.resolve(target_modules=["query"], layers_to_transform=[1], layers_pattern="layers")


def test_layers_pattern_ignores_moe_expert_indices():
  t = Tree().kernel("enc/layers_1/mlp/experts_5/wi", (D, D))
  t.kernel("enc/layers_5/mlp/experts_0/wi", (D, D))
  assert paths(t.resolve(target_modules=["wi"], layers_to_transform=[5],
                         layers_pattern=["h", "layers"])) == ["enc/layers_5/mlp/experts_0/wi"]


def test_layers_to_transform_on_stacked_kernels():
  t = Tree().kernel("params/ScanBlock_0/attn/query", (6, D, D), stacked=6)
  t.kernel("params/decoder/attn/query", (3, D, D), stacked=3)
  res = t.resolve(target_modules=["query"], layers_to_transform=[1, 4])
  assert res.targets[0].path == "params/ScanBlock_0/attn/query"
  assert res.targets[0].layers == (1, 4)
  assert res.targets[1].path == "params/decoder/attn/query"
  assert res.targets[1].layers == (1,)
  res = t.resolve(target_modules=["query"], layers_to_transform=[4, 5])
  assert paths(res) == ["params/ScanBlock_0/attn/query"]  # decoder has only 3 layers
  res = t.resolve(target_modules=["decoder/attn/query"], layers_to_transform=[0, 1, 2])
  assert res.targets[0].layers is None  # every layer of the stack
  with pytest.raises(ValueError, match=r"indices \[6\] select no layer.*\[0, 1, 2, 3, 4, 5\]"):
    t.resolve(target_modules=["query"], layers_to_transform=[6])


def test_layers_pattern_index_in_a_stacked_path_wins_over_the_stack_axis():
  t = Tree().kernel("enc/layers_2/sub/query", (4, D, D), stacked=4)
  res = t.resolve(target_modules=["query"], layers_to_transform=[2], layers_pattern="layers")
  assert paths(res) == ["enc/layers_2/sub/query"] and res.targets[0].layers is None
  res = t.resolve(target_modules=["query"], layers_to_transform=[1])  # no pattern: stack axis
  assert res.targets[0].layers == (1,)


# --- rank_pattern / alpha_pattern -------------------------------------------------

@pytest.mark.parametrize("specific", ["h_8/attn/c_attn", "h.8.attn.c_attn"])
def test_rank_and_alpha_patterns_are_independent_and_specific_wins(specific):
  res = gpt().resolve(target_modules=["c_attn"],
                      rank_pattern={"c_attn": 4, specific: 16},
                      alpha_pattern={specific: 32, "c_attn": 8})
  got = {t.path: (t.r, t.alpha, t.scaling) for t in res.targets}
  assert got.pop("params/h_8/attn/c_attn") == (16, 32, 2.0)
  assert len(got) == 9 and set(got.values()) == {(4, 8, 2.0)}


def test_pattern_alpha_defaults_to_lora_alpha_and_rslora_scaling():
  res = gpt().resolve(target_modules=["c_attn"], lora_alpha=16, use_rslora=True,
                      rank_pattern={"h_1/attn/c_attn": 64})
  got = {t.path: t for t in res.targets}
  assert got["params/h_1/attn/c_attn"] == Target("params/h_1/attn/c_attn", 64, 16, 2.0)
  h0 = got["params/h_0/attn/c_attn"]
  assert (h0.r, h0.alpha) == (8, 16) and h0.scaling == pytest.approx(16 / math.sqrt(8))


def test_lookup_rules():
  path = "params/h_8/attn/c_attn"
  assert lookup({}, path) is None
  assert lookup({"attn": 1}, path) is None  # a key must match a whole tail
  assert lookup({"c_attn": 1, "h_8/attn/c_attn": 2}, path) == ("h_8/attn/c_attn", 2)
  assert lookup({"h_8/attn/c_attn": 2, "c_attn": 1}, path) == ("h_8/attn/c_attn", 2)
  assert lookup({"^params/h_8/attn/c_attn": 3, "h_8/attn/c_attn": 2}, path)[1] == 3
  assert lookup({"^h_8/attn/c_attn": 3}, path) is None  # ^ anchors at the path start
  assert lookup({".*": 5, "c_attn": 1}, path) == (".*", 5)  # covers the whole path
  assert lookup({"c_att(?:n)": 1, "c_attn": 2}, path) == ("c_att(?:n)", 1)  # longer key
  assert lookup({"c_attn": 1, "c_att.": 2}, path) == ("c_att.", 2)  # then lexicographic
  assert lookup({"c_att.": 2, "c_attn": 1}, path) == ("c_att.", 2)


def test_pattern_keys_that_match_no_target_are_errors():
  with pytest.raises(ValueError, match=r"\(2 problems\)") as info:
    gpt().resolve(target_modules=["c_attn"], rank_pattern={"attn": 4, "c_attn": 2},
                  alpha_pattern={"c_fc": 2.0})
  msg = str(info.value)
  assert "`rank_pattern` key 'attn' matches no targeted module path. Closest targeted " \
         "paths: params/h_0/attn/c_attn" in msg
  assert "`alpha_pattern` key 'c_fc' matches no targeted module path" in msg
  with pytest.raises(ValueError, match=r"`kernel_axes` key 'conv' matches no targeted"):
    gpt().resolve(target_modules=["c_attn"], kernel_axes={"conv": (0, 1)})


# --- bias --------------------------------------------------------------------------

def test_bias_modes():
  t = gpt(n=2)
  assert t.resolve(target_modules=["c_attn"]).bias_paths == ()
  only = t.resolve(target_modules=["c_attn"], bias="lora_only").bias_paths
  assert only == ("params/h_0/attn/c_attn/bias", "params/h_1/attn/c_attn/bias")
  every = t.resolve(target_modules=["c_attn"], bias="all").bias_paths
  assert every == tuple(sorted(p for p in t.leaves if p.endswith("/bias")))
  assert "params/h_0/ln_1/bias" in every and len(every) == 10
  saved = t.resolve(target_modules=["c_attn"], bias="all", modules_to_save=["h_1"]).bias_paths
  assert not any(p.startswith("params/h_1/") for p in saved)


def test_resolve_argument_errors():
  t = gpt(n=1)
  with pytest.raises(TypeError, match=r"`spec` must be a LoraSpec; got dict"):
    resolve({"target_modules": ["c_attn"]}, t.kernels, sorted(t.modules), t.leaves)
  with pytest.raises(ValueError, match=r"more than once: \['params/wte'\]"):
    resolve(LoraSpec(target_modules=["c_attn"]), t.kernels + t.kernels[:1], [], t.leaves)


def test_kernel_info_validation():
  with pytest.raises(ValueError, match=r"`kind` must be one of .*got kind='linear'"):
    KernelInfo("a", "kernel", (2, 2), "linear")
  with pytest.raises(ValueError, match=r"`stacked=3` must equal the leading axis"):
    KernelInfo("a", "kernel", (2, 2, 2), "dense", stacked=3)


def test_head_rule_ignores_block_kernels_and_position_tables():
  # d_ff == vocab inside blocks, and a position table as large as the width:
  # only the top-level kernel with vocab outputs is a head.
  t = Tree().kernel("params/wte", (256, 64), "embed", "embedding")
  t.kernel("params/wpe", (64, 64), "embed", "embedding")
  for i in range(2):
    t.kernel(f"params/h_{i}/mlp/c_fc", (64, 256)).kernel(f"params/h_{i}/mlp/c_proj", (256, 64))
  t.kernel("params/out", (64, 256))
  res = t.resolve(target_modules="all-linear")
  assert res.heads == ("params/out",)
  assert len(res.targets) == 4


@pytest.mark.parametrize("path, group", [
    ("blocks_0/wq", "attn"), ("blocks/1/c_attn", "attn"), ("h_0/out_proj", "attn"),
    ("mlp/q_proj", "attn"),            # both groups hold: attention wins
    ("ffn/attention/dense", "attn"),   # a component of each: attention wins
    ("h_0/fc1", "mlp"), ("h_0/w3", "mlp"), ("t5/wi_1", "mlp"), ("neox/dense_4h_to_h", "mlp"),
    ("bert/intermediate", "mlp"), ("h_0/proj", None)])
def test_group_flags_read_these_names(path, group):
  t = Tree().kernel(path, (D, D)).kernel("other/mlp/fc2", (D, D)).kernel("other/attn/wk", (D, D))
  attn = paths(t.resolve(finetune_attention_modules=True, finetune_mlp_modules=False))
  mlp = paths(t.resolve(finetune_mlp_modules=True, finetune_attention_modules=False))
  assert (path in attn, path in mlp) == (group == "attn", group == "mlp")


@pytest.mark.parametrize("tower", ["visual", "vit", "image_encoder", "img_enc", "vision"])
def test_vision_tower_markers(tower):
  t = Tree().kernel(f"{tower}/layers_0/attn/q", (D, D)).kernel("text/layers_0/attn/q", (D, D))
  assert paths(t.resolve(finetune_vision_layers=True, finetune_language_layers=False)) == [
      f"{tower}/layers_0/attn/q"]


def test_a_stacked_vocab_sized_kernel_is_not_a_head():
  t = (Tree().kernel("embed", (V, D), "embed", "embedding")
       .kernel("blocks/out", (3, D, V), stacked=3).kernel("proj_out", (D, V)))
  res = t.resolve(target_modules="all-linear")
  assert res.heads == ("proj_out",)
  assert paths(res) == ["blocks/out"]
  # a head neither named like one nor vocabulary-sized is not recognised: adapted
  t2 = Tree().kernel("embed", (V, D), "embed", "embedding").kernel("proj_out", (D, 7))
  assert paths(t2.resolve(target_modules="all-linear")) == ["proj_out"]


def nnx_llama(n=3):
  """An NNX-style tree (list layers as bare digit components), HF Llama's names."""
  t = Tree().kernel("model/embed_tokens", (V, D), "embed", "embedding")
  for i in range(n):
    for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/up_proj"):
      t.kernel(f"model/layers/{i}/{m}", (D, D), bias=False)
  return t


def test_peft_dotted_names_in_list_fields_are_module_names():
  # A PEFT module name's dots are path separators; a dot before a layer number is also linen's "_".
  assert paths(gpt().resolve(target_modules=["h.1.attn.c_attn", "mlp.c_fc"],
                             exclude_modules=["h.3.mlp"])) == sorted(
      ["params/h_1/attn/c_attn"] + [f"params/h_{i}/mlp/c_fc" for i in range(10) if i != 3])
  assert paths(nnx_llama().resolve(target_modules=["model.layers.2.self_attn.q_proj",
                                                   "layers.0.mlp.up_proj"])) == [
      "model/layers/0/mlp/up_proj", "model/layers/2/self_attn/q_proj"]
  res = gpt().resolve(target_modules=["c_attn"], modules_to_save=["h.9.mlp"])
  assert res.modules_to_save == ("params/h_9/mlp",)
  # Separators only: no regex wildcard, and a name must end at a component boundary.
  with pytest.raises(ValueError, match=r"'h.1.attn.c_at' matched no module path"):
    gpt().resolve(target_modules=["h.1.attn.c_at"])
  t = gpt().kernel("params/hx1/attnzc_attn", (D, D))
  assert paths(t.resolve(target_modules=["h.1.attn.c_attn"])) == ["params/h_1/attn/c_attn"]


def test_peft_dotted_names_as_pattern_keys_are_literal():
  t = gpt().kernel("params/hx8yattn/c_attn", (D, D))  # "h.8.attn" as a regex would match it
  res = t.resolve(target_modules=["c_attn"], rank_pattern={"h.8.attn.c_attn": 16, "c_attn": 4})
  assert {p.path: p.r for p in res.targets if p.r == 16} == {"params/h_8/attn/c_attn": 16}
  assert lookup({"h.8.attn": 1, "attn": 2}, "params/h_8/attn") == ("h.8.attn", 1)
  assert lookup({"layers.2": 5}, "model/layers/2") == ("layers.2", 5)
  assert lookup({"layers.2": 5}, "model/layers/12") is None


def test_peft_dotted_layers_pattern_spans_components():
  t = nnx_llama()
  assert paths(t.resolve(target_modules=["q_proj"], layers_to_transform=[1],
                         layers_pattern="model.layers")) == ["model/layers/1/self_attn/q_proj"]
  with pytest.raises(ValueError, match="select no layer"):  # "." is no wildcard: model/xlayers
    Tree().kernel("modelxlayers/1/q", (D, D)).resolve(
        target_modules=["q"], layers_to_transform=[1], layers_pattern="model.layers")


def test_peft_regex_target_modules_match_the_dotted_path():
  # PEFT writes regexes over dotted names; one without "/" is also tried on the dotted path.
  assert paths(gpt(3).resolve(target_modules=r".*\.h\.1\.attn\.c_(attn|proj)")) == [
      "params/h_1/attn/c_attn", "params/h_1/attn/c_proj"]
  assert paths(nnx_llama().resolve(target_modules=r".*\.(q|v)_proj",
                                   exclude_modules=r".*layers\.0\..*")) == [
      f"model/layers/{i}/self_attn/{m}" for i in (1, 2) for m in ("q_proj", "v_proj")]
  # A regex with "/" is lojax's own: matched against the path only.
  with pytest.raises(ValueError, match="matched no module path"):
    gpt(3).resolve(target_modules=r"params/h\.1\.attn/c_attn")
