"""lojax on transformers' Flax models (BERT, GPT-2, Llama), unchanged: the checks of
tests/test_model_libraries.py (zero delta at init, training, lorafy == merged, FLOPs within
5% of the frozen limit, no merged-kernel fallback).

transformers dropped Flax in 5.0 and the PEFT oracle needs 5.x, so CI (one environment)
skips these. Run them in an environment of their own:

  python -m venv --system-site-packages .venv-hf
  .venv-hf/bin/pip install --no-deps "transformers==4.57.6"
  .venv-hf/bin/pip install "tokenizers==0.22.2" "huggingface_hub<1.0"
  .venv-hf/bin/python -m pytest -q tests/test_transformers_flax.py
"""

import jax
import jax.numpy as jnp
import pytest

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxBertForMaskedLM"):
  pytest.skip("transformers >= 5 has no Flax models: see this file's docstring",
              allow_module_level=True)

from test_model_libraries import check_model  # noqa: E402

V, B, T = 256, 2, 16


def _ids():
  return jax.random.randint(jax.random.key(1), (B, T), 0, V)


def _fn(model):
  return lambda p, ids: model(ids, params=p).logits


def test_bert_masked_lm():
  """Exact (erf) GELU: the lean path keeps the MLP activation instead of recomputing it."""
  model = transformers.FlaxBertForMaskedLM(transformers.BertConfig(
      vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=128, max_position_embeddings=32), seed=0)
  per_layer = ["attention/self/query", "attention/self/key", "attention/self/value",
               "attention/output/dense", "intermediate/dense", "output/dense"]
  expect = ([f"bert/encoder/layer/{i}/{m}" for i in range(2) for m in per_layer]
            + ["cls/predictions/transform/dense"])   # the decoder is tied to the embedding
  check_model(model.params, _fn(model), _ids(), "bert/embeddings/word_embeddings/embedding",
              expect_targets=expect)


def test_gpt2_lm_head():
  """Conv1D kernels are stored [out, in] and applied as x @ W.T: traced, so A is on the input
  side as in PEFT."""
  model = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32), seed=0)
  expect = [f"transformer/h/{i}/{m}" for i in range(2)
            for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")]
  lora = check_model(model.params, _fn(model), _ids(), "transformer/wte/embedding",
                     expect_targets=expect)
  t = lora.meta.adapter("default").target("transformer/h/0/attn/c_attn")
  assert t.shape == (192, 64) and t.in_axes == (1,)


def test_llama_causal_lm():
  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32), seed=0)
  expect = [f"model/layers/{i}/{m}" for i in range(2)
            for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                      "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")]
  check_model(model.params, _fn(model), _ids(), "model/embed_tokens/embedding",
              expect_targets=expect)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoding_with_init_cache(family):
  """Greedy decoding with transformers' own cache (``init_cache``, ``past_key_values``) in a
  ``lax.scan``: lorafy and the merged params give the same tokens."""
  from test_model_libraries import _check_decoding
  if family == "gpt2":
    model = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32), seed=0)
  else:
    model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32), seed=0)
  size, prompt = 32, _ids()[:, :8]
  mask = jnp.ones((B, size), jnp.int32)

  def apply(p, ids, pos, cache, prefill):
    out = model(ids, attention_mask=mask, position_ids=pos, params=p, past_key_values=cache)
    return out.logits, out.past_key_values

  _check_decoding(model.params, _fn(model), apply, prompt, model.init_cache(B, size))


def test_vit_image_classification():
  """Exact (erf) GELU encoder on images: at the FLOP limit (the lean path keeps the MLP
  activation); zero delta at init, training, lorafy == merged."""
  import warnings

  import numpy as np
  import optax
  from test_model_libraries import _flops
  import lojax
  model = transformers.FlaxViTForImageClassification(transformers.ViTConfig(
      image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=128, num_labels=10), seed=0)
  pixels = jax.random.normal(jax.random.key(1), (4, 3, 32, 32))
  labels = jnp.arange(4) % 10
  fn = lambda p, x: model(x, params=p).logits  # noqa: E731
  loss_of = lambda logits: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      logits, labels).mean()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    lora = lojax.wrap(model.params, lojax.LoraSpec(r=4, lora_alpha=8, target_modules="all-linear"),
                      key=jax.random.key(2), apply_fn=fn, example_args=(pixels,))
    targets = lora.meta.adapter("default").targets
    assert len(targets) == 2 * 6 and lora.meta.adapter("default").heads == ("classifier",)
    np.testing.assert_allclose(jax.jit(lojax.lorafy(fn))(lora, pixels), fn(model.params, pixels),
                               rtol=1e-6, atol=1e-6)
    tx = optax.adam(1e-2)

    def step(lora, opt_state):
      loss, g = jax.value_and_grad(
          lambda t: loss_of(lojax.lorafy(fn)(lora.with_trainable(t), pixels)))(lora.trainable)
      updates, opt_state = tx.update(g, opt_state)
      return optax.apply_updates(lora.trainable, updates), opt_state, loss

    jstep, opt_state, losses = jax.jit(step), tx.init(lora.trainable), []
    for _ in range(6):
      trainable, opt_state, loss = jstep(lora, opt_state)
      lora = lora.with_trainable(trainable)
      losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    np.testing.assert_allclose(jax.jit(lojax.lorafy(fn))(lora, pixels),
                               fn(lojax.merge(lora), pixels), rtol=2e-5, atol=2e-5)
    tokens = 4 * (32 // 8) ** 2 + 4   # patches + the class token, per image
    adapters = sum(6 * tokens * t.r * (t.fan_in + t.fan_out) for t in targets)
    limit = lambda p, x: jax.value_and_grad(lambda x: loss_of(fn(p, x)))(x)  # noqa: E731
    allowance = _flops(limit, model.params, pixels) + adapters
    lora_flops = _flops(step, lora, opt_state)
  assert lora_flops <= 1.05 * allowance, (lora_flops / allowance, lora_flops, allowance)
