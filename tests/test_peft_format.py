"""PEFT-format export/import: PEFT's names and shapes, exact round trips, errors."""

import dataclasses
import functools
import json
import os
import re
import warnings
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lojax
from lojax._src.mappings import DEFAULT_MAPPING, GPT2_MAPPING, PeftMapping
from lojax._src.peft_format import load_peft, save_peft

sys.path.insert(0, os.path.dirname(__file__))
import gpt  # noqa: E402


def randomized(lora, seed=1):
  leaves, treedef = jax.tree.flatten(lora.adapters)
  rng = np.random.default_rng(seed)
  new = [jnp.asarray(rng.standard_normal(x.shape) * 0.1, x.dtype) for x in leaves]
  return lojax.LoraParams(lora.base, jax.tree.unflatten(treedef, new), lora.meta)


@functools.cache
def gpt_model(scan=False):
  model = gpt.GPT(scan=scan)
  params, ids = gpt.init(model)
  return model, params, ids


def wrapped(spec, scan=False):
  model, params, ids = gpt_model(scan)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                    example_args=(ids,))
  return model, params, ids, randomized(lora)


def assert_round_trip(tmp_path, model, params, ids, lora, mapping):
  save_peft(tmp_path, lora, mapping=mapping, base_model_name_or_path="gpt2")
  back = load_peft(tmp_path, params, mapping=mapping, apply_fn=model.apply, example_args=(ids,))
  assert back.meta.adapters[0].targets == lora.meta.adapters[0].targets
  if "adalora_step" in back.adapters["default"]:  # PEFT has no step counter
    assert back.adapters["default"]["adalora_step"] == lora.meta.adapters[0].spec.total_step
    back = lojax.LoraParams(back.base, {"default": dict(
        back.adapters["default"], adalora_step=lora.adapters["default"]["adalora_step"])},
        back.meta)
  got, want = jax.tree.leaves(back.adapters), jax.tree.leaves(lora.adapters)
  assert jax.tree.structure(back.adapters) == jax.tree.structure(lora.adapters)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  f = jax.jit(lojax.lorafy(model.apply))
  np.testing.assert_array_equal(np.asarray(f(back, ids)), np.asarray(f(lora, ids)))
  return back


SPEC = lojax.LoraSpec(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc", "wte", "lm_head"],
                      rank_pattern={"c_fc": 2}, alpha_pattern={"lm_head": 3},
                      modules_to_save=["ln_f"], bias="lora_only")


def test_gpt2_export_has_peft_names_shapes_and_config(tmp_path):
  _, _, _, lora = wrapped(SPEC)
  save_peft(tmp_path, lora, mapping=GPT2_MAPPING, base_model_name_or_path="gpt2")
  with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as fh:
    assert fh.metadata() == {"format": "pt"}
  t = load_file(tmp_path / "adapter_model.safetensors")
  p = "base_model.model."
  shapes = {k[len(p):]: v.shape for k, v in t.items()}
  d, r = 32, 4
  assert shapes["transformer.h.0.attn.c_attn.lora_A.weight"] == (r, d)
  assert shapes["transformer.h.0.attn.c_attn.lora_B.weight"] == (3 * d, r)
  assert shapes["transformer.h.1.mlp.c_fc.lora_A.weight"] == (2, d)
  assert shapes["transformer.h.1.mlp.c_fc.lora_B.weight"] == (4 * d, 2)
  assert shapes["transformer.wte.lora_embedding_A"] == (r, 64)
  assert shapes["transformer.wte.lora_embedding_B"] == (d, r)
  assert shapes["lm_head.lora_A.weight"] == (r, d)
  assert shapes["lm_head.lora_B.weight"] == (64, r)
  assert shapes["transformer.h.0.attn.c_attn.base_layer.bias"] == (3 * d,)
  assert shapes["transformer.ln_f.weight"] == (d,)
  assert len(shapes) == 18
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA" and cfg["inference_mode"] is True
  # PEFT saves the value of the last module it wrapped: lm_head, an nn.Linear
  assert cfg["base_model_name_or_path"] == "gpt2" and cfg["fan_in_fan_out"] is False
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["bias"] == "lora_only"
  assert "transformer.h.1.attn.c_attn" in cfg["target_modules"]
  assert cfg["rank_pattern"] == {"transformer.h.0.mlp.c_fc": 2, "transformer.h.1.mlp.c_fc": 2}
  assert cfg["alpha_pattern"] == {"lm_head": 3}
  assert cfg["modules_to_save"] == ["transformer.ln_f"]
  # The PEFT delta s * B @ A (torch [out, in]) is the transposed Flax delta.
  a = t[p + "lm_head.lora_A.weight"]
  b = t[p + "lm_head.lora_B.weight"]
  merged = lojax.merge(lora)["params"]["lm_head"]["kernel"]
  base = lora.base["params"]["lm_head"]["kernel"]
  np.testing.assert_allclose(np.asarray(merged - base), (3 / 4 * b @ a).T, rtol=1e-5,
                             atol=1e-6)
  # Bias values are full (base + delta), as PEFT trains them in place.
  np.testing.assert_allclose(
      t[p + "transformer.h.0.attn.c_attn.base_layer.bias"],
      np.asarray(lora.base["params"]["h_0"]["attn"]["c_attn"]["bias"] +
                 lora.adapters["default"]["bias"]["params/h_0/attn/c_attn/bias"]), rtol=1e-6)


def test_round_trip_plain_lora_with_embedding_bias_and_saved_modules(tmp_path):
  model, params, ids, lora = wrapped(SPEC)
  assert_round_trip(tmp_path, model, params, ids, lora, GPT2_MAPPING)


def test_round_trip_stacked_layers(tmp_path):
  spec = lojax.LoraSpec(r=4, target_modules=["c_attn", "mlp/c_proj"], layers_to_transform=[1])
  model, params, ids, lora = wrapped(spec, scan=True)
  save_peft(tmp_path, lora, mapping=GPT2_MAPPING)
  keys = set(load_file(tmp_path / "adapter_model.safetensors"))
  assert "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight" in keys
  assert not any(".h.0." in k for k in keys)  # only the adapted layer is written
  back = assert_round_trip(tmp_path / "rt", model, params, ids, lora, GPT2_MAPPING)
  assert back.meta.adapters[0].targets[0].layers == (1,)


def test_round_trip_adalora_resized(tmp_path):
  spec = lojax.AdaLoraSpec(init_r=4, target_r=2, total_step=10, lora_alpha=8,
                           target_modules=["c_attn", "c_fc"])
  model, params, ids, lora = wrapped(spec)
  tx = lojax.adalora(optax.adam(1e-3), spec)
  state = tx.init(lora.trainable)
  mask = {p: jnp.arange(4) < (1 + i % 3) for i, p in enumerate(state.mask)}
  state = state._replace(mask=mask, final_mask=mask)
  with pytest.warns(UserWarning, match="never allocated"):  # randomized, not trained
    small = lojax.adalora_resize(lora, state)
  save_peft(tmp_path, small, mapping=GPT2_MAPPING)
  t = load_file(tmp_path / "adapter_model.safetensors")
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 4 and cfg["total_step"] == 10
  p = "base_model.model.transformer.h.0.attn.c_attn."
  assert t[p + "lora_A"].shape == (1, 32) and t[p + "lora_E"].shape == (1, 1)
  assert t[p + "lora_B"].shape == (96, 1)
  assert cfg["rank_pattern"]["transformer.h.0.attn.c_attn.lora_E"] == [True, False, False, False]
  back = assert_round_trip(tmp_path / "rt", model, params, ids, small, GPT2_MAPPING)
  assert [t.r for t in back.meta.adapters[0].targets] == [1, 2, 3, 1]
  # ranknum stays init_r: the scaling is unchanged by the resize.
  assert {t.scaling for t in back.meta.adapters[0].targets} == {8 / (4 + 1e-5)}


class Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(6, (3, 3), name="conv")(x)


def test_conv_layout_and_round_trip(tmp_path):
  model, x = Conv(), jnp.ones((1, 8, 8, 3))
  params = model.init(jax.random.key(0), x)
  lora = randomized(lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["conv"]),
                               key=jax.random.key(0), apply_fn=model.apply, example_args=(x,)))
  save_peft(tmp_path, lora, mapping=PeftMapping())
  t = load_file(tmp_path / "adapter_model.safetensors")
  a, b = t["base_model.model.conv.lora_A.weight"], t["base_model.model.conv.lora_B.weight"]
  assert a.shape == (2, 3, 3, 3) and b.shape == (6, 2, 1, 1)  # torch [out, in, kh, kw]
  # The torch delta einsum(B, A) in [cout, cin, kh, kw] is the Flax delta transposed.
  delta = np.einsum("or,rihw->oihw", b[:, :, 0, 0], a) * 4.0
  merged = lojax.merge(lora)["params"]["conv"]["kernel"] - params["params"]["conv"]["kernel"]
  np.testing.assert_allclose(np.transpose(np.asarray(merged), (3, 2, 0, 1)), delta, rtol=1e-5,
                             atol=1e-6)
  back = load_peft(tmp_path, params, apply_fn=model.apply, example_args=(x,))
  for k in ("lora_A", "lora_B"):
    np.testing.assert_array_equal(back.adapters["default"]["lora"]["params/conv"][k],
                                  lora.adapters["default"]["lora"]["params/conv"][k])


def test_mapping_rules():
  assert GPT2_MAPPING.torch_name("params/h_3/mlp/c_fc") == "transformer.h.3.mlp.c_fc"
  assert GPT2_MAPPING.torch_name("params/h/attn/c_proj", 5) == "transformer.h.5.attn.c_proj"
  assert GPT2_MAPPING.torch_name("params/lm_head") == "lm_head"
  assert GPT2_MAPPING.torch_name("params/other") is None
  assert not GPT2_MAPPING.transposed("params/h_0/attn/c_attn")  # Conv1D: [in, out]
  assert GPT2_MAPPING.transposed("params/lm_head")
  assert PeftMapping(names=lambda p: p.upper()).torch_name("a/b") == "A.B"
  assert DEFAULT_MAPPING.torch_name("params/h/q", 2) == "h.q.2"
  with pytest.raises(ValueError, match=r"`names` has invalid regular expressions: '\('"):
    PeftMapping(names=[("(", "x")])


def test_errors(tmp_path):
  model, params, ids, lora = wrapped(SPEC)
  with pytest.raises(ValueError, match="Not a PEFT adapter directory: .*adapter_config.json"):
    load_peft(tmp_path / "none", params)
  with pytest.raises(ValueError, match=r"no torch name for 'params/lm_head'. Add a rule"):
    save_peft(tmp_path / "x", lora, mapping=PeftMapping(names=[(r"params/h_(.*)", r"h.\1")]))
  with pytest.raises(ValueError, match="same tensor name"):
    save_peft(tmp_path / "y", lora, mapping=PeftMapping(names=[(r".*", "same")]))
  save_peft(tmp_path / "g", lora, mapping=GPT2_MAPPING)
  with pytest.raises(ValueError, match=r"does not fit these params with this mapping:\n"
                     r"(.|\n)*transformer.h.0.attn.c_attn: no kernel of these params maps"):
    load_peft(tmp_path / "g", params, mapping=DEFAULT_MAPPING)
  cfg_file = tmp_path / "g" / "adapter_config.json"
  cfg = json.loads(cfg_file.read_text())
  cfg_file.write_text(json.dumps(dict(cfg, peft_type="IA3")))
  with pytest.raises(ValueError, match="`peft_type` 'IA3' .* is not supported"):
    load_peft(tmp_path / "g", params, mapping=GPT2_MAPPING)
  cfg_file.write_text(json.dumps(cfg))
  t = load_file(tmp_path / "g" / "adapter_model.safetensors")
  key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
  t[key] = np.zeros((95, 4), np.float32)
  save_file(t, tmp_path / "g" / "adapter_model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"params/h_0/attn/c_attn: file gives shapes .*\(95, 4\)"):
    load_peft(tmp_path / "g", params, mapping=GPT2_MAPPING, apply_fn=model.apply,
              example_args=(ids,))
  (tmp_path / "g" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match="Could not read the PEFT adapter"):
    load_peft(tmp_path / "g", params, mapping=GPT2_MAPPING)
  two = lojax.wrap(lora, SPEC, key=jax.random.key(1), adapter_name="b")
  two = lojax.set_adapter(two, ["default", "b"])
  with pytest.raises(ValueError, match="`adapter_name` is required"):
    save_peft(tmp_path / "z", two)


def test_export_loads_in_peft_on_transformers_gpt2(tmp_path):
  """The GPT2_MAPPING export, loaded by PEFT itself, gives lojax's logits."""
  torch = pytest.importorskip("torch", reason="torch not installed: PEFT load check skipped")
  peft = pytest.importorskip("peft", reason="peft not installed: PEFT load check skipped")
  transformers = pytest.importorskip("transformers",
                                     reason="transformers not installed: PEFT load check skipped")
  import gpt as gpt_lib
  m = gpt_lib.GPT(vocab=64, d=32, heads=4, layers=2, max_len=16, tied=True)
  params, ids = gpt_lib.init(m, batch=2, seq=8)
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  lojax.save_peft(tmp_path / "peft", lora, mapping=lojax.GPT2_MAPPING,
                  base_model_name_or_path="gpt2")
  cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                layer_norm_epsilon=1e-6, activation_function="gelu_new",
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  p = jax.tree.map(lambda x: torch.tensor(np.asarray(x)), params["params"])
  sd = {"transformer.wte.weight": p["wte"]["embedding"], "transformer.wpe.weight": p["wpe"]["embedding"],
        "transformer.ln_f.weight": p["ln_f"]["scale"], "transformer.ln_f.bias": p["ln_f"]["bias"]}
  for i in range(2):
    h = p[f"h_{i}"]
    for ln in ("ln_1", "ln_2"):
      sd[f"transformer.h.{i}.{ln}.weight"] = h[ln]["scale"]
      sd[f"transformer.h.{i}.{ln}.bias"] = h[ln]["bias"]
    for part, names in (("attn", ("c_attn", "c_proj")), ("mlp", ("c_fc", "c_proj"))):
      for n in names:   # Conv1D stores [in, out], like a Flax kernel
        sd[f"transformer.h.{i}.{part}.{n}.weight"] = h[part][n]["kernel"]
        sd[f"transformer.h.{i}.{part}.{n}.bias"] = h[part][n]["bias"]
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected and all("lm_head" in k or "attn.bias" in k for k in missing), missing
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft")).eval()
  loaded = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
  assert len(loaded) == 2 * 2 * 4                     # A and B of 4 kernels in 2 layers
  with torch.no_grad():
    theirs = peft_model(torch.tensor(np.asarray(ids))).logits.numpy()
  ours = np.asarray(lojax.lorafy(m.apply)(lora, ids))
  assert np.abs(ours - np.asarray(m.apply(params, ids))).max() > 1e-3   # the adapters matter
  np.testing.assert_allclose(theirs, ours, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("config_change, extra_suffix", [
    ({}, "lora_magnitude_vector"),                  # a DoRA magnitude in a plain LoRA file
    ({}, "lora_E"),                                 # an AdaLoRA singular-value vector
    ({"use_dora": True}, None),                     # DoRA announced, magnitude missing
])
def test_tensors_the_variant_does_not_hold_are_refused(tmp_path, config_change, extra_suffix):
  spec = lojax.LoraSpec(r=4, target_modules=["c_attn"])
  model, params, ids, lora = wrapped(spec)
  save_peft(tmp_path, lora, mapping=GPT2_MAPPING)
  if extra_suffix:
    t = load_file(tmp_path / "adapter_model.safetensors")
    t[f"base_model.model.transformer.h.1.attn.c_attn.{extra_suffix}"] = np.ones(4, np.float32)
    save_file(t, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
  cfg_file = tmp_path / "adapter_config.json"
  cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), **config_change)))
  want = (rf"params/h_1/attn/c_attn: the file has \['{extra_suffix}'\], which a lora adapter"
          if extra_suffix else r"params/h_0/attn/c_attn: incomplete factors in the file")
  with pytest.raises(ValueError, match=want):
    load_peft(tmp_path, params, mapping=GPT2_MAPPING, apply_fn=model.apply, example_args=(ids,))


def test_a_users_spec_subclass_does_not_take_over_reading(tmp_path):
  class MySpec(lojax.LoraSpec):
    pass

  spec = MySpec(r=4, target_modules=["c_attn"])
  model, params, ids, lora = wrapped(spec)
  save_peft(tmp_path, lora, mapping=GPT2_MAPPING)
  back = load_peft(tmp_path, params, mapping=GPT2_MAPPING, apply_fn=model.apply,
                   example_args=(ids,))
  assert type(back.meta.adapters[0].spec) is lojax.LoraSpec


@pytest.mark.parametrize("copy", ["head_base_layer", "original_module_bias",
                                  "modules_to_save_bias"])
def test_base_weight_copies_in_a_peft_file(tmp_path, copy):
  """PEFT writes copies of base weights beside some adapters (a targeted head's
  `base_layer.weight`; with bias="all" a saved module's `original_module.bias` and
  `modules_to_save.bias`). Equal to the params' own, they load; different, they are refused."""
  spec = lojax.LoraSpec(r=2, target_modules=["c_attn", "lm_head"], modules_to_save=["ln_f"])
  model, params, ids, lora = wrapped(spec)
  save_peft(tmp_path, lora, mapping=GPT2_MAPPING)
  t = load_file(tmp_path / "adapter_model.safetensors")
  prefix = "base_model.model."
  if copy == "head_base_layer":   # torch Linear weight [out, in]
    name, value = "lm_head.base_layer.weight", np.asarray(params["params"]["lm_head"]["kernel"]).T
  elif copy == "original_module_bias":
    name, value = "transformer.ln_f.original_module.bias", np.asarray(
        params["params"]["ln_f"]["bias"])
  else:
    name, value = "transformer.ln_f.modules_to_save.bias", t[prefix + "transformer.ln_f.bias"]
  kw = dict(mapping=GPT2_MAPPING, apply_fn=model.apply, example_args=(ids,))
  for changed in (False, True):
    t[prefix + name] = np.ascontiguousarray(value + (0.5 if changed else 0.0), np.float32)
    save_file(t, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    if not changed:
      back = load_peft(tmp_path, params, **kw)
      np.testing.assert_allclose(jax.jit(lojax.lorafy(model.apply))(back, ids),
                                 jax.jit(lojax.lorafy(model.apply))(lora, ids), atol=1e-6)
    else:
      with pytest.raises(ValueError, match=re.escape(prefix + name) + ": (the file's copy|differs)"):
        load_peft(tmp_path, params, **kw)


@pytest.mark.parametrize("damage", ["bias_not_trained", "int_factor"])
def test_tensors_that_would_be_dropped_or_misread_are_refused(tmp_path, damage):
  """A bias the config does not train (unless it equals the base), an integer factor."""
  model, params, ids, lora = wrapped(lojax.LoraSpec(r=2, target_modules=["c_attn"]))
  save_peft(tmp_path, lora, mapping=GPT2_MAPPING)
  t = load_file(tmp_path / "adapter_model.safetensors")
  kw = dict(mapping=GPT2_MAPPING, apply_fn=model.apply, example_args=(ids,))
  name = "base_model.model.transformer.h.0.attn.c_attn."
  if damage == "bias_not_trained":
    base_bias = np.asarray(params["params"]["h_0"]["attn"]["c_attn"]["bias"])
    t[name + "base_layer.bias"] = base_bias  # the base's own bias: a harmless copy
    save_file(t, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    load_peft(tmp_path, params, **kw)
    t[name + "base_layer.bias"] = base_bias + 1.0
    want = r"h_0/attn/c_attn/bias: the file holds a trained bias.*config's `bias`"
  else:
    t[name + "lora_A.weight"] = t[name + "lora_A.weight"].astype(np.int32)
    want = r"lora_A.weight: a int32 tensor; LoRA factors are floats"
  save_file(t, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=want):
    load_peft(tmp_path, params, **kw)


@pytest.mark.parametrize("option", [{"layer_replication": [[0, 2]]}, {"use_qalora": True},
                                    {"some_future_option": "on"}])
def test_unsupported_peft_options_are_refused_by_name(tmp_path, option):
  model, params, ids, lora = wrapped(lojax.LoraSpec(r=2, target_modules=["c_attn"]))
  save_peft(tmp_path, lora, mapping=GPT2_MAPPING)
  cfg = tmp_path / "adapter_config.json"
  unset = {"layer_replication": None, "target_parameters": None, "lora_bias": False,
           "use_qalora": False, "megatron_config": None, "eva_config": None}
  cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **unset}))  # as PEFT writes them
  kw = dict(mapping=GPT2_MAPPING, apply_fn=model.apply, example_args=(ids,))
  load_peft(tmp_path, params, **kw)  # unset options are fine
  cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **option}))
  [key] = option
  with pytest.raises(ValueError, match=rf"does not support: `{key}`="):
    load_peft(tmp_path, params, **kw)


def test_peft_files_need_no_torch(tmp_path):
  """save_peft / load_peft run without importing torch (safetensors' NumPy API only)."""
  import subprocess
  code = f"""
import sys, jax, jax.numpy as jnp, lojax
params = {{"params": {{"q": {{"kernel": jnp.ones((4, 3))}}}}}}
lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["q"]), key=jax.random.key(0))
lojax.save_peft({str(tmp_path)!r}, lora)
lojax.load_peft({str(tmp_path)!r}, params)
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


def test_round_trip_n_d_dense_general_kernels(tmp_path):
  """DenseGeneral q [embed, heads, hd] and out [heads, hd, embed]: torch Linear shapes, the
  flattened delta as in float64, and a bit-identical round trip."""
  model = gpt.GPT(general=True)
  params, ids = gpt.init(model)
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["query", "out"])
  lora = randomized(lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                               example_args=(ids,)))
  mapping = PeftMapping(names=((r"params/(.+)", r"\1"),))
  save_peft(tmp_path, lora, mapping=mapping)
  t = load_file(tmp_path / "adapter_model.safetensors")
  fac = lora.adapters["default"]["lora"]
  for path, name in (("params/h_0/attn/query", "h_0.attn.query"), ("params/h_0/attn/out",
                                                                      "h_0.attn.out")):
    a = np.asarray(t[f"base_model.model.{name}.lora_A.weight"], np.float64)   # [r, in]
    b = np.asarray(t[f"base_model.model.{name}.lora_B.weight"], np.float64)   # [out, r]
    k = np.asarray(params["params"]["h_0"]["attn"][path.rsplit("/", 1)[1]]["kernel"])
    in_axes = lora.meta.adapter("default").target(path).in_axes
    d_in = int(np.prod([k.shape[i] for i in in_axes]))
    assert a.shape == (2, d_in) and b.shape == (k.size // d_in, 2)
    delta = np.asarray(fac[path]["lora_A"], np.float64).reshape(d_in, 2) @ np.asarray(
        fac[path]["lora_B"], np.float64).reshape(2, -1)
    np.testing.assert_allclose((b @ a).T, delta, rtol=1e-6, atol=1e-7)  # torch: W' = W + B@A
  assert_round_trip(tmp_path / "rt", model, params, ids, lora, mapping)


def test_save_peft_without_a_mapping_warns_with_the_names_it_writes(tmp_path):
  model, params, ids, lora = wrapped(lojax.LoraSpec(r=2, target_modules=["c_attn"]))
  with pytest.warns(UserWarning, match=r"without `mapping=`.*'h_0\.attn\.c_attn'.*"
                                       r"GPT2_MAPPING"):
    save_peft(tmp_path / "a", lora)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    save_peft(tmp_path / "b", lora, mapping=PeftMapping())  # "these are the torch names"
  assert load_file(tmp_path / "a" / "adapter_model.safetensors").keys() == load_file(
      tmp_path / "b" / "adapter_model.safetensors").keys()


def _pissa(init="pissa", **kw):
  """A PiSSA-style adapter on the unrolled GPT and its initial state (before "training")."""
  model, params, ids = gpt_model()
  spec = lojax.LoraSpec(**{"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "lm_head"],
                           "init_lora_weights": init, **kw})
  initial = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                       example_args=(ids,))
  return model, params, ids, initial, randomized(initial)


def _config_edit(directory, **changes):
  path = os.path.join(directory, "adapter_config.json")
  with open(path) as fh:
    cfg = json.load(fh)
  cfg.update(changes)
  with open(path, "w") as fh:
    json.dump(cfg, fh)


def test_a_base_rewriting_init_is_refused_on_a_shared_base(tmp_path):
  """PiSSA/OLoRA/LoftQ rewrite the kernels they adapt: never under another adapter's feet."""
  model, params, ids, initial, trained = _pissa()
  for init in ("pissa", "olora", "loftq", "pissa_niter_2"):
    with pytest.raises(ValueError, match="rewrites the base kernels.*adapters \\['default'\\]"):
      extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if init == "loftq" else {}
      lojax.wrap(trained, lojax.LoraSpec(r=2, target_modules=["c_fc"], init_lora_weights=init,
                                         **extra), key=jax.random.key(0), adapter_name="second")
  save_peft(tmp_path, trained, mapping=GPT2_MAPPING)
  with pytest.raises(ValueError, match="share their base with adapters \\['default'\\]"):
    load_peft(tmp_path, trained, mapping=GPT2_MAPPING, adapter_name="second")


@pytest.mark.parametrize("init, loads", [("orthogonal", True), ("eva", True), ("corda", False),
                                         ("lora_ga", False), ("mica", False)])
def test_inits_that_load_and_inits_that_are_refused(tmp_path, init, loads):
  """An init that only drew the factors is moot on load; one lojax cannot rebuild is refused."""
  model, params, ids, trained = wrapped(lojax.LoraSpec(r=2, target_modules=["c_attn"]))
  save_peft(tmp_path, trained, mapping=GPT2_MAPPING)
  _config_edit(tmp_path, init_lora_weights=init)
  if loads:
    back = load_peft(tmp_path, params, mapping=GPT2_MAPPING)
    assert back.meta.adapters[0].spec.init_lora_weights is True
  else:
    with pytest.raises(ValueError, match=f"`init_lora_weights`='{init}'.*Nothing was loaded"):
      load_peft(tmp_path, params, mapping=GPT2_MAPPING)


def test_a_pissa_file_rebuilds_the_residual_base(tmp_path):
  """Loaded onto the original params, a PiSSA file computes the trained model (the residual
  base W - s A0 B0 and the trained factors); ``initial=`` writes a rank-2r plain LoRA file
  that computes it on the original params. Float64 reference from the original kernels."""
  model, params, ids, initial, trained = _pissa()
  want = np.asarray(jax.jit(lojax.lorafy(model.apply))(trained, ids))
  save_peft(tmp_path / "pissa", trained, mapping=GPT2_MAPPING)
  back = load_peft(tmp_path / "pissa", params, mapping=GPT2_MAPPING)
  np.testing.assert_allclose(np.asarray(jax.jit(lojax.lorafy(model.apply))(back, ids)), want,
                             rtol=2e-5, atol=2e-5)
  save_peft(tmp_path / "plain", trained, mapping=GPT2_MAPPING, initial=initial)
  with open(tmp_path / "plain" / "adapter_config.json") as fh:
    cfg = json.load(fh)
  assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (4, 8, True)
  tensors = load_file(tmp_path / "plain" / "adapter_model.safetensors")
  t = trained.meta.adapters[0].targets[0]
  w = np.asarray(params["params"]["h_0"]["attn"]["c_attn"]["kernel"], np.float64)
  ad = trained.adapters["default"]["lora"][t.path]
  a = np.asarray(ad["lora_A"], np.float64)
  b = np.asarray(ad["lora_B"], np.float64)
  residual = np.asarray(trained.base["params"]["h_0"]["attn"]["c_attn"]["kernel"], np.float64)
  name = "base_model.model.transformer.h.0.attn.c_attn."
  delta = (tensors[name + "lora_B.weight"].astype(np.float64) @
           tensors[name + "lora_A.weight"].astype(np.float64)).T   # [in, out], Conv1D layout
  np.testing.assert_allclose(w + t.scaling * delta, residual + t.scaling * a @ b, atol=1e-5)
  plain = load_peft(tmp_path / "plain", params, mapping=GPT2_MAPPING)
  assert plain.base is params or jax.tree.all(jax.tree.map(
      lambda x, y: bool(np.array_equal(x, y)), plain.base, params))
  np.testing.assert_allclose(np.asarray(jax.jit(lojax.lorafy(model.apply))(plain, ids)), want,
                             rtol=2e-5, atol=2e-5)


def test_a_randomized_pissa_file_warns_that_its_base_is_approximate(tmp_path):
  model, params, ids, initial, trained = _pissa("pissa_niter_2")
  save_peft(tmp_path, trained, mapping=GPT2_MAPPING)
  with pytest.warns(UserWarning, match="randomized SVD"):
    load_peft(tmp_path, params, mapping=GPT2_MAPPING)


def test_initial_must_be_the_adapters_own_initial_state(tmp_path):
  model, params, ids, initial, trained = _pissa()
  with pytest.raises(TypeError, match="`initial` must be the LoraParams"):
    save_peft(tmp_path, trained, mapping=GPT2_MAPPING, initial=initial.adapters)
  other = lojax.wrap(params, dataclasses.replace(initial.meta.adapters[0].spec, r=1),
                     key=jax.random.key(0))
  with pytest.raises(ValueError, match="not the initial state.*targets or spec differ"):
    save_peft(tmp_path, trained, mapping=GPT2_MAPPING, initial=other)
  moved = lojax.LoraParams(jax.tree.map(lambda x: x + 1, trained.base), trained.adapters,
                           trained.meta)
  with pytest.raises(ValueError, match="residual base kernels differ at"):
    save_peft(tmp_path, moved, mapping=GPT2_MAPPING, initial=initial)
  _, _, _, plain = wrapped(lojax.LoraSpec(r=2, target_modules=["c_attn"]))
  with pytest.raises(ValueError, match="converts a PiSSA or OLoRA adapter.*init_lora_weights=True"):
    save_peft(tmp_path, plain, mapping=GPT2_MAPPING, initial=plain)


@pytest.mark.parametrize("init", ["olora", "loftq"])
def test_olora_and_loftq_files_rebuild_their_base(tmp_path, init):
  """As PEFT's from_pretrained does: the init runs again on the original kernels (OLoRA's
  residual, LoftQ's quantized kernel), then the file's factors replace the drawn ones."""
  kw = ({"loftq_config": {"loftq_bits": 4, "loftq_iter": 2}, "lora_alpha": 2} if init == "loftq"
        else {})
  model, params, ids, initial, trained = _pissa(init, **kw)
  save_peft(tmp_path, trained, mapping=GPT2_MAPPING)
  back = load_peft(tmp_path, params, mapping=GPT2_MAPPING)
  for x, y in zip(jax.tree.leaves(back.base), jax.tree.leaves(trained.base)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  f = jax.jit(lojax.lorafy(model.apply))
  np.testing.assert_allclose(np.asarray(f(back, ids)), np.asarray(f(trained, ids)), rtol=1e-5,
                             atol=1e-5)


HOSTILE_CONFIGS = {   # what a damaged or hand-edited adapter_config.json holds -> the field named
    "an array": ([1, 2], "holds an array"), "null": (None, "holds null"),
    "r=None": ({"r": None}, "`r`: must be an integer"), "r='2'": ({"r": "2"}, "`r`"),
    "use_rslora='false'": ({"use_rslora": "false"}, "`use_rslora`.*PEFT would read as true"),
    "use_dora='false'": ({"use_dora": "false"}, "`use_dora`"),
    "rank_pattern list": ({"rank_pattern": [1]}, "`rank_pattern`"),
    "alpha_pattern bad regex": ({"alpha_pattern": {"(": 3}}, "`alpha_pattern`"),
    "alpha_pattern str value": ({"alpha_pattern": {"c_attn": "3"}}, "`alpha_pattern`"),
    "target_modules int": ({"target_modules": 5}, "`target_modules`"),
    "modules_to_save str": ({"modules_to_save": "ln_f"}, "`modules_to_save`"),
    "lora_dropout str": ({"lora_dropout": "0.1"}, "`lora_dropout`"),
    "task_type int": ({"task_type": 7}, "`task_type`"),
    "layers_to_transform str": ({"layers_to_transform": "1"}, "`layers_to_transform`"),
    "layers_pattern ints": ({"layers_pattern": [1]}, "`layers_pattern`"),
    "loftq_config list": ({"loftq_config": [1]}, "`loftq_config`"),
    "two at once": ({"r": None, "lora_alpha": "x"}, "`r`.*\n.*`lora_alpha`"),
    "adalora without its fields": ({"peft_type": "ADALORA"}, "lacks \\['init_r'"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CONFIGS))
def test_hostile_configs_are_refused_naming_the_field(tmp_path, name):
  """Never a foreign exception, never a misread (PEFT reads "false" as true)."""
  model, params, ids, lora = wrapped(lojax.LoraSpec(r=2, target_modules=["c_attn"]))
  save_peft(tmp_path, lora, mapping=GPT2_MAPPING)
  change, match = HOSTILE_CONFIGS[name]
  cfg_path = tmp_path / "adapter_config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps({**cfg, **change} if isinstance(change, dict) else change))
  with pytest.raises(ValueError, match=match):
    load_peft(tmp_path, params, mapping=GPT2_MAPPING)


@pytest.mark.parametrize("damage", ["0-d", "nan", "inf_bias"])
def test_hostile_tensors_are_refused(tmp_path, damage):
  model, params, ids, lora = wrapped(lojax.LoraSpec(r=2, target_modules=["c_attn"], bias="all"))
  save_peft(tmp_path, lora, mapping=GPT2_MAPPING)
  path = tmp_path / "adapter_model.safetensors"
  tensors = load_file(path)
  a = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
  if damage == "0-d":
    tensors[a] = np.array(1.0, np.float32)
  elif damage == "nan":
    tensors[a] = np.where(np.arange(tensors[a].size).reshape(tensors[a].shape) == 3, np.nan,
                          tensors[a]).astype(np.float32)
  else:
    b = "base_model.model.transformer.ln_f.bias"
    tensors[b] = np.full_like(tensors[b], np.inf)
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="0-D tensor; LoRA tensors" if damage == "0-d" else
                     "holds [0-9]+ non-finite values"):
    load_peft(tmp_path, params, mapping=GPT2_MAPPING)


# A fused k/v kernel [2, heads, embed, head_dim] (tunix's Gemma kv_einsum) and its mapping.
_KV = PeftMapping(names=[(r"attn/q", "attn.q_proj")],
                  splits=[(r"attn/kv", ("attn.k_proj", "attn.v_proj"))],
                  leaves={"w": "weight"}, matmul_leaves=("w",))
_NH, _D, _H = 2, 6, 3


def _fused_params():
  rng = np.random.default_rng(0)
  return {"attn": {"q": {"w": jnp.asarray(rng.standard_normal((_D, _NH * _H)), jnp.float32)},
                   "kv": {"w": jnp.asarray(rng.standard_normal((2, _NH, _D, _H)), jnp.float32)}}}


def _fused_fn(p, x):
  kv = jnp.einsum("bd,ckdh->cbkh", x, p["attn"]["kv"]["w"])
  return x @ p["attn"]["q"]["w"], kv[0], kv[1]


def test_fused_kernel_loads_each_torch_modules_adapter_exactly(tmp_path):
  """k_proj and v_proj with their own ranks and alphas (rsLoRA) -> one kv adapter."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, _D)).astype(np.float32)
  ranks, alphas = {"k_proj": 3, "v_proj": 1}, {"k_proj": 4.0, "v_proj": 8.0}
  tensors, want = {}, {}
  params = _fused_params()
  w = np.asarray(params["attn"]["kv"]["w"], np.float64)
  for c, name in enumerate(["k_proj", "v_proj"]):
    a = rng.standard_normal((ranks[name], _D))
    b = rng.standard_normal((_NH * _H, ranks[name]))
    tensors[f"base_model.model.attn.{name}.lora_A.weight"] = a.astype(np.float32)
    tensors[f"base_model.model.attn.{name}.lora_B.weight"] = b.astype(np.float32)
    s = alphas[name] / np.sqrt(ranks[name])
    torch_w = w[c].transpose(0, 2, 1).reshape(_NH * _H, _D)     # nn.Linear weight [out, in]
    want[name] = (x @ (torch_w + s * b @ a).T).reshape(4, _NH, _H)
  save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "adapter_config.json").write_text(json.dumps(dict(
      peft_type="LORA", r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "v_proj"],
      alpha_pattern={"v_proj": 8.0}, rank_pattern={"k_proj": 3, "v_proj": 1})))
  lora = load_peft(tmp_path, params, mapping=_KV, apply_fn=_fused_fn,
                   example_args=(jnp.asarray(x),))
  (t,) = lora.meta.adapters[0].targets
  assert (t.path, t.r, t.scaling) == ("attn/kv", 4, 1.0)
  _, k, v = lojax.lorafy(_fused_fn)(lora, jnp.asarray(x))
  np.testing.assert_allclose(k, want["k_proj"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v, want["v_proj"], rtol=1e-5, atol=1e-5)

  # one module only: the other slice keeps the base
  del tensors["base_model.model.attn.v_proj.lora_A.weight"]
  del tensors["base_model.model.attn.v_proj.lora_B.weight"]
  save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
  _, k, v = lojax.lorafy(_fused_fn)(load_peft(tmp_path, params, mapping=_KV, apply_fn=_fused_fn,
                                              example_args=(jnp.asarray(x),)), jnp.asarray(x))
  np.testing.assert_allclose(k, want["k_proj"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v, np.einsum("bd,kdh->bkh", x, w[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_fused_kernel_exports_one_adapter_per_torch_module(tmp_path, use_dora):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, _D)), jnp.float32)
  params = _fused_params()
  lora = randomized(lojax.wrap(params, lojax.LoraSpec(r=2, lora_alpha=6, use_dora=use_dora,
                                                      target_modules=["kv", "q"]),
                               key=jax.random.key(0), apply_fn=_fused_fn, example_args=(x,)))
  save_peft(tmp_path, lora, mapping=_KV)
  got = load_file(str(tmp_path / "adapter_model.safetensors"))
  f = lora.adapters["default"]["lora"]["attn/kv"]
  a, b = np.asarray(f["lora_A"]), np.asarray(f["lora_B"])     # [D, r], [r, 2, NH, H]
  for c, name in enumerate(["k_proj", "v_proj"]):
    pre = f"base_model.model.attn.{name}."
    np.testing.assert_array_equal(got[pre + "lora_A.weight"], a.T)
    np.testing.assert_array_equal(got[pre + "lora_B.weight"], b[:, c].reshape(2, -1).T)
    if use_dora:
      m = np.asarray(lora.adapters["default"]["lora"]["attn/kv"]["lora_magnitude"])
      np.testing.assert_array_equal(got[pre + "lora_magnitude_vector"], m[c].reshape(-1))
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["target_modules"] == ["attn.k_proj", "attn.q_proj", "attn.v_proj"]
  # and back: the joined adapter (rank 4, scaling 1) computes the same function
  back = load_peft(tmp_path, params, mapping=_KV, apply_fn=_fused_fn, example_args=(x,))
  for got_, want_ in zip(lojax.lorafy(_fused_fn)(back, x), lojax.lorafy(_fused_fn)(lora, x)):
    np.testing.assert_allclose(got_, want_, rtol=1e-5, atol=1e-5)


def test_fused_kernel_errors(tmp_path):
  with pytest.raises(ValueError, match="fewer than two"):
    PeftMapping(splits=[(r"attn/kv", ("attn.k_proj",))])
  params = _fused_params()
  x = jnp.ones((4, _D))
  wrong = PeftMapping(splits=[(r"attn/kv", ("a", "b", "c"))], leaves={"w": "weight"})
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["kv"]), key=jax.random.key(0),
                    apply_fn=_fused_fn, example_args=(x,))
  with pytest.raises(ValueError, match="does not have 3 slices"):
    save_peft(tmp_path, lora, mapping=wrong)
  ada = lojax.wrap(params, lojax.AdaLoraSpec(init_r=2, target_r=1, total_step=10,
                                             target_modules=["kv"]),
                   key=jax.random.key(0), apply_fn=_fused_fn, example_args=(x,))
  with pytest.raises(ValueError, match="adalora adapter cannot be split"):
    save_peft(tmp_path, ada, mapping=_KV)


def test_fused_dora_needs_every_module(tmp_path):
  x = jnp.ones((4, _D))
  params = _fused_params()
  lora = randomized(lojax.wrap(params, lojax.LoraSpec(r=2, use_dora=True, target_modules=["kv"]),
                               key=jax.random.key(0), apply_fn=_fused_fn, example_args=(x,)))
  save_peft(tmp_path, lora, mapping=_KV)
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  save_file({k: v for k, v in tensors.items() if "v_proj" not in k},
            str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match="adapts only 1 of the 2"):
    load_peft(tmp_path, params, mapping=_KV, apply_fn=_fused_fn, example_args=(x,))
