"""The benchmark model, as a Flax linen module and as a Flax NNX module.

GPT-style: token + position embeddings, ``layers`` pre-LayerNorm blocks with
causal attention (``attn/c_attn`` fused q/k/v projection, ``attn/c_proj``
output projection) and an MLP (``mlp/c_fc``, ``mlp/c_proj``), a final
LayerNorm and an untied ``lm_head``. Both versions have the same param layout
and compute the same function. ``perturb`` is added to the embedding output:
the gradient with respect to it is the frozen-model limit (forward plus all
input gradients, no weight gradient).
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache



@contextlib.contextmanager
def fresh_compiles():
  """Compiles for real inside: a persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``,
  or the test session's) would make the reported compile times cache reads. The setting is
  restored after, since tests run the scripts in-process. Also a decorator."""
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()   # jax decides once whether the cache is on; ask again
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", cached)
    compilation_cache.reset_cache()

@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 8192
  d: int = 512
  heads: int = 8
  layers: int = 4
  seq: int = 256
  batch: int = 8


def _attend(q, k, v, heads):
  b, t, d = q.shape
  hd = d // heads
  q, k, v = (z.reshape(b, t, heads, hd) for z in (q, k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
  o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
  return o.reshape(b, t, d)


# ----------------------------------------------------------------- linen ---

class _LinenBlock(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x):
    x = x + _LinenAttention(self.cfg, name="attn")(nn.LayerNorm(name="ln_1")(x))
    return x + _LinenMLP(self.cfg, name="mlp")(nn.LayerNorm(name="ln_2")(x))


class _LinenAttention(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, h):
    q, k, v = jnp.split(nn.Dense(3 * self.cfg.d, name="c_attn")(h), 3, axis=-1)
    return nn.Dense(self.cfg.d, name="c_proj")(_attend(q, k, v, self.cfg.heads))


class _LinenMLP(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.cfg.d, name="c_proj")(jax.nn.gelu(nn.Dense(4 * self.cfg.d, name="c_fc")(h)))


def embed(cfg: Config, ids, perturb=None):
  """Token plus position embeddings (linen ``wte`` / ``wpe``, inside a compact module), plus
  the limit rows' ``perturb`` of the embedding output."""
  x = nn.Embed(cfg.vocab, cfg.d, name="wte")(ids)
  x = x + nn.Embed(cfg.seq, cfg.d, name="wpe")(jnp.arange(ids.shape[1]))[None]
  return x if perturb is None else x + perturb


class LinenGPT(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, ids, perturb=None):
    x = embed(self.cfg, ids, perturb)
    for i in range(self.cfg.layers):
      x = _LinenBlock(self.cfg, name=f"h_{i}")(x)
    return nn.Dense(self.cfg.vocab, use_bias=False, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


# ------------------------------------------------------------------- nnx ---

class _NnxAttention(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.heads = cfg.heads
    self.c_attn = nnx.Linear(cfg.d, 3 * cfg.d, rngs=rngs)
    self.c_proj = nnx.Linear(cfg.d, cfg.d, rngs=rngs)

  def __call__(self, h):
    q, k, v = jnp.split(self.c_attn(h), 3, axis=-1)
    return self.c_proj(_attend(q, k, v, self.heads))


class _NnxMLP(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.c_fc = nnx.Linear(cfg.d, 4 * cfg.d, rngs=rngs)
    self.c_proj = nnx.Linear(4 * cfg.d, cfg.d, rngs=rngs)

  def __call__(self, h):
    return self.c_proj(jax.nn.gelu(self.c_fc(h)))


class _NnxBlock(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.ln_1 = nnx.LayerNorm(cfg.d, rngs=rngs)
    self.attn = _NnxAttention(cfg, rngs)
    self.ln_2 = nnx.LayerNorm(cfg.d, rngs=rngs)
    self.mlp = _NnxMLP(cfg, rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class NnxGPT(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.wte = nnx.Embed(cfg.vocab, cfg.d, rngs=rngs)
    self.wpe = nnx.Embed(cfg.seq, cfg.d, rngs=rngs)
    self.h = nnx.List([_NnxBlock(cfg, rngs) for _ in range(cfg.layers)])
    self.ln_f = nnx.LayerNorm(cfg.d, rngs=rngs)
    self.lm_head = nnx.Linear(cfg.d, cfg.vocab, use_bias=False, rngs=rngs)

  def __call__(self, ids, perturb=None):
    x = self.wte(ids) + self.wpe(jnp.arange(ids.shape[1]))[None]
    if perturb is not None:
      x = x + perturb
    for block in self.h:
      x = block(x)
    return self.lm_head(self.ln_f(x))


def batch(cfg: Config, seed: int = 0):
  """Token ids and next-token labels of one batch."""
  ids = jax.random.randint(jax.random.key(seed), (cfg.batch, cfg.seq + 1), 0, cfg.vocab)
  return ids[:, :-1], ids[:, 1:]


def xent(logits, labels):
  """The rows' loss: mean token cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def lora_step(apply, tx):
  """The jitted LoRA training step of the rows (``apply(lora, ids)``): returns only the
  trained part, ``(new_trainable, new_opt_state, loss)``."""

  @jax.jit
  def step(lora, opt_state, ids, labels):
    loss, grads = jax.value_and_grad(
        lambda t: xent(apply(lora.with_trainable(t), ids), labels))(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss

  return step
