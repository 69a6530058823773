"""lojax quickstart: LoRA-fine-tune a small character-level transformer on CPU.

1. Pretrain. A 3-layer GPT-style model that reads UTF-8 bytes is trained in
   full for a few hundred steps on English prose: the docstrings of some
   standard-library modules (``PRETRAIN_MODULES``).
2. Adapt. The pretrained weights are frozen and LoRA adapters (rank ``--rank``,
   on the attention ``query`` and ``value`` projections) are trained for
   ``--steps`` steps on a different text: the Python source code of other
   standard-library modules (``ADAPT_MODULES``). The last 10% of that code (the
   end of functools.py) is held out: no training batch reads it.
3. Report. The held-out loss of the frozen model and of the LoRA model, and the
   largest difference between the factorized LoRA model and the same model with
   the adapters merged into plain params (``lojax.merge``).

Both texts ship with Python, so nothing is downloaded. The numbers vary a
little between Python versions, whose docstrings and sources differ. Run with
``python examples/quickstart.py [--steps 300] [--rank 8] [--seed 0]``.
"""

import argparse
import importlib
import inspect
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lojax

PRETRAIN_MODULES = ("typing", "inspect", "os", "statistics", "difflib", "logging",
                    "argparse", "json", "shutil", "subprocess", "random", "collections")
ADAPT_MODULES = ("textwrap", "heapq", "bisect", "string", "queue", "csv", "fractions",
                 "pprint", "calendar", "functools")
CONTEXT, BATCH, VOCAB = 64, 16, 256  # characters per window, windows per batch, byte values


def docstrings(names):
  """The docstrings of the modules ``names`` and of the public names they define."""
  parts = []
  for name in names:
    module = importlib.import_module(name)
    members = [v for k, v in sorted(vars(module).items())
               if not k.startswith("_") and getattr(v, "__module__", None) == name]
    parts += [inspect.getdoc(obj) for obj in [module] + members]
  text = "\n\n".join(p for p in parts if p)
  if len(text) < 10_000:
    raise SystemExit("Docstrings are missing (python -OO?); run without -OO.")
  return text


def encode(text):
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


class Attention(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, self.heads, d // self.heads)
               for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)  # causal
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return nn.Dense(d, name="out")(out.reshape(b, t, d))


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.heads, name="attn")(nn.LayerNorm(name="ln_1")(x))
    h = nn.gelu(nn.Dense(4 * x.shape[-1], name="fc1")(nn.LayerNorm(name="ln_2")(x)))
    return x + nn.Dense(x.shape[-1], name="fc2")(h)


class CharGPT(nn.Module):
  """Params: wte, wpe, h_<i>/{attn/{query,key,value,out}, fc1, fc2}, ln_f, lm_head."""
  width: int = 80
  depth: int = 3
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.width, name="wte")(tokens)
    x = x + nn.Embed(CONTEXT, self.width, name="wpe")(jnp.arange(tokens.shape[1]))
    for i in range(self.depth):
      x = Block(self.heads, name=f"h_{i}")(x)
    return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def texts():
  """(pretraining prose, adaptation code, held-out code, held-out (inputs, targets))."""
  prose = encode(docstrings(PRETRAIN_MODULES))
  code = encode("\n\n".join(inspect.getsource(importlib.import_module(m)) for m in ADAPT_MODULES))
  split = int(0.9 * len(code))
  train, held_out = code[:split], code[split:]
  n = (len(held_out) - 1) // CONTEXT  # every non-overlapping held-out window
  eval_x = held_out[:n * CONTEXT].reshape(n, CONTEXT)
  eval_y = held_out[1:n * CONTEXT + 1].reshape(n, CONTEXT)
  return prose, train, held_out, (eval_x, eval_y)


def batches(data, rng):
  """Endless (inputs, next-character targets) batches of random windows of ``data``."""
  while True:
    windows = np.stack([data[s:s + CONTEXT + 1]
                        for s in rng.integers(0, len(data) - CONTEXT, BATCH)])
    yield windows[:, :-1], windows[:, 1:]


def xent(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def pretrain(model, params, data, steps, rng):
  """Ordinary full training: every parameter gets a gradient."""
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10, max(steps, 1)))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: xent(model.apply(p, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  bar = tqdm(range(steps), desc="pretrain (full)")
  for _, (x, y) in zip(bar, batches(data, rng)):
    params, opt_state, loss = step(params, opt_state, x, y)
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
  return params


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="LoRA training steps")
  parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
  parser.add_argument("--seed", type=int, default=0, help="seed for init and batches")
  parser.add_argument("--pretrain-steps", type=int, default=300, help="full training steps")
  args = parser.parse_args()
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  init_key, lora_key = jax.random.split(jax.random.key(args.seed))

  prose, train, held_out, (eval_x, eval_y) = texts()
  print(f"pretrain text: {len(prose):,} bytes of docstrings; adapt text: {len(train):,} bytes "
        f"of source code, {len(held_out):,} held out")

  model = CharGPT()
  params = jax.jit(model.init)(init_key, eval_x[:1])  # {"params": {...}}, linen variables
  params = pretrain(model, params, prose, args.pretrain_steps, rng)

  # --- LoRA: freeze `params`, train low-rank adapters on the code -----------
  spec = lojax.LoraSpec(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"])
  lora = lojax.wrap(params, spec, key=lora_key)
  lojax.print_trainable_parameters(lora)
  apply = lojax.lorafy(model.apply)  # apply(lora, x): base + adapters, factorized
  tx = optax.adamw(1e-2)
  opt_state = tx.init(lora.trainable)

  @jax.jit
  def step(lora, opt_state, x, y):
    def loss_fn(trainable):
      return xent(apply(lora.with_trainable(trainable), x), y)
    loss, grads = jax.value_and_grad(loss_fn)(lora.trainable)  # adapters only
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss  # trained part only

  bar = tqdm(range(args.steps), desc="LoRA")
  for _, (x, y) in zip(bar, batches(train, rng)):
    trainable, opt_state, loss = step(lora, opt_state, x, y)
    lora = lora.with_trainable(trainable)  # outside jit: the frozen base is never copied
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

  # --- Report ---------------------------------------------------------------
  forward, lora_forward = jax.jit(model.apply), jax.jit(apply)
  frozen = xent(forward(params, eval_x), eval_y)
  lora_logits = lora_forward(lora, eval_x)
  print(f"held-out loss on unseen code (nats/byte): frozen base {frozen:.3f} -> "
        f"base + LoRA {xent(lora_logits, eval_y):.3f}")
  merged = lojax.merge(lora)  # plain params: W + s * A @ B in every adapted kernel
  diff = float(jnp.max(jnp.abs(lora_logits - forward(merged, eval_x))))
  ok = diff < 1e-3
  print(f"merge check: max |apply(lora, x) - model.apply(merge(lora), x)| = {diff:.2e} "
        f"({'OK: float32 rounding only' if ok else 'MISMATCH'})")
  print(f"done in {time.perf_counter() - start:.0f} s")
  if not ok:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
