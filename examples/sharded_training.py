"""lojax sharded training: LoRA on a Megatron-sharded model over a ("data", "model") mesh.

1. A small GPT-style model declares Megatron shardings with
   ``nn.with_partitioning``: the column-parallel kernels (``qkv``, ``fc1``,
   ``lm_head``) split their output axis over ``model``, the row-parallel ones
   (``out``, ``fc2``) their input axis. Its params are created directly on
   the mesh.
2. ``lojax.lora_shardings`` derives the adapters' shardings from those
   annotations (A follows the kernel's input axes, B its output axes, the rank
   axis replicated), ``lojax.opt_state_shardings`` the AdamW state's; one
   jitted step trains with batches split over ``data``, the model lorafied
   with ``split_kernels=True`` for its tensor-parallel kernels.
3. The adapters and optimizer state are saved with Orbax and restored onto a
   mesh of another shape, where training continues.

Runs on 8 fake CPU devices by default (``XLA_FLAGS`` is set before jax is
imported); ``--real-devices`` uses the machine's devices instead. Run with
``python examples/sharded_training.py [--steps 60] [--mesh 2,4]``.
"""

import argparse
import os
import sys

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--steps", type=int, default=60, help="LoRA training steps")
ARGS.add_argument("--mesh", default="2,4", help="data,model mesh shape")
ARGS.add_argument("--real-devices", action="store_true",
                  help="use the real devices instead of 8 fake CPU devices")
ARGS.add_argument("--checkpoint-dir", default=None, help="where to save (default: a temp dir)")

if __name__ == "__main__" and "--real-devices" not in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import inspect  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import lojax  # noqa: E402

from lojax import lora_shardings, opt_state_shardings, shard  # noqa: E402

VOCAB, CONTEXT, BATCH = 256, 32, 16


def dense(features, axes, name):
  """A Dense layer whose kernel is annotated with mesh axes (None: replicated)."""
  kernel = nn.with_partitioning(nn.initializers.lecun_normal(), axes)
  bias = nn.with_partitioning(nn.initializers.zeros_init(), (axes[1],))
  return nn.Dense(features, kernel_init=kernel, bias_init=bias, name=name)


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm(name="ln_1")(x)
    qkv = dense(3 * d, (None, "model"), "qkv")(h)                 # column-parallel
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.heads, d // self.heads), 3, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)
    x = x + dense(d, ("model", None), "out")(o)                    # row-parallel
    h = jax.nn.gelu(dense(4 * d, (None, "model"), "fc1")(nn.LayerNorm(name="ln_2")(x)))
    return x + dense(d, ("model", None), "fc2")(h)


class GPT(nn.Module):
  width: int = 64
  depth: int = 2
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.width, name="wte")(tokens)
    x = x + nn.Embed(CONTEXT, self.width, name="wpe")(jnp.arange(tokens.shape[1]))
    for i in range(self.depth):
      x = Block(self.heads, name=f"h_{i}")(x)
    kernel = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
    return nn.Dense(VOCAB, kernel_init=kernel, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def make_mesh(shape, real_devices):
  devices = jax.devices()
  if np.prod(shape) != len(devices):
    raise SystemExit(f"--mesh {shape} needs {np.prod(shape)} devices; there are "
                     f"{len(devices)}{'' if real_devices else ' fake CPU devices'}.")
  # Auto axes: XLA propagates shardings through the model (jax.make_mesh's default
  # here is Explicit axes, which need a model written for sharding-in-types).
  return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def batches(data, rng):
  while True:
    starts = rng.integers(0, len(data) - CONTEXT - 1, BATCH)
    w = np.stack([data[s:s + CONTEXT + 1] for s in starts])
    yield w[:, :-1], w[:, 1:]


def escape(tree, undo=False):
  """Orbax reads "/" in dict keys as nesting; lojax's module paths contain "/"."""
  if isinstance(tree, dict):
    f = ((lambda k: re.sub(r"~(.)", lambda m: "/" if m[1] == "s" else "~", k)) if undo else
         (lambda k: k.replace("~", "~~").replace("/", "~s")))
    return {f(k): escape(v, undo) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(escape(v, undo) for v in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(escape(v, undo) for v in tree)
  return tree


def setup(model, lora, tx, mesh):
  """Shardings on ``mesh`` and the jitted step that keeps them."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))
  shardings = lora_shardings(lora, boxed, mesh=mesh)  # read the Partitioned boxes
  state_shardings = opt_state_shardings(tx, shardings.trainable, lora.trainable)
  data = NamedSharding(mesh, P("data"))
  # The kernels are split over "model" (tensor parallelism) on an Auto mesh, where a traced
  # kernel does not say so: split_kernels=True runs x@W + (x@A)@B as two matmuls, and the step
  # moves no more activations between devices than the frozen model does.
  apply = lojax.lorafy(model.apply, split_kernels=True)

  def step(lora, opt_state, x, y):
    def loss_fn(trainable):
      logits = apply(lora.with_trainable(trainable), x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss

  step = jax.jit(step, in_shardings=(shardings, state_shardings, data, data),
                 out_shardings=(shardings.trainable, state_shardings, NamedSharding(mesh, P())))
  return shardings, state_shardings, data, step


def train(step, lora, opt_state, data, sharding, steps, rng, label):
  losses = []
  for i, (x, y) in zip(range(steps), batches(data, rng)):
    x, y = jax.device_put(x, sharding), jax.device_put(y, sharding)
    trainable, opt_state, loss = step(lora, opt_state, x, y)
    lora = lora.with_trainable(trainable)
    losses.append(float(loss))
    if i % max(steps // 5, 1) == 0 or i == steps - 1:
      print(f"  [{label}] step {i:4d}  loss {losses[-1]:.3f}")
  return lora, opt_state, losses


def main():
  args = ARGS.parse_args()
  shape = tuple(int(n) for n in args.mesh.split(","))
  mesh = make_mesh(shape, args.real_devices)
  print(f"mesh {dict(mesh.shape)} on {len(jax.devices())} {jax.devices()[0].platform} devices")
  text = "\n".join(inspect.getsource(m) for m in (textwrap, argparse, inspect))
  data = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
  rng = np.random.default_rng(0)

  model = GPT()
  # Create the base params directly on the mesh, from their annotations.
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))
  base_shardings = nn.get_sharding(abstract, mesh)
  params = jax.jit(model.init, out_shardings=base_shardings)(
      jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))
  params = nn.unbox(params)

  spec = lojax.LoraSpec(r=8, lora_alpha=16, target_modules=["qkv", "out", "fc1", "fc2"])
  lora = lojax.wrap(params, spec, key=jax.random.key(1))
  lojax.print_trainable_parameters(lora)
  tx = optax.adamw(1e-2)
  shardings, state_shardings, sharding, step = setup(model, lora, tx, mesh)
  lora = shard(lora, shardings)
  opt_state = jax.device_put(tx.init(lora.trainable), state_shardings)
  for path in ("qkv", "out"):
    ad = lora.trainable["default"]["lora"][f"params/h_0/{path}"]
    print(f"  h_0/{path}: kernel {params['params']['h_0'][path]['kernel'].sharding.spec}, "
          f"lora_A {ad['lora_A'].sharding.spec}, lora_B {ad['lora_B'].sharding.spec}")

  half = args.steps // 2
  lora, opt_state, losses = train(step, lora, opt_state, data, sharding, half, rng, "mesh " +
                                  args.mesh)

  # Save adapters + optimizer state (each process writes its own shards).
  root = pathlib.Path(args.checkpoint_dir or tempfile.mkdtemp()).resolve() / "lora_ckpt"
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(root, escape({"adapters": lora.trainable, "opt_state": opt_state}), force=True)
  ckpt.wait_until_finished()

  # Restore onto a mesh of another shape: give the target shardings, Orbax reshards.
  new_shape = shape[::-1] if shape[0] != shape[1] else (shape[0] * shape[1], 1)
  new_mesh = make_mesh(new_shape, args.real_devices)
  shardings2, state_shardings2, sharding2, step2 = setup(model, lora, tx, new_mesh)
  target = {"adapters": jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), lora.trainable,
      shardings2.trainable),
            "opt_state": jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state,
      state_shardings2)}
  restored = escape(ckpt.restore(root, escape(target)), undo=True)
  ckpt.close()
  same = all(bool(jnp.array_equal(a, b)) for a, b in
             zip(jax.tree.leaves(restored), jax.tree.leaves(lora.trainable)))
  print(f"restored onto mesh {dict(new_mesh.shape)}: values {'identical' if same else 'DIFFER'}")
  lora2 = shard(lora, shardings2).with_trainable(restored["adapters"])
  _, _, more = train(step2, lora2, restored["opt_state"], data, sharding2,
                     args.steps - half, rng, f"mesh {new_shape[0]},{new_shape[1]}")
  print(f"loss {losses[0]:.3f} -> {more[-1]:.3f}")
  if not same or not more[-1] < losses[0]:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
