"""LoRA training on a mesh with ``AxisType.Explicit`` axes, 8 fake CPU devices.

Run in a subprocess by test_explicit_sharding.py (``XLA_FLAGS`` must be set before jax is
imported). The model is an NNX transformer written for explicit sharding: every matmul
names the sharding of its output (``out_sharding``), tensor-parallel over "model" (N-D
LinearGeneral q/k/v/o kernels, column-parallel up and head, row-parallel o and down) and
data-parallel over "data"; ``scan`` stacks the blocks and runs them with ``nnx.scan``.
``python tests/explicit_check.py [lora] [dora] [scan] [quantized]`` prints one ``CHECK`` line per
check and exits non-zero on the first failure.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import lojax  # noqa: E402
import sharding_check as sc  # noqa: E402
from lojax._src import paths as lp  # noqa: E402

V, D, H, LAYERS, BATCH, SEQ = 128, 64, 4, 2, 8, 10
HD = D // H


def spec(*names):
  """``P(*names)`` under a mesh (``jax.set_mesh``), None without one (a one-device run)."""
  return None if jax.sharding.get_abstract_mesh().empty else P(*names)


class Block(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(D, rngs=rngs)
    self.q, self.k, self.v = (nnx.LinearGeneral(D, (H, HD), rngs=rngs) for _ in range(3))
    self.o = nnx.LinearGeneral((H, HD), D, axis=(-2, -1), rngs=rngs)
    self.ln2 = nnx.LayerNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, 4 * D, rngs=rngs)
    self.down = nnx.Linear(4 * D, D, rngs=rngs)

  def __call__(self, x):
    heads, rows = spec("data", None, "model", None), spec("data", None, None)
    h = self.ln1(x)
    q, k, v = (f(h, out_sharding=heads) for f in (self.q, self.k, self.v))
    s = jnp.einsum("bthd,bshd->bhts", q, k, out_sharding=spec("data", "model", None, None))
    mask = jnp.tril(jnp.ones((SEQ, SEQ), bool))
    p = jax.nn.softmax(jnp.where(mask, s / np.sqrt(HD), -1e9), axis=-1)
    a = jnp.einsum("bhts,bshd->bthd", p, v, out_sharding=heads)
    x = x + self.o(a, out_sharding=rows)
    h = jax.nn.gelu(self.up(self.ln2(x), out_sharding=spec("data", None, "model")))
    return x + self.down(h, out_sharding=rows)


class Model(nnx.Module):
  def __init__(self, rngs, scan=False):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    if scan:   # one stacked Block, its leaves with a leading layer axis
      make = nnx.vmap(Block, in_axes=0, out_axes=0)
      self.blocks = nnx.split_rngs(splits=LAYERS)(make)(rngs)
    else:
      self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
    self.scan = scan
    self.ln_f = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids, out_sharding=spec("data", None, None))
    if self.scan:
      x = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
          x, self.blocks)
    else:
      for block in self.blocks:
        x = block(x)
    # The logits are gathered over "model" for the loss's take_along_axis.
    return self.head(self.ln_f(x), out_sharding=spec("data", None, None))


def tensor_parallel(state):
  """Column-parallel q/k/v (heads), up and head; row-parallel o and down. The head's bias
  is replicated, like the gathered logits it is added to. Stacked layers: the layer axis
  is not split."""

  def rule(keypath, x):
    path = lp.render(keypath)
    if re.search(r"/(q|k|v)/kernel$", path):
      s = (None, "model", None)
    elif re.search(r"/(q|k|v)/bias$", path):
      s = ("model", None)
    elif path.endswith("/o/kernel"):
      s = ("model", None, None)
    elif path.endswith("up/kernel") or path.endswith("head/kernel"):
      s = (None, "model")
    elif path.endswith("up/bias"):
      s = ("model",)
    elif path.endswith("down/kernel"):
      s = ("model", None)
    else:
      return P()
    return P(*([None] * (x.ndim - len(s))), *s)

  return jax.tree_util.tree_map_with_path(rule, state)


def kernel_shapes(base, specs, mesh, stacked=False):
  """Sorted-dims shapes of every kernel (and, ``stacked``, of one layer's), whole and per
  device."""
  sizes = dict(mesh.shape)
  out = set()
  for (kp, x), sp in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(
      specs, is_leaf=lambda v: isinstance(v, P))):
    if not lp.render(kp).endswith(("kernel", "embedding")):
      continue
    shard = tuple(d // (sizes[n] if n else 1) for d, n in
                  zip(x.shape, tuple(sp) + (None,) * (x.ndim - len(sp))))
    for shape in (x.shape, shard):
      out.add(tuple(sorted(shape)))
      if stacked and lp.render(kp).startswith("blocks/"):
        out.add(tuple(sorted(shape[1:])))
  return out


def make_step(graphdef, tx, merged=False):
  """The LoRA training step; ``merged``: through merged kernels ``W + s*A@B`` instead (the
  negative control of the collectives check)."""
  if merged:
    apply = lambda lora, ids: nnx.merge(graphdef, lojax.merge(lora))(ids)
  else:
    apply = lojax.lorafy(lambda st, ids: nnx.merge(graphdef, st)(ids))

  def step(lora, opt_state, ids, targets):
    def loss_fn(trainable):
      logits = apply(lora.with_trainable(trainable), ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss, grads

  return step


def max_diff(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check(name, steps=3):
  graphdef, state = nnx.split(Model(nnx.Rngs(0), scan=name == "scan"))
  ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, V)
  targets = jnp.roll(ids, -1, axis=1)
  dora = name == "dora"   # (DoRA has no embedding form)
  targets_fn = ["q", "k", "v", "o", "up", "down", "head"] + ([] if dora else ["embed"])
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules=targets_fn, use_dora=dora)
  lora = lojax.wrap(state, spec,
                    key=jax.random.key(3), apply_fn=lambda st, x: nnx.merge(graphdef, st)(x),
                    example_args=(ids,))
  # B != 0 so that the adapters change the loss from the first step.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lora.trainable)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  lora = lora.with_trainable(jax.tree_util.tree_unflatten(treedef, [
      x + 0.05 * jax.random.normal(k, x.shape) if lp.render(kp).endswith("lora_B") else x
      for (kp, x), k in zip(leaves, keys)]))
  tx = optax.adamw(1e-2, eps=1e-6)

  ref_step = jax.jit(make_step(graphdef, tx))
  ref, ref_state, ref_losses = lora.trainable, tx.init(lora.trainable), []
  for i in range(steps):
    ref, ref_state, loss, g = ref_step(lora.with_trainable(ref), ref_state, ids, targets)
    if i == 0:
      ref_grads = g
    ref_losses.append(float(loss))

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    shardings = lojax.lora_shardings(lora, tensor_parallel(lora.base), mesh=mesh)
    state_sh = lojax.opt_state_shardings(tx, shardings.trainable, lora.trainable)
    slora = lojax.shard(lora, shardings)
    opt_state = jax.device_put(tx.init(lora.trainable), state_sh)
    data = NamedSharding(mesh, P("data"))
    sids, stargets = jax.device_put(ids, data), jax.device_put(targets, data)
    step = jax.jit(make_step(graphdef, tx))   # shardings come from the arguments' types
    trainable, losses = slora.trainable, []
    for i in range(steps):
      trainable, opt_state, loss, g = step(slora.with_trainable(trainable), opt_state,
                                           sids, stargets)
      if i == 0:
        grads = g
      losses.append(float(loss))
    if name == "lora":
      args = (slora, opt_state, sids, stargets)
      hlo = {m: jax.jit(make_step(graphdef, tx, merged=m)).lower(*args).compile().as_text()
             for m in (False, True)}

  # Gradients and trained leaves come out with their parameters' shardings (typed, not
  # replicated): B of a column-parallel kernel split over "model", A of a row-parallel one.
  want = jax.tree.leaves(shardings.trainable)
  kept = all(x.sharding.is_equivalent_to(s, x.ndim) and gx.sharding.is_equivalent_to(s, x.ndim)
             for x, gx, s in zip(jax.tree.leaves(trainable), jax.tree.leaves(grads), want))
  n_split = sum(not s.is_fully_replicated for s in want)
  loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
  grad_diff = max_diff(grads, ref_grads)
  param_diff = max_diff(trainable, ref)
  print(f"CHECK explicit {name} losses={[round(x, 5) for x in losses]} "
        f"loss_diff={loss_diff:.2e} grad_diff={grad_diff:.2e} param_diff={param_diff:.2e} "
        f"kept_shardings={kept} split_leaves={n_split}", flush=True)
  assert losses[-1] < losses[0] - 1e-3, losses
  assert loss_diff < 5e-5 and grad_diff < 5e-5 and param_diff < 1e-3, name
  assert kept and n_split > 0, name
  if name == "lora":
    # The kernels are split over "model" only, so the frozen model moves no kernel-sized
    # tensor between devices; neither may the LoRA step. Merged kernels do (their full-size
    # gradients are summed over "data"): the check can fail.
    shapes = kernel_shapes(lora.base, tensor_parallel(lora.base), mesh)
    ops = {m: sc.collectives(h) for m, h in hlo.items()}
    moved = {m: sum(b for _, shape, b in o if tuple(sorted(shape)) in shapes)
             for m, o in ops.items()}
    # Nor does the LoRA step reshuffle activations: no all-to-all (the merged step has none;
    # [x | x@A] concatenated along a split axis would add them, see fused.dense).
    shuffles = {m: sum(op == "all-to-all" for op, _, _ in o) for m, o in ops.items()}
    print(f"CHECK explicit collectives kernel_shaped_bytes lora={moved[False]} "
          f"merged={moved[True]} all_to_alls lora={shuffles[False]} "
          f"merged={shuffles[True]}", flush=True)
    assert moved[False] == 0 and moved[True] > 0, moved
    assert shuffles[False] <= shuffles[True], shuffles


def check_hand_quantized():
  """A kernel outside the targets stored with lojax.quantize (used plain and transposed): the
  lorafied step on the Explicit mesh computes what it computes on the decoded float kernel."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  rng = np.random.default_rng(0)
  t = rng.standard_normal((64, 128)).astype(np.float32) * .1
  u = rng.standard_normal((128, 64)).astype(np.float32) * .1
  x = rng.standard_normal((8, 64)).astype(np.float32)
  worst = 0.0
  with jax.set_mesh(mesh):
    for transposed in (False, True):
      rep = NamedSharding(mesh, P())
      stored = lojax.quantize(u.T.copy() if transposed else u, "nf4")
      params = {"t": {"kernel": jax.device_put(t, NamedSharding(mesh, P(None, "model")))},
                "u": {"kernel": jax.device_put(stored, rep)}}

      def f(p, x, transposed=transposed):
        h = jnp.tanh(x @ p["t"]["kernel"])
        w = p["u"]["kernel"].T if transposed else p["u"]["kernel"]
        return jnp.matmul(h, w, out_sharding=P("data", None))

      lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["t"],
                                               init_lora_weights=False), key=jax.random.key(0))
      decoded = lojax.LoraParams(
          jax.tree.map(lojax.dequantize, lora.base,
                       is_leaf=lambda v: isinstance(v, lojax.QuantizedArray)),
          lora.adapters, lora.meta)
      xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
      loss = lambda tr, lo: jnp.sum(lojax.lorafy(f)(lo.with_trainable(tr), xs) ** 2)  # noqa
      got, want = (jax.jit(jax.value_and_grad(loss))(lo.trainable, lo) for lo in (lora, decoded))
      worst = max(worst, max_diff(got, want))
  assert worst < 1e-4, worst
  print(f"CHECK explicit quantized max_diff={worst:.1e}")


def main(argv):
  assert len(jax.devices()) == 8, jax.devices()
  # Every use of an adapted kernel stays factorized: no merged-kernel fallback.
  warnings.filterwarnings("error", message="lojax:")
  for name in argv or ("lora", "dora", "scan", "quantized"):
    check_hand_quantized() if name == "quantized" else check(name)
  print("ALL OK")


if __name__ == "__main__":
  main(sys.argv[1:])
