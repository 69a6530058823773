"""AdaLoRA with lojax: ranks move to where they matter, inside the optimizer.

The quickstart's character-level transformer is pretrained on English prose,
then adapted to Python source code with AdaLoRA on every block linear
(``"all-linear"``: attention query/key/value/out and MLP fc1/fc2): each kernel
starts at rank ``--init-r`` and the total budget shrinks on PEFT's cubic
schedule to ``--target-r`` per kernel. There is no allocation call in the loop:
``lojax.adalora(optax.adamw(...), spec)`` is the optimizer, and every update
scores the ranks and masks the least important ones. The loss adds the
orthogonal regulariser ``lojax.adalora_orth_reg`` (PEFT adds it inside the
model). The script prints the per-kernel ranks whenever they change, the
held-out loss (frozen vs AdaLoRA), resizes the adapter to its kept ranks, and
saves a plot of rank over steps per kernel to ``--plot`` (PNG).

Run with ``python examples/adalora.py [--steps 300] [--plot adalora_ranks.png]``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lojax
from quickstart import CharGPT, batches, pretrain, texts, xent


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="AdaLoRA training steps")
  parser.add_argument("--init-r", type=int, default=8, help="initial rank per kernel")
  parser.add_argument("--target-r", type=int, default=2, help="final average rank per kernel")
  parser.add_argument("--pretrain-steps", type=int, default=300, help="full training steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", default="adalora_ranks.png", help="PNG of rank over steps")
  args = parser.parse_args()
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  init_key, lora_key = jax.random.split(jax.random.key(args.seed))

  prose, train, _, (eval_x, eval_y) = texts()

  model = CharGPT()
  params = pretrain(model, jax.jit(model.init)(init_key, eval_x[:1]), prose, args.pretrain_steps, rng)

  T = args.steps
  spec = lojax.AdaLoraSpec(init_r=args.init_r, target_r=args.target_r, lora_alpha=2 * args.init_r,
                           tinit=T // 10, tfinal=T // 5, deltaT=5, total_step=T,
                           target_modules="all-linear", orth_reg_weight=0.1)
  lora = lojax.wrap(params, spec, key=lora_key)
  lojax.print_trainable_parameters(lora)
  apply = lojax.lorafy(model.apply)
  tx = lojax.adalora(optax.adamw(1e-2), spec)   # the optimizer *is* the allocator
  opt_state = tx.init(lora.trainable)

  @jax.jit
  def step(lora, opt_state, x, y):
    def loss_fn(trainable):
      task = xent(apply(lora.with_trainable(trainable), x), y)
      return task + lojax.adalora_orth_reg(trainable, spec=spec)
    loss, grads = jax.value_and_grad(loss_fn)(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss  # trained part only

  history, last = [], None
  bar = tqdm(range(T), desc="AdaLoRA")
  for t, (x, y) in zip(bar, batches(train, rng)):
    trainable, opt_state, loss = step(lora, opt_state, x, y)
    lora = lora.with_trainable(trainable)  # outside jit: the frozen base is never copied
    ranks = lojax.adalora_ranks(opt_state)
    history.append(ranks)
    if ranks != last:
      short = " ".join(f"{p.removeprefix('params/')}={r}" for p, r in ranks.items())
      tqdm.write(f"step {t:4d} budget {lojax.adalora_budget(opt_state):3d}: {short}")
      last = ranks
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

  frozen = xent(jax.jit(model.apply)(params, eval_x), eval_y)
  adapted = xent(jax.jit(apply)(lora, eval_x), eval_y)
  print(f"held-out loss (nats/byte): frozen {frozen:.3f} -> AdaLoRA {adapted:.3f}")
  small = lojax.adalora_resize(lora, opt_state)
  diff = float(jnp.max(jnp.abs(jax.jit(apply)(small, eval_x) - jax.jit(apply)(lora, eval_x))))
  print(f"resized to the kept ranks: {lojax.count_parameters(lora).trainable:,} -> "
        f"{lojax.count_parameters(small).trainable:,} trainable params, max output change "
        f"{diff:.1e}")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 5))
  ax.set_prop_cycle(color=plt.cm.tab20.colors)
  for path in history[0]:
    ax.plot([h[path] for h in history], label=path.removeprefix("params/"), lw=1.2)
  ax.set(xlabel="step", ylabel="kept rank", title="AdaLoRA rank per kernel")
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)
  print(f"plot: {args.plot}; done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
