"""The README's code runs as written and does what the text around it says.

Every fenced block in README.md is preceded by a marker, ``<!-- test: NAME -->``
(an HTML comment, invisible on GitHub): NAME picks a setup here that provides
the names the block uses, and a check that asserts what the README claims about
the result. A block without a marker fails ``test_every_block_is_marked``, so a
new block cannot go untested. ``<!-- test: shell -->`` marks shell commands,
``<!-- test: output -->`` text that another test (named in the marker's
comment) compares, ``<!-- test: diagram -->`` a drawing. The files under docs/ follow
the same rule; a Python block there needs a setup here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import pathlib
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lojax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- test: ([\w-]+)(?: [^>]*)? -->\s*\n```(\w*)\n(.*?)\n```", re.S)
FENCE = re.compile(r"^```", re.M)


def blocks(path):
  """(name, language, code) of every marked fenced block of ``path``, in order."""
  return [m.groups() for m in MARK.finditer(path.read_text())]


def test_every_block_is_marked():
  for path in DOCS:
    text = path.read_text()
    opened = len(FENCE.findall(text)) // 2
    assert len(blocks(path)) == opened, (
        f"{path.name}: {opened} fenced blocks, {len(blocks(path))} with a `<!-- test: ... -->` "
        "marker on the line before; mark the new block and give it a setup in tests/test_readme.py")


# --------------------------------------------------------------------------
# Setups: the names a block may use (the block imports the rest itself)
# --------------------------------------------------------------------------

sys.path.insert(0, str(ROOT / "examples"))
import quickstart  # noqa: E402  (the model the README's numbers are quoted for)


def quickstart_names():
  model = quickstart.CharGPT()
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16)), jnp.int32)
  y = jnp.roll(x, -1, axis=1)
  params = model.init(jax.random.key(0), x)
  spec = lojax.LoraSpec(r=8, lora_alpha=16, target_modules=["query", "value"])
  return dict(model=model, x=x, y=y, params=params, spec=spec, key=jax.random.key(1))


@functools.cache
def _trained():
  import optax
  ns = {"jax": jax, "optax": optax, "lojax": lojax, **quickstart_names()}
  exec(code_of("quickstart"), ns)
  return ns


def trained_names():
  """The quickstart's names after its block ran: ``lora``, ``apply``, ``tx``, ``opt_state``."""
  return dict(_trained())  # the blocks rebind names; the arrays themselves are immutable


def adapters_names():
  """Two named adapters, "default" and "code", both active."""
  ns = trained_names()
  lora = lojax.wrap(ns["lora"], ns["spec"], key=jax.random.key(2), adapter_name="code")
  ns["lora"] = lojax.set_adapter(lora, ["default", "code"])
  return ns


def mixed_names():
  ns = adapters_names()
  exec(code_of("weighted"), ns)
  ns["lora"] = ns["mix"]
  return ns


def dropout_names():
  ns = quickstart_names()
  spec = lojax.LoraSpec(r=8, target_modules=["query", "value"], lora_dropout=0.5,
                        init_lora_weights=False)  # B != 0: the adapter path shows in outputs
  ns["lora"] = lojax.wrap(ns["params"], spec, key=ns["key"])
  ns["apply"] = lojax.lorafy(ns["model"].apply)
  ns["dropout_key"] = jax.random.key(7)
  return ns


def nnx_names():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.query = nnx.Linear(6, 6, rngs=rngs)
      self.value = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.value(jnp.tanh(self.query(x)))

  def reference(state, x):  # the NNX model written out on its merged weights
    h = jnp.tanh(x @ state["query"]["kernel"][...] + state["query"]["bias"][...])
    return h @ state["value"]["kernel"][...] + state["value"]["bias"][...]

  return dict(model=Net(nnx.Rngs(0)), key=jax.random.key(1), x=jnp.ones((2, 6)),
              reference=reference,
              spec=lojax.LoraSpec(r=2, target_modules=["query", "value"],
                                  init_lora_weights=False))


def gpt2_names():
  sys.path.insert(0, str(ROOT / "tests"))
  from gpt import GPT
  model = GPT(vocab=50, d=16, heads=2, layers=2)
  x = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), x)
  spec = lojax.LoraSpec(r=2, target_modules=["c_attn"])
  return dict(params=params, spec=spec, key=jax.random.key(1),
              lora=lojax.wrap(params, spec, key=jax.random.key(1)))


def equinox_names():
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(6, 3, 8, 2, key=jax.random.key(0))
  spec = lojax.LoraSpec(r=2, target_modules="all-linear", init_lora_weights=False)
  return {"eqx": eqx, "model": model, "spec": spec, "key": jax.random.key(1),
          "x": jnp.ones((4, 6))}


def tunix_names():
  pytest.importorskip("tunix")
  from flax import nnx
  from tunix.models.llama3 import model as llama
  cfg = llama.ModelConfig(num_layers=1, vocab_size=64, embed_dim=32, hidden_dim=64, num_heads=2,
                          head_dim=16, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6)
  t = 8
  return {"nnx": nnx, "model": llama.Llama3(cfg, rngs=nnx.Rngs(0)),
          "spec": lojax.LoraSpec(r=2, target_modules="all-linear"), "key": jax.random.key(1),
          "ids": jnp.zeros((1, t), jnp.int32), "positions": jnp.arange(t)[None],
          "mask": jnp.tril(jnp.ones((1, t, t), bool))}


def recurrentgemma_names():
  rg = pytest.importorskip("recurrentgemma.jax")
  from recurrentgemma import common
  cfg = rg.GriffinConfig(vocab_size=64, width=32, mlp_expanded_width=64, num_heads=2,
                         block_types=(common.TemporalBlockType.RECURRENT,
                                      common.TemporalBlockType.ATTENTION),
                         embeddings_scale_by_sqrt_dim=True, attention_window_size=8,
                         logits_soft_cap=30.0)
  griffin = rg.Griffin(cfg)
  ids, positions = jnp.zeros((1, 8), jnp.int32), jnp.arange(8)[None]
  return {"griffin": griffin, "params": griffin.init(jax.random.key(0), ids, positions),
          "spec": lojax.LoraSpec(r=2, target_modules="all-linear"), "key": jax.random.key(1),
          "ids": ids, "positions": positions}


def transformers_names():
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxLlamaForCausalLM"):
    pytest.skip("transformers >= 5 has no Flax models (tests/test_transformers_flax.py)")
  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32), seed=0)
  return {"model": model, "spec": lojax.LoraSpec(r=2, target_modules="all-linear"),
          "key": jax.random.key(1), "ids": jnp.zeros((2, 16), jnp.int32)}


def gemma_names():
  gm = pytest.importorskip("gemma.gm", reason="gemma: tests/test_gemma.py")
  from gemma.gm.nn import _modules
  cfg = gm.nn.config.TransformerConfig(
      num_embed=64, embed_dim=32, hidden_dim=64, num_heads=2, head_dim=16, num_kv_heads=1,
      final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
      attention_types=(_modules.AttentionType.GLOBAL,))
  transformer = gm.nn.Transformer(config=cfg, dtype=jnp.float32)
  ids = jnp.zeros((1, 8), jnp.int32)
  return {"transformer": transformer, "params": transformer.init(jax.random.key(0), ids),
          "spec": lojax.LoraSpec(r=2, target_modules="all-linear"), "key": jax.random.key(1),
          "ids": ids}


def moe_names():
  k = jax.random.split(jax.random.key(0), 3)
  e, d, f = 4, 8, 16

  def moe_layer(p, x):   # x: [E, tokens, d], already dispatched
    h = jax.nn.relu(jnp.einsum("etd,edf->etf", x, p["moe"]["wi"]))
    return jnp.einsum("etf,efd->etd", h, p["moe"]["wo"])

  return {"params": {"moe": {"wi": jax.random.normal(k[0], (e, d, f)),
                             "wo": jax.random.normal(k[1], (e, f, d))}},
          "moe_layer": moe_layer, "x": jax.random.normal(k[2], (e, 5, d)),
          "key": jax.random.key(1)}


def serving_names():
  sys.path.insert(0, str(ROOT / "examples"))
  import generate
  model = generate.CausalLM(width=32, depth=2, heads=2, vocab=64)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)
  params = model.init(jax.random.key(0), x)
  spec = lojax.LoraSpec(r=4, target_modules="all-linear", init_lora_weights=False)
  adapters = [lojax.wrap(params, dataclasses.replace(spec, r=r, lora_alpha=2 * r),
                         key=jax.random.key(r)) for r in (2, 8, 16)]
  return dict(model=model, x=x, params=params, key=jax.random.key(1), adapters=adapters,
              lora=adapters[0], cache=generate.empty_cache(model, params, 2),
              tokens=x[:, :1], positions=jnp.zeros((2, 1), jnp.int32))


SETUPS = {
    "quickstart": trained_names, "rank-pattern": quickstart_names,
    "apply-fn": quickstart_names, "nnx": nnx_names, "plain": lambda: {"key": jax.random.key(1)},
    "dropout": dropout_names,
    "weighted": adapters_names, "mixed": mixed_names, "optax-masks": trained_names,
    "loraplus": trained_names,
    "adalora": quickstart_names, "quantize": quickstart_names, "checkpoint": trained_names,
    "peft": gpt2_names, "peft-pissa": gpt2_names, "equinox": equinox_names, "tunix": tunix_names,
    "recurrentgemma": recurrentgemma_names, "moe": moe_names,
    "transformers": transformers_names, "gemma": gemma_names,
    "decode": serving_names, "hotswap": serving_names,
    "eva": quickstart_names,
    "readme-quickstart": dict, "start-linen": dict, "start-nnx": dict,
}


# docs/coming-from-peft.md: a PEFT script (run on torch when PEFT is installed) and its lojax
# translation, on models of the same shapes.

def _from_peft_linen():
  import flax.linen as nn

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Dense(16, name="query")(x))
      h = jnp.tanh(nn.Dense(16, name="value")(h))
      return nn.Dense(3, name="classifier")(h)

  return Classifier()


def from_peft_names():
  model = _from_peft_linen()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 12)), jnp.float32)
  y = jnp.arange(8) % 3
  return dict(model=model, x=x, y=y, params=model.init(jax.random.key(0), x))


def from_peft_torch_names():
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")

  class Classifier(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.query, self.value = torch.nn.Linear(12, 16), torch.nn.Linear(16, 16)
      self.classifier = torch.nn.Linear(16, 3)

    def forward(self, x):
      return self.classifier(torch.tanh(self.value(torch.tanh(self.query(x)))))

  torch.manual_seed(0)
  return dict(torch=torch, model=Classifier(), x=torch.randn(8, 12), y=torch.arange(8) % 3)


def check_from_peft(ns):
  lora, model, x = ns["lora"], ns["model"], ns["x"]
  assert sorted(lora.trainable["default"]["lora"]) == ["params/query", "params/value"]
  assert set(lora.trainable["default"]["modules_to_save"]) == {"params/classifier/kernel",
                                                               "params/classifier/bias"}
  b = lora.trainable["default"]["lora"]["params/query"]["lora_B"]
  assert float(jnp.abs(b).max()) > 0                        # the step trained the adapters
  apply = lojax.lorafy(model.apply)
  np.testing.assert_allclose(model.apply(ns["merged"], x), apply(lora, x, lora_deterministic=True),
                             atol=1e-5, rtol=1e-5)
  assert pathlib.Path("adapter/adapter_model.safetensors").exists()
  back = lojax.load_peft("adapter", ns["params"], mapping=lojax.PeftMapping())
  np.testing.assert_allclose(lojax.merge(back)["params"]["query"]["kernel"],
                             ns["merged"]["params"]["query"]["kernel"], atol=1e-6)


def check_from_peft_torch(ns):
  """PEFT's model and file are those of the lojax translation: the same parameter counts, and
  PEFT's adapter directory loads onto the Flax params of the same shapes."""
  from peft import get_peft_model
  assert not any("lora_" in name for name, _ in ns["merged"].named_modules())
  fresh = get_peft_model(type(ns["merged"])(), ns["config"]).get_nb_trainable_parameters()
  flax_ns = from_peft_names()
  spec = lojax.LoraSpec(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"],
                        modules_to_save=["classifier"])
  count = lojax.count_parameters(lojax.wrap(flax_ns["params"], spec, key=jax.random.key(0)))
  assert fresh == (count.trainable, count.total), (fresh, count)
  loaded = lojax.load_peft("adapter", flax_ns["params"], mapping=lojax.PeftMapping())
  assert loaded.meta.adapter("default").spec.lora_dropout == 0.1
  assert loaded.trainable["default"]["lora"]["params/query"]["lora_A"].shape == (12, 4)


SETUPS.update({"from-peft": from_peft_names, "from-peft-torch": from_peft_torch_names})


def code_of(name):
  [code] = [c for path in DOCS for n, _, c in blocks(path) if n == name]
  return code


# --------------------------------------------------------------------------
# Checks: what the README says about each block's result
# --------------------------------------------------------------------------

def check_quickstart(ns):
  lora, x = ns["lora"], ns["x"]
  assert np.isfinite(ns["loss"])
  assert set(lora.trainable) == {"default"}
  assert set(lora.trainable["default"]) == {"lora", "bias", "modules_to_save"}
  assert sorted(lora.trainable["default"]["lora"]) == sorted(
      f"params/h_{i}/attn/{n}" for i in range(3) for n in ("query", "value"))
  # "merged: plain params for model.apply": the same outputs as the factorized apply
  np.testing.assert_allclose(ns["model"].apply(ns["merged"], x), ns["apply"](lora, x),
                             atol=1e-5, rtol=1e-5)
  # the step trained the adapters: B moved from its zero init
  b = lora.trainable["default"]["lora"]["params/h_0/attn/query"]["lora_B"]
  assert float(jnp.abs(b).max()) > 0
  # "## Parameter counts": the figure quoted there is this model's
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    lojax.print_trainable_parameters(lora)
  assert out.getvalue().strip() == (
      "trainable params: 7,680 || all params: 287,696 || trainable%: 2.6695")
  assert "trainable params: 7,680 || all params: 287,696 || trainable%: 2.6695" in (
      ROOT / "docs" / "training.md").read_text()


def _check_complete_quickstart(ns, merged_apply):
  """A complete quickstart: it trained (the toy task's loss from ~1.4 to below 0.1), only the
  adapters changed, and the merged model computes what the adapted one does."""
  assert float(ns["loss"]) < 0.1, float(ns["loss"])
  b = next(iter(ns["lora"].trainable["default"]["lora"].values()))["lora_B"]
  assert float(jnp.abs(b).max()) > 0
  np.testing.assert_allclose(merged_apply(ns["x"]), ns["apply"](ns["lora"], ns["x"]),
                             rtol=1e-5, atol=1e-5)


def check_readme_quickstart(ns):
  _check_complete_quickstart(ns, lambda x: ns["model"].apply(ns["merged"], x))
  assert code_of("readme-quickstart") == code_of("start-linen")   # one quickstart, two places
  assert len(code_of("readme-quickstart").splitlines()) <= 25


def check_start_linen(ns):
  _check_complete_quickstart(ns, lambda x: ns["model"].apply(ns["merged"], x))


def check_start_nnx(ns):
  _check_complete_quickstart(ns, lambda x: ns["merged"](x))
  assert len(code_of("start-nnx").splitlines()) <= 25


def check_rank_pattern(ns):
  lora = lojax.wrap(ns["params"], ns["spec"], key=ns["key"])
  targets = lora.meta.adapter("default").targets
  ranks = {t.path: t.r for t in targets}
  scales = {t.path: t.scaling for t in targets}
  assert ranks == {**{f"params/h_{i}/attn/query": 4 for i in (0, 2)},
                   "params/h_1/attn/query": 16,
                   **{f"params/h_{i}/attn/value": 8 for i in range(3)}}
  assert all(scales[f"params/h_{i}/attn/value"] == 32 / 8 for i in range(3))
  assert scales["params/h_1/attn/query"] == 16 / 16


def check_apply_fn(ns):
  assert sorted(ns["lora"].trainable["default"]["lora"]) == sorted(
      f"params/h_{i}/attn/{n}" for i in range(3) for n in ("query", "value"))


def check_nnx(ns):
  x, model, merged = ns["x"], ns["model"], ns["merged_model"]
  np.testing.assert_allclose(merged(x), ns["y"], atol=1e-5)
  assert not np.allclose(merged(x), model(x), atol=1e-3)  # B != 0 in this setup: a real delta
  np.testing.assert_allclose(
      ns["y"], ns["reference"](lojax.merge(ns["lora"]), x), atol=1e-5)


def check_plain(ns):
  merged = lojax.merge(ns["lora"])["w"]["kernel"]
  np.testing.assert_allclose(ns["y"], jnp.tanh(jnp.ones((3, 6)) @ merged), atol=1e-6)
  assert float(jnp.abs(merged - 1).max()) == 0  # B = 0 at init: the base function


def check_dropout(ns):
  apply, lora, x = ns["apply"], ns["lora"], ns["x"]
  evaluation = ns["logits"]
  np.testing.assert_allclose(evaluation, ns["model"].apply(lojax.merge(lora), x), atol=1e-4)
  training = apply(lora, x, lora_rng=ns["dropout_key"])
  assert not np.allclose(training, evaluation, atol=1e-3)
  with pytest.raises(ValueError, match="lora_rng"):
    apply(lora, x)


def check_weighted(ns):
  mix, lora = ns["mix"], ns["lora"]
  assert "mix" in mix.meta.names and "mix" not in lojax.set_adapter(mix, "default").trainable
  # "svd" with svd_rank=16 covers the rank (8 + 8): exact, 0.7 dW_default + 0.3 dW_code
  def delta(l, name):
    merged = lojax.merge(lojax.set_adapter(l, name))["params"]["h_0"]["attn"]["query"]["kernel"]
    return merged - lora.base["params"]["h_0"]["attn"]["query"]["kernel"]
  lora2 = lojax.wrap(lora, lojax.LoraSpec(r=8, target_modules=["query", "value"],
                                          init_lora_weights=False),
                     key=jax.random.key(3), adapter_name="other")
  mix2 = lojax.add_weighted_adapter(lora2, ["default", "other"], [0.7, 0.3], "mix",
                                    combination_type="svd", svd_rank=16)
  np.testing.assert_allclose(delta(mix2, "mix"),
                             0.7 * delta(lora2, "default") + 0.3 * delta(lora2, "other"),
                             atol=1e-5)


def check_mixed(ns):
  lora, x, model = ns["lora"], ns["x"], ns["model"]
  for i, name in enumerate(["code", None, "mix", "default"]):
    params = lojax.merge(lojax.set_adapter(lora, name)) if name else lora.base
    np.testing.assert_allclose(ns["logits"][i], model.apply(params, x)[i], atol=1e-4)


def check_optax_masks(ns):
  import optax
  lora = ns["lora"]
  state = ns["tx"].init(lora)
  grads = jax.tree.map(jnp.ones_like, lora)
  updates, _ = ns["tx"].update(grads, state, lora)
  flat = jax.tree_util.tree_leaves_with_path(updates)
  base = [v for p, v in flat if "base" in jax.tree_util.keystr(p)]
  assert base and all(float(jnp.abs(v).max()) == 0 for v in base)
  labels = lojax.partition_labels(lora)
  assert set(jax.tree.leaves(labels)) == {"trainable", "frozen"}
  assert isinstance(ns["tx"], optax.GradientTransformation)


def check_loraplus(ns):
  """One step of ``tx``: lora_B moves 16x as far as plain Adam's lr would (its first step
  is ~lr per element), lora_A ~lr."""
  lora, tx = ns["lora"], ns["tx"]
  grads = jax.tree.map(jnp.ones_like, lora.trainable)
  updates, _ = tx.update(grads, ns["opt_state"], lora.trainable)
  moved = {k: float(jnp.abs(v).max()) for p, v in jax.tree_util.tree_leaves_with_path(updates)
           for k in ("lora_A", "lora_B") if k in jax.tree_util.keystr(p)}
  assert abs(moved["lora_A"] - 1e-4) < 1e-6 and abs(moved["lora_B"] - 16e-4) < 1e-5, moved


def check_adalora(ns):
  ranks = ns["lojax"].adalora_ranks(ns["opt_state"])
  assert ranks and all(r == 12 for r in ranks.values())
  assert ns["small"] is not None


def check_quantize(ns):
  kernel = ns["lora"].base["params"]["h_0"]["attn"]["query"]["kernel"]
  assert type(kernel).__name__ == "QuantizedArray"
  merged = lojax.merge(ns["lora"])["params"]["h_0"]["attn"]["query"]["kernel"]
  assert isinstance(merged, jax.Array) and merged.dtype == jnp.float32


def check_eva(ns):
  lora, ranks = ns["lora"], {}
  for t in lora.meta.adapter("default").targets:
    ranks[t.path] = t.r
    entry = lora.adapters["default"]["lora"][t.path]
    a = np.asarray(entry["lora_A"], np.float64)
    np.testing.assert_allclose(a.T @ a, np.eye(t.r), atol=1e-5)    # orthonormal components
    assert not np.any(np.asarray(entry["lora_B"]))
  assert sum(ranks.values()) == 6 * 8 and len(set(ranks.values())) > 1   # redistributed
  for i in range(3):   # query and value read the same input: one PCA, the same rank
    assert ranks[f"params/h_{i}/attn/query"] == ranks[f"params/h_{i}/attn/value"]
  np.testing.assert_allclose(lojax.lorafy(ns["model"].apply)(lora, ns["x"]),
                             ns["model"].apply(ns["params"], ns["x"]), atol=1e-5)


def check_checkpoint(ns):
  assert pathlib.Path("ckpt").is_dir()
  restored = ns["lora"].trainable["default"]["lora"]["params/h_0/attn/query"]["lora_B"]
  assert float(jnp.abs(restored).max()) > 0  # the trained B came back, not the zero init


def check_equinox(ns):
  lora, x = ns["lora"], ns["x"]
  assert sorted(lora.trainable["default"]["lora"]) == ["layers/0", "layers/1", "layers/2"]
  merged = ns["eqx"].combine(lojax.merge(lora), ns["static"])
  np.testing.assert_allclose(ns["apply"](lora, x), jax.vmap(merged)(x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(jax.vmap(merged)(x), jax.vmap(ns["model"])(x), atol=1e-4)


def check_tunix(ns):
  paths = sorted(ns["lora"].trainable["default"]["lora"])
  assert paths == sorted(f"layers/0/{m}" for m in ("attn/q_proj", "attn/k_proj", "attn/v_proj",
                                                   "attn/o_proj", "mlp/gate_proj",
                                                   "mlp/up_proj", "mlp/down_proj")), paths


def check_recurrentgemma(ns):
  paths = ns["lora"].trainable["default"]["lora"]
  assert "params/blocks.0/recurrent_block/rg_lru/a_gate" in paths
  assert "params/blocks.1/attention_block/proj_q" in paths


def check_transformers(ns):
  paths = sorted(ns["lora"].trainable["default"]["lora"])
  assert len(paths) == 7 and "model/layers/0/mlp/down_proj" in paths, paths


def check_gemma(ns):
  paths = sorted(ns["lora"].trainable["default"]["lora"])
  assert "params/layer_0/mlp/linear" in paths and "params/layer_0/attn/q_einsum" in paths


def check_moe(ns):
  lora = ns["lora"]
  assert lora.meta.adapter("default").target("moe/wi").expert_axes == (0,)
  assert lora.trainable["default"]["lora"]["moe/wi"]["lora_A"].shape == (4, 8, 4)
  assert lora.trainable["default"]["lora"]["moe/wi"]["lora_B"].shape == (4, 4, 16)


def check_peft(ns):
  assert pathlib.Path("out/adapter_config.json").exists()
  assert pathlib.Path("out/adapter_model.safetensors").exists()
  a = ns["lora"].trainable["default"]["lora"]["params/h_0/attn/c_attn"]["lora_A"]
  assert a.shape == (16, 2)


def check_peft_pissa(ns):
  import json
  cfg = json.loads(pathlib.Path("out/adapter_config.json").read_text())
  assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (16, 32, True)
  sys.path.insert(0, str(ROOT / "tests"))
  from gpt import GPT
  model, x = GPT(vocab=50, d=16, heads=2, layers=2), jnp.arange(8)[None] % 50
  plain = lojax.load_peft("out", ns["params"], mapping=lojax.GPT2_MAPPING)
  assert jax.tree.structure(plain.base) == jax.tree.structure(ns["params"])
  for a, b in zip(jax.tree.leaves(plain.base), jax.tree.leaves(ns["params"])):
    np.testing.assert_array_equal(a, b)   # the untouched base
  want = model.apply(ns["params"], x)
  for lora in (plain, ns["lora"]):   # untrained: the delta A B - A0 B0 is zero
    np.testing.assert_allclose(lojax.lorafy(model.apply)(lora, x), want, atol=2e-5, rtol=2e-5)


def check_decode(ns):
  # the adapted model's first-token logits, and the cache written at position 0
  merged = lojax.merge(ns["lora"])
  np.testing.assert_allclose(ns["logits"][:, 0], ns["model"].apply(merged, ns["tokens"])[:, 0],
                             atol=1e-5, rtol=1e-5)
  k = ns["new"]["cache"]["h_0"]["attn"]["k"]
  assert float(jnp.abs(k[:, 0]).max()) > 0 and float(jnp.abs(k[:, 1:]).max()) == 0


def check_hotswap(ns):
  np.testing.assert_allclose(ns["logits"], ns["model"].apply(lojax.merge(ns["adapters"][-1]),
                                                             ns["x"]), atol=1e-5, rtol=1e-5)
  assert ns["serve"]._cache_size() == 1   # one compilation for the three ranks


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_readme_block(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  import optax
  from flax import nnx
  # the imports a reader has from the quickstart block (and `nnx` for the NNX lines)
  ns = {"jax": jax, "jnp": jnp, "optax": optax, "lojax": lojax, "nnx": nnx, **SETUPS[name]()}
  if name == "checkpoint":
    ns["step"] = 1
  if name != "quickstart":  # the quickstart block ran in its (cached) setup
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # AdaLoRA's "ranks never changed" and the like
      exec(code_of(name), ns)
  globals()["check_" + name.replace("-", "_")](ns)


def test_every_python_block_has_a_setup():
  names = [n for path in DOCS for n, lang, _ in blocks(path) if lang == "python"]
  assert sorted(names) == sorted(SETUPS), "README python blocks and SETUPS differ"


def test_error_example():
  """The `## Errors` block: the message on the quickstart's model, first lines as shown."""
  [shown] = [c for path in DOCS for n, _, c in blocks(path) if n == "error"]
  ns = quickstart_names()
  with pytest.raises(ValueError) as err:
    lojax.wrap(ns["params"], lojax.LoraSpec(target_modules=["q_proj", "v_proj"]), key=ns["key"])
  got = str(err.value).splitlines()
  want = shown.splitlines()[1:]
  assert want[0] == "ValueError: " + got[0]
  for line, actual in zip(want[1:], got[1:]):
    prefix = line.rstrip("…").rstrip()
    assert actual.startswith(prefix), (line, actual)


def test_shell_blocks_name_what_exists():
  """Each `pip install -e ".[extras]"` names extras pyproject.toml defines; each script exists;
  the test command is the one CI runs."""
  import tomllib
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  shell = [c for n, _, c in blocks(ROOT / "README.md") if n == "shell"]
  assert shell
  for code in shell:
    for group in re.findall(r'pip install -e "\.\[([\w,-]+)\]"', code):
      assert set(group.split(",")) <= set(extras), group
    for script in re.findall(r"python ((?:examples|benchmarks|tools)/\S+\.py)", code):
      assert (ROOT / script).exists(), script
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python -m pytest -q -n 2" in ci
  assert any("python -m pytest -q -n 2" in c for c in shell)


def test_speed_figures_are_the_committed_benchmark_results():
  """docs/benchmarks.md and the README's `## Speed` quote benchmarks/results/cpu.json, rounded
  as written there."""
  import json
  rows = json.loads((ROOT / "benchmarks" / "results" / "cpu.json").read_text())["rows"]
  speed = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
  mib = lambda row: f"{rows[row]['temp_bytes'] / 2**20:.0f} MiB"
  ratio = lambda row, what: f"{rows[row][what + '_ratio_to_limit']:.2f}x"
  qwix = rows["lojax LoRA (NNX)"]["step_s"] / rows["qwix LoRA (NNX)"]["step_s"]
  expected = [
      f"costs {ratio('lojax LoRA', 'flops')} the FLOPs and {ratio('lojax LoRA', 'step')} the time",
      f"Full fine-tuning costs {ratio('full fine-tuning', 'flops')} the FLOPs and a merged-delta "
      f"step {ratio('lojax LoRA, merged delta (naive)', 'flops')}",
      f"takes {qwix:.2f}x the time of a qwix LoRA step",
      f"temp memory is {mib('lojax LoRA')}, against {mib('frozen limit')} for the frozen limit "
      f"and {mib('full fine-tuning')} for full fine-tuning",
      f"a LoRA step takes {ratio('lojax LoRA (MiniLM)', 'step')} the limit's time, with "
      f"{mib('lojax LoRA (MiniLM)')} temp against {mib('full fine-tuning (MiniLM)')}",
  ]
  serving = json.loads((ROOT / "benchmarks" / "results" / "cpu.json").read_text())["serving"]
  sv = lambda phase, row, to: f"{serving[phase][row]['ratio_to_' + to]:.2f}x"
  expected += [
      f"a decoded token with the adapters unmerged takes {sv('decode', 'unmerged', 'merged')} "
      f"the merged model's time and a prefill {sv('prefill', 'unmerged', 'merged')}",
      f"decodes at {sv('decode', 'mixed K=4', 'unmerged')} / "
      f"{sv('decode', 'mixed K=16', 'unmerged')} and prefills at "
      f"{sv('prefill', 'mixed K=4', 'unmerged')} / {sv('prefill', 'mixed K=16', 'unmerged')}",
      f"{serving['hotswap']['swaps']} hotswaps of ranks 4 to 16 cause "
      f"{serving['hotswap']['recompilations']} recompilations",
  ]
  status = " ".join((ROOT / "docs" / "status.md").read_text().split())
  readme = (ROOT / "README.md").read_text()
  short = " ".join(readme[readme.index("## Speed"):readme.index("## Where next")].split())
  expected_short = [
      f"a LoRA step costs {ratio('lojax LoRA', 'flops')} the FLOPs and "
      f"{ratio('lojax LoRA', 'step')} the time", f"{qwix:.2f}x a qwix step's time",
      f"decodes at {sv('decode', 'unmerged', 'merged')} the merged model's time"]
  missing_short = [e for e in expected_short if e not in short]
  assert not missing_short, missing_short
  comp = json.loads((ROOT / "benchmarks" / "results" / "compile.json").read_text())["layers"]
  c4, c48 = comp["4"]["rows"], comp["48"]["rows"]
  tot = lambda rows, row: f"{rows[row]['total_s']:.2f} s"  # noqa: E731
  vs = lambda rows, row: f"{rows[row]['total_vs_limit']:.2f}x"  # noqa: E731
  fgrad = c48["full fine-tuning gradient"]
  expected += [
      f"At 48 layers a LoRA step takes {tot(c48, 'lojax LoRA step')}, "
      f"{vs(c48, 'lojax LoRA step')} the frozen limit's {tot(c48, 'frozen limit')} and "
      f"{c48['lojax LoRA step']['total_s'] / c48['full fine-tuning']['total_s']:.2f}x full "
      f"fine-tuning's {tot(c48, 'full fine-tuning')}; its gradient alone takes "
      f"{vs(c48, 'lojax LoRA gradient')} the limit's time, against "
      f"{vs(c48, 'full fine-tuning gradient')} for full fine-tuning's gradient",
      f"the factorized step has {c48['lojax LoRA step']['dots']} matmuls against the limit's "
      f"{c48['frozen limit']['dots']} ({fgrad['dots']} with full fine-tuning's weight gradients)",
      f"full fine-tuning already costs {vs(c48, 'full fine-tuning')}",
      f"({c48['lojax LoRA step']['fusions'] - c48['lojax LoRA gradient']['fusions']} fusions "
      f"for the 384 adapter leaves)",
      f"{mib('lojax QLoRA (NF4)')} at {ratio('lojax QLoRA (NF4)', 'step')} the NNX limit's time "
      f"({ratio('lojax QLoRA (NF4, double-quant)', 'step')} with double quantization"]
  scale = json.loads((ROOT / "benchmarks" / "results" / "scale.json").read_text())["models"]
  sg = {k: scale[k]["rows"] for k in ("8b", "70b")}
  ag = lambda rows, n: rows[n]["collectives"]["all-gather"]["bytes_per_step"]  # noqa: E731
  expected.append(
      f"all-gathers {ag(sg['8b'], 'qlora_g') / ag(sg['8b'], 'lora'):.2f}x (8B) and "
      f"{ag(sg['70b'], 'qlora_g') / ag(sg['70b'], 'lora'):.2f}x (70B) the bytes of the LoRA "
      f"step, taking {sg['8b']['qlora_g']['memory']['total'] / 2**30:.2f} and "
      f"{sg['70b']['qlora_g']['memory']['total'] / 2**30:.2f} GiB per device in all")
  sharding_doc = " ".join((ROOT / "docs" / "sharding.md").read_text().split())
  claim = (f"Llama-3-70B step (`benchmarks/results/scale.md`) that moves "
           f"{ag(sg['70b'], 'qlora_g') / ag(sg['70b'], 'lora'):.2f}x the all-gather bytes")
  assert claim in sharding_doc, claim
  training = " ".join((ROOT / "docs" / "training.md").read_text().split())
  compile_claim = (f"{c4['lojax LoRA step']['total_s']:.2f} s on the 4-layer benchmark GPT and "
                   f"{c48['lojax LoRA step']['total_s']:.1f} s with 48 unrolled layers")
  assert compile_claim in training, compile_claim
  plain, lean = c48["lojax LoRA step, remat=False"], c48["lojax LoRA step"]
  plain_claim = (f"compiles faster ({plain['total_s']:.2f} s at 48 layers), at the price of more "
                 f"memory ({plain['temp_mib']:.0f} MiB of temp against {lean['temp_mib']:.0f} MiB)")
  assert plain_claim in training and plain["total_s"] < lean["total_s"], plain_claim
  dora = f"a DoRA step keeps {mib('lojax DoRA')} temp on the benchmark GPT, against {mib('lojax LoRA')}"
  missing = [e for e in expected if e not in speed] + ([dora] if dora not in status else [])
  assert not missing, missing
