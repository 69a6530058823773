"""Initialisations: each against a float64 NumPy reference of its formula.

Notation as in the docstring of lojax's inits: a kernel M is ``[in, out]``,
PEFT's weight is W = M^T ``[out, in]``; our A ``[in, r]`` is PEFT's A^T and
our B ``[r, out]`` is PEFT's B^T.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt
import lojax
from lojax._src import quant

TOL = dict(rtol=1e-4, atol=1e-5)


def one_kernel(m, init, r=4, alpha=8, **kw):
  params = {"d": {"kernel": jnp.asarray(m, jnp.float32), "bias": jnp.zeros(m.shape[1])}}
  spec = lojax.LoraSpec(r=r, lora_alpha=alpha, target_modules=["d"], init_lora_weights=init, **kw)
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  ab = lora.adapters["default"]["lora"]["d"]
  return params, lora, np.asarray(ab["lora_A"], np.float64), np.asarray(ab["lora_B"], np.float64)


def kernel(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def outer_terms(a, b):
  """The rank-one terms A[:, i] B[i] (invariant to the sign of each component)."""
  return np.einsum("ir,ro->rio", a, b)


@pytest.fixture(scope="module")
def gpt_model():
  m = gpt.GPT()
  params, ids = gpt.init(m)
  return m, params, ids


def test_pissa_matches_top_singular_triplets():
  m = kernel((24, 16))
  s = 8 / 4
  params, lora, a, b = one_kernel(m, "pissa")
  w = m.astype(np.float64).T  # PEFT's [out, in]
  u, sv, vh = np.linalg.svd(w, full_matrices=False)
  sr = sv[:4] / s
  a_peft = np.sqrt(sr)[:, None] * vh[:4]       # [r, in]
  b_peft = u[:, :4] * np.sqrt(sr)               # [out, r]
  np.testing.assert_allclose(outer_terms(a, b), outer_terms(a_peft.T, b_peft.T), **TOL)
  # The columns of A are the top right singular vectors of W scaled by sqrt(S/s).
  np.testing.assert_allclose(a.T @ a, np.diag(sr), **TOL)
  np.testing.assert_allclose(b @ b.T, np.diag(sr), **TOL)
  np.testing.assert_allclose(np.abs(a), np.abs(a_peft.T), **TOL)
  np.testing.assert_allclose(np.abs(b), np.abs(b_peft.T), **TOL)
  residual = np.asarray(lora.base["d"]["kernel"])
  np.testing.assert_allclose(residual, (w - s * b_peft @ a_peft).T, **TOL)
  # The original params are untouched, other leaves shared.
  np.testing.assert_array_equal(params["d"]["kernel"], m)
  assert lora.base["d"]["bias"] is params["d"]["bias"]


def test_pissa_niter_close_to_exact_on_low_rank_plus_noise():
  rng = np.random.default_rng(1)
  m = (rng.standard_normal((64, 4)) @ rng.standard_normal((4, 48)) * 3
       + 0.01 * rng.standard_normal((64, 48))).astype(np.float32)
  _, exact, a0, b0 = one_kernel(m, "pissa")
  _, fast, a1, b1 = one_kernel(m, "pissa_niter_2")
  d0, d1 = a0 @ b0, a1 @ b1
  assert np.linalg.norm(d1 - d0) < 1e-3 * np.linalg.norm(d0)
  np.testing.assert_allclose(np.asarray(fast.base["d"]["kernel"]),
                             np.asarray(exact.base["d"]["kernel"]), atol=2e-3)


def test_olora_from_qr_of_peft_weight():
  m = kernel((20, 12), seed=2)
  s = 8 / 4
  _, lora, a, b = one_kernel(m, "olora")
  w = m.astype(np.float64).T
  q, r = np.linalg.qr(w)
  a_peft, b_peft = r[:4], q[:, :4]
  np.testing.assert_allclose(outer_terms(a, b), outer_terms(a_peft.T, b_peft.T), **TOL)
  np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)  # Q's columns are orthonormal
  np.testing.assert_allclose(np.asarray(lora.base["d"]["kernel"]),
                             (w - s * b_peft @ a_peft).T, **TOL)


def test_orthogonal_factors_product_is_zero():
  m = kernel((20, 12), seed=3)
  params, lora, a, b = one_kernel(m, "orthogonal", r=6)
  assert a.shape == (20, 6) and b.shape == (6, 12)
  assert np.linalg.norm(a) > 1 and np.linalg.norm(b) > 1
  np.testing.assert_allclose(a @ b, 0, atol=1e-5 * np.linalg.norm(a) * np.linalg.norm(b))
  # A's and B's ranks are r/2: G1 Q[0::2] and Q[1::2]^T G2^T span orthogonal r/2-dim spaces.
  sa, sb = np.linalg.svd(a, compute_uv=False), np.linalg.svd(b, compute_uv=False)
  assert sa[2] > 0.1 and sa[3] < 1e-5 and sb[2] > 0.1 and sb[3] < 1e-5
  assert lora.base is params  # the base is not rewritten


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_1", "olora", "orthogonal"])
def test_wrapped_model_output_unchanged_at_init(gpt_model, init):
  m, params, ids = gpt_model
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"],
                        init_lora_weights=init)
  before = jax.tree.map(np.array, params)
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  ref = m.apply(params, ids)
  f = lojax.lorafy(m.apply)
  for out in (f(lora, ids), jax.jit(f)(lora, ids)):
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, params, before)  # not mutated
  fc = lora.adapters["default"]["lora"]["params/h_0/mlp/c_fc"]
  assert np.abs(fc["lora_B"]).max() > 0.05  # the adapter is not zero: the base compensates
  assert lora.base["params"]["ln_f"]["scale"] is params["params"]["ln_f"]["scale"]


def test_pissa_on_nd_kernels():
  m = gpt.GPT(general=True)
  params, ids = gpt.init(m)
  spec = lojax.LoraSpec(r=4, lora_alpha=4, target_modules=["query", "out"],
                        init_lora_weights="pissa")
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=m.apply, example_args=(ids,))
  # The out kernel [heads, head_dim, embed] is the matrix [heads*head_dim, embed].
  k = np.asarray(params["params"]["h_0"]["attn"]["out"]["kernel"], np.float64)
  ab = lora.adapters["default"]["lora"]["params/h_0/attn/out"]
  a, b = np.asarray(ab["lora_A"], np.float64), np.asarray(ab["lora_B"], np.float64)
  assert a.shape == (4, 8, 4) and b.shape == (4, 32)
  sv = np.linalg.svd(k.reshape(32, 32), compute_uv=False)
  np.testing.assert_allclose(np.linalg.svd(a.reshape(32, 4) @ b, compute_uv=False)[:4], sv[:4],
                             rtol=1e-4)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(m.apply))(lora, ids), m.apply(params, ids),
                             rtol=1e-4, atol=1e-4)


def test_stacked_kernel_rewrites_selected_layers_only():
  m = gpt.GPT(scan=True, layers=3)
  params, ids = gpt.init(m)
  spec = lojax.LoraSpec(r=2, target_modules=["c_fc"], layers_to_transform=[0, 2],
                        init_lora_weights="olora")
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=m.apply, example_args=(ids,))
  old = np.asarray(params["params"]["h"]["mlp"]["c_fc"]["kernel"], np.float64)
  new = np.asarray(lora.base["params"]["h"]["mlp"]["c_fc"]["kernel"])
  np.testing.assert_array_equal(new[1], old[1])
  ab = lora.adapters["default"]["lora"]["params/h/mlp/c_fc"]
  for j, layer in enumerate((0, 2)):
    q, r = np.linalg.qr(old[layer].T)
    np.testing.assert_allclose(new[layer], old[layer] - 4.0 * (q[:, :2] @ r[:2]).T, **TOL)
    np.testing.assert_allclose(np.abs(np.asarray(ab["lora_B"][j])), np.abs(q[:, :2].T), **TOL)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(m.apply))(lora, ids), m.apply(params, ids),
                             rtol=1e-4, atol=1e-4)


def loftq_reference(m, r, iters, method):
  """LoftQ in PEFT's [out, in] orientation, float64."""
  w = m.astype(np.float64).T
  x = w
  for _ in range(iters):
    wq = quant.fake_quantize_np(x.T, method).astype(np.float64).T
    u, s, vh = np.linalg.svd(w - wq, full_matrices=False)
    big_l, big_r = u[:, :r] * np.sqrt(s[:r]), np.sqrt(s[:r])[:, None] * vh[:r]
    x = w - big_l @ big_r
  return wq, big_r, big_l  # base, PEFT's A = R, B = L


@pytest.mark.parametrize("bits,method", [(4, "nf4"), (8, "int8")])
def test_loftq_matches_reference_and_improves_with_iterations(bits, method):
  m = kernel((128, 64), seed=4)
  errors = []
  for iters in (1, 3, 5):
    _, lora, a, b = one_kernel(m, "loftq", r=8, alpha=8,
                               loftq_config={"loftq_bits": bits, "loftq_iter": iters})
    base = lora.base["d"]["kernel"]
    assert isinstance(base, quant.QuantizedArray) and base.method == method
    wq, a_peft, b_peft = loftq_reference(m, 8, iters, method)
    deq = np.asarray(quant.dequantize(base), np.float64)
    np.testing.assert_allclose(deq, wq.T, atol=1e-5)
    np.testing.assert_allclose(a @ b, (b_peft @ a_peft).T, atol=1e-4)
    errors.append(np.linalg.norm(m - (deq + 1.0 * a @ b)))
  plain = np.linalg.norm(m - quant.fake_quantize_np(m, method))
  assert errors[0] < plain
  assert errors[0] >= errors[1] >= errors[2], errors


def test_loftq_wrapped_model_close_to_original(gpt_model):
  m, params, ids = gpt_model
  ref = m.apply(params, ids)
  f = jax.jit(lojax.lorafy(m.apply))
  plain = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules="all-linear"),
                     key=jax.random.key(0), quantize="nf4")
  loftq = lojax.wrap(params, lojax.LoraSpec(r=4, lora_alpha=4, target_modules="all-linear",
                                            init_lora_weights="loftq",
                                            loftq_config={"loftq_bits": 4, "loftq_iter": 3}),
                     key=jax.random.key(0))
  assert np.abs(f(loftq, ids) - ref).mean() < np.abs(f(plain, ids) - ref).mean()


def test_invalid_combinations_are_refused(gpt_model):
  m, params, ids = gpt_model
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"(?s)params/wte: `init_lora_weights='loftq'` supports "
                     r"dense .* embed kernel"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["wte", "c_fc"], init_lora_weights="loftq",
                                      loftq_config={"loftq_bits": 4}), key=key)
  with pytest.raises(ValueError, match=r"params/wte: `quantize='nf4'` supports dense"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["wte"]), key=key, quantize="nf4")
  with pytest.raises(ValueError, match=r"(?s)h_0/mlp/c_fc: .*needs r <= min\(fan_in, fan_out\) "
                     r"= 32, got r=40"):
    lojax.wrap(params, lojax.LoraSpec(r=40, target_modules=["c_fc"], init_lora_weights="pissa"),
               key=key)
  with pytest.raises(ValueError, match=r"needs an even rank, this target has r=3"):
    lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["c_fc"], rank_pattern={"h_0.*": 3},
                                      init_lora_weights="orthogonal"), key=key)
  with pytest.raises(ValueError, match=r"\['loftq_bits'\]=8` does not match the quantization 'nf4'"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["c_fc"], init_lora_weights="loftq",
                                      loftq_config={"loftq_bits": 8}), key=key, quantize="nf4")
  with pytest.raises(ValueError, match=r"`quantize` must be one of"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["c_fc"]), key=key, quantize="fp4")


def test_loftq_warns_when_scaling_is_not_one():
  """As in PEFT the factors are not divided by the scaling: with s = 2 the model computes
  the quantized base plus 2x the quantization error's best rank-r approximation."""
  m = kernel((64, 32), seed=5)
  with pytest.warns(UserWarning, match=r"s = \[2\.0\].*Set `lora_alpha` equal to `r`"):
    _, lora, a, b = one_kernel(m, "loftq", r=4, alpha=8, loftq_config={"loftq_bits": 8})
  wq, a_peft, b_peft = loftq_reference(m, 4, 1, "int8")
  np.testing.assert_allclose(a @ b, (b_peft @ a_peft).T, atol=1e-4)  # not (L@R).T / 2
  x = np.random.default_rng(6).normal(size=(3, 64))
  out = lojax.lorafy(lambda p, x: x @ p["d"]["kernel"])(lora, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(out, x @ (wq.T + 2.0 * (b_peft @ a_peft).T), rtol=1e-4, atol=1e-4)
