"""A small GPT-style Flax linen model used across the tests.

GPT-2 names: wte, wpe, h_<i>/{ln_1, attn/{c_attn, c_proj}, ln_2, mlp/{c_fc,
c_proj}}, ln_f, lm_head (absent when embeddings are tied). ``scan=True``
stacks the blocks with ``nn.scan`` (param leaves get a leading layer axis,
paths ``params/h/...``); ``general=True`` uses DenseGeneral q/k/v kernels
``[embed, heads, head_dim]`` and an output kernel ``[heads, head_dim, embed]``.
``perturb`` is added to the embedding output (used to measure the frozen
limit: the gradient w.r.t. it needs no weight gradients).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lojax


class Attention(nn.Module):
  d: int
  heads: int
  general: bool = False

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    hd = self.d // self.heads
    if self.general:
      q = nn.DenseGeneral((self.heads, hd), name="query")(x)
      k = nn.DenseGeneral((self.heads, hd), name="key")(x)
      v = nn.DenseGeneral((self.heads, hd), name="value")(x)
    else:
      qkv = nn.Dense(3 * self.d, name="c_attn")(x)
      q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.heads, hd), 3, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(x.dtype)
    mask = jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    if self.general:
      return nn.DenseGeneral(self.d, axis=(-2, -1), name="out")(o)
    return nn.Dense(self.d, name="c_proj")(o.reshape(b, t, self.d))


class Block(nn.Module):
  d: int
  heads: int
  general: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    x = x + Attention(self.d, self.heads, self.general, name="attn")(nn.LayerNorm(name="ln_1")(x))
    h = nn.LayerNorm(name="ln_2")(x)
    h = nn.Dense(4 * self.d, name="c_fc")(h)
    h = nn.Dense(self.d, name="c_proj")(jax.nn.gelu(h))
    return x + h, None


class MLP(nn.Module):
  d: int

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4 * self.d, name="c_fc")(x)
    return nn.Dense(self.d, name="c_proj")(jax.nn.gelu(h))


class GPTBlock(nn.Module):
  d: int
  heads: int
  general: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    x = x + Attention(self.d, self.heads, self.general, name="attn")(nn.LayerNorm(name="ln_1")(x))
    x = x + MLP(self.d, name="mlp")(nn.LayerNorm(name="ln_2")(x))
    return x, None


class GPT(nn.Module):
  vocab: int = 64
  d: int = 32
  heads: int = 4
  layers: int = 2
  max_len: int = 16
  tied: bool = False
  scan: bool = False
  general: bool = False
  remat: bool = False   # with scan: each block is an nn.remat (jax.checkpoint) of itself

  @nn.compact
  def __call__(self, ids, perturb=None):
    wte = nn.Embed(self.vocab, self.d, name="wte")
    x = wte(ids) + nn.Embed(self.max_len, self.d, name="wpe")(jnp.arange(ids.shape[1]))[None]
    if perturb is not None:
      x = x + perturb
    if self.scan:
      block = nn.remat(GPTBlock) if self.remat else GPTBlock
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=self.layers)
      x, _ = stack(self.d, self.heads, self.general, name="h")(x, None)
    else:
      for i in range(self.layers):
        x, _ = GPTBlock(self.d, self.heads, self.general, name=f"h_{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    if self.tied:
      return wte.attend(x)
    return nn.Dense(self.vocab, use_bias=False, name="lm_head")(x)


def init(model: GPT, batch: int = 2, seq: int = 8, seed: int = 0):
  ids = jax.random.randint(jax.random.key(seed + 1), (batch, seq), 0, model.vocab)
  params = model.init(jax.random.key(seed), ids)
  return params, ids


def step_fns(model, ids):
  """The jitted-step bodies compared here: LoRA (lean or plain path), merged delta, full, limit."""
  apply = lojax.lorafy(model.apply)
  tx = optax.adamw(1e-3)
  labels = jnp.roll(ids, -1, axis=1)

  def loss_of(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def trainable_step(logits_of):
    def step(lora, opt_state, ids):
      loss, grads = jax.value_and_grad(
          lambda t: loss_of(logits_of(lora.with_trainable(t), ids)))(lora.trainable)
      updates, opt_state = tx.update(grads, opt_state, lora.trainable)
      return optax.apply_updates(lora.trainable, updates), opt_state, loss
    return step

  def full_step(params, opt_state, ids):
    loss, grads = jax.value_and_grad(lambda p: loss_of(model.apply(p, ids)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def limit(params, perturb, ids):
    return jax.value_and_grad(lambda q: loss_of(model.apply(params, ids, q)))(perturb)

  return {
      "lora": trainable_step(apply),
      "plain": trainable_step(lojax.lorafy(model.apply, remat=False)),
      # the naive path: W + s*A@B inside the step
      "merged": trainable_step(lambda lo, x: model.apply(lojax.merge(lo), x)),
      "full": full_step, "limit": limit, "tx": tx,
  }
