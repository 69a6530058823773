"""No silent numerical failure (issue 21 item 2): degenerate DoRA columns, huge and tiny
kernels, zero magnitudes, non-finite combination weights, out-of-range adapter ids.

Every reference is float64 NumPy or the formula written out here, never lojax's own output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import lojax


def np64(x):
  return np.asarray(x, np.float64)


f = lambda p, x: x @ p["l"]["kernel"]
FNS = {"eager": lojax.lorafy(f), "jit": jax.jit(lojax.lorafy(f))}


def dora(kernel, init=True, r=2):
  spec = lojax.LoraSpec(r=r, lora_alpha=2 * r, use_dora=True, target_modules=["l"],
                        init_lora_weights=init)
  params = {"l": {"kernel": jnp.asarray(kernel, jnp.float32)}}
  return params, lojax.wrap(params, spec, key=jax.random.key(1))


def replace(lora, **leaves):
  t = jax.tree.map(lambda z: z, lora.trainable)
  for k, v in leaves.items():
    t["default"]["lora"]["l"][k] = jnp.asarray(v, jnp.float32)
  return lora.with_trainable(t)


def reference(params, lora):
  """float64 ``x -> x @ (where(n > 0, m/n, 0) * V)`` with ``V = W + s*A@B``; and n."""
  ad = lora.adapters["default"]["lora"]["l"]
  s = lora.meta.adapters[0].targets[0].scaling
  V = np64(params["l"]["kernel"]) + s * np64(ad["lora_A"]) @ np64(ad["lora_B"])
  n = np.linalg.norm(V, axis=0)
  m = np64(ad["lora_magnitude"])
  scale = np.where(n > 0, m / np.where(n > 0, n, 1.0), 0.0)
  return V * scale, n


def kernel_with_zero_column(col=2, shape=(6, 5)):
  w = np.array(jax.random.normal(jax.random.key(0), shape), np.float32)
  w[:, col] = 0.0
  return w


X = np.asarray(jax.random.normal(jax.random.key(7), (4, 6)), np.float32)


# --------------------------------------------------------------------------
# (a) all-zero columns and kernels
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [kernel_with_zero_column(), np.zeros((6, 5), np.float32)],
                         ids=["zero-column", "zero-kernel"])
@pytest.mark.parametrize("how", sorted(FNS))
def test_dora_zero_columns_are_finite_and_unchanged_at_init(kernel, how):
  params, lora = dora(kernel)
  mag = lora.adapters["default"]["lora"]["l"]["lora_magnitude"]
  np.testing.assert_allclose(mag, np.linalg.norm(np64(kernel), axis=0), rtol=1e-6)
  out = FNS[how](lora, jnp.asarray(X))
  assert np.all(np.isfinite(out)), out
  np.testing.assert_allclose(out, np64(X) @ np64(kernel), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda t: jnp.sum(FNS[how](lora.with_trainable(t), jnp.asarray(X)) ** 2))(
      lora.trainable)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g)), g
  merged = lojax.merge(lora)["l"]["kernel"]
  np.testing.assert_allclose(merged, kernel, rtol=1e-6, atol=0)


@pytest.mark.parametrize("how", sorted(FNS))
def test_dora_zero_direction_scales_to_zero_with_any_magnitude(how):
  """A column with ``W + s*A@B = 0`` has no direction: it gives 0 (PEFT: 0/0 = NaN),
  the other columns ``(m/n) * V``; gradients follow with ``n`` constant."""
  params, lora = dora(kernel_with_zero_column(col=1))
  m = np.linspace(0.5, 2.0, 5)
  lora = replace(lora, lora_magnitude=m)          # m = 1.375 on the zero column
  ref, n = reference(params, lora)
  assert n[1] == 0
  np.testing.assert_allclose(FNS[how](lora, jnp.asarray(X)), np64(X) @ ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lojax.merge(lora)["l"]["kernel"], ref, rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda t: jnp.sum(FNS[how](lora.with_trainable(t), jnp.asarray(X))))(
      lora.trainable)["default"]["lora"]["l"]["lora_magnitude"]
  V = np64(params["l"]["kernel"])                 # B = 0: V = W
  want = np.where(n > 0, (np64(X) @ V).sum(0) / np.where(n > 0, n, 1.0), 0.0)
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def test_dora_conv_with_a_zero_output_channel():
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
  conv = nn.Conv(4, (3, 3), use_bias=False)
  params = conv.init(jax.random.key(1), x)
  params = jax.tree.map(lambda k: k.at[..., 2].set(0.0), params)
  spec = lojax.LoraSpec(r=2, target_modules=["params"], use_dora=True)
  lora = lojax.wrap(params, spec, key=jax.random.key(2), apply_fn=conv.apply, example_args=(x,))
  k = np64(params["params"]["kernel"])
  np.testing.assert_allclose(lora.adapters["default"]["lora"]["params"]["lora_magnitude"],
                             np.sqrt((k ** 2).sum((0, 1, 2))), rtol=1e-6)
  out = jax.jit(lojax.lorafy(conv.apply))(lora, x)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, conv.apply(params, x), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out)[..., 2] == 0)


# --------------------------------------------------------------------------
# (b) huge and tiny kernels: the norms are computed scaled
# --------------------------------------------------------------------------

def extreme_kernel():
  w = np.asarray(jax.random.normal(jax.random.key(3), (6, 5)), np.float64)
  w[:, 0] *= 1e30     # squares overflow float32 (max ~3.4e38)
  w[:, 1] *= 3e19     # just above the overflow threshold ~1.8e19
  w[:, 3] *= 1e-25    # squares underflow to 0 in float32
  return w.astype(np.float32)


@pytest.mark.parametrize("how", sorted(FNS))
def test_dora_norms_neither_overflow_nor_underflow(how):
  kernel = extreme_kernel()
  params, lora = dora(kernel)
  mag = lora.adapters["default"]["lora"]["l"]["lora_magnitude"]
  np.testing.assert_allclose(mag, np.linalg.norm(np64(kernel), axis=0), rtol=1e-6)
  m = np.asarray([2.0, 0.5, 1.5, 3.0, 0.25]) * np64(mag)   # a scale of 2, 0.5, ... per column
  lora = replace(lora, lora_magnitude=m)
  ref, _ = reference(params, lora)
  want = np64(X) @ ref
  out = np64(FNS[how](lora, jnp.asarray(X)))
  assert np.all(np.isfinite(out)), out
  np.testing.assert_allclose(out / np.abs(want).max(0), want / np.abs(want).max(0), atol=1e-5)
  merged = np64(lojax.merge(lora)["l"]["kernel"])
  np.testing.assert_allclose(merged / np.abs(ref).max(0), ref / np.abs(ref).max(0), atol=1e-6)


@pytest.mark.parametrize("how", sorted(FNS))
def test_dora_factorized_norm_with_huge_factors(how):
  """The step's norm comes from ||W||², AᵀW and AᵀA: huge A or B must not overflow there."""
  params, lora = dora(np.asarray(jax.random.normal(jax.random.key(4), (6, 5)), np.float32),
                      init=False)
  ad = lora.adapters["default"]["lora"]["l"]
  a = np64(ad["lora_A"]) * 1e21                     # AᵀA overflows
  b = np64(ad["lora_B"]) * 1e-20
  b[:, 2] *= 1e19                                   # column 2 of A@B ~1e20: squares overflow
  lora = replace(lora, lora_A=a, lora_B=b, lora_magnitude=np.arange(1.0, 6.0))
  ref, n = reference(params, lora)
  assert np.all(np.isfinite(n)) and n[2] > 1e19
  want = np64(X) @ ref
  out = np64(FNS[how](lora, jnp.asarray(X)))
  assert np.all(np.isfinite(out)), out
  np.testing.assert_allclose(out, want, rtol=2e-4, atol=1e-5)


def test_dora_plain_kernels_keep_the_unscaled_numbers():
  """Scaling by powers of two is exact: ordinary kernels get the plain formula's norm."""
  params, lora = dora(np.asarray(jax.random.normal(jax.random.key(5), (6, 5)), np.float32),
                      init=False)
  ad = lora.adapters["default"]["lora"]["l"]
  V = np.asarray(params["l"]["kernel"] + 2.0 * ad["lora_A"] @ ad["lora_B"], np.float32)
  plain = jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(V)), axis=0))
  np.testing.assert_allclose(ad["lora_magnitude"], np.linalg.norm(np64(V), axis=0), rtol=1e-6)
  np.testing.assert_array_equal(ad["lora_magnitude"], plain)   # bit-identical


# --------------------------------------------------------------------------
# (c) unmerge with a zero magnitude
# --------------------------------------------------------------------------

@pytest.mark.parametrize("use_jit", [False, True])
def test_unmerge_with_zero_magnitude_restores_the_base(use_jit):
  kernel = kernel_with_zero_column(col=4)
  params, lora = dora(kernel, init=False)
  m = np.asarray([1.5, 0.0, 0.7, 2.0, 1.0])       # column 1: zero magnitude; 4: zero W only
  lora = replace(lora, lora_magnitude=m)
  merge = jax.jit(lojax.merge) if use_jit else lojax.merge
  unmerge = jax.jit(lojax.unmerge) if use_jit else lojax.unmerge
  merged = merge(lora)
  ref, _ = reference(params, lora)
  np.testing.assert_allclose(merged["l"]["kernel"], ref, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(merged["l"]["kernel"])[:, 1] == 0)
  back = unmerge(lora, merged)["l"]["kernel"]
  assert np.all(np.isfinite(back)), back
  np.testing.assert_allclose(back, kernel, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# (d) add_weighted_adapter with non-finite weights
# --------------------------------------------------------------------------

def two_plain_adapters():
  p = {"d": {"kernel": jnp.ones((4, 3))}}
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["d"], init_lora_weights=False)
  lora = lojax.wrap(p, spec, key=jax.random.key(0))
  return lojax.wrap(lora, spec, key=jax.random.key(1), adapter_name="b")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -np.inf, np.float32("nan"),
                                 jnp.asarray(jnp.inf)], ids=["nan", "inf", "-inf", "np", "jnp"])
@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_add_weighted_adapter_refuses_non_finite_weights(bad, combination_type):
  lora = two_plain_adapters()
  with pytest.raises(ValueError, match=r"`weights` must be finite.*weights\[1\]="):
    lojax.add_weighted_adapter(lora, ["default", "b"], [1.0, bad], "mix",
                               combination_type=combination_type)


def test_add_weighted_adapter_finite_weights_still_combine():
  """cat is exactly w0*s*A0@B0 + w1*s*A1@B1 (s = lora_alpha / r = 2), written out."""
  lora = two_plain_adapters()
  mix = lojax.add_weighted_adapter(lora, ["default", "b"], [1.0, -0.5], "mix",
                                   combination_type="cat")
  delta = lambda n, ad: np64(ad[n]["lora"]["d"]["lora_A"]) @ np64(ad[n]["lora"]["d"]["lora_B"])
  want = 2.0 * delta("default", lora.adapters) - 0.5 * 2.0 * delta("b", lora.adapters)
  np.testing.assert_allclose(delta("mix", mix.adapters), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# (e) out-of-range lora_adapter_ids
# --------------------------------------------------------------------------

def two_adapters():
  p = {"l": {"kernel": jax.random.normal(jax.random.key(0), (6, 5))}}
  spec = lojax.LoraSpec(r=2, target_modules=["l"], init_lora_weights=False)
  lora = lojax.wrap(p, spec, key=jax.random.key(1), adapter_name="a")
  lora = lojax.wrap(lora, spec, key=jax.random.key(2), adapter_name="b")
  return p, lojax.set_adapter(lora, ["a", "b"])


def mixed_reference(p, lora, ids):
  """float64: row i is ``x_i @ (W + s*A@B)`` of adapter ids[i], ``x_i @ W`` outside [0, 2)."""
  W, rows = np64(p["l"]["kernel"]), []
  for i, v in enumerate(ids):
    W_i = W
    if 0 <= v < 2:
      ad = lora.adapters[("a", "b")[v]]["lora"]["l"]
      W_i = W + (8 / 2) * np64(ad["lora_A"]) @ np64(ad["lora_B"])
    rows.append(np64(X[i]) @ W_i)
  return np.stack(rows)


@pytest.mark.parametrize("ids", [[0, 2, -1, 1], [0, 1, -2, 1], [5, 1, -1, 0]])
def test_out_of_range_adapter_ids(ids):
  p, lora = two_adapters()
  x = jnp.asarray(X)
  fn = lojax.lorafy(f)
  # Concrete ids: lojax's ValueError names the argument and the rows.
  bad = [f"ids\\[{i}\\]={v}" for i, v in enumerate(ids) if not -1 <= v < 2]
  with pytest.raises(ValueError, match=r"`lora_adapter_ids` must lie in \[-1, 2\).*" + bad[0]):
    fn(lora, x, lora_adapter_ids=jnp.asarray(ids, jnp.int32))
  with pytest.raises(ValueError, match=r"`lora_adapter_ids` must lie in \[-1, 2\)"):
    jax.jit(lambda lo, x: fn(lo, x, lora_adapter_ids=np.asarray(ids)))(lora, x)  # closed over
  # Traced ids under checkify: the error is reported.
  err, _ = jax.jit(checkify.checkify(fn))(lora, x, lora_adapter_ids=jnp.asarray(ids, jnp.int32))
  assert err.get() is not None and "`lora_adapter_ids` must lie in [-1, 2)" in err.get()
  # Traced ids under plain jit (documented): such a row gets the base model, the others their
  # own adapter's x @ (W + s*A@B), written out in float64.
  out = jax.jit(fn)(lora, x, lora_adapter_ids=jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(out, mixed_reference(p, lora, ids), rtol=1e-5, atol=1e-5)


def test_in_range_adapter_ids_pass_checkify():
  p, lora = two_adapters()
  ids = [0, 1, -1, 1]
  err, out = jax.jit(checkify.checkify(lojax.lorafy(f)))(
      lora, jnp.asarray(X), lora_adapter_ids=jnp.asarray(ids, jnp.int32))
  assert err.get() is None
  np.testing.assert_allclose(out, mixed_reference(p, lora, ids), rtol=1e-5, atol=1e-5)


def test_dora_merged_fallback_with_a_zero_column():
  """A use lojax cannot factorize (the kernel also multiplies its own transpose) takes the
  exact merged DoRA kernel: its zero column scales by 0, not 0/0."""
  params, lora = dora(kernel_with_zero_column(col=1))
  lora = replace(lora, lora_magnitude=np.linspace(0.5, 2.0, 5))
  ref, n = reference(params, lora)
  assert n[1] == 0
  g = lambda p, x: (x @ p["l"]["kernel"]) @ p["l"]["kernel"].T
  with pytest.warns(UserWarning, match="merged"):
    out = jax.jit(lojax.lorafy(g))(lora, jnp.asarray(X))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, np64(X) @ ref @ ref.T, rtol=1e-5, atol=1e-5)
