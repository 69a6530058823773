"""lojax unchanged on third-party JAX model libraries: tunix (NNX Llama 3, Qwen3 dense and
MoE) and recurrentgemma (linen Griffin). Each test skips without its library; `.ci/run`
installs both (see its comments for why with `--no-deps`).

For each model, small config and random init, with warnings as errors (no merged-kernel
fallback, no layout guess): ``"all-linear"`` finds every projection whatever its leaf name
(``w`` einsums, ``kernel`` linears, MoE expert arrays); zero delta at init; a few jitted
steps lower the loss; lorafy equals the model on merged params; the compiled step's FLOPs
stay within 5% of the frozen limit (gradient w.r.t. the embedding table only) plus the
adapters' own ``6 * tokens * r * (fan_in + fan_out)`` per kernel (and per expert).
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lojax
from lojax._src import paths as P

V, B, T = 256, 2, 16


def _flops(f, *args):
  cost = jax.jit(f).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _set(tree, path, value):
  """``tree`` with the leaf at lojax path ``path`` replaced."""
  paths, leaves, treedef = P.flatten(tree)
  assert path in paths, (path, paths[:5])
  return jax.tree_util.tree_unflatten(treedef, [value if p == path else x
                                                for p, x in zip(paths, leaves)])


def _get(tree, path):
  paths, leaves, _ = P.flatten(tree)
  return leaves[paths.index(path)]


def check_model(params, fn, ids, embed_path, *, expect_targets, tokens_per_expert=None,
                spec=None):
  """The common checks; ``fn(params, ids) -> logits``. Returns the trained LoraParams.

  ``spec`` defaults to r = 4 on ``"all-linear"``; ``tokens_per_expert`` is what one expert
  of an expert kernel sees (for the adapters' FLOPs).
  """
  labels = jnp.roll(ids, -1, axis=1)
  loss_of = lambda logits: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      logits.astype(jnp.float32), labels).mean()
  spec = spec or lojax.LoraSpec(r=4, lora_alpha=8, target_modules="all-linear")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the libraries' own
    lora = lojax.wrap(params, spec, key=jax.random.key(2), apply_fn=fn, example_args=(ids,))
    targets = lora.meta.adapter("default").targets
    assert sorted(t.path for t in targets) == sorted(expect_targets)
    apply = jax.jit(lojax.lorafy(fn))
    # B = 0 at init: the base output (to rounding: a multi-axis einsum runs as one 2-D matmul)
    np.testing.assert_allclose(apply(lora, ids), jax.jit(fn)(params, ids), rtol=1e-6, atol=1e-6)

    tx = optax.adam(1e-2)

    def step(lora, opt_state):
      loss, g = jax.value_and_grad(
          lambda t: loss_of(lojax.lorafy(fn)(lora.with_trainable(t), ids)))(lora.trainable)
      updates, opt_state = tx.update(g, opt_state)
      return optax.apply_updates(lora.trainable, updates), opt_state, loss

    jstep = jax.jit(step)
    opt_state, losses = tx.init(lora.trainable), []
    for _ in range(6):
      trainable, opt_state, loss = jstep(lora, opt_state)
      lora = lora.with_trainable(trainable)
      losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    np.testing.assert_allclose(apply(lora, ids), jax.jit(fn)(lojax.merge(lora), ids),
                               rtol=2e-5, atol=2e-5)

    def limit(params, table):   # params as an argument: constant kernels would fold away
      return jax.value_and_grad(lambda e: loss_of(fn(_set(params, embed_path, e), ids)))(table)

    def adapter_flops(t):
      tokens = ids.size if not t.expert_axes else tokens_per_expert
      return 6 * tokens * t.r * (t.fan_in + t.fan_out) * t.n_experts * (t.n_layers or 1)

    allowance = (_flops(limit, params, _get(params, embed_path))
                 + sum(map(adapter_flops, targets)))
    lora_flops = _flops(step, lora, opt_state)
  assert lora_flops <= 1.05 * allowance, (lora_flops / allowance, lora_flops, allowance)
  return lora


# --------------------------------------------------------------------------
# tunix (NNX): Llama 3 and Qwen3, dense and MoE
# --------------------------------------------------------------------------

def _tunix_fn(model, batch=None, length=None):
  """(state, fn(state, ids) -> logits) of a tunix causal LM over a full causal mask."""
  from flax import nnx
  b, t = batch or B, length or T
  graphdef, state = nnx.split(model)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

  def fn(s, ids):
    return nnx.merge(graphdef, s)(ids, pos, None, mask)[0]

  return state, fn


def _ids():
  return jax.random.randint(jax.random.key(1), (B, T), 0, V)


ATTN = ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj"]
MLP = ["mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "nnx_remat"])
def test_tunix_llama3(remat):
  pytest.importorskip("tunix", reason="tunix: see .ci/run")
  from flax import nnx
  from tunix.models.llama3 import model as llama
  cfg = llama.ModelConfig(num_layers=2, vocab_size=V, embed_dim=64, hidden_dim=128, num_heads=4,
                          head_dim=16, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6,
                          remat_config=llama.RematConfig.BLOCK if remat else
                          llama.RematConfig.NONE)
  state, fn = _tunix_fn(llama.Llama3(cfg, rngs=nnx.Rngs(0)))
  # the four attention einsums hold `w`, the MLP's nnx.Linear `kernel`: all 14 per layer pair
  expect = [f"layers/{i}/{m}" for i in range(2) for m in ATTN + MLP]
  lora = check_model(state, fn, _ids(), "embedder/input_embedding", expect_targets=expect)
  t = lora.meta.adapter("default").target("layers/0/attn/o_proj")
  assert (t.leaf, t.in_axes) == ("w", (0, 1))   # [N, H, D]: heads and head_dim contracted


def test_tunix_qwen3_moe():
  pytest.importorskip("tunix", reason="tunix: see .ci/run")
  from flax import nnx
  from tunix.models.qwen3 import model as qwen
  experts = 4
  cfg = qwen.ModelConfig(num_layers=2, vocab_size=V, embed_dim=64, hidden_dim=128, num_heads=4,
                         head_dim=16, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6,
                         num_experts=experts, num_experts_per_tok=2)
  state, fn = _tunix_fn(qwen.Qwen3(cfg, rngs=nnx.Rngs(0)))
  ids = _ids()
  # "all-linear" takes named kernels (PEFT's Linear modules): attention and the router
  # (PEFT's all-linear adapts a MoE router too); the expert arrays are named explicitly,
  # as with PEFT's target_parameters
  expect = [f"layers/{i}/{m}" for i in range(2) for m in ATTN + ["mlp/router"]]
  lora = check_model(state, fn, ids, "embedder/input_embedding", expect_targets=expect)
  assert lora.meta.adapter("default").target("layers/0/mlp/router").in_axes == (0,)

  # the expert arrays named explicitly: per-expert factors; tunix's CPU path runs every
  # expert on every (masked) token, so B * T tokens per expert
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules=MLP)
  moe = check_model(state, fn, ids, "embedder/input_embedding", spec=spec,
                    expect_targets=[f"layers/{i}/{m}" for i in range(2) for m in MLP],
                    tokens_per_expert=ids.size)
  assert all(t.expert_axes == (0,) and t.in_axes == (1,)
             for t in moe.meta.adapter("default").targets)


# --------------------------------------------------------------------------
# recurrentgemma (linen): Griffin, recurrent and local-attention blocks
# --------------------------------------------------------------------------

def _griffin():
  """A two-block Griffin (recurrent, then local attention)."""
  rg = pytest.importorskip("recurrentgemma.jax", reason="recurrentgemma: see .ci/run")
  from recurrentgemma import common
  cfg = rg.GriffinConfig(vocab_size=V, width=64, mlp_expanded_width=128, num_heads=4,
                         block_types=(common.TemporalBlockType.RECURRENT,
                                      common.TemporalBlockType.ATTENTION),
                         embeddings_scale_by_sqrt_dim=True, attention_window_size=16,
                         logits_soft_cap=30.0)
  return rg.Griffin(cfg)


def test_recurrentgemma_griffin():
  model = _griffin()
  ids = _ids()
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  params = model.init(jax.random.key(0), ids, pos)

  def fn(p, ids):
    return model.apply(p, ids, pos)[0]

  rec = ["linear_x", "linear_y", "linear_out", "rg_lru/a_gate", "rg_lru/input_gate"]
  attn = ["proj_q", "proj_k", "proj_v", "proj_final"]
  expect = ([f"params/blocks.0/recurrent_block/{m}" for m in rec]
            + [f"params/blocks.1/attention_block/{m}" for m in attn]
            + [f"params/blocks.{i}/mlp_block/{m}" for i in range(2) for m in ("ffw_up",
                                                                             "ffw_down")])
  lora = check_model(params, fn, ids, "params/embedder/input_embedding", expect_targets=expect,
                     tokens_per_expert=ids.size)
  meta = lora.meta.adapter("default")
  # the RG-LRU gates are block-diagonal ([heads, block, block], batched over heads): each
  # head's block gets its own factors, so the delta stays block-diagonal
  gate = meta.target("params/blocks.0/recurrent_block/rg_lru/a_gate")
  assert (gate.leaf, gate.expert_axes, gate.in_axes) == ("w", (0,), (1,))
  # ffw_up's `w` [2, D, F] holds the gate and up halves as a free axis: one A, B per half pair
  up = meta.target("params/blocks.0/mlp_block/ffw_up")
  assert (up.expert_axes, up.in_axes) == ((), (1,))
  # layers are indexed `blocks.<i>` inside one path component
  assert math.prod(up.kernel_shape) == 2 * 64 * 128
  one = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules="all-linear",
                                          layers_to_transform=[1]),
                   key=jax.random.key(0), apply_fn=fn, example_args=(ids,))
  assert {t.path.split("/")[1] for t in one.meta.adapter("default").targets} == {"blocks.1"}


# --------------------------------------------------------------------------
# Decoding with each library's own cache, through lorafy
# --------------------------------------------------------------------------

def _greedy(apply, params, prompt, cache, steps):
  """Greedy decoding in a ``lax.scan``: ``apply(params, ids, pos, cache) -> (logits, cache)``."""
  b, p = prompt.shape
  logits, cache = apply(params, prompt, jnp.broadcast_to(jnp.arange(p), (b, p)), cache, True)
  tok = jnp.argmax(logits[:, -1], -1)

  def step(carry, i):
    tok, cache = carry
    logits, cache = apply(params, tok[:, None], jnp.full((b, 1), p + i), cache, False)
    return (jnp.argmax(logits[:, -1], -1), cache), (tok, logits[:, -1])

  _, (toks, logits) = jax.lax.scan(step, (tok, cache), jnp.arange(steps))
  return toks.T, logits


def _check_decoding(params, full, apply, prompt, cache, steps=8):
  """Unmerged adapters (lorafy) and merged params decode the same greedy tokens."""
  spec = lojax.LoraSpec(r=4, target_modules="all-linear", init_lora_weights=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    lora = lojax.wrap(params, spec, key=jax.random.key(2), apply_fn=full,
                      example_args=(prompt,))
    unmerged = jax.jit(lambda lo: _greedy(lojax.lorafy(apply), lo, prompt, cache, steps))(lora)
  merged = jax.jit(lambda p: _greedy(apply, p, prompt, cache, steps))(lojax.merge(lora))
  base = jax.jit(lambda p: _greedy(apply, p, prompt, cache, steps))(params)
  np.testing.assert_array_equal(unmerged[0], merged[0])
  np.testing.assert_allclose(unmerged[1], merged[1], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(unmerged[1]) - np.asarray(base[1])).max() > 1e-3  # adapters act


def test_tunix_llama3_decodes_with_its_kv_cache():
  pytest.importorskip("tunix", reason="tunix: see .ci/run")
  from flax import nnx
  from tunix.models.llama3 import model as llama
  cfg = llama.ModelConfig(num_layers=2, vocab_size=V, embed_dim=64, hidden_dim=128, num_heads=4,
                          head_dim=16, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6)
  graphdef, state = nnx.split(llama.Llama3(cfg, rngs=nnx.Rngs(0)))
  size, prompt = 32, _ids()[:, :8]

  def apply(s, ids, pos, cache, prefill):
    t = ids.shape[1]
    q = pos[:, :, None] if not prefill else jnp.arange(t)[None, :, None]
    mask = jnp.broadcast_to(jnp.arange(size)[None, None, :] <= q, (B, t, size))
    return nnx.merge(graphdef, s)(ids, pos, cache, mask)

  def full(s, ids):
    t = ids.shape[1]
    return nnx.merge(graphdef, s)(ids, jnp.broadcast_to(jnp.arange(t), (B, t)), None,
                                  jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)),
                                                   (B, t, t)))[0]

  shape = (B, size, 2, 16)
  cache = {f"layer_{i}": {"k": jnp.zeros(shape), "v": jnp.zeros(shape),
                          "end_index": jnp.zeros((B,), jnp.int32)} for i in range(2)}
  _check_decoding(state, full, apply, prompt, cache)


def test_recurrentgemma_decodes_with_its_cache():
  griffin = _griffin()
  prompt = _ids()[:, :8]
  pos = jnp.broadcast_to(jnp.arange(8), (B, 8))
  params = griffin.init(jax.random.key(0), prompt, pos)

  def apply(p, ids, pos, cache, prefill):   # the prompt builds the cache (cache=None)
    return griffin.apply(p, ids, pos, None if prefill else cache, return_cache=True)

  def full(p, ids):
    return griffin.apply(p, ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))[0]

  _check_decoding(params, full, apply, prompt, griffin.init_cache(B, jnp.float32))
