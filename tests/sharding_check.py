"""Sharded-training checks on 8 fake CPU devices (run in a subprocess by test_sharding.py).

``python tests/sharding_check.py [dense] [scan] [adalora] [qlora] [example]``
prints one ``CHECK <name> ...`` line per check with its numbers, and exits
non-zero on the first failure. XLA_FLAGS must be set before jax is imported,
which is why this is a script and not a test module.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import functools  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import gpt  # noqa: E402
import lojax  # noqa: E402
from lojax._src import paths as lp  # noqa: E402
from lojax._src import sharding as ls  # noqa: E402

BATCH, SEQ = 8, 10  # token counts (80, 40 per data shard) unlike any kernel dim


def mesh_of(shape):
  # Auto axes: gpt.py's nn.Dense names no out_sharding, which Explicit axes require of the
  # model itself (explicit_check.py trains a model written for them).
  return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def megatron(params):
  """Column-parallel c_attn/c_fc/lm_head (output axis), row-parallel c_proj (input axis)."""

  def spec(keypath, x):
    path = lp.render(keypath)
    lead = [None] * (x.ndim - 2)
    if re.search(r"(c_attn|c_fc)/kernel$|lm_head/kernel$", path):
      return P(*lead, None, "model")
    if re.search(r"(c_attn|c_fc)/bias$", path):
      return P(*([None] * (x.ndim - 1)), "model")
    if path.endswith("c_proj/kernel"):
      return P(*lead, "model", None)
    return P()

  return jax.tree_util.tree_map_with_path(spec, params)


@functools.cache
def setup(scan, adalora=False):
  # One block for AdaLoRA (its step compiles slowest); two otherwise.
  model = gpt.GPT(vocab=128, d=64, heads=4, layers=1 if adalora else 2, max_len=SEQ, scan=scan)
  params, ids = gpt.init(model, batch=BATCH, seq=SEQ)
  targets = jax.random.randint(jax.random.key(7), ids.shape, 0, model.vocab)
  kw = dict(target_modules=["c_attn", "c_proj", "c_fc"], bias="lora_only",
            modules_to_save=["ln_f"])
  # eps=1e-6: the key part of c_attn's bias has an exactly-zero gradient (softmax
  # ignores a per-query shift); Adam's default eps would blow its ~1e-11 rounding
  # noise, which differs between layouts, up to a full step of either sign.
  opt = optax.adamw(3e-2, eps=1e-6)
  if adalora:
    spec = lojax.AdaLoraSpec(init_r=6, target_r=2, total_step=6, tinit=1, tfinal=1, **kw)
    tx = lojax.adalora(opt, spec)
  else:
    spec = lojax.LoraSpec(r=4, lora_alpha=8, **kw)
    tx = opt
  lora = lojax.wrap(params, spec, key=jax.random.key(3), apply_fn=model.apply,
                    example_args=(ids,))
  # B != 0 so that the adapters change the loss from the first step.
  # (random, not constant: a constant B gives the row-parallel A's a zero gradient,
  # which LayerNorm projects out, and Adam would amplify its rounding noise.)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lora.trainable)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  lora = lora.with_trainable(jax.tree_util.tree_unflatten(treedef, [
      x + 0.05 * jax.random.normal(k, x.shape) if lp.render(kp).endswith("lora_B") else x
      for (kp, x), k in zip(leaves, keys)]))
  return model, params, lora, tx, ids, targets


def make_step(model, tx, split_kernels=False):
  apply = lojax.lorafy(model.apply, split_kernels=split_kernels)

  def step(lora, opt_state, ids, targets):
    def loss_fn(trainable):
      logits = apply(lora.with_trainable(trainable), ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss

  return step


@functools.cache
def sharded_step(scan, adalora, shape, split_kernels=False):
  """(compiled sharded step, lora shardings, opt-state shardings) on a ("data", "model") mesh."""
  model, _, lora, tx, ids, targets = setup(scan, adalora)
  mesh = mesh_of(shape)
  shardings = ls.lora_shardings(lora, megatron(lora.base), mesh=mesh)
  state_sh = ls.opt_state_shardings(tx, shardings.trainable, lora.trainable)
  data = NamedSharding(mesh, P("data"))
  step = jax.jit(make_step(model, tx, split_kernels),
                 in_shardings=(shardings, state_sh, data, data),
                 out_shardings=(shardings.trainable, state_sh, NamedSharding(mesh, P())))
  compiled = step.lower(abstract_tree(lora, shardings),
                        abstract_tree(jax.eval_shape(tx.init, lora.trainable), state_sh),
                        abstract_tree(ids, data), abstract_tree(targets, data)).compile()
  return compiled, shardings, state_sh


def abstract_tree(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def max_diff(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_equiv(scan, adalora, steps=3):
  model, _, lora, tx, ids, targets = setup(scan, adalora)
  ref_step = jax.jit(make_step(model, tx))
  ref_lora, ref_state, ref_losses = lora, tx.init(lora.trainable), []
  for _ in range(steps):
    t, ref_state, loss = ref_step(ref_lora, ref_state, ids, targets)
    ref_lora = ref_lora.with_trainable(t)
    ref_losses.append(float(loss))

  step, shardings, state_sh = sharded_step(scan, adalora, (2, 4))
  mesh = next(iter(jax.tree.leaves(shardings))).mesh
  slora = ls.shard(lora, shardings)
  state = jax.device_put(tx.init(lora.trainable), state_sh)
  data = NamedSharding(mesh, P("data"))
  sids, stargets = jax.device_put(ids, data), jax.device_put(targets, data)
  losses = []
  for _ in range(steps):
    t, state, loss = step(slora, state, sids, stargets)
    slora = slora.with_trainable(t)
    losses.append(float(loss))
  # The trained leaves kept the derived shardings (nothing was silently replicated).
  kept = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in
             zip(jax.tree.leaves(slora.trainable), jax.tree.leaves(shardings.trainable)))
  sharded = [lp.render(kp) for kp, x in jax.tree_util.tree_leaves_with_path(slora.trainable)
             if not x.sharding.is_fully_replicated]
  loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
  param_diff = max_diff(slora.trainable, ref_lora.trainable)
  state_diff = max_diff(state, ref_state)
  name = f"equiv scan={scan} adalora={adalora}"
  print(f"CHECK {name} losses={[round(x, 5) for x in losses]} loss_diff={loss_diff:.2e} "
        f"param_diff={param_diff:.2e} state_diff={state_diff:.2e} kept_shardings={kept} "
        f"sharded_leaves={len(sharded)}", flush=True)
  assert losses[-1] < losses[0] - 1e-3, losses
  # Losses and moments (sums of gradients) agree to float rounding (a different
  # summation order, amplified a little by Adam over the steps); params to well under
  # 1% of one Adam step (lr 3e-2): entries with ~0 gradient amplify rounding most.
  assert loss_diff < 5e-5 and state_diff < 5e-5 and param_diff < 1e-3, name
  assert kept and len(sharded) > 0, name


# --------------------------------------------------------------------------
# Collectives in the compiled HLO
# --------------------------------------------------------------------------

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1,
                "u8": 1, "f64": 8, "s64": 8, "u64": 8}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str):
  """[(op, result shape, bytes)] of every collective in an HLO module text."""
  out = []
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    for dt, dims in _SHAPE.findall(m.group(1)):
      shape = tuple(int(d) for d in dims.split(",") if d)
      out.append((m.group(2), shape, int(np.prod(shape, dtype=np.int64)) * _DTYPE_BYTES.get(dt, 4)))
  return out


def kernel_shapes(params, divisors=(1, 2, 4, 8)):
  """Sorted-dims shapes of every base kernel (per layer and stacked) and of its shards."""
  out = set()
  for kp, x in jax.tree_util.tree_leaves_with_path(params):
    if not lp.render(kp).endswith(("kernel", "embedding")):
      continue
    for shape in {x.shape, x.shape[1:] if x.ndim > 2 else x.shape}:
      for parts in np.ndindex(*([len(divisors)] * len(shape))):
        dims = [d // divisors[i] for d, i in zip(shape, parts) if d % divisors[i] == 0]
        if len(dims) == len(shape):
          out.add(tuple(sorted(dims)))
  return out


def summarize(ops, shapes):
  """{op: (count, bytes, bytes of kernel-shaped tensors)}."""
  out = {}
  for op in COLLECTIVES:
    mine = [(s, b) for o, s, b in ops if o == op]
    big = sum(b for s, b in mine if tuple(sorted(s)) in shapes)
    out[op] = (len(mine), sum(b for _, b in mine), big)
  return out


def check_collectives(scan, control=True):
  model, params, lora, tx, ids, targets = setup(scan)
  step, shardings, state_sh = sharded_step(scan, False, (2, 4))
  mesh = next(iter(jax.tree.leaves(shardings))).mesh
  state = jax.eval_shape(tx.init, lora.trainable)
  abstract = lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)
  data = NamedSharding(mesh, P("data"))
  a_ids, a_t = abstract(ids, data), abstract(targets, data)
  lora_hlo = step.as_text()
  split_hlo = sharded_step(scan, False, (2, 4), split_kernels=True)[0].as_text()

  # The frozen limit: the gradient w.r.t. an additive perturbation of the
  # embedding output; the base model's own forward + backward, no weight grads.
  def limit(params, ids, targets, perturb):
    def loss_fn(perturb):
      logits = model.apply(params, ids, perturb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return jax.value_and_grad(loss_fn)(perturb)

  base_sh = shardings.base
  perturb = jax.ShapeDtypeStruct((BATCH, SEQ, model.d), jnp.float32, sharding=data)
  limit_hlo = jax.jit(limit, in_shardings=(base_sh, data, data, data)).lower(
      jax.tree.map(abstract, params, base_sh), a_ids, a_t, perturb).compile().as_text()
  # Negative control: training through merged kernels (W + s*A@B formed in the step)
  # reduces full-size kernel gradients across the data axis.
  def merged_step(lora, opt_state, ids, targets):
    def loss_fn(trainable):
      logits = model.apply(lojax.merge(lora.with_trainable(trainable)), ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss

  merged_hlo = "" if not control else jax.jit(merged_step, in_shardings=(shardings, state_sh, data, data),
                       out_shardings=(shardings.trainable, state_sh, NamedSharding(mesh, P()))
                       ).lower(jax.tree.map(abstract, lora, shardings),
                               jax.tree.map(abstract, state, state_sh), a_ids, a_t
                               ).compile().as_text()
  shapes = kernel_shapes(params)
  rows = {name: summarize(collectives(h), shapes)
          for name, h in (("lora", lora_hlo), ("split", split_hlo), ("limit", limit_hlo),
                          ("merged", merged_hlo))}
  kernel_bytes = {name: sum(v[2] for v in r.values()) for name, r in rows.items()}
  gather_bytes = {name: r["all-gather"][2] for name, r in rows.items()}
  print(f"CHECK collectives scan={scan} "
        f"allgather_kernel_shaped_bytes={gather_bytes} all_collectives_kernel_shaped_bytes="
        f"{kernel_bytes}", flush=True)
  for name, r in rows.items():
    print("  " + name + ": " + ", ".join(f"{op} n={n} bytes={b} kernel_shaped={k}"
                                         for op, (n, b, k) in r.items()), flush=True)
  shaped = sorted({s for o, s, _ in collectives(lora_hlo) if tuple(sorted(s)) in shapes})
  print(f"  lora kernel-shaped collective results: {shaped}", flush=True)
  assert gather_bytes["lora"] <= gather_bytes["limit"], gather_bytes
  # lorafy(split_kernels=True): two matmuls per kernel; no activation traffic beyond the limit's
  for op in ("all-gather", "all-to-all", "collective-permute"):
    (n, b, _), (n0, b0, _) = rows["split"][op], rows["limit"][op]
    assert n <= n0 and b <= b0, (op, rows["split"], rows["limit"])
  assert kernel_bytes["lora"] <= kernel_bytes["limit"], kernel_bytes
  if control:
    assert kernel_bytes["merged"] > kernel_bytes["limit"], kernel_bytes  # the check can fail


# --------------------------------------------------------------------------
# Orbax checkpoints across mesh shapes
# --------------------------------------------------------------------------

def _map_keys(tree, f):
  if isinstance(tree, dict):
    return {f(k): _map_keys(v, f) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_map_keys(v, f) for v in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(_map_keys(v, f) for v in tree)
  return tree


def escape(tree):
  """Dict keys with "/" (lojax module paths) made safe for Orbax's key paths."""
  return _map_keys(tree, lambda k: k.replace("~", "~~").replace("/", "~s"))


def unescape(tree):
  return _map_keys(tree, lambda k: re.sub(r"~(.)", lambda m: "/" if m[1] == "s" else "~", k))


def check_checkpoint(adalora, meshes=((4, 2), (8, 1)), train_on=None):
  """Adapters + optimizer state saved on a (2, 4) mesh, restored on other mesh shapes."""
  import orbax.checkpoint as ocp

  model, _, lora, tx, ids, targets = setup(False, adalora)
  step, shardings, state_sh = sharded_step(False, adalora, (2, 4))
  saved_on = next(iter(jax.tree.leaves(shardings))).mesh
  slora = ls.shard(lora, shardings)
  state = jax.device_put(tx.init(lora.trainable), state_sh)
  data = NamedSharding(saved_on, P("data"))
  for _ in range(2):
    t, state, _ = step(slora, state, jax.device_put(ids, data), jax.device_put(targets, data))
    slora = slora.with_trainable(t)
  tree = {"adapters": slora.trainable, "opt_state": state}
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "ckpt"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, escape(tree))
    ckpt.wait_until_finished()
    lojax.save_adapters(pathlib.Path(tmp) / "lojax_ckpt", slora, step=2, opt_state=state)
    for shape in meshes:
      mesh = mesh_of(shape)
      sh = ls.lora_shardings(lora, megatron(lora.base), mesh=mesh)
      st_sh = ls.opt_state_shardings(tx, sh.trainable, lora.trainable)
      target = {"adapters": abstract_tree(lora.trainable, sh.trainable),
                "opt_state": abstract_tree(jax.eval_shape(tx.init, lora.trainable), st_sh)}
      restored = unescape(ckpt.restore(path, escape(target)))
      assert jax.tree.structure(restored) == jax.tree.structure(tree)
      same = max_diff(restored, tree)
      on_mesh = all(x.sharding == s.sharding for x, s in
                    zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
      split = sum(1 for x in jax.tree.leaves(restored) if "model" in str(x.sharding.spec))
      loss1 = loss2 = 0.0
      if shape == train_on:  # the restored adapters and state train on the new mesh
        step2 = sharded_step(False, adalora, shape)[0]
        d2 = NamedSharding(mesh, P("data"))
        _, _, loss2 = step2(ls.shard(lora, sh).with_trainable(restored["adapters"]),
                            restored["opt_state"], jax.device_put(ids, d2),
                            jax.device_put(targets, d2))
        _, _, loss1 = step(slora, state, jax.device_put(ids, data),
                           jax.device_put(targets, data))
      print(f"CHECK checkpoint adalora={adalora} saved_on=(2, 4) restored_on={shape} "
            f"max_diff={same:.1e} shardings_match={on_mesh} model_sharded_leaves={split} "
            f"next_loss_diff={abs(float(loss1) - float(loss2)):.1e}", flush=True)
      assert same == 0.0 and on_mesh and split > 0, shape
      assert abs(float(loss1) - float(loss2)) < 1e-5
      # The same through lojax's own checkpoint path.
      lj, lj_state = lojax.restore_adapters(
          pathlib.Path(tmp) / "lojax_ckpt", lora.base, opt_state_template=tx.init(lora.trainable),
          shardings=sh, opt_state_shardings=st_sh)
      lj_tree = {"adapters": lj.trainable, "opt_state": lj_state}
      assert max_diff(lj_tree, tree) == 0.0, shape
      assert all(x.sharding == s.sharding for x, s in
                 zip(jax.tree.leaves(lj_tree), jax.tree.leaves(target))), shape
      print(f"CHECK lojax checkpoint restored_on={shape} ok", flush=True)
    ckpt.close()


def check_example(steps=6):
  """examples/sharded_training.py, in this process (its 8 devices are this process's)."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
  import sharded_training
  argv, sys.argv = sys.argv, ["sharded_training.py", "--steps", str(steps)]
  try:
    sharded_training.main()  # raises SystemExit(1) unless restored values are identical
  finally:                   # and the loss went down
    sys.argv = argv
  print("CHECK example sharded_training ok", flush=True)


def fsdp_tp(params):
  """FSDP x TP: column-parallel kernels split ("data", "model"), row-parallel ("model", "data")."""

  def spec(keypath, x):
    path = lp.render(keypath)
    lead = [None] * (x.ndim - 2)
    if re.search(r"(c_attn|c_fc)/kernel$", path):
      return P(*lead, "data", "model")
    if path.endswith("c_proj/kernel"):
      return P(*lead, "model", "data")
    return P()

  return jax.tree_util.tree_map_with_path(spec, params)


def check_qlora_gather(scan, steps=2):
  """A QLoRA step on an NF4 base split FSDP x TP: with ``gather_codes_over="data"`` its
  all-gathers move the uint8 codes (and scales), no decoded float kernel; without, XLA
  gathers the decoded kernels. Both train exactly as one device does."""
  model, params, _, tx, ids, targets = setup(scan)
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(3), quantize="nf4",
                    apply_fn=model.apply, example_args=(ids,))
  ref_step = jax.jit(make_step(model, tx))
  ref_lora, ref_state = lora, tx.init(lora.trainable)
  for _ in range(steps):
    t, ref_state, ref_loss = ref_step(ref_lora, ref_state, ids, targets)
    ref_lora = ref_lora.with_trainable(t)
  mesh = mesh_of((4, 2))
  data = NamedSharding(mesh, P("data"))
  # per-layer block kernels and their shards (the embeddings and head are not quantized)
  kernels = {tuple(sorted(s)) for kp, x in jax.tree_util.tree_leaves_with_path(params)
             if re.search(r"(c_attn|c_proj|c_fc)/kernel$", lp.render(kp))
             for s in kernel_shapes({"k": {"kernel": x[0] if scan else x}})}
  out = {}
  for over in (None, "data"):
    shardings = ls.lora_shardings(lora, fsdp_tp(params), mesh=mesh, gather_codes_over=over)
    state_sh = ls.opt_state_shardings(tx, shardings.trainable, lora.trainable)
    step = jax.jit(make_step(model, tx), in_shardings=(shardings, state_sh, data, data),
                   out_shardings=(shardings.trainable, state_sh, NamedSharding(mesh, P())))
    slora = ls.shard(lora, shardings)
    state = jax.device_put(tx.init(lora.trainable), state_sh)
    sids, stargets = jax.device_put(ids, data), jax.device_put(targets, data)
    compiled = step.lower(slora, state, sids, stargets).compile()
    hlo, temp = compiled.as_text(), compiled.memory_analysis().temp_size_in_bytes
    for _ in range(steps):
      t, state, loss = step(slora, state, sids, stargets)
      slora = slora.with_trainable(t)
    gathers = [(dt, tuple(int(d) for d in dims.split(",") if d))
               for line in hlo.splitlines() if (m := _OP.search(line)) and m.group(2) == "all-gather"
               for dt, dims in _SHAPE.findall(m.group(1))]
    nbytes = lambda dt, sh: int(np.prod(sh, dtype=np.int64)) * _DTYPE_BYTES.get(dt, 4)  # noqa
    out[over] = dict(
        loss_diff=abs(float(loss) - float(ref_loss)), temp=temp,
        param_diff=max_diff(slora.trainable, ref_lora.trainable),
        float_kernel_gathers=sum(dt == "f32" and tuple(sorted(sh[-2:])) in kernels
                                 for dt, sh in gathers),
        code_gathers=sum(dt == "u8" for dt, _ in gathers),
        gather_bytes=sum(nbytes(dt, sh) for dt, sh in gathers),
        all_reduce_bytes=sum(b for o, _, b in collectives(hlo) if o == "all-reduce"),
        other_bytes=sum(b for o, _, b in collectives(hlo) if o not in ("all-reduce", "all-gather")))
  print(f"CHECK qlora_gather scan={scan} {out}", flush=True)
  for over, r in out.items():
    assert r["loss_diff"] < 5e-5 and r["param_diff"] < 1e-3, (over, r)
  # Gathering codes: no decoded kernel is gathered; the codes are.
  assert out["data"]["float_kernel_gathers"] == 0 and out["data"]["code_gathers"] > 0, out
  assert out[None]["code_gathers"] == 0, out
  assert out["data"]["temp"] <= 1.25 * out[None]["temp"], out   # gathered codes are transient
  if not scan:   # XLA gathers the decoded kernels here, 8x the codes' bytes per value
    assert out[None]["float_kernel_gathers"] > 0, out
    assert out["data"]["gather_bytes"] < out[None]["gather_bytes"], out


GROUPS = {
    "dense": lambda: (check_equiv(scan=False, adalora=False), check_collectives(scan=False)),
    "scan": lambda: check_equiv(scan=True, adalora=False),
    "scan_collectives": lambda: check_collectives(scan=True, control=False),
    "adalora": lambda: (check_equiv(scan=False, adalora=True), check_checkpoint(adalora=True)),
    "qlora": lambda: (check_qlora_gather(scan=False), check_qlora_gather(scan=True)),
    "example": check_example,
}


def main(argv):
  assert len(jax.devices()) == 8, jax.devices()
  for name in argv or ("dense", "scan", "adalora"):
    start = time.perf_counter()
    GROUPS[name]()
    print(f"GROUP {name} {time.perf_counter() - start:.1f} s", flush=True)
  print("ALL OK")


if __name__ == "__main__":
  main(sys.argv[1:])
