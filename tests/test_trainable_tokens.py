"""``trainable_token_indices``: some embedding rows trained on their own (PEFT's option).

PEFT itself is the oracle for untied GPT-2 (a list: the input embedding; a dict:
by name, on the scanned model) in ``tests/test_peft_oracle.py`` (cases
``trainable_tokens*``: outputs, gradients, counts, files both ways). Here: the
tied model against PEFT live (the new rows also change the logits), float64
NumPy with the rows replaced by hand, merge/unmerge exactness, mixed batches,
checkpoints, shardings, LoRA+ groups, the compiled cost (no table-sized
gradient, FLOPs at the frozen model's), and the errors.
"""

from __future__ import annotations

import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lojax

sys.path.insert(0, os.path.dirname(__file__))
import gpt  # noqa: E402
import test_peft_oracle as oracle  # noqa: E402

ROWS = [4, 9, 56]          # rows the oracle's input sequence uses (and the tied logits)
TABLE = "params/wte/embedding"


def _tied():
  model = gpt.GPT(vocab=oracle.VOCAB, d=oracle.D, heads=oracle.HEADS, layers=oracle.LAYERS,
                  max_len=oracle.MAX_LEN, tied=True)
  params = oracle.flax_params(scan=False)
  params["params"].pop("lm_head")
  return model, params


def _wrapped(model, params, rows=ROWS, seed=0, name="default", base=None, **kw):
  spec = lojax.LoraSpec(r=2, target_modules=["c_attn"], trainable_token_indices=rows, **kw)
  lora = lojax.set_adapter(lojax.wrap(params if base is None else base, spec,
                                      key=jax.random.key(seed), adapter_name=name), name)
  rng = np.random.default_rng(seed)
  tr = lora.trainable
  ad = tr[name]
  ad["trainable_tokens"] = {p: jnp.asarray(rng.normal(size=v.shape), v.dtype)
                            for p, v in ad["trainable_tokens"].items()}
  ad["lora"] = {p: dict(e, lora_B=jnp.asarray(rng.normal(size=e["lora_B"].shape) * 0.1,
                                                jnp.float32)) for p, e in ad["lora"].items()}
  return lora.with_trainable(tr)


def _by_hand(model, params, lora, name="default"):
  """The model on a table whose rows were replaced by hand (PEFT's index_copy), and the
  adapter's LoRA merged by hand: ``W + s*A@B`` with ``s = alpha / r``."""
  p = jax.tree.map(np.asarray, params)
  ad = lora.adapters[name]
  table = np.array(p["params"]["wte"]["embedding"])
  table[np.asarray(ROWS)] = np.asarray(ad["trainable_tokens"][TABLE])
  p["params"]["wte"]["embedding"] = table
  for path, e in ad["lora"].items():
    leaf = p
    for part in path.split("/"):
      leaf = leaf[part]
    leaf["kernel"] = leaf["kernel"] + (8 / 2) * np.asarray(e["lora_A"]) @ np.asarray(e["lora_B"])
  return p


def test_tied_model_matches_peft():
  torch, transformers, peft = oracle.import_torch_stack()
  model, params = _tied()
  lora = _wrapped(model, params)
  cfg = transformers.GPT2Config(vocab_size=oracle.VOCAB, n_embd=oracle.D,
                                n_layer=oracle.LAYERS, n_head=oracle.HEADS,
                                n_positions=oracle.MAX_LEN, layer_norm_epsilon=1e-6,
                                activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                attn_pdrop=0.0, tie_word_embeddings=True)
  base = transformers.GPT2LMHeadModel(cfg)
  sd = {k: torch.from_numpy(v.copy()) for k, v in oracle.base_state_dict().items()
        if k != "lm_head.weight"}
  base.load_state_dict(sd, strict=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pm = peft.get_peft_model(base.eval(), peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=["c_attn"], trainable_token_indices=ROWS)).eval()
  named = dict(pm.named_parameters())
  ad = lora.adapters["default"]
  with torch.no_grad():
    named["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta.default"].copy_(
        torch.from_numpy(np.array(ad["trainable_tokens"][TABLE])))
    for i in range(oracle.LAYERS):
      e = ad["lora"][f"params/h_{i}/attn/c_attn"]
      m = f"base_model.model.transformer.h.{i}.attn.c_attn"
      named[f"{m}.lora_A.default.weight"].copy_(torch.from_numpy(np.asarray(e["lora_A"]).T))
      named[f"{m}.lora_B.default.weight"].copy_(torch.from_numpy(np.asarray(e["lora_B"]).T))
  ids = oracle.inputs()[0]
  with torch.no_grad():
    want = pm(torch.from_numpy(ids).long()).logits.numpy()
  got = np.asarray(jax.jit(lojax.lorafy(model.apply))(lora, jnp.asarray(ids)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # the new rows reach the tied logits: without them the logits differ
  plain = lojax.wrap(params, lojax.LoraSpec(r=2, lora_alpha=8, target_modules=["c_attn"]),
                     key=jax.random.key(0))
  plain = plain.with_trainable({"default": {k: v for k, v in ad.items()
                                            if k != "trainable_tokens"}})
  assert np.abs(np.asarray(lojax.lorafy(model.apply)(plain, jnp.asarray(ids))) - want).max() > 1e-3
  # PEFT's count: the rows are parameters (trainable, and in the total)
  trainable, total = pm.get_nb_trainable_parameters()
  count = lojax.count_parameters(lora)
  assert (count.trainable, count.total) == (trainable, total)


def test_against_rows_replaced_by_hand_and_merge():
  model, params = _tied()
  lora = _wrapped(model, params, lora_alpha=8)
  ids = jnp.asarray(oracle.inputs()[0])
  want = model.apply(_by_hand(model, params, lora), ids)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(model.apply))(lora, ids), want, rtol=1e-5,
                             atol=1e-5)
  merged = lojax.merge(lora)
  np.testing.assert_array_equal(merged["params"]["wte"]["embedding"][np.asarray(ROWS)],
                                lora.adapters["default"]["trainable_tokens"][TABLE])
  back = lojax.unmerge(lora, merged)
  np.testing.assert_array_equal(back["params"]["wte"]["embedding"],
                                params["params"]["wte"]["embedding"])


def test_gradient_is_the_gradient_of_the_rows():
  model, params = _tied()
  lora = _wrapped(model, params, lora_alpha=8)
  ids = jnp.asarray(oracle.inputs()[0])
  labels = jnp.asarray(oracle.inputs()[1])

  def xent(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  g = jax.grad(lambda t: xent(lojax.lorafy(model.apply)(lora.with_trainable(t), ids)))(
      lora.trainable)["default"]["trainable_tokens"][TABLE]
  merged = _by_hand(model, params, lora)
  table = jnp.asarray(merged["params"]["wte"]["embedding"])

  def by_rows(v):   # the rows set into the table, as PEFT's index_copy
    p = jax.tree.map(jnp.asarray, merged)
    p["params"]["wte"]["embedding"] = table.at[jnp.asarray(ROWS)].set(v)
    return xent(model.apply(p, ids))

  want = jax.grad(by_rows)(table[jnp.asarray(ROWS)])
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


def test_no_table_sized_work_in_a_step():
  """Tied logits add the rows' columns in place: no ``[tokens, vocab]`` product or buffer
  (nor a ``[vocab, dim]`` gradient) beyond the LoRA step's."""
  vocab, tokens, n = 16384, 2 * 16, 4
  model = gpt.GPT(vocab=vocab, d=32, heads=4, layers=1, max_len=16, tied=True)
  params, ids = gpt.init(model, batch=2, seq=16)

  def step_cost(spec):
    lora = lojax.wrap(params, spec, key=jax.random.key(0))
    f = jax.jit(jax.grad(lambda t: lojax.lorafy(model.apply)(lora.with_trainable(t),
                                                             ids).sum()))
    c = f.lower(lora.trainable).compile()
    return c.cost_analysis()["flops"], c.memory_analysis().temp_size_in_bytes

  f0, t0 = step_cost(lojax.LoraSpec(r=2, target_modules=["c_attn"]))
  f1, t1 = step_cost(lojax.LoraSpec(r=2, target_modules=["c_attn"],
                                    trainable_token_indices=list(range(1, n + 1))))
  # a one-hot product would be 2 * tokens * n * vocab FLOPs forward alone, a logits buffer
  # tokens * vocab * 4 bytes; what is left does not grow with the vocabulary
  assert f1 - f0 < tokens * n * vocab / 4, (f0, f1)
  assert t1 - t0 < tokens * vocab * 4 / 16, (t0, t1)


def test_mixed_batch_and_overlap():
  model, params = _tied()
  lora = _wrapped(model, params, lora_alpha=8)
  lora = _wrapped(model, params, rows=[1, 12], seed=1, name="other", base=lora, lora_alpha=8)
  lora = lojax.set_adapter(lora, ["default", "other"])
  ids = jnp.asarray(np.concatenate([oracle.inputs()[0]] * 2))
  ids = ids.at[1, 0].set(1)
  got = jax.jit(lojax.lorafy(model.apply))(lora, ids, lora_adapter_ids=jnp.array([0, 1]))
  alone = lojax.set_adapter(lora, "default")
  np.testing.assert_allclose(got[0], lojax.lorafy(model.apply)(alone, ids[:1])[0], rtol=1e-5,
                             atol=1e-5)
  other = lojax.set_adapter(lora, "other")
  np.testing.assert_allclose(got[1], lojax.lorafy(model.apply)(other, ids[1:])[0], rtol=1e-5,
                             atol=1e-5)
  clash = _wrapped(model, params, rows=[9], seed=2, name="clash", base=lora, lora_alpha=8)
  with pytest.raises(ValueError, match="both train row 9"):
    lojax.lorafy(model.apply)(lojax.set_adapter(clash, ["default", "clash"]), ids)


def test_checkpoint_sharding_loraplus(tmp_path):
  model, params = _tied()
  lora = _wrapped(model, params, lora_alpha=8)
  lojax.save_adapters(tmp_path / "ckpt", lora, step=1)
  back = lojax.restore_adapters(tmp_path / "ckpt", params)
  assert back.meta.adapters[0].tokens == ((TABLE, tuple(ROWS)),)
  np.testing.assert_array_equal(back.adapters["default"]["trainable_tokens"][TABLE],
                                lora.adapters["default"]["trainable_tokens"][TABLE])
  mesh = jax.make_mesh((1,), ("model",))
  specs = jax.tree.map(lambda x: None, params)
  specs["params"]["wte"]["embedding"] = jax.sharding.PartitionSpec(None, "model")
  sh = lojax.lora_shardings(lora, specs, mesh=mesh)
  assert sh.adapters["default"]["trainable_tokens"][TABLE].spec == jax.sharding.PartitionSpec(
      None, "model")
  tx = lojax.loraplus(optax.sgd, lora, learning_rate=1.0, loraplus_lr_ratio=4.0)
  grads = jax.tree.map(jnp.ones_like, lora.trainable)
  upd, _ = tx.update(grads, tx.init(lora.trainable), lora.trainable)
  # PEFT's rule: trainable_tokens_delta is neither lora_B nor 1-D: lora_A's learning rate
  assert np.all(np.asarray(upd["default"]["trainable_tokens"][TABLE]) == -1.0)


def test_refusals():
  model, params = _tied()
  with pytest.raises(ValueError, match="LoRA target and has trainable tokens"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["wte"], trainable_token_indices=[1]),
               key=jax.random.key(0))
  with pytest.raises(ValueError, match="outside the table's 64 rows"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["c_attn"], trainable_token_indices=[64]),
               key=jax.random.key(0))
  with pytest.raises(ValueError, match="matches no embedding"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["c_attn"],
                                      trainable_token_indices={"wxe": [1]}),
               key=jax.random.key(0))
  two = {"a": {"embedding": jnp.ones((8, 4))}, "b": {"embedding": jnp.ones((8, 4))},
         "q": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match="input embedding is not clear"):
    lojax.wrap(two, lojax.LoraSpec(target_modules=["q"], trainable_token_indices=[1]),
               key=jax.random.key(0))
  with pytest.raises(ValueError, match="repeats rows"):
    lojax.LoraSpec(target_modules=["q"], trainable_token_indices=[1, 1])
  with pytest.raises(ValueError, match="cannot be weighted"):
    lora = _wrapped(model, params)
    lojax.add_weighted_adapter(lora, ["default"], [1.0], "mix")
