"""lojax unchanged on third-party model code (the `models` extra; each test skips without
its library).

For each model: zero delta at init, lorafy == the model on merged params, a few
jitted steps lower the loss, the compiled step's FLOPs stay within 5% of the
frozen limit plus the adapters' own, and no merged-kernel fallback (warnings are
errors here).
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lojax

eqx = pytest.importorskip("equinox", reason="pip install -e '.[models]' (equinox)")

D, T, V, LAYERS = 128, 32, 256, 2  # as tests/test_flops.py: matmuls dominate, as in real models


class Block(eqx.Module):
  attn: eqx.nn.MultiheadAttention
  mlp: eqx.nn.MLP
  ln1: eqx.nn.LayerNorm
  ln2: eqx.nn.LayerNorm

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.attn = eqx.nn.MultiheadAttention(4, D, key=k1)
    self.mlp = eqx.nn.MLP(D, D, 4 * D, 1, activation=jax.nn.gelu, key=k2)
    self.ln1, self.ln2 = eqx.nn.LayerNorm(D), eqx.nn.LayerNorm(D)

  def __call__(self, x):  # x: [T, D]
    h = jax.vmap(self.ln1)(x)
    x = x + self.attn(h, h, h)
    return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))


class LM(eqx.Module):
  embed: eqx.nn.Embedding
  blocks: list
  head: eqx.nn.Linear

  def __init__(self, key):
    keys = jax.random.split(key, LAYERS + 2)
    self.embed = eqx.nn.Embedding(V, D, key=keys[0])
    self.blocks = [Block(k) for k in keys[1:-1]]
    self.head = eqx.nn.Linear(D, V, use_bias=False, key=keys[-1])

  def __call__(self, ids, perturb=None):
    x = jax.vmap(self.embed)(ids)
    if perturb is not None:
      x = x + perturb
    for b in self.blocks:
      x = b(x)
    return jax.vmap(self.head)(x)


class ScanLM(eqx.Module):
  """Scan over layers: the blocks' arrays stacked on a leading axis (eqx.filter_vmap)."""
  embed: eqx.nn.Embedding
  blocks: Block
  head: eqx.nn.Linear

  def __init__(self, key):
    k0, k1, k2 = jax.random.split(key, 3)
    self.embed = eqx.nn.Embedding(V, D, key=k0)
    self.blocks = eqx.filter_vmap(Block)(jax.random.split(k1, LAYERS))
    self.head = eqx.nn.Linear(D, V, use_bias=False, key=k2)

  def __call__(self, ids, perturb=None):
    x = jax.vmap(self.embed)(ids)
    if perturb is not None:
      x = x + perturb
    arrays, static = eqx.partition(self.blocks, eqx.is_array)

    def body(x, layer):
      return eqx.combine(layer, static)(x), None

    x, _ = jax.lax.scan(body, x, arrays)
    return jax.vmap(self.head)(x)


def _batched(model_cls):
  params, static = eqx.partition(model_cls(jax.random.key(0)), eqx.is_array)

  def fn(p, ids, perturb=None):
    m = eqx.combine(p, static)
    if perturb is None:
      return jax.vmap(m)(ids)
    return jax.vmap(m)(ids, perturb)

  return params, fn


def _flops(f, *args):
  cost = jax.jit(f).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("model_cls", [LM, ScanLM], ids=["layers", "scan"])
def test_equinox_transformer(model_cls):
  params, fn = _batched(model_cls)
  ids = jax.random.randint(jax.random.key(1), (4, T), 0, V)
  labels = jnp.roll(ids, -1, axis=1)
  spec = lojax.LoraSpec(r=8, lora_alpha=16, target_modules="all-linear")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no merged-kernel fallback, no layout guess
    lora = lojax.wrap(params, spec, key=jax.random.key(2), apply_fn=fn, example_args=(ids,))
    targets = lora.meta.adapter("default").targets
    # q, k, v, o and the MLP's two layers, per block; the [V, D] head is left out
    assert len(targets) == 6 * (1 if model_cls is ScanLM else LAYERS)
    assert all(t.leaf == "weight" and t.in_axes == (1,) for t in targets)  # [out, in]
    assert all(bool(t.stacked) == (model_cls is ScanLM) for t in targets)
    assert lora.meta.adapter("default").heads == ("head",)
    apply = jax.jit(lojax.lorafy(fn))
    np.testing.assert_array_equal(apply(lora, ids), jax.jit(fn)(params, ids))  # B = 0 at init

    tx = optax.adam(3e-2)
    loss_of = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(lora, opt_state):
      loss, g = jax.value_and_grad(lambda t: loss_of(lojax.lorafy(fn)(lora.with_trainable(t),
                                                                       ids)))(lora.trainable)
      updates, opt_state = tx.update(g, opt_state)
      return optax.apply_updates(lora.trainable, updates), opt_state, loss

    jstep = jax.jit(step)
    opt_state, losses = tx.init(lora.trainable), []
    for _ in range(8):
      trainable, opt_state, loss = jstep(lora, opt_state)
      lora = lora.with_trainable(trainable)
      losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    np.testing.assert_allclose(apply(lora, ids), jax.jit(fn)(lojax.merge(lora), ids), rtol=1e-5,
                               atol=1e-5)

    # FLOPs: the frozen limit (gradient w.r.t. the embedding output only) plus the adapters'
    # own 6 * tokens * r * (d_in + d_out).
    def limit(perturb):
      return jax.value_and_grad(lambda q: loss_of(fn(params, ids, q)))(perturb)

    adapters = sum(6 * ids.size * t.r * (math.prod(t.kernel_shape)
                                         // t.kernel_shape[1] + t.kernel_shape[1])
                   * (t.n_layers or 1) for t in targets)
    lora_flops = _flops(step, lora, opt_state)
    allowance = _flops(limit, jnp.zeros(ids.shape + (D,))) + adapters
    assert lora_flops <= 1.05 * allowance, (lora_flops, allowance)
