"""A small linen T5 (v1.1) in the parameter layout of t5x's minimal T5, for the tests.

t5x (``t5x/examples/t5/network.py``) is what JAX T5 users have; it is not
installed here, so this module rebuilds its forward pass and its param tree
(under ``params``)::

  token_embedder/embedding                 [vocab, embed]  (shared by both stacks)
  encoder/relpos_bias/rel_embedding        [heads, buckets]
  encoder/layers_{i}/pre_attention_layer_norm/scale
  encoder/layers_{i}/attention/{query,key,value}/kernel   [embed, heads * head_dim]
  encoder/layers_{i}/attention/out/kernel                 [heads * head_dim, embed]
  encoder/layers_{i}/pre_mlp_layer_norm/scale
  encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel [embed, mlp];  mlp/wo/kernel [mlp, embed]
  encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding
  decoder/layers_{i}/{pre_self_attention_layer_norm, self_attention,
                      pre_cross_attention_layer_norm, encoder_decoder_attention,
                      pre_mlp_layer_norm, mlp}
  decoder/decoder_norm/scale
  decoder/logits_dense/kernel              [embed, vocab]  (untied head)

t5x's ``DenseGeneral`` stores its kernel flattened to two axes (``embed`` x
``joined_kv``) and reshapes it when called; so do these projections. T5 v1.1:
RMS norm (no mean, no bias), gated-GELU MLP (tanh GELU of ``wi_0`` times
``wi_1``), attention logits not scaled by 1/sqrt(head_dim), a relative position
bias per stack (bidirectional buckets in the encoder, causal in the decoder)
computed once and added in every self-attention layer (transformers computes
it in block 0 and passes it on), none in the cross-attention. No padding
masks: every token attends, as transformers does without ``attention_mask``.

:func:`params_from_torch` builds these params from the safetensors of a
transformers ``T5ForConditionalGeneration`` with the same :class:`T5Config`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab: int = 64
  embed: int = 32
  heads: int = 4
  head_dim: int = 8
  mlp: int = 48
  encoder_layers: int = 2
  decoder_layers: int = 2
  buckets: int = 8
  max_distance: int = 16
  eps: float = 1e-6

  def transformers_kwargs(self) -> dict:
    """The same sizes as keyword arguments of transformers' ``T5Config``."""
    return dict(vocab_size=self.vocab, d_model=self.embed, num_heads=self.heads,
                d_kv=self.head_dim, d_ff=self.mlp, num_layers=self.encoder_layers,
                num_decoder_layers=self.decoder_layers,
                relative_attention_num_buckets=self.buckets,
                relative_attention_max_distance=self.max_distance,
                layer_norm_epsilon=self.eps, feed_forward_proj="gated-gelu", dropout_rate=0.0)


def relative_buckets(q_len: int, k_len: int, *, bidirectional: bool, buckets: int,
                     max_distance: int) -> np.ndarray:
  """T5's bucket of each (query, key) pair, ``[q_len, k_len]`` ints (static).

  The offset ``key - query``: small distances get a bucket each, larger ones
  share logarithmically wider buckets up to ``max_distance``; bidirectional
  buckets give later keys their own half, causal ones clamp later keys to 0.
  """
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  n, base = buckets, np.zeros_like(rel)
  if bidirectional:
    n //= 2
    base = np.where(rel > 0, n, 0)
    dist = np.abs(rel)
  else:
    dist = np.maximum(-rel, 0)
  exact = n // 2
  # float32 as transformers computes it; distances below `exact` are not read from `far`
  ratio = np.maximum(dist, exact).astype(np.float32) / np.float32(exact)
  far = exact + (np.log(ratio) / np.float32(np.log(max_distance / exact))
                 * np.float32(n - exact)).astype(np.int64)
  far = np.minimum(far, n - 1)
  return base + np.where(dist < exact, dist, far)


class RmsNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class RelativePositionBias(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, q_len: int, k_len: int, bidirectional: bool):
    c = self.cfg
    table = self.param("rel_embedding", nn.initializers.normal(1.0), (c.heads, c.buckets))
    idx = relative_buckets(q_len, k_len, bidirectional=bidirectional, buckets=c.buckets,
                           max_distance=c.max_distance)
    onehot = jnp.asarray(idx[None] == np.arange(c.buckets)[:, None, None], table.dtype)
    return jnp.einsum("hn,nqk->hqk", table, onehot)[None]   # [1, heads, q, k]


class Attention(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x, kv, bias):
    c = self.cfg

    def heads(name, y):
      y = nn.Dense(c.heads * c.head_dim, use_bias=False, name=name)(y)
      return y.reshape(*y.shape[:-1], c.heads, c.head_dim)
    q, k, v = heads("query", x), heads("key", kv), heads("value", kv)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)   # T5: no 1/sqrt(head_dim)
    if bias is not None:
      s = s + bias
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    return nn.Dense(x.shape[-1], use_bias=False, name="out")(o.reshape(*o.shape[:2], -1))


class Mlp(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
    gate = jax.nn.gelu(dense(self.cfg.mlp, "wi_0")(x), approximate=True)   # "gelu_new"
    return dense(x.shape[-1], "wo")(gate * dense(self.cfg.mlp, "wi_1")(x))


class EncoderLayer(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x, bias):
    h = RmsNorm(self.cfg.eps, name="pre_attention_layer_norm")(x)
    x = x + Attention(self.cfg, name="attention")(h, h, bias)
    return x + Mlp(self.cfg, name="mlp")(RmsNorm(self.cfg.eps, name="pre_mlp_layer_norm")(x))


class DecoderLayer(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, y, encoded, bias):
    c = self.cfg
    h = RmsNorm(c.eps, name="pre_self_attention_layer_norm")(y)
    y = y + Attention(c, name="self_attention")(h, h, bias)
    h = RmsNorm(c.eps, name="pre_cross_attention_layer_norm")(y)
    y = y + Attention(c, name="encoder_decoder_attention")(h, encoded, None)
    return y + Mlp(c, name="mlp")(RmsNorm(c.eps, name="pre_mlp_layer_norm")(y))


class Encoder(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x):
    t = x.shape[1]
    bias = RelativePositionBias(self.cfg, name="relpos_bias")(t, t, True)
    for i in range(self.cfg.encoder_layers):
      x = EncoderLayer(self.cfg, name=f"layers_{i}")(x, bias)
    return RmsNorm(self.cfg.eps, name="encoder_norm")(x)


class Decoder(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, y, encoded):
    t = y.shape[1]
    bias = RelativePositionBias(self.cfg, name="relpos_bias")(t, t, False)
    bias = jnp.where(jnp.tril(jnp.ones((t, t), bool)), bias, -1e10)
    for i in range(self.cfg.decoder_layers):
      y = DecoderLayer(self.cfg, name=f"layers_{i}")(y, encoded, bias)
    y = RmsNorm(self.cfg.eps, name="decoder_norm")(y)
    return nn.Dense(self.cfg.vocab, use_bias=False, name="logits_dense")(y)


class T5(nn.Module):
  """``T5(cfg).apply(variables, encoder_ids, decoder_ids)``: logits ``[batch, dec_len, vocab]``."""
  cfg: T5Config

  @nn.compact
  def __call__(self, encoder_ids, decoder_ids):
    embed = nn.Embed(self.cfg.vocab, self.cfg.embed, name="token_embedder")
    encoded = Encoder(self.cfg, name="encoder")(embed(encoder_ids))
    return Decoder(self.cfg, name="decoder")(embed(decoder_ids), encoded)


def params_from_torch(tensors, cfg: T5Config) -> dict:
  """The linen variables of :class:`T5` from a ``T5ForConditionalGeneration`` state dict.

  ``tensors``: torch name -> numpy array (``safetensors.numpy.load_file``). The
  head must be untied (``lm_head.weight`` present). Torch ``nn.Linear``
  weights are ``[out, in]``; the Flax kernels ``[in, out]``.
  """
  w = lambda name: np.asarray(tensors[name], np.float32)
  lin = lambda name: w(name + ".weight").T
  norm = lambda name: {"scale": w(name + ".weight")}

  def attention(prefix):
    return {f: {"kernel": lin(f"{prefix}.{t}")}
            for f, t in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))}

  def mlp(prefix):
    return {f: {"kernel": lin(f"{prefix}.DenseReluDense.{f}")} for f in ("wi_0", "wi_1", "wo")}

  def relpos(stack):
    table = w(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    return {"rel_embedding": table.T}   # torch [buckets, heads]

  enc = {"relpos_bias": relpos("encoder"), "encoder_norm": norm("encoder.final_layer_norm")}
  for i in range(cfg.encoder_layers):
    b = f"encoder.block.{i}.layer"
    enc[f"layers_{i}"] = {"pre_attention_layer_norm": norm(f"{b}.0.layer_norm"),
                          "attention": attention(f"{b}.0.SelfAttention"),
                          "pre_mlp_layer_norm": norm(f"{b}.1.layer_norm"),
                          "mlp": mlp(f"{b}.1")}
  dec = {"relpos_bias": relpos("decoder"), "decoder_norm": norm("decoder.final_layer_norm"),
         "logits_dense": {"kernel": lin("lm_head")}}
  for i in range(cfg.decoder_layers):
    b = f"decoder.block.{i}.layer"
    dec[f"layers_{i}"] = {"pre_self_attention_layer_norm": norm(f"{b}.0.layer_norm"),
                          "self_attention": attention(f"{b}.0.SelfAttention"),
                          "pre_cross_attention_layer_norm": norm(f"{b}.1.layer_norm"),
                          "encoder_decoder_attention": attention(f"{b}.1.EncDecAttention"),
                          "pre_mlp_layer_norm": norm(f"{b}.2.layer_norm"),
                          "mlp": mlp(f"{b}.2")}
  params = {"token_embedder": {"embedding": w("shared.weight")}, "encoder": enc, "decoder": dec}
  return {"params": jax.tree.map(jnp.asarray, params)}
