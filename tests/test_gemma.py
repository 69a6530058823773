"""lojax on DeepMind's gemma (``gm.nn.Transformer``, linen), unchanged: the checks of
tests/test_model_libraries.py (``"all-linear"`` finds every projection: the attention
``Einsum``s' ``w`` and the MLP's bare ``gating_einsum`` / ``linear`` arrays; zero delta at
init, training, lorafy == merged, FLOPs within 5% of the frozen limit, no fallback).

gemma 3.x pulls in kauldron and TensorFlow and pins what the rest of the suite needs
otherwise, so CI skips this file. Run it in an environment of its own:

  python -m venv --system-site-packages .venv-gemma
  .venv-gemma/bin/pip install --no-deps "gemma==3.3.0" "kauldron==1.4.2" "clu==0.0.12"
  .venv-gemma/bin/pip install tensorflow-cpu lark typeguard einops immutabledict \\
      sentencepiece ml-collections
  .venv-gemma/bin/python -m pytest -q tests/test_gemma.py
"""

import jax
import jax.numpy as jnp
import pytest

gm = pytest.importorskip("gemma.gm", reason="gemma: see this file's docstring")

from test_model_libraries import check_model  # noqa: E402


def test_gemma_transformer():
  from gemma.gm.nn import _modules
  cfg = gm.nn.config.TransformerConfig(
      num_embed=256, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16, num_kv_heads=2,
      final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
      attention_types=(_modules.AttentionType.GLOBAL,) * 2)
  model = gm.nn.Transformer(config=cfg, dtype=jnp.float32)   # gemma's default is bf16
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  params = model.init(jax.random.key(0), ids)
  per_layer = ["attn/q_einsum", "attn/kv_einsum", "attn/attn_vec_einsum",
               "mlp/gating_einsum", "mlp/linear"]
  expect = [f"params/layer_{i}/{m}" for i in range(2) for m in per_layer]
  lora = check_model(params, lambda p, ids: model.apply(p, ids).logits, ids,
                     "params/embedder/input_embedding", expect_targets=expect)
  kv = lora.meta.adapter("default").target("params/layer_0/attn/kv_einsum")
  assert (kv.leaf, kv.in_axes) == ("w", (2,))   # [2, K, D, H]: k and v share A over D


def test_gemma_decodes_with_its_cache():
  """Greedy decoding with gemma's own cache (``config.init_cache``) in a ``lax.scan``: lorafy
  and the merged params give the same tokens."""
  from gemma.gm.nn import _modules
  from test_model_libraries import _check_decoding
  cfg = gm.nn.config.TransformerConfig(
      num_embed=256, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16, num_kv_heads=2,
      final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
      attention_types=(_modules.AttentionType.GLOBAL,) * 2)
  model = gm.nn.Transformer(config=cfg, dtype=jnp.float32)
  b, size = 2, 32
  prompt = jax.random.randint(jax.random.key(1), (b, 8), 0, 256)
  params = model.init(jax.random.key(0), prompt)

  def apply(p, ids, pos, cache, prefill):
    t = ids.shape[1]
    q = jnp.arange(t)[None, :, None] if prefill else pos[:, :, None]
    mask = jnp.broadcast_to(jnp.arange(size)[None, None, :] <= q, (b, t, size))
    out = model.apply(p, ids, positions=pos, cache=cache, attention_mask=mask)
    return out.logits, out.cache

  _check_decoding(params, lambda p, ids: model.apply(p, ids).logits, apply, prompt,
                  cfg.init_cache(batch_size=b, dtype=jnp.float32, cache_length=size))
