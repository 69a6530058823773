"""Generate text with LoRA adapters: a KV-cache decoding loop under ``lojax.lorafy``.

1. Pretrain. A small byte-level GPT (the quickstart's texts) is trained in full on
   English prose: standard-library docstrings.
2. Adapt. LoRA adapters on every projection are trained on Python source code.
3. Generate. The same prompts are continued by the frozen model, by the
   model with its adapters applied unmerged (``lojax.lorafy`` of the whole
   decoding loop: one prefill, then a ``lax.scan`` of single-token steps with a
   linen KV cache, ``mutable=["cache"]``) and by the merged model
   (``lojax.merge``, plain params): sampled continuations before and after,
   the number of tokens on which the unmerged and merged greedy continuations
   agree, and greedy tokens per second for both.

The model keeps its KV cache in linen's ``"cache"`` collection: ``decode=True``
appends the new keys and values at ``cache_index`` and attends over the cache.
Run ``python examples/generate.py [--steps 300] [--pretrain-steps 800] [--tokens 56]``
(about a minute on a 2-core CPU). The model was trained on windows of 64 bytes, so
prompt plus continuation stay within 64.
"""

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lojax
from quickstart import VOCAB, batches, pretrain, texts, xent

MAX_LEN = 256                # positions: prompt + generated tokens
PROMPTS = ("def ", "The ")


class Attention(nn.Module):
  """Causal self-attention; with ``decode=True`` it reads and extends a KV cache."""
  heads: int

  @nn.compact
  def __call__(self, x, positions, decode: bool):
    b, t, d = x.shape
    hd = d // self.heads
    q, k, v = jnp.split(nn.Dense(3 * d, name="c_attn")(x).reshape(b, t, 3 * self.heads, hd), 3,
                        axis=2)
    if decode:
      ck = self.variable("cache", "k", jnp.zeros, (b, MAX_LEN, self.heads, hd), x.dtype)
      cv = self.variable("cache", "v", jnp.zeros, (b, MAX_LEN, self.heads, hd), x.dtype)
      start = positions[0, 0]
      k = ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, start, 0, 0))
      v = cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, start, 0, 0))
      mask = jnp.arange(MAX_LEN)[None, :] <= positions[0][:, None]      # [t, MAX_LEN]
    else:
      mask = jnp.tril(jnp.ones((t, t), bool))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    return nn.Dense(d, name="c_proj")(o.reshape(b, t, d))


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x, positions, decode):
    x = x + Attention(self.heads, name="attn")(nn.LayerNorm(name="ln_1")(x), positions, decode)
    h = nn.gelu(nn.Dense(4 * x.shape[-1], name="c_fc")(nn.LayerNorm(name="ln_2")(x)))
    return x + nn.Dense(x.shape[-1], name="c_proj")(h)


class CausalLM(nn.Module):
  """Params: wte, wpe, h_<i>/{ln_1, attn/{c_attn, c_proj}, ln_2, c_fc, c_proj}, ln_f, lm_head."""
  width: int = 96
  depth: int = 3
  heads: int = 4
  vocab: int = VOCAB

  @nn.compact
  def __call__(self, tokens, positions=None, decode: bool = False):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = nn.Embed(self.vocab, self.width, name="wte")(tokens)
    x = x + nn.Embed(MAX_LEN, self.width, name="wpe")(positions)
    for i in range(self.depth):
      x = Block(self.heads, name=f"h_{i}")(x, positions, decode)
    return nn.Dense(self.vocab, use_bias=False, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def empty_cache(model, params, batch: int):
  """A zero KV cache for ``batch`` sequences (its shapes from one abstract decoding call)."""
  ids = jnp.zeros((batch, 1), jnp.int32)
  shapes = jax.eval_shape(lambda p: model.apply(p, ids, ids, decode=True, mutable=["cache"]),
                          params)[1]["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def greedy(model, params, cache, prompt, steps: int, temperature: float = 0.0, key=None):
  """``prompt`` [B, P] continued by ``steps`` tokens: prefill, then a scan of cached steps.

  Greedy (``temperature=0``), else sampled from ``softmax(logits / temperature)`` with
  ``key``. ``params`` is the model's variables dict ({"params": ...}); under
  ``lojax.lorafy`` it holds the adapted kernels, which the scan's body consumes factorized.
  """
  b, p = prompt.shape
  key = jax.random.key(0) if key is None else key

  def pick(logits, i):
    if temperature == 0.0:
      return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    k = jax.random.fold_in(key, i)
    return jax.random.categorical(k, logits[:, -1] / temperature).astype(jnp.int32)

  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  logits, out = model.apply({**params, "cache": cache}, prompt, positions, decode=True,
                            mutable=["cache"])

  def step(carry, _):
    cache, token, pos = carry
    logits, out = model.apply({**params, "cache": cache}, token[:, None],
                              jnp.full((b, 1), pos), decode=True, mutable=["cache"])
    return (out["cache"], pick(logits, pos), pos + 1), token

  _, tokens = jax.lax.scan(step, (out["cache"], pick(logits, p - 1), jnp.int32(p)), None,
                           length=steps)
  return tokens.T                                                         # [B, steps]


def decode_text(prompt: str, tokens) -> str:
  return prompt + bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", "replace")


def tokens_per_second(fn, *args, repeats: int = 3) -> float:
  """Generated tokens per second of ``fn(*args)`` (compiled first; median of ``repeats``)."""
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out.size / float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="LoRA training steps")
  parser.add_argument("--pretrain-steps", type=int, default=800, help="full training steps")
  parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
  parser.add_argument("--tokens", type=int, default=56, help="tokens generated per prompt")
  parser.add_argument("--temperature", type=float, default=0.7, help="for the samples shown")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  init_key, lora_key = jax.random.split(jax.random.key(args.seed))
  prose, code, _, (eval_x, _) = texts()

  model = CausalLM()
  params = jax.jit(model.init)(init_key, eval_x[:1])
  params = pretrain(model, params, prose, args.pretrain_steps, rng)

  spec = lojax.LoraSpec(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
  lora = lojax.wrap(params, spec, key=lora_key)
  lojax.print_trainable_parameters(lora)
  apply = lojax.lorafy(model.apply)
  tx = optax.adamw(5e-3)
  opt_state = tx.init(lora.trainable)

  @jax.jit
  def train_step(lora, opt_state, x, y):
    loss, grads = jax.value_and_grad(
        lambda t: xent(apply(lora.with_trainable(t), x), y))(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss

  bar = tqdm(range(args.steps), desc="LoRA")
  for _, (x, y) in zip(bar, batches(code, rng)):
    trainable, opt_state, loss = train_step(lora, opt_state, x, y)
    lora = lora.with_trainable(trainable)
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

  prompt = np.stack([np.frombuffer(p.encode(), np.uint8) for p in PROMPTS]).astype(np.int32)
  cache = empty_cache(model, params, len(PROMPTS))
  run = functools.partial(greedy, model, steps=args.tokens)
  frozen = jax.jit(run)
  unmerged = jax.jit(lojax.lorafy(run))   # the whole loop: prefill + scan, factorized
  merged_params = lojax.merge(lora)
  sample = functools.partial(run, temperature=args.temperature, key=jax.random.key(args.seed))
  before = jax.jit(sample)(params, cache, prompt)
  after = jax.jit(lojax.lorafy(sample))(lora, cache, prompt)
  for i, p in enumerate(PROMPTS):
    print(f"--- prompt {p!r} (sampled at temperature {args.temperature})\n"
          f"  frozen base: {decode_text(p, before[i])!r}\n"
          f"  with LoRA:   {decode_text(p, after[i])!r}")
  greedy_unmerged = unmerged(lora, cache, prompt)
  greedy_merged = frozen(merged_params, cache, prompt)
  same = int(np.sum(np.cumprod(np.asarray(greedy_unmerged) == np.asarray(greedy_merged),
                               axis=1)))
  print(f"unmerged and merged greedy continuations agree on {same} of "
        f"{greedy_unmerged.size} tokens (up to the first difference in each)")
  tps_unmerged = tokens_per_second(unmerged, lora, cache, prompt)
  tps_merged = tokens_per_second(frozen, merged_params, cache, prompt)
  print(f"tokens/s (batch {len(PROMPTS)}, greedy, KV cache): unmerged {tps_unmerged:,.0f}, "
        f"merged {tps_merged:,.0f} ({tps_merged / tps_unmerged:.2f}x)")
  print(f"done in {time.perf_counter() - start:.0f} s")
  if same != greedy_unmerged.size:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
