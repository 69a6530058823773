"""Shardings of LoRA trees and optimizer states; sharded training on 8 fake devices.

The rule is checked on an abstract (2, 4) mesh in-process; the sharded
training step, the collective bytes and the Orbax round trip run in
``sharding_check.py`` subprocesses, because the 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) must be set before
jax is imported.
"""

import ast
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import gpt
import lojax
from lojax._src import paths as lp
from lojax._src import sharding as ls

MESH = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
HERE = pathlib.Path(__file__).resolve().parent


def specs(tree):
  """{path: spec} of a tree of NamedShardings."""
  paths, leaves, _ = ls._flatten_specs(tree)
  return {p: s.spec for p, s in zip(paths, leaves)}


def megatron(params):
  def spec(keypath, x):
    path = lp.render(keypath)
    lead = [None] * (x.ndim - 2)
    if re.search(r"(c_attn|c_fc)/kernel$", path):
      return P(*lead, None, "model")
    if re.search(r"(c_attn|c_fc)/bias$", path):
      return P(*([None] * (x.ndim - 1)), "model")
    if path.endswith("c_proj/kernel"):
      return P(*lead, "model", None)
    if path.endswith("wte/embedding"):
      return P("model", None)
    return None
  return jax.tree_util.tree_map_with_path(spec, params)


def test_dense_rule_bias_and_saved_modules():
  model = gpt.GPT(d=32, layers=1)
  params, ids = gpt.init(model)
  spec = lojax.LoraSpec(r=4, target_modules=["c_attn", "c_proj", "c_fc", "wte"],
                        bias="lora_only", modules_to_save=["ln_f"])
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                    example_args=(ids,))
  got = specs(ls.lora_shardings(lora, megatron(params), mesh=MESH).adapters)
  ad = "default/lora/params/h_0/"
  # Column-parallel c_attn: A [in, r] replicated, B [r, out] split on the output axis.
  assert got[ad + "attn/c_attn/lora_A"] == P()
  assert got[ad + "attn/c_attn/lora_B"] == P(None, "model")
  # Row-parallel c_proj: A split on the input axis, B replicated.
  assert got[ad + "attn/c_proj/lora_A"] == P("model")
  assert got[ad + "mlp/c_proj/lora_B"] == P()
  # Vocab-split embedding [vocab, d]: the looked-up axis is the input side.
  assert got["default/lora/params/wte/lora_A"] == P("model")
  assert got["default/lora/params/wte/lora_B"] == P()
  assert got["default/bias/params/h_0/mlp/c_fc/bias"] == P("model")
  assert got["default/bias/params/h_0/attn/c_proj/bias"] == P()
  assert got["default/modules_to_save/params/ln_f/scale"] == P()


def test_general_kernels_stacked_layers_and_adalora_e():
  model = gpt.GPT(d=32, heads=4, layers=4, scan=True, general=True)
  params, ids = gpt.init(model)
  base = jax.tree_util.tree_map_with_path(
      lambda kp, x: (P("data", None, "model", None) if lp.render(kp).endswith("query/kernel")
                     else P("data", "model", None, None) if lp.render(kp).endswith("out/kernel")
                     else None), params)
  spec = lojax.AdaLoraSpec(init_r=4, target_r=2, total_step=10, target_modules=["query", "out"])
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                    example_args=(ids,))
  got = specs(ls.lora_shardings(lora, base, mesh=MESH).adapters)
  q = "default/lora/params/h/attn/query/"
  o = "default/lora/params/h/attn/out/"
  # query [L, embed, heads, hd]: A [L, embed, r], B [L, r, heads, hd]; E [L, r].
  assert got[q + "lora_A"] == P("data")
  assert got[q + "lora_B"] == P("data", None, "model")
  assert got[q + "lora_E"] == P("data")
  # out [L, heads, hd, embed] (two input axes): A [L, heads, hd, r], B [L, r, embed].
  assert got[o + "lora_A"] == P("data", "model")
  assert got[o + "lora_B"] == P("data")
  assert got["default/adalora_step"] == P()


def test_selected_layers_and_indivisible_axes_are_replicated():
  model = gpt.GPT(d=32, layers=4, scan=True)
  params, ids = gpt.init(model)
  base = jax.tree_util.tree_map_with_path(
      lambda kp, x: P("model", None, "data") if lp.render(kp).endswith("c_fc/kernel") else None,
      params)
  # Layers 0..2 of 4: 3 is not divisible by the 4-way model axis, so that axis replicates.
  spec = lojax.LoraSpec(r=3, target_modules=["c_fc"], layers_to_transform=[0, 1, 2],
                        layers_pattern="h")
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                    example_args=(ids,))
  got = specs(ls.lora_shardings(lora, base, mesh=MESH).adapters)
  assert got["default/lora/params/h/mlp/c_fc/lora_A"] == P()
  assert got["default/lora/params/h/mlp/c_fc/lora_B"] == P(None, None, "data")


def test_conv_kernel():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(8, (3, 3), name="conv")(x)

  x = jnp.ones((2, 6, 6, 4))
  params = Net().init(jax.random.key(0), x)
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["conv"]),
                    key=jax.random.key(1), apply_fn=Net().apply, example_args=(x,))
  base = {"params": {"conv": {"kernel": P(None, None, "data", "model"), "bias": P("model")}}}
  got = specs(ls.lora_shardings(lora, base, mesh=MESH).adapters)
  assert got["default/lora/params/conv/lora_A"] == P(None, None, "data")  # [kh, kw, cin, r]
  assert got["default/lora/params/conv/lora_B"] == P(None, "model")       # [r, cout]


def small_lora():
  params = {"enc": {"d": {"kernel": jnp.ones((8, 12)), "bias": jnp.zeros(12)}}}
  spec = lojax.LoraSpec(r=2, target_modules=["d"], bias="lora_only")
  return params, lojax.wrap(params, spec, key=jax.random.key(0))


def test_replicate_override_shardings_and_partition_specs():
  params, lora = small_lora()
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  named = {"enc": {"d": {"kernel": NamedSharding(mesh, P(None, "model")),
                         "bias": NamedSharding(mesh, P("model"))}}}
  s = ls.lora_shardings(lora, named)  # the mesh comes from the NamedShardings
  assert specs(s.adapters)["default/lora/enc/d/lora_B"] == P(None, "model")
  assert specs(s.base) == {"enc/d/bias": P("model"), "enc/d/kernel": P(None, "model")}
  rep = specs(ls.lora_shardings(lora, named, replicate=True).adapters)
  assert set(rep.values()) == {P()}
  seen = []

  def override(path, sharding):
    seen.append(path)
    return P("data") if path.endswith("lora_A") else None

  got = specs(ls.lora_shardings(lora, named, override=override).adapters)
  assert got["default/lora/enc/d/lora_A"] == P("data")
  assert got["default/lora/enc/d/lora_B"] == P(None, "model")
  assert sorted(seen) == ["default/bias/enc/d/bias", "default/lora/enc/d/lora_A",
                          "default/lora/enc/d/lora_B"]
  # shard() places the tree; values unchanged.
  placed = ls.shard(lora, s)
  assert placed.adapters["default"]["lora"]["enc/d"]["lora_B"].sharding.spec == P(None, "model")


def test_flax_partitioned_boxes():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
      return nn.Dense(12, kernel_init=init, name="d")(x)

  boxed = Net().init(jax.random.key(0), jnp.ones((1, 8)))
  lora = lojax.wrap(nn.unbox(boxed), lojax.LoraSpec(r=2, target_modules=["d"]),
                    key=jax.random.key(1))
  got = specs(ls.lora_shardings(lora, boxed, mesh=MESH).adapters)
  assert got["default/lora/params/d/lora_B"] == P(None, "model")
  assert got["default/lora/params/d/lora_A"] == P()


def test_errors():
  _, lora = small_lora()
  with pytest.raises(ValueError, match=r"no entry for 1 leaf path.*enc/d/bias"):
    ls.lora_shardings(lora, {"enc": {"d": {"kernel": P()}}}, mesh=MESH)
  with pytest.raises(ValueError, match="pass `mesh=`"):
    ls.lora_shardings(lora, {"enc": {"d": {"kernel": P(), "bias": P()}}})
  with pytest.raises(TypeError, match="`base_shardings` at 'enc/d/kernel' is a str"):
    ls.lora_shardings(lora, {"enc": {"d": {"kernel": "model", "bias": P()}}}, mesh=MESH)


def test_opt_state_shardings_adamw_and_adalora():
  model = gpt.GPT(d=32, layers=1)
  params, ids = gpt.init(model)
  spec = lojax.AdaLoraSpec(init_r=4, target_r=2, total_step=10, bias="lora_only",
                           target_modules=["c_attn", "c_proj"])
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                    example_args=(ids,))
  s = ls.lora_shardings(lora, megatron(params), mesh=MESH)
  trainable = specs(s.trainable)
  for tx in (optax.adamw(1e-3), lojax.adalora(optax.adamw(1e-3), spec),
             optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))):
    st = ls.opt_state_shardings(tx, s.trainable, lora.trainable)
    assert jax.tree.structure(st) == jax.tree.structure(jax.eval_shape(tx.init, lora.trainable))
    got = specs(st)
    mirrored = 0
    for path, spec_ in got.items():
      match = [t for t in trainable if path.endswith(t)]
      tail = path.split("/")[-1]
      if match:     # mu / nu mirror the whole trainable tree
        assert spec_ == trainable[match[0]], path
        mirrored += 1
      elif tail in ("lora_A", "lora_B", "lora_E"):   # AdaLoRA's EMAs: {module: factors}
        want = trainable["default/lora/" + path.split("/", 1)[1]]
        assert spec_ == want, path
        mirrored += 1
      else:         # counts, masks, budgets
        assert spec_ == P(), path
    assert mirrored >= 2 * len(trainable)
  ipt = specs(ls.opt_state_shardings(lojax.adalora(optax.adamw(1e-3), spec), s.trainable,
                                     lora.trainable))
  assert ipt["ipt/params/h_0/attn/c_attn/lora_B"] == P(None, "model")
  assert ipt["unc/params/h_0/attn/c_proj/lora_A"] == P("model")
  assert ipt["mask/params/h_0/attn/c_attn"] == P()


def run_checks(*groups):
  env = dict(os.environ, PYTHONPATH=str(HERE.parent))
  return subprocess.Popen([sys.executable, str(HERE / "sharding_check.py"), *groups], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sharded_training_on_8_fake_devices():
  """Same losses/adapters as one device, no hidden weight traffic, Orbax across meshes."""
  # 2 processes for 2 cores; the example (examples/sharded_training.py) runs in the second
  procs = [run_checks("dense", "scan", "qlora"), run_checks("adalora", "example")]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, (out + err)[-4000:]
    assert "ALL OK" in out
    outs.append(out)
  out = "".join(outs)
  checks = [line for line in out.splitlines() if line.startswith("CHECK")]
  assert len([c for c in checks if c.startswith("CHECK equiv")]) == 3
  for line in checks:
    if line.startswith("CHECK equiv"):
      diffs = dict(re.findall(r"(\w+_diff)=([\d.e+-]+)", line))
      assert float(diffs["loss_diff"]) < 5e-5 and float(diffs["state_diff"]) < 5e-5, line
      assert "kept_shardings=True" in line
    if line.startswith("CHECK collectives"):
      g = ast.literal_eval(re.search(r"allgather_kernel_shaped_bytes=(\{.*?\})", line)[1])
      k = ast.literal_eval(re.search(r"all_collectives_kernel_shaped_bytes=(\{.*?\})", line)[1])
      assert g["lora"] <= g["limit"] and k["lora"] <= k["limit"], line
  restored = [c for c in checks if c.startswith("CHECK checkpoint")]
  assert {re.search(r"restored_on=(\(\d, \d\))", c)[1] for c in restored} == {"(4, 2)", "(8, 1)"}
  assert all("max_diff=0.0e+00" in c and "shardings_match=True" in c for c in restored)
  assert "restored onto mesh {'data': 4, 'model': 2}: values identical" in out
  assert "CHECK example sharded_training ok" in out
  # QLoRA with gather_codes_over: the codes are gathered, no decoded kernel (asserted there)
  assert len([c for c in checks if c.startswith("CHECK qlora_gather")]) == 2


def test_dora_magnitude_follows_the_output_axes():
  params, _ = gpt.init(gpt.GPT())
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["c_fc"], use_dora=True),
                    key=jax.random.key(0))
  base = jax.tree_util.tree_map_with_path(
      lambda kp, x: P(None, "model") if "c_fc" in str(kp) and "kernel" in str(kp) else P(),
      params)
  s = lojax.lora_shardings(lora, base, mesh=MESH)
  assert s.adapters["default"]["lora"]["params/h_0/mlp/c_fc"]["lora_magnitude"].spec == P("model")


@pytest.mark.parametrize("method", ["nf4", "nf4-dq", "int8"])
def test_quantized_base_shards_its_stored_arrays(method):
  """A quantized kernel's codes and scales get shardings of their own ranks (a kernel's
  3-axis spec on NF4's [L, blocks] scales could not be placed), following the kernel's
  axes where the layout does; lojax.shard places them."""
  stack = {"h": {"mlp": {"kernel": jax.random.normal(jax.random.key(0), (2, 64, 256))}}}
  def fn(p, x):   # each layer's kernel in a scan: a stacked [L, in, out] kernel
    return jax.lax.scan(lambda c, w: (c, c @ w), x, p["h"]["mlp"]["kernel"])[1]
  lora = lojax.wrap(stack, lojax.LoraSpec(r=2, target_modules=["mlp"]),
                    key=jax.random.key(1), quantize=method, apply_fn=fn,
                    example_args=(jnp.ones((4, 64)),))
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
  shardings = lojax.lora_shardings(lora, {"h": {"mlp": {"kernel": P(None, "fsdp", "tp")}}},
                                   mesh=mesh)
  node = shardings.base["h"]["mlp"]["kernel"]
  got = {n: s.spec for n, s in node.data.items()}
  if method == "int8":
    want = {"codes": P(None, "fsdp", "tp"), "scales": P(None, None, "tp")}
  else:   # NF4 blocks run along the kernel's last axis: codes and scales keep its axes
    want = {"codes": P(None, "fsdp", "tp"), "scales": P(None, "fsdp", "tp")}
    if method == "nf4-dq":   # the quantized scales run row-major over the blocks
      want.update(scales=P(None, "fsdp"), scales_absmax=P(None, "fsdp"),
                  scales_mean=P())
  assert got == want
  placed = lojax.shard(lora, shardings)
  np.testing.assert_array_equal(lojax.merge(placed)["h"]["mlp"]["kernel"],
                                lojax.merge(lora)["h"]["mlp"]["kernel"])


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_gather_codes_over_gathers_the_stored_arrays_where_they_are_decoded(method):
  """``gather_codes_over`` gives each stored array the sharding it has without those mesh
  axes, ``lojax.shard`` carries it to the placed kernel (so the tree matches the shardings
  for jit), and the step computes what it computes without (the collectives themselves are
  checked on 8 devices: sharding_check.py's qlora group)."""
  stack = {"h": {"mlp": {"kernel": jax.random.normal(jax.random.key(0), (2, 64, 256))}}}
  def fn(p, x):
    return jax.lax.scan(lambda c, w: (c, c @ w), x, p["h"]["mlp"]["kernel"])[1]
  x = jnp.ones((4, 64))
  lora = lojax.wrap(stack, lojax.LoraSpec(r=2, target_modules=["mlp"], init_lora_weights=False),
                    key=jax.random.key(1), quantize=method, apply_fn=fn, example_args=(x,))
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
  specs = {"h": {"mlp": {"kernel": P(None, "fsdp", "tp")}}}
  shardings = lojax.lora_shardings(lora, specs, mesh=mesh, gather_codes_over="fsdp")
  node = shardings.base["h"]["mlp"]["kernel"]
  gather = dict(node.gather)
  assert set(gather) == set(node.data)
  for name, (stored, gathered) in gather.items():
    assert stored == node.data[name]
    want = [None if e == "fsdp" else e for e in stored.spec]
    assert tuple(gathered.spec) == tuple(want), (name, stored.spec, gathered.spec)
  placed = lojax.shard(lora, shardings)
  assert placed.base["h"]["mlp"]["kernel"].gather == node.gather
  apply = jax.jit(lojax.lorafy(fn), in_shardings=(shardings, None))
  np.testing.assert_allclose(apply(placed, x), jax.jit(lojax.lorafy(fn))(lora, x), rtol=1e-6)
  with pytest.raises(ValueError, match="gather_codes_over.*'data'.*mesh does not have"):
    lojax.lora_shardings(lora, specs, mesh=mesh, gather_codes_over="data")
