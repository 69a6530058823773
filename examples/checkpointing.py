"""lojax checkpointing: save adapters while training, survive a kill, resume exactly.

1. Train LoRA adapters on a small GPT-style model (a toy next-token task),
   saving the adapters and the optimizer state every ``--every`` steps with an
   asynchronous :class:`AdapterCheckpointer` that keeps the last 3 steps.
2. "Kill" the run at ``--kill-at`` (the process just stops: nothing is saved
   on the way out).
3. Start again from scratch, as a new process would: initialise the base,
   wrap it, restore the latest checkpoint (adapters + optimizer state) and
   train to ``--steps``. The losses after the restart equal, bit for bit,
   those of an uninterrupted run, which is also trained for comparison.
4. Write the adapters in Hugging Face PEFT's format (adapter_config.json +
   adapter_model.safetensors, GPT-2 module names).

Run with ``python examples/checkpointing.py [--steps 30] [--every 5] [--kill-at 17]``;
files go to ``--out`` (default ``./checkpointing_out``).
"""

import argparse
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lojax
from lojax._src.checkpoint import AdapterCheckpointer
from lojax import GPT2_MAPPING, save_peft

VOCAB, D, HEADS, LAYERS, SEQ, BATCH = 64, 32, 4, 2, 16, 8


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(nn.Dense(3 * d, name="c_attn")(x).reshape(b, t, 3 * HEADS, -1), 3, 2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v).reshape(b, t, d)
    return nn.Dense(d, name="c_proj")(o)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1], name="c_proj")(jax.nn.gelu(nn.Dense(4 * D, name="c_fc")(x)))


class Block(nn.Module):
  """GPT-2's names: ln_1, attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}."""

  @nn.compact
  def __call__(self, x):
    x = x + Attention(name="attn")(nn.LayerNorm(name="ln_1")(x))
    return x + MLP(name="mlp")(nn.LayerNorm(name="ln_2")(x))


class GPT(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, D, name="wte")(ids) + nn.Embed(SEQ, D, name="wpe")(jnp.arange(SEQ))
    for i in range(LAYERS):
      x = Block(name=f"h_{i}")(x)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def batch(step):
  """Toy task: each sequence counts upwards (mod VOCAB) from a random start."""
  start = jax.random.randint(jax.random.key(step), (BATCH, 1), 0, VOCAB)
  ids = (start + jnp.arange(SEQ + 1)) % VOCAB
  return ids[:, :-1], ids[:, 1:]


def setup(model, spec, tx):
  """Everything a fresh process builds before training (or before restoring)."""
  ids, _ = batch(0)
  params = model.init(jax.random.key(0), ids)  # stands for loading pretrained weights
  lora = lojax.wrap(params, spec, key=jax.random.key(1))
  return params, lora, tx.init(lora.trainable)


def make_step(model, tx):
  apply = lojax.lorafy(model.apply)

  def loss_fn(trainable, lora, ids, labels):
    logits = apply(lora.with_trainable(trainable), ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(lora, opt_state, ids, labels):
    loss, grads = jax.value_and_grad(loss_fn)(lora.trainable, lora, ids, labels)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return lora.with_trainable(optax.apply_updates(lora.trainable, updates)), opt_state, loss

  return step


def train(step_fn, lora, opt_state, start, stop, ckpt=None, every=0):
  losses = {}
  for step in range(start, stop):
    lora, opt_state, loss = step_fn(lora, opt_state, *batch(step))
    losses[step + 1] = float(loss)
    if ckpt is not None and (step + 1) % every == 0:
      ckpt.save(step + 1, lora, opt_state=opt_state)  # returns at once; writes in background
  return lora, opt_state, losses


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--every", type=int, default=5)
  ap.add_argument("--kill-at", type=int, default=17)
  ap.add_argument("--out", default="checkpointing_out")
  args = ap.parse_args()
  out = os.path.abspath(args.out)
  shutil.rmtree(out, ignore_errors=True)
  model = GPT()
  spec = lojax.LoraSpec(r=8, lora_alpha=16, target_modules="all-linear")
  tx = optax.adamw(3e-3)
  step_fn = make_step(model, tx)

  # 1-2. Train, checkpointing every N steps; the run dies at --kill-at.
  _, lora, opt_state = setup(model, spec, tx)
  ckpt = AdapterCheckpointer(os.path.join(out, "ckpt"), max_to_keep=3)
  _, _, before = train(step_fn, lora, opt_state, 0, args.kill_at, ckpt, args.every)
  ckpt.wait_until_finished()  # a real kill may lose the step being written; older ones stay
  print(f"killed at step {args.kill_at}; checkpoints on disk: {ckpt.all_steps()}")
  del lora, opt_state, ckpt

  # 3. A new process: fresh base and adapters, then the latest checkpoint.
  _, template, state_template = setup(model, spec, tx)
  ckpt = AdapterCheckpointer(os.path.join(out, "ckpt"), max_to_keep=3)
  resume = ckpt.latest_step()
  lora, opt_state = ckpt.restore(template, opt_state_template=state_template)
  print(f"resumed from step {resume}")
  lora, _, after = train(step_fn, lora, opt_state, resume, args.steps, ckpt, args.every)
  ckpt.close()

  _, lora0, state0 = setup(model, spec, tx)
  _, _, reference = train(step_fn, lora0, state0, 0, args.steps)
  resumed = {**before, **after}
  for s in range(1, args.steps + 1, max(1, args.steps // 10)):
    mark = "<- resumed here" if s == resume + 1 else ""
    print(f"step {s:3d}  loss {resumed[s]:.6f}  uninterrupted {reference[s]:.6f} {mark}")
  same = all(resumed[s] == reference[s] for s in range(resume + 1, args.steps + 1))
  print(f"losses after resuming identical to the uninterrupted run: {same}")

  # 4. PEFT export.
  save_peft(os.path.join(out, "peft"), lora, mapping=GPT2_MAPPING, base_model_name_or_path="gpt2")
  files = sorted(os.listdir(os.path.join(out, "peft")))
  print(f"PEFT adapter written to {os.path.join(out, 'peft')}: {files}")
  if not same:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
