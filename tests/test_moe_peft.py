"""Adapters on MoE expert kernels and bare arrays in PEFT files: ``target_parameters``.

PEFT 0.21 adapts an ``nn.Parameter`` (``LoraConfig(target_parameters=[...])``) with a
``lora.ParamWrapper`` around the module that holds it. For a parameter of ``E`` experts (1 for
a 2-D one) and rank ``r`` its file holds ``<module>.lora_A.weight [E*r, in]``, expert-major
(row ``e*r + k``), and ``<module>.lora_B.weight [out, r*E]``, rank-major (column ``k*E + e``),
with ``in``/``out`` as PEFT reads the parameter: ``[E, out, in]`` for a 3-D one (``[E, in,
out]`` when its module sets ``is_transposed``), ``[out, in]`` for a 2-D one. Several adapted
parameters of one module nest: the one the module registers last is ``<module>``, the one
before it ``<module>.base_layer``. The tests without torch check that layout written out by
hand; the live ones run PEFT on transformers' Mixtral MoE block (experts ``[E, out, in]``) and
Llama 4 experts (``[E, in, out]``, read by PEFT the other way round) with identical weights.
"""

import copy
import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lojax
from test_moe import scanned_experts

E, D, F, T, R = 4, 16, 24, 8, 2
ALPHA = 6.0
S = ALPHA / R
PREFIX = "base_model.model."
ORDER = lojax.PeftMapping(parameter_order=["wi", "wo"])   # the torch module registers wi first


def _params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"moe": {"wi": jax.random.normal(k[0], (E, D, F)) / math.sqrt(D),
                  "wo": jax.random.normal(k[1], (E, F, D)) / math.sqrt(F)}}


def batched(p, x):          # x: [E, T, D], tokens already dispatched to experts
  h = jnp.einsum("etd,edf->etf", x, p["moe"]["wi"])
  return jnp.einsum("etf,efd->etd", jax.nn.relu(h), p["moe"]["wo"])


def _x():
  return jax.random.normal(jax.random.key(3), (E, T, D))


def _wrap(**kw):
  spec = lojax.LoraSpec(**{"r": R, "lora_alpha": ALPHA, "target_modules": ["moe/wi", "moe/wo"],
                           "init_lora_weights": False, **kw})
  return lojax.wrap(_params(), spec, key=jax.random.key(1), apply_fn=batched,
                    example_args=(_x(),))


def _factors(lora, path):
  entry = lora.adapters["default"]["lora"][path]
  return np.asarray(entry["lora_A"], np.float64), np.asarray(entry["lora_B"], np.float64)


def _peft_delta(a, b, experts):
  """PEFT's per-expert delta, written out: ``[E, PEFT out, PEFT in]`` from lora_A ``[E*r, in]``
  (row e*r + k) and lora_B ``[out, r*E]`` (column k*E + e), scaling S."""
  r = a.shape[0] // experts
  return np.stack([S * sum(np.outer(b[:, k * experts + e], a[e * r + k]) for k in range(r))
                   for e in range(experts)])


# --------------------------------------------------------------------------
# Without torch: the layout, round trips, refusals
# --------------------------------------------------------------------------

@pytest.mark.parametrize("swapped", [False, True])
def test_written_tensors_follow_peft_target_parameter_layout(tmp_path, swapped):
  lora = _wrap()
  mapping = lojax.PeftMapping(parameter_order=["wi", "wo"],
                              swapped_parameters=[r"moe/w."] if swapped else [])
  lojax.save_peft(tmp_path, lora, mapping=mapping)
  tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["target_parameters"] == ["moe.wi", "moe.wo"]
  assert config["target_modules"] == [] and config["r"] == R and config["lora_alpha"] == ALPHA
  assert not config["fan_in_fan_out"] and config["lora_dropout"] == 0
  # wi is registered first: its wrapper is the inner one
  where = {"moe/wi": PREFIX + "moe.base_layer.", "moe/wo": PREFIX + "moe."}
  assert sorted(tensors) == sorted(f"{w}{k}.weight" for w in where.values()
                                   for k in ("lora_A", "lora_B"))
  for path, prefix in where.items():
    a, b = _factors(lora, path)
    n_in, n_out = a.shape[1], b.shape[2]
    la, lb = tensors[prefix + "lora_A.weight"], tensors[prefix + "lora_B.weight"]
    lojax_delta = np.einsum("eir,ero->eio", a, b) * S               # [E, in, out]
    if swapped:   # PEFT reads [E, in, out]: its "in" is the kernel's output
      assert la.shape == (E * R, n_out) and lb.shape == (n_in, R * E)
      want = lojax_delta
    else:         # PEFT reads [E, out, in] (nn.Linear per expert)
      assert la.shape == (E * R, n_in) and lb.shape == (n_out, R * E)
      want = lojax_delta.transpose(0, 2, 1)
    np.testing.assert_allclose(_peft_delta(la, lb, E), want, rtol=1e-5, atol=1e-6,
                               err_msg=path)
    if not swapped:   # the factors themselves, entry by entry
      np.testing.assert_array_equal(la[1 * R + 0], a[1, :, 0].astype(np.float32))
      np.testing.assert_array_equal(lb[:, 1 * E + 2], b[2, 1, :].astype(np.float32))


@pytest.mark.parametrize("swapped", [False, True])
def test_expert_adapter_round_trips_through_a_peft_file(tmp_path, swapped):
  lora = _wrap(rank_pattern={"moe/wo": 3}, alpha_pattern={"moe/wi": 5.0})
  mapping = lojax.PeftMapping(parameter_order=["wi", "wo"],
                              swapped_parameters=[r"moe/w."] if swapped else [])
  lojax.save_peft(tmp_path, lora, mapping=mapping)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["rank_pattern"] == {"moe.wo": 3} and config["alpha_pattern"] == {"moe.wi": 5.0}
  back = lojax.load_peft(tmp_path, _params(), mapping=mapping, apply_fn=batched,
                         example_args=(_x(),))
  for t in lora.meta.adapter("default").targets:
    u = back.meta.adapter("default").target(t.path)
    assert (u.r, u.alpha, u.scaling, u.expert_axes) == (t.r, t.alpha, t.scaling, t.expert_axes)
    for k in ("lora_A", "lora_B"):
      np.testing.assert_array_equal(back.adapters["default"]["lora"][t.path][k],
                                    lora.adapters["default"]["lora"][t.path][k])
  np.testing.assert_array_equal(jax.jit(lojax.lorafy(batched))(back, _x()),
                                jax.jit(lojax.lorafy(batched))(lora, _x()))
  # read with the other orientation, the shapes do not fit: an error, not another model
  other = lojax.PeftMapping(parameter_order=["wi", "wo"],
                            swapped_parameters=[] if swapped else [r"moe/w."])
  with pytest.raises(ValueError, match=r"moe/wi.*lora_A"):
    lojax.load_peft(tmp_path, _params(), mapping=other, apply_fn=batched, example_args=(_x(),))


def test_stacked_expert_layers_are_one_target_parameter_per_layer(tmp_path):
  layers = 3
  params, fn = scanned_experts(layers, E, D, F)
  x = _x()
  spec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, target_modules=["wi", "wo"],
                        init_lora_weights=False, layers_to_transform=[0, 2])
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=fn, example_args=(x,))
  mapping = lojax.PeftMapping(names=[(r"wi\[(\d+)\]", r"layers.\1.experts.gate_up_proj"),
                                     (r"wo\[(\d+)\]", r"layers.\1.experts.down_proj")])
  lojax.save_peft(tmp_path, lora, mapping=mapping)
  tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["target_parameters"] == [f"layers.{i}.experts.{n}" for i in (0, 2)
                                         for n in ("down_proj", "gate_up_proj")]
  # transformers' order: gate_up_proj before down_proj, so gate_up_proj is the inner wrapper
  assert tensors[f"{PREFIX}layers.2.experts.base_layer.lora_A.weight"].shape == (E * R, D)
  assert tensors[f"{PREFIX}layers.2.experts.lora_A.weight"].shape == (E * R, F)
  assert len(tensors) == 8
  a, b = _factors(lora, "wi")
  np.testing.assert_allclose(
      _peft_delta(tensors[f"{PREFIX}layers.2.experts.base_layer.lora_A.weight"],
                  tensors[f"{PREFIX}layers.2.experts.base_layer.lora_B.weight"], E),
      S * np.einsum("eir,ero->eoi", a[1], b[1]), rtol=1e-5, atol=1e-6)
  back = lojax.load_peft(tmp_path, params, mapping=mapping, apply_fn=fn, example_args=(x,))
  assert back.meta.adapter("default").target("wi").layers == (0, 2)
  for path in ("wi", "wo"):
    for k in ("lora_A", "lora_B"):
      np.testing.assert_array_equal(back.adapters["default"]["lora"][path][k],
                                    lora.adapters["default"]["lora"][path][k])


def _bare_model():
  """A 2-D bare array (``mlp/proj``, PEFT's ``[out, in]`` target parameter) beside a Dense."""
  k = jax.random.split(jax.random.key(7), 2)
  params = {"mlp": {"proj": jax.random.normal(k[0], (D, F)) / math.sqrt(D),
                    "out": {"kernel": jax.random.normal(k[1], (F, D)) / math.sqrt(F)}}}
  fn = lambda p, x: jnp.tanh(x @ p["mlp"]["proj"]) @ p["mlp"]["out"]["kernel"]
  return params, fn, jax.random.normal(jax.random.key(8), (T, D))


def test_a_two_d_bare_array_is_a_target_parameter_beside_a_target_module(tmp_path):
  params, fn, x = _bare_model()
  spec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, target_modules=["mlp/proj", "mlp/out"],
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=fn, example_args=(x,))
  lojax.save_peft(tmp_path, lora, mapping=lojax.PeftMapping())
  tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["target_modules"] == ["mlp.out"] and config["target_parameters"] == ["mlp.proj"]
  # the bare array is parameter `proj` of module `mlp`: its tensors are named after `mlp`
  assert sorted(tensors) == sorted(f"{PREFIX}mlp{m}.lora_{k}.weight" for m in ("", ".out")
                                   for k in "AB")
  a, b = _factors(lora, "mlp/proj")
  la, lb = tensors[f"{PREFIX}mlp.lora_A.weight"], tensors[f"{PREFIX}mlp.lora_B.weight"]
  assert la.shape == (R, D) and lb.shape == (F, R)
  np.testing.assert_allclose(S * lb @ la, S * (a @ b).T, rtol=1e-5, atol=1e-6)
  back = lojax.load_peft(tmp_path, params, mapping=lojax.PeftMapping(), apply_fn=fn,
                         example_args=(x,))
  np.testing.assert_array_equal(jax.jit(lojax.lorafy(fn))(back, x),
                                jax.jit(lojax.lorafy(fn))(lora, x))


def test_what_peft_cannot_adapt_as_target_parameters_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"(?s)moe: \['wi', 'wo'\].*parameter_order"):
    lojax.save_peft(tmp_path / "a", _wrap(), mapping=lojax.PeftMapping())
  with pytest.raises(ValueError, match=r"(?s)lora_dropout.*target_parameters"):
    lojax.save_peft(tmp_path / "b", _wrap(lora_dropout=0.1), mapping=ORDER)
  params, fn, x = _bare_model()
  dora = lojax.wrap(params, lojax.LoraSpec(r=R, target_modules=["mlp/proj"], use_dora=True),
                    key=jax.random.key(1), apply_fn=fn, example_args=(x,))
  with pytest.raises(ValueError, match=r"mlp/proj.*plain LoRA"):
    lojax.save_peft(tmp_path / "c", dora, mapping=lojax.PeftMapping())
  top = {"wi": jnp.ones((E, D, F))}
  lora = lojax.wrap(top, lojax.LoraSpec(r=R, target_modules=["wi"]), key=jax.random.key(1),
                    apply_fn=lambda p, x: jnp.einsum("etd,edf->etf", x, p["wi"]),
                    example_args=(_x(),))
  with pytest.raises(ValueError, match=r"wi: its torch name 'wi' is a parameter of the top-level"):
    lojax.save_peft(tmp_path / "d", lora, mapping=lojax.PeftMapping())
  G = 2
  two = {"moe": {"ew": jnp.ones((G, E, D, F))}}
  lora = lojax.wrap(two, lojax.LoraSpec(r=R, target_modules=["moe/ew"]), key=jax.random.key(1),
                    apply_fn=lambda p, x: jnp.stack([jnp.einsum(
                        "gtd,gdf->gtf", x[:, e], p["moe"]["ew"][:, e]) for e in range(E)], 1),
                    example_args=(jnp.ones((G, E, T, D)),))
  with pytest.raises(ValueError, match=r"moe/ew: 2 expert axes"):
    lojax.save_peft(tmp_path / "e", lora, mapping=lojax.PeftMapping())
  assert not any((tmp_path / n).exists() for n in "abcde")   # nothing half-written


def test_a_target_parameters_entry_that_selects_nothing_is_an_error(tmp_path):
  lojax.save_peft(tmp_path, _wrap(), mapping=ORDER)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  config["target_parameters"] = ["moe.wi", "moe.wo", "moe.w_gate"]
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"\['moe.w_gate'\] in adapter_config.json select no"):
    lojax.load_peft(tmp_path, _params(), mapping=ORDER, apply_fn=batched, example_args=(_x(),))
  # PEFT's rule: an entry selects the parameters whose name ends with "." + entry
  config["target_parameters"] = ["wi", "moe.wo"]
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  back = lojax.load_peft(tmp_path, _params(), mapping=ORDER, apply_fn=batched,
                         example_args=(_x(),))
  assert sorted(back.adapters["default"]["lora"]) == ["moe/wi", "moe/wo"]
  config["target_parameters"] = "moe.wi"
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="`target_parameters`: must be a list of strings or null"):
    lojax.load_peft(tmp_path, _params(), mapping=ORDER, apply_fn=batched, example_args=(_x(),))


# --------------------------------------------------------------------------
# Live against PEFT: transformers' MoE blocks with identical weights
# --------------------------------------------------------------------------

H, I, K, TOKENS = 16, 12, 2, 24


def _torch():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  pytest.importorskip("peft")
  return torch


def _mixtral_block(torch):
  """transformers' MixtralSparseMoeBlock (router ``gate.weight [E, H]``, experts
  ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``: ``[E, out, in]``), random weights."""
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
  cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                      num_experts_per_tok=K)

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.moe = MixtralSparseMoeBlock(cfg)

    def forward(self, x):
      return self.moe(x[None])[0]

  torch.manual_seed(0)
  block = Block()
  with torch.no_grad():
    for p in block.parameters():
      p.normal_(0.0, 0.3)
  return block.eval()


def mixtral(p, x):          # the same block in JAX, every expert computed, weighted by routing
  probs = jax.nn.softmax(x @ p["moe"]["router"], axis=-1)
  top, idx = jax.lax.top_k(probs, K)
  top = top / top.sum(-1, keepdims=True)
  combine = jnp.sum(jax.nn.one_hot(idx, E) * top[..., None], axis=1)     # [T, E]
  out = jnp.zeros_like(x)
  for e in range(E):
    gate, up = jnp.split(x @ p["moe"]["experts"]["gate_up_proj"][e], 2, axis=-1)
    out = out + combine[:, e:e + 1] * ((jax.nn.silu(gate) * up) @
                                       p["moe"]["experts"]["down_proj"][e])
  return out


MIXTRAL_MAPPING = lojax.PeftMapping(names=[(r"moe/router", "moe.gate.weight"), (r"(.*)", r"\1")])
MIXTRAL_TARGETS = ["moe.experts.gate_up_proj", "moe.experts.down_proj", "moe.gate.weight"]


def _mixtral_params(block):
  sd = {k: v.detach().numpy() for k, v in block.state_dict().items()}
  return {"moe": {"router": jnp.asarray(sd["moe.gate.weight"].T),
                  "experts": {n: jnp.asarray(sd[f"moe.experts.{n}"].transpose(0, 2, 1))
                              for n in ("gate_up_proj", "down_proj")}}}


def _close(got, want, what):
  want = np.asarray(want, np.float64)
  err = float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
  assert err < 1e-5, f"{what}: max error {err:.2e} of the output's max"
  return err


def _load_in_peft(torch, block, directory):
  """``PeftModel.from_pretrained``, checking that every tensor of the file went in, as is."""
  from peft import PeftModel, get_peft_model_state_dict
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(block, str(directory))
  missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
  assert not missing, missing
  state = get_peft_model_state_dict(model)
  written = load_file(os.path.join(directory, "adapter_model.safetensors"))
  assert sorted(state) == sorted(written)
  for k, v in written.items():
    np.testing.assert_array_equal(state[k].detach().numpy(), v, err_msg=k)
  return model.eval()


def test_peft_mixtral_experts_file_loads_in_lojax_and_back(tmp_path):
  torch = _torch()
  from peft import LoraConfig, get_peft_model
  block = _mixtral_block(torch)
  base = copy.deepcopy(block)
  params = _mixtral_params(block)
  x = np.random.default_rng(0).standard_normal((TOKENS, H)).astype(np.float32)
  with torch.no_grad():
    frozen = block(torch.from_numpy(x)).numpy()
  _close(mixtral(params, jnp.asarray(x)), frozen, "frozen block")
  # PEFT -> lojax: random factors on every expert parameter and the 2-D router weight, with
  # PEFT's rank and alpha patterns keyed by parameter name
  config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=MIXTRAL_TARGETS,
                      init_lora_weights=False, rank_pattern={"gate.weight": 3},
                      alpha_pattern={"down_proj": 5.0})
  peft_model = get_peft_model(block, config).eval()
  with torch.no_grad():
    want = peft_model(torch.from_numpy(x)).numpy()
  assert np.abs(want - frozen).max() > 1e-2 * np.abs(frozen).max()   # the adapter matters
  peft_model.save_pretrained(tmp_path / "peft")
  lora = lojax.load_peft(tmp_path / "peft", params, mapping=MIXTRAL_MAPPING, apply_fn=mixtral,
                         example_args=(jnp.asarray(x),))
  meta = lora.meta.adapter("default")
  assert meta.target("moe/router").r == 3 and meta.target("moe/experts/gate_up_proj").r == R
  assert meta.target("moe/experts/down_proj").scaling == 5.0 / R
  err_in = _close(jax.jit(lojax.lorafy(mixtral))(lora, jnp.asarray(x)), want, "PEFT -> lojax")
  # lojax -> PEFT: lojax's random factors, written by save_peft, read by PeftModel
  spec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, init_lora_weights=False,
                        target_modules=["moe/router", "moe/experts/gate_up_proj",
                                        "moe/experts/down_proj"],
                        rank_pattern={"router": 1}, alpha_pattern={"down_proj": 4.0})
  ours = lojax.wrap(params, spec, key=jax.random.key(2), apply_fn=mixtral,
                    example_args=(jnp.asarray(x),))
  expected = np.asarray(jax.jit(lojax.lorafy(mixtral))(ours, jnp.asarray(x)))
  assert np.abs(expected - frozen).max() > 1e-2 * np.abs(frozen).max()
  lojax.save_peft(tmp_path / "lojax", ours, mapping=MIXTRAL_MAPPING)
  written = json.loads((tmp_path / "lojax" / "adapter_config.json").read_text())
  assert written["target_modules"] == [] and written["target_parameters"] == sorted(
      MIXTRAL_TARGETS)
  assert written["rank_pattern"] == {"moe.gate.weight": 1}
  assert written["alpha_pattern"] == {"moe.experts.down_proj": 4.0}
  loaded = _load_in_peft(torch, base, tmp_path / "lojax")
  with torch.no_grad():
    got = loaded(torch.from_numpy(x)).numpy()
  err_out = _close(got, expected, "lojax -> PEFT")
  print(f"mixtral: PEFT->lojax {err_in:.1e}, lojax->PEFT {err_out:.1e} of the output's max")


def _llama4_experts(torch):
  """transformers' Llama4TextExperts: ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``
  (``[E, in, out]``, used by ``torch.bmm``), without ``is_transposed``: PEFT reads them as
  ``[E, out, in]``, so its ``lora_A`` sits on their output side."""
  from transformers import Llama4TextConfig
  from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
  cfg = Llama4TextConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                         hidden_act="silu")

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.experts = Llama4TextExperts(cfg)

    def forward(self, x):
      return self.experts(x)

  torch.manual_seed(1)
  block = Block()
  with torch.no_grad():
    for p in block.parameters():
      p.normal_(0.0, 0.3)
  return block.eval()


def llama4(p, x):           # x: [E * t, H], t tokens per expert in expert order
  h = jnp.einsum("etd,edf->etf", x.reshape(E, -1, H), p["experts"]["gate_up_proj"])
  gate, up = jnp.split(h, 2, axis=-1)
  return jnp.einsum("etf,efd->etd", up * jax.nn.silu(gate),
                    p["experts"]["down_proj"]).reshape(-1, H)


def test_peft_llama4_experts_read_the_other_way_round(tmp_path):
  torch = _torch()
  from peft import LoraConfig, get_peft_model
  block = _llama4_experts(torch)
  base = copy.deepcopy(block)
  params = {"experts": {n: jnp.asarray(v.detach().numpy())
                        for n, v in block.experts.named_parameters()}}
  mapping = lojax.PeftMapping(swapped_parameters=[r"experts/.*"])
  x = np.random.default_rng(1).standard_normal((TOKENS, H)).astype(np.float32)
  config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], init_lora_weights=False,
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])
  peft_model = get_peft_model(block, config).eval()
  with torch.no_grad():
    want = peft_model(torch.from_numpy(x)).numpy()
  peft_model.save_pretrained(tmp_path / "peft")
  tensors = load_file(os.path.join(tmp_path / "peft", "adapter_model.safetensors"))
  assert tensors[f"{PREFIX}experts.base_layer.lora_A.weight"].shape == (E * R, 2 * I)
  lora = lojax.load_peft(tmp_path / "peft", params, mapping=mapping, apply_fn=llama4,
                         example_args=(jnp.asarray(x),))
  err_in = _close(jax.jit(lojax.lorafy(llama4))(lora, jnp.asarray(x)), want, "PEFT -> lojax")
  with pytest.raises(ValueError, match="lora_A"):   # without swapped_parameters: does not fit
    lojax.load_peft(tmp_path / "peft", params, mapping=lojax.PeftMapping(), apply_fn=llama4,
                    example_args=(jnp.asarray(x),))
  spec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, init_lora_weights=False,
                        target_modules=["experts/gate_up_proj", "experts/down_proj"])
  ours = lojax.wrap(params, spec, key=jax.random.key(3), apply_fn=llama4,
                    example_args=(jnp.asarray(x),))
  expected = np.asarray(jax.jit(lojax.lorafy(llama4))(ours, jnp.asarray(x)))
  lojax.save_peft(tmp_path / "lojax", ours, mapping=mapping)
  loaded = _load_in_peft(torch, base, tmp_path / "lojax")
  with torch.no_grad():
    got = loaded(torch.from_numpy(x)).numpy()
  err_out = _close(got, expected, "lojax -> PEFT")
  print(f"llama4: PEFT->lojax {err_in:.1e}, lojax->PEFT {err_out:.1e} of the output's max")


def test_peft_reads_is_transposed_experts_as_in_out():
  """GPT-OSS experts set ``is_transposed`` (``gate_up_proj [E, H, 2I]``, ``[E, in, out]``):
  PEFT's ``lora_A`` is then on their input side, as for ``[E, out, in]`` experts without it,
  so their lojax kernel (the same array) needs no ``swapped_parameters``."""
  torch = _torch()
  from peft import LoraConfig, get_peft_model
  from transformers import GptOssConfig
  from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
  cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.experts = GptOssExperts(cfg)

  model = get_peft_model(Block(), LoraConfig(r=R, target_modules=[], target_parameters=[
      "experts.gate_up_proj", "experts.down_proj"]))
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if "lora_" in k}
  assert shapes[f"{PREFIX}experts.base_layer.lora_A.default.weight"] == (E * R, H)
  assert shapes[f"{PREFIX}experts.base_layer.lora_B.default.weight"] == (2 * I, R * E)
  assert shapes[f"{PREFIX}experts.lora_A.default.weight"] == (E * R, I)
