"""Quantized base kernels: NF4 (with double quantization) and int8."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt
import lojax
from lojax._src import paths as P
from lojax._src import quant

# The NF4 levels as published with QLoRA (Dettmers et al., 2023, appendix E).
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def data(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_nf4_levels_are_the_qlora_levels():
  np.testing.assert_allclose(quant.NF4_LEVELS, PAPER_NF4, atol=5e-7)
  assert quant.NF4_LEVELS[7] == 0.0
  np.testing.assert_allclose(quant.NF4_MAX_ERROR, (1 - 0.6961928) / 2, atol=1e-6)


@pytest.mark.parametrize("method", ["nf4", "nf4-dq"])
def test_nf4_error_per_block(method):
  x = data((3000,)) * np.repeat(np.random.default_rng(1).uniform(0.01, 5, 47), 64)[:3000]
  x = x.astype(np.float32)
  q = quant.quantize(x, method)
  d = np.asarray(quant.dequantize(q))
  n = 47 * 64
  err = np.abs(np.pad(d - x, (0, n - 3000))).reshape(47, 64).max(1)
  absmax = np.abs(np.pad(x, (0, n - 3000))).reshape(47, 64).max(1)
  bound = quant.NF4_MAX_ERROR * absmax
  if method == "nf4-dq":
    # Codes come from the exact absmax; the stored scale s' differs from it by at most
    # (its block's absmax of centred scales) / 254, which adds |absmax - s'| per block.
    scale_err = np.abs(absmax - scales_of(q))
    centred = absmax - absmax.mean()
    assert np.all(scale_err <= np.abs(centred).max() / 254 + 1e-6)
    bound = bound + scale_err
  assert np.all(err <= bound * (1 + 1e-6) + 1e-7), (err - bound).max()
  assert np.all(err > 0.1 * bound)  # the bound is not vacuous


def scales_of(q):
  s = np.asarray(q.data["scales"], np.float32) * (np.asarray(q.data["scales_absmax"])[..., None] / 127)
  return s.reshape(-1)[:q.data["codes"].size // 32] + np.asarray(q.data["scales_mean"])


def test_int8_error_per_output_channel():
  x = (data((3, 40, 24)) * np.linspace(0.1, 3, 24)).astype(np.float32)
  q = quant.quantize(x, "int8", in_axes=(0, 1))
  assert q.data["codes"].dtype == jnp.int8 and q.data["codes"].shape == (3, 40, 24)
  assert q.data["scales"].shape == (1, 1, 24)
  err = np.abs(np.asarray(quant.dequantize(q)) - x).max(axis=(0, 1))
  absmax = np.abs(x).max(axis=(0, 1))
  assert np.all(err <= absmax / 254 * (1 + 1e-5))
  assert np.all(err > absmax / 254 / 4)


def test_packing_round_trip_and_nibble_order():
  rng = np.random.default_rng(2)
  idx = rng.integers(0, 16, (5, 128))
  idx[:, 0] = 15  # every block's absmax is 1 exactly (one block of 64 holds a level +1)
  idx[:, 64] = 0  # ... and -1
  x = quant.NF4_LEVELS[idx] * np.array([1, 2, 3, 4, 5], np.float32)[:, None]
  q = quant.quantize(x, "nf4")
  codes = np.asarray(q.data["codes"]).reshape(-1)
  flat = idx.reshape(-1)
  np.testing.assert_array_equal(codes & 15, flat[0::2])
  np.testing.assert_array_equal(codes >> 4, flat[1::2])
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), x)


def test_shapes_dtypes_and_padding():
  x = data((10, 7))  # 70 values: two blocks, the second padded
  q = quant.quantize(jnp.asarray(x, jnp.bfloat16), "nf4")
  assert q.data["codes"].shape == (2, 32) and q.data["codes"].dtype == jnp.uint8
  assert q.data["scales"].shape == (2,) and q.data["scales"].dtype == jnp.float32
  assert q.shape == (10, 7) and q.dtype == jnp.bfloat16
  assert quant.dequantize(q).dtype == jnp.bfloat16
  assert quant.dequantize(q, jnp.float32).shape == (10, 7)
  dq = quant.quantize(data((300, 64)), "nf4-dq")
  assert dq.data["scales"].shape == (2, 256) and dq.data["scales"].dtype == jnp.int8
  assert dq.data["scales_absmax"].shape == (2,) and dq.data["scales_mean"].shape == ()


def test_stacked_kernels_are_quantized_per_layer():
  x = data((3, 10, 7))  # 70 values per layer: blocks must not cross layers
  q = quant.quantize(x, "nf4-dq", stacked=True)
  assert q.data["codes"].shape == (3, 2, 32)
  for layer in range(3):
    one = quant.quantize(x[layer], "nf4-dq")
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q))[layer],
                                  np.asarray(quant.dequantize(one)))


@pytest.mark.parametrize("method", ["nf4", "nf4-dq"])
def test_nf4_blocks_run_along_the_last_axis_in_the_kernels_axes(method):
  """With 64 dividing the last axis, the stored arrays keep the kernel's axes (so they can be
  sharded like it): codes [L, ..., last/64, 32], scales [L, ..., last/64], each block a run of
  64 values along the last axis, checked against the blocks written out in NumPy; the same
  bytes decode from the flat layout too (arrays stored before)."""
  x = data((2, 6, 3, 128)) * np.random.default_rng(3).uniform(0.1, 4, (2, 6, 3, 1))
  q = quant.quantize(x.astype(np.float32), method, stacked=True)
  assert q.data["codes"].shape == (2, 6, 3, 2, 32)
  blocks = x.reshape(2, 6, 3, 2, 64)
  absmax = np.abs(blocks).max(-1)
  idx = np.abs(blocks[..., None] / absmax[..., None, None] - PAPER_NF4).argmin(-1)
  codes = np.asarray(q.data["codes"]).astype(np.int64)
  np.testing.assert_array_equal(codes & 15, idx[..., 0::2])
  np.testing.assert_array_equal(codes >> 4, idx[..., 1::2])
  if method == "nf4":
    assert q.data["scales"].shape == (2, 6, 3, 2)
    np.testing.assert_array_equal(np.asarray(q.data["scales"]), absmax.astype(np.float32))
    scale = absmax
  else:   # int8 scales in blocks of 256 over each layer's 36 block absmaxes, row-major
    assert q.data["scales"].shape == (2, 1, 256)
    scale = np.stack([scales_of(quant.QuantizedArray(
        {k: v[layer] for k, v in q.data.items()}, method=method, shape=x.shape[1:],
        dtype=np.float32)) for layer in range(2)]).reshape(absmax.shape)
  want = (np.asarray(PAPER_NF4, np.float32)[idx] * scale[..., None]).reshape(x.shape)
  got = np.asarray(quant.dequantize(q))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  flat = {k: (v.reshape(2, -1, 32) if k == "codes" else
              v.reshape(2, -1) if (k, method) == ("scales", "nf4") else v)
          for k, v in q.data.items()}
  legacy = quant.QuantizedArray(flat, method=method, shape=x.shape, dtype=np.float32,
                                stacked=True)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(legacy)), got)
  one = quant.QuantizedArray({k: v[1] for k, v in q.data.items()}, method=method,
                             shape=x.shape[1:], dtype=np.float32)   # one layer, as a scan slices
  np.testing.assert_array_equal(np.asarray(quant.dequantize(one)), got[1])


@pytest.mark.parametrize("method", quant.METHODS)
def test_dequantize_under_jit(method):
  q = quant.quantize(data((2, 96, 40)), method, in_axes=(0,), stacked=True)
  eager = np.asarray(quant.dequantize(q))
  # Same arithmetic; XLA may fuse a multiply-add differently (1 ulp).
  np.testing.assert_allclose(np.asarray(jax.jit(quant.dequantize)(q)), eager, rtol=1e-6)
  np.testing.assert_allclose(quant.dequantize_np(q), eager, rtol=1e-6)
  assert jax.eval_shape(quant.dequantize, q).shape == (2, 96, 40)
  out = jax.jit(lambda t: t)(q)  # a pytree: its arrays pass through jit
  assert isinstance(out, quant.QuantizedArray) and out.method == method


def test_nf4_memory_is_at_most_0_16_of_float32():
  x = np.zeros((1024, 1024), np.float32)
  x[::7, ::5] = 1.0
  for method, most in (("nf4", 0.141), ("nf4-dq", 0.13), ("int8", 0.26)):
    assert quant.quantize(x, method).nbytes <= most * x.nbytes, method


@pytest.fixture(scope="module")
def gpt_model():
  m = gpt.GPT()
  params, ids = gpt.init(m)
  return m, params, ids


@pytest.mark.parametrize("method", quant.METHODS)
def test_wrapped_model_uses_dequantized_targets_only(gpt_model, method):
  m, params, ids = gpt_model
  spec = lojax.LoraSpec(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), quantize=method)
  paths, leaves, _ = P.flatten(lora.base)
  quantized = sorted(p for p, x in zip(paths, leaves) if quant.is_quantized(x))
  assert quantized == [f"params/h_{i}/{k}/kernel" for i in (0, 1)
                       for k in ("attn/c_attn", "mlp/c_fc")]  # one leaf per kernel path
  assert lora.base["params"]["lm_head"]["kernel"] is params["params"]["lm_head"]["kernel"]
  deq = jax.tree.map(quant.dequantize, lora.base, is_leaf=quant.is_quantized)
  merged = lojax.merge(lojax.LoraParams(deq, lora.adapters, lora.meta))
  ref = m.apply(merged, ids)
  f = lojax.lorafy(m.apply)
  for out in (f(lora, ids), jax.jit(f)(lora, ids)):
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  # merge dequantizes the base: plain float weights.
  np.testing.assert_allclose(lojax.merge(lora)["params"]["h_0"]["mlp"]["c_fc"]["kernel"],
                             merged["params"]["h_0"]["mlp"]["c_fc"]["kernel"], atol=1e-6)


def test_frozen_leaves_quantized_by_hand_are_decoded_in_the_step(gpt_model):
  """Matrices outside the targets (the token embedding, an untargeted lm_head) stored with
  lojax.quantize before wrap: the step runs on their decoded values, the step's arguments
  hold their codes, and no gradient reaches them."""
  m, params, ids = gpt_model
  p = jax.tree.map(lambda x: x, params)
  wte, head = p["params"]["wte"]["embedding"], p["params"]["lm_head"]["kernel"]
  p["params"]["wte"]["embedding"] = lojax.quantize(wte, "nf4")
  p["params"]["lm_head"]["kernel"] = lojax.quantize(head, "nf4")
  spec = lojax.LoraSpec(r=4, target_modules="all-linear", init_lora_weights=False)
  lora = lojax.wrap(p, spec, key=jax.random.key(0), quantize="nf4")
  assert "params/lm_head" not in {t.path for t in lora.meta.adapters[0].targets}
  deq = jax.tree.map(lambda x: np.asarray(quant.dequantize(x), np.float64) if
                     quant.is_quantized(x) else x, lora.base, is_leaf=quant.is_quantized)
  assert np.abs(deq["params"]["wte"]["embedding"] - wte).max() > 1e-4  # NF4 is lossy
  ref = m.apply(lojax.merge(lojax.LoraParams(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), deq), lora.adapters, lora.meta)), ids)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(m.apply))(lora, ids), ref, rtol=1e-4,
                             atol=1e-4)
  float_lora = lojax.LoraParams(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), deq),
                                lora.adapters, lora.meta)
  loss = lambda lo: lambda t: jnp.mean(lojax.lorafy(m.apply)(lo.with_trainable(t), ids) ** 2)
  g = jax.jit(jax.grad(loss(lora)))(lora.trainable)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(jax.grad(loss(float_lora))(lora.trainable))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # the arguments hold the codes: 4.5 bits per value instead of 32 for both matrices
  step = jax.jit(lambda base, t: jax.grad(loss(lojax.LoraParams(base, lora.adapters,
                                                                 lora.meta)))(t))
  nbytes = lambda base: step.lower(base, lora.trainable).compile().memory_analysis(
  ).argument_size_in_bytes
  saved = nbytes(float_lora.base) - nbytes(lora.base)
  stored = [x for x in jax.tree.leaves(lora.base, is_leaf=quant.is_quantized)
            if quant.is_quantized(x)]
  assert len(stored) == 2 + 4 * 2   # wte, lm_head and the 4 linears of each of the 2 blocks
  assert saved == (1 - 4.5 / 32) * sum(4 * x.size for x in stored)

def test_training_step_with_quantized_base(gpt_model):
  m, params, ids = gpt_model
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules="all-linear"),
                    key=jax.random.key(0), quantize="nf4-dq")
  f = lojax.lorafy(m.apply)

  @jax.jit
  def loss_grad(trainable):
    return jax.value_and_grad(lambda t: jnp.mean(f(lora.with_trainable(t), ids) ** 2))(trainable)

  loss, g = loss_grad(lora.trainable)
  assert np.isfinite(loss)
  gb = g["default"]["lora"]["params/h_0/mlp/c_fc"]["lora_B"]
  assert np.abs(np.asarray(gb)).max() > 0  # B's gradient flows through the dequantized base


def test_quantize_only_when_wrapping_plain_params(gpt_model):
  _, params, _ = gpt_model
  lora = lojax.wrap(params, lojax.LoraSpec(target_modules=["c_fc"]), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"`quantize='int8'` is only for wrapping plain params"):
    lojax.wrap(lora, lojax.LoraSpec(target_modules=["c_attn"]), key=jax.random.key(0),
               adapter_name="second", quantize="int8")


@pytest.mark.parametrize("method", quant.METHODS)
def test_unmerge_gives_back_the_quantized_base(gpt_model, method):
  _, params, _ = gpt_model
  spec = lojax.LoraSpec(r=4, target_modules=["c_attn"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), quantize=method)
  merged = lojax.merge(lora)
  w = merged["params"]["h_0"]["attn"]["c_attn"]["kernel"]
  assert not quant.is_quantized(w)   # merged: plain float weights (for export)
  back = lojax.unmerge(lora, merged)
  for i in (0, 1):
    got = back["params"][f"h_{i}"]["attn"]["c_attn"]["kernel"]
    want = lora.base["params"][f"h_{i}"]["attn"]["c_attn"]["kernel"]
    assert quant.is_quantized(got) and got.method == method and got.shape == want.shape
    # The same stored codes and scales as the base it was merged from (not a float kernel).
    for k, v in want.data.items():
      np.testing.assert_array_equal(np.asarray(got.data[k]), np.asarray(v), err_msg=k)
  assert back["params"]["lm_head"]["kernel"].dtype == jnp.float32
  # Merged params that were changed since: their kernel is quantized anew, like the base.
  changed = jax.tree.map(lambda x: x, merged)
  k = merged["params"]["h_0"]["attn"]["c_attn"]["kernel"]
  changed["params"]["h_0"]["attn"]["c_attn"]["kernel"] = k * 2.0
  got = lojax.unmerge(lora, changed)["params"]["h_0"]["attn"]["c_attn"]["kernel"]
  assert quant.is_quantized(got) and got.method == method
  f = lora.adapters["default"]["lora"]["params/h_0/attn/c_attn"]
  ref = 2.0 * np.asarray(k) - spec.lora_alpha / spec.r * np.asarray(f["lora_A"]) @ np.asarray(
      f["lora_B"])
  err = np.abs(np.asarray(quant.dequantize(got)) - ref).max() / np.abs(ref).max()
  assert err < (0.02 if method == "int8" else 0.2), err


def test_unmerge_of_a_quantized_base_under_jit_says_to_call_it_outside(gpt_model):
  _, params, _ = gpt_model
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["c_attn"]),
                    key=jax.random.key(0), quantize="nf4")
  with pytest.raises(ValueError, match="call lojax.unmerge outside jax.jit"):
    jax.jit(lojax.unmerge)(lora, lojax.merge(lora))


@pytest.mark.parametrize("method", quant.METHODS)
def test_training_on_a_quantized_base_equals_the_dequantized_float_model(method):
  """Loss and adapter gradients against the dense model written out on the dequantized kernels."""
  k = jax.random.split(jax.random.key(3), 4)
  params = {"up": {"kernel": jax.random.normal(k[0], (64, 128)) * 0.1},
            "down": {"kernel": jax.random.normal(k[1], (128, 64)) * 0.1}}
  x = jax.random.normal(k[2], (16, 64))
  y = jax.random.normal(k[3], (16, 64))

  def f(p, x):
    return jax.nn.gelu(x @ p["up"]["kernel"]) @ p["down"]["kernel"]

  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), quantize=method)
  apply = lojax.lorafy(f)
  loss = lambda t: jnp.mean((apply(lora.with_trainable(t), x) - y) ** 2)
  got_loss, got = jax.jit(jax.value_and_grad(loss))(lora.trainable)

  w = {n: np.asarray(quant.dequantize(lora.base[n]["kernel"]), np.float64) for n in params}
  ad = lora.adapters["default"]["lora"]

  def ref_loss(t):   # float64, dense: (W_deq + s A B), written out
    wu = w["up"] + 2.0 * t["up"]["lora_A"] @ t["up"]["lora_B"]
    wd = w["down"] + 2.0 * t["down"]["lora_A"] @ t["down"]["lora_B"]
    out = jax.nn.gelu(np.asarray(x, np.float64) @ wu) @ wd
    return jnp.mean((out - np.asarray(y, np.float64)) ** 2)

  with jax.enable_x64(True):
    t64 = jax.tree.map(lambda z: jnp.asarray(z, jnp.float64), ad)
    want_loss, want = jax.value_and_grad(ref_loss)(t64)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for n in params:
    for part in ("lora_A", "lora_B"):
      np.testing.assert_allclose(got["default"]["lora"][n][part], want[n][part], rtol=2e-4,
                                 atol=1e-6, err_msg=f"{n} {part}")
  # The quantized base is what the model uses: the float kernels would give another loss.
  float_loss = float(jnp.mean((lojax.lorafy(f)(lojax.LoraParams(params, lora.adapters, lora.meta),
                                               x) - y) ** 2))
  assert abs(float_loss - float(got_loss)) > 1e-6


SCAN_REMAT = pytest.mark.parametrize("scan,remat", [(False, False), (True, False), (True, True)],
                                     ids=["unrolled", "scan", "scan_remat"])


def _nf4_and_float_steps(scan, remat, targets, by_hand=lambda path: False):
  """A 4-block GPT wrapped with NF4 ``targets`` (and the kernels ``by_hand(path)`` stored
  with lojax.quantize before wrap) and the same adapters on the decoded float base: the
  temp memory of each one's training step, and the float kernel bytes stored as NF4. Both
  steps' losses and gradients are checked equal."""
  import optax
  model = gpt.GPT(vocab=512, d=256, heads=4, layers=4, max_len=64, scan=scan, remat=remat)
  params, ids = gpt.init(model, batch=4, seq=64)
  labels = jnp.roll(ids, -1, 1)
  spec = lojax.LoraSpec(r=8, target_modules=targets, init_lora_weights=False)
  how = dict(apply_fn=model.apply, example_args=(ids,))
  f = lojax.lorafy(model.apply)

  def loss(t, lora):
    return optax.softmax_cross_entropy_with_integer_labels(
        f(lora.with_trainable(t), ids), labels).mean()

  step = jax.jit(jax.value_and_grad(loss))
  hand = jax.tree_util.tree_map_with_path(
      lambda kp, x: lojax.quantize(x, "nf4", stacked=scan and "lm_head" not in str(kp))
      if by_hand(jax.tree_util.keystr(kp)) else x, params)
  nf4 = lojax.wrap(hand, spec, key=jax.random.key(0), quantize="nf4", **how)
  decoded = jax.tree.map(lojax.dequantize, nf4.base, is_leaf=quant.is_quantized)
  plain = lojax.wrap(decoded, spec, key=jax.random.key(0), **how).with_trainable(nf4.trainable)
  temp = {}
  for name, lora in (("nf4", nf4), ("float", plain)):
    temp[name] = step.lower(lora.trainable, lora).compile().memory_analysis().temp_size_in_bytes
  (l1, g1), (l2, g2) = step(nf4.trainable, nf4), step(plain.trainable, plain)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))
  stored = lambda tree: sum(np.prod(x.shape) * 4 for x in jax.tree.leaves(  # noqa: E731
      tree, is_leaf=quant.is_quantized) if quant.is_quantized(x))
  return temp, stored(nf4.base), stored(hand)


@SCAN_REMAT
def test_a_quantized_step_holds_no_float_copy_of_the_kernels(scan, remat):
  """A QLoRA step keeps the codes, not the decoded kernels: the lean dense op decodes again
  in the backward, a scan over a quantized stack decodes one layer per step, and a
  checkpointed layer (nn.remat) takes the codes as its input and decodes inside (else it
  would keep each layer's decoded kernel for the backward). Its temp memory is then the
  float32 LoRA step's (a float copy of the adapted kernels would add their 12 MiB here),
  and it computes what the same adapters compute on the decoded base."""
  temp, kernels, _ = _nf4_and_float_steps(scan, remat, ["c_attn", "c_proj", "c_fc"])
  assert kernels == 12 * 2**20
  assert temp["nf4"] <= temp["float"] + kernels // 8, (temp, kernels)


@SCAN_REMAT
def test_untargeted_kernels_quantized_by_hand_keep_their_codes(scan, remat):
  """Kernels outside the targets, stored with lojax.quantize before wrap, are kept as codes
  as the targets are: the dense op decodes them again in the backward (their input gradient
  needs the kernel), a scan slices their codes and decodes one layer per step, a checkpoint
  takes the codes. Without that the step keeps each decoded kernel for the backward (9.5 MiB
  here), or the whole decoded stack; its temp memory is the float step's but for the
  kernels decoded while their matmuls run, and it computes what the decoded model
  computes."""
  untargeted = re.compile(r"(c_proj|c_fc|lm_head).*kernel")
  temp, _, by_hand = _nf4_and_float_steps(scan, remat, ["c_attn"],
                                          lambda path: bool(untargeted.search(path)))
  assert by_hand == 9 * 2**20 + 256 * 512 * 4   # 3 of 4 linears per block, and the head
  # a decoded kernel lives while its matmul runs (at most two at once: 1 MiB each here);
  # kept for the backward, they would add all 9.5 MiB
  assert temp["nf4"] <= temp["float"] + 2 * 2**20, (temp, by_hand)


def test_a_hand_quantized_leaf_replaced_or_multiplied_by_a_target():
  """A hand-quantized base leaf whose modules_to_save copy is trained (adapters trained on the
  float base, loaded onto a quantized one) is that copy in the step, not the base's codes; a
  target multiplied by a hand-quantized kernel (x @ (T @ U)) stays factorized."""
  import warnings
  k = jax.random.split(jax.random.key(0), 3)
  t, u = (jax.random.normal(key, (64, 64)) * 0.1 for key in k[:2])
  x = jax.random.normal(k[2], (4, 64))
  spec = lojax.LoraSpec(r=4, target_modules=["t"], modules_to_save=["u"],
                        init_lora_weights=False)
  lo = lojax.wrap({"t": {"kernel": t}, "u": {"kernel": u}}, spec, key=jax.random.key(0))
  tr = lo.trainable
  tr["default"]["modules_to_save"]["u/kernel"] = 2 * tr["default"]["modules_to_save"]["u/kernel"]
  lo = lo.with_trainable(tr)
  lq = lojax.LoraParams({"t": {"kernel": t}, "u": {"kernel": lojax.quantize(u, "nf4")}},
                        lo.adapters, lo.meta)
  f = lambda p, x: (x @ p["t"]["kernel"]) @ p["u"]["kernel"]  # noqa: E731
  np.testing.assert_allclose(lojax.lorafy(f)(lq, x), lojax.lorafy(f)(lo, x), rtol=1e-6)
  grad = lambda lora: jax.grad(lambda tr: jnp.sum(lojax.lorafy(f)(lora.with_trainable(tr), x)))(
      lora.trainable)["default"]["modules_to_save"]["u/kernel"]  # noqa: E731
  np.testing.assert_allclose(grad(lq), grad(lo), rtol=1e-5, atol=1e-6)

  q = {"t": {"kernel": t}, "u": {"kernel": lojax.quantize(u, "nf4")}}
  lora = lojax.wrap(q, lojax.LoraSpec(r=4, target_modules=["t"], init_lora_weights=False),
                    key=jax.random.key(0))
  g = lambda p, x: x @ (p["t"]["kernel"] @ p["u"]["kernel"])  # noqa: E731
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*cannot factorize")
    out = lojax.lorafy(g)(lora, x)
  merged = lojax.merge(lora)
  np.testing.assert_allclose(out, g(jax.tree.map(lojax.dequantize, merged,
                                                 is_leaf=quant.is_quantized), x),
                             rtol=1e-5, atol=1e-5)


def test_a_bf16_matmul_with_f32_accumulation_has_jaxs_input_gradient():
  """bf16 activations times a quantized bf16 kernel with ``preferred_element_type=f32``: the
  lean op's backward forms the input gradient from the f32 cotangent, as JAX's own rule does
  (rounding it to bf16 first changed the gradients by ~3e-3), so the step's gradients are
  those of the same model on the decoded float kernel."""
  k = jax.random.split(jax.random.key(0), 3)
  t = jax.random.normal(k[0], (64, 64)) * 0.1
  u = jax.random.normal(k[1], (64, 256))
  x = jax.random.normal(k[2], (8, 64))

  def f(p, x):
    h = (x @ p["t"]["kernel"]).astype(jnp.bfloat16)
    return jnp.matmul(h, p["u"]["kernel"], preferred_element_type=jnp.float32)

  spec = lojax.LoraSpec(r=4, target_modules=["t"], init_lora_weights=False)
  stored = lojax.quantize(u.astype(jnp.bfloat16), "nf4")
  lq = lojax.wrap({"t": {"kernel": t}, "u": {"kernel": stored}}, spec, key=jax.random.key(0))
  lf = lojax.wrap({"t": {"kernel": t}, "u": {"kernel": lojax.dequantize(stored)}}, spec,
                  key=jax.random.key(0)).with_trainable(lq.trainable)
  grad = lambda lo: jax.jit(jax.grad(lambda tr: jnp.sum(jnp.sin(3 * lojax.lorafy(f)(  # noqa
      lo.with_trainable(tr), x)))))(lo.trainable)
  for a, b in zip(jax.tree.leaves(grad(lq)), jax.tree.leaves(grad(lf))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(jnp.abs(b).max()))


def test_a_quantized_embedding_decodes_only_the_gathered_rows():
  """XLA fuses the decoding of a hand-quantized (untargeted) embedding into the lookup: the
  step holds no decoded table (1 MiB here), only the codes unpacked to a byte each."""
  table = np.asarray(jax.random.normal(jax.random.key(0), (4096, 64)), np.float32)
  params = {"emb": {"embedding": table},
            "out": {"kernel": np.asarray(jax.random.normal(jax.random.key(1), (64, 64)) / 8)}}
  ids = jnp.arange(32).reshape(4, 8) * 97 % 4096
  f = lambda p, ids: jnp.take(p["emb"]["embedding"], ids, axis=0) @ p["out"]["kernel"]
  spec = lojax.LoraSpec(r=4, target_modules=["out"], init_lora_weights=False)

  def step(params):
    lora = lojax.wrap(params, spec, key=jax.random.key(2))
    loss = lambda t, lo: jnp.sum(lojax.lorafy(f)(lo.with_trainable(t), ids) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(lora.trainable, lora).compile()   # base: an argument
    return lora, compiled.memory_analysis().temp_size_in_bytes

  q = dict(params, emb={"embedding": lojax.quantize(table, "nf4")})
  (lora_f, temp_f), (lora_q, temp_q) = step(params), step(q)
  assert temp_q <= temp_f + table.size, (temp_q, temp_f)   # a byte per value, not four
  rows = np.asarray(quant.dequantize(q["emb"]["embedding"]))[np.asarray(ids)]
  np.testing.assert_allclose(lojax.lorafy(f)(lora_q, ids),
                             np.asarray(lojax.lorafy(lambda p, x: x @ p["out"]["kernel"])(
                                 lora_f, jnp.asarray(rows))), rtol=1e-5, atol=1e-5)
