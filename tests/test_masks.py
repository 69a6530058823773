"""Dropout masks, probed: one kernel ``[C, C]`` with ``W = 0`` and ``A = B = I``.

With ``r = lora_alpha = C`` (scaling 1) and ``x = ones`` the adapted matmul
returns ``dropout(x) @ A @ B = mask / keep``, so each use's output *is* its
mask (values 0 or ``1/keep = 2``). The tests read the masks back and check the
README's promises: a fresh mask per scan / while-loop iteration and per use of
a kernel, the same masks for the same ``lora_rng``, and an unbiased adapter
contribution.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lojax

C = 64            # mask width per row
ROWS = 4          # rows per use: each mask has ROWS * C = 256 Bernoulli(1/2) entries
STEPS = 4         # loop iterations
KEEP = 0.5


def _probe_lora(seed: int = 0):
  params = {"params": {"proj": {"kernel": jnp.zeros((C, C), jnp.float32)}}}
  spec = lojax.LoraSpec(r=C, lora_alpha=C, lora_dropout=1 - KEEP, target_modules=["proj"])
  lora = lojax.wrap(params, spec, key=jax.random.key(seed))
  eye = jnp.eye(C, dtype=jnp.float32)
  trainable = {"default": {**lora.trainable["default"],
                           "lora": {"params/proj": {"lora_A": eye, "lora_B": eye}}}}
  return lora.with_trainable(trainable)


def _scan_fn(params, x):
  k = params["params"]["proj"]["kernel"]
  _, ys = lax.scan(lambda c, xi: (c, xi @ k), 0.0, x)
  return ys


def _while_fn(params, x):
  k = params["params"]["proj"]["kernel"]

  def body(c):
    i, out = c
    return i + 1, out.at[i].set(x[i] @ k)

  return lax.while_loop(lambda c: c[0] < x.shape[0], body, (0, jnp.zeros_like(x)))[1]


def _twice_fn(params, x):
  k = params["params"]["proj"]["kernel"]
  return jnp.stack([x[0] @ k, x[1] @ k, jnp.tanh(x[2]) @ k / np.tanh(1.0)])


class _Cell(nn.Module):
  @nn.compact
  def __call__(self, c, x):
    return c, nn.Dense(C, use_bias=False, name="proj", kernel_init=nn.initializers.zeros)(x)


class _ScanModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Cell, variable_broadcast="params", split_rngs={"params": False},
                    in_axes=0, out_axes=0)
    return stack(name="cell")(0.0, x)[1]


def _nn_scan_fn(params, x):
  return _ScanModel().apply(params, x)


def _nn_scan_lora():
  x = jnp.ones((STEPS, ROWS, C), jnp.float32)
  model = _ScanModel()
  params = model.init(jax.random.key(0), x)
  spec = lojax.LoraSpec(r=C, lora_alpha=C, lora_dropout=1 - KEEP, target_modules=["proj"])
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  (path,) = lora.trainable["default"]["lora"]
  eye = jnp.eye(C, dtype=jnp.float32)
  trainable = {"default": {**lora.trainable["default"],
                           "lora": {path: {"lora_A": eye, "lora_B": eye}}}}
  return lora.with_trainable(trainable)


CASES = {"lax.scan": (_scan_fn, STEPS), "while_loop": (_while_fn, STEPS),
         "two_uses": (_twice_fn, 3), "nn.scan": (_nn_scan_fn, STEPS)}


def _masks(fn, n, key, use_jit, lora=None):
  lora = _probe_lora() if lora is None else lora
  f = lojax.lorafy(fn)
  if use_jit:
    f = jax.jit(f)
  x = jnp.ones((n, ROWS, C), jnp.float32)
  out = np.asarray(f(lora, x, lora_rng=key), np.float64)
  assert out.shape == (n, ROWS, C), out.shape
  return out


def _check_is_mask(out):
  # Every entry is a dropped (0) or kept-and-rescaled (1/keep) input.
  np.testing.assert_allclose(np.minimum(np.abs(out), np.abs(out - 1 / KEEP)), 0.0, atol=1e-5)
  kept = (out > 1).mean()
  assert 0.35 < kept < 0.65, kept    # Bernoulli(1/2) over >= 768 entries: 0.5 +- 0.018 (1 sd)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(CASES))
def test_masks_differ_per_iteration_and_per_use(case, use_jit):
  fn, n = CASES[case]
  lora = _nn_scan_lora() if case == "nn.scan" else None
  out = _masks(fn, n, jax.random.key(7), use_jit, lora)
  _check_is_mask(out)
  kept = out > 1
  for i in range(n):
    for j in range(i):
      # Two independent Bernoulli(1/2) masks of 256 entries agree on 128 +- 8 of them;
      # repeated masks agree on all 256.
      agree = (kept[i] == kept[j]).mean()
      assert agree < 0.75, (case, i, j, agree)


@pytest.mark.parametrize("case", list(CASES))
def test_masks_are_deterministic_in_lora_rng(case):
  fn, n = CASES[case]
  lora = _nn_scan_lora() if case == "nn.scan" else None
  a = _masks(fn, n, jax.random.key(3), False, lora)
  b = _masks(fn, n, jax.random.key(3), True, lora)
  np.testing.assert_array_equal(a > 1, b > 1)       # same key: same masks, eager or jit
  c = _masks(fn, n, jax.random.key(4), True, lora)
  assert ((a > 1) == (c > 1)).mean() < 0.75          # another key: other masks


def test_dropout_keeps_the_expectation():
  # Average the scan's outputs over many keys: E[mask / keep] = 1 = the delta without
  # dropout (x = ones, A = B = I). Each entry's mean over K keys has sd 1/sqrt(K) = 0.0316
  # for K = 1000; the overall mean (K * STEPS * ROWS * C samples) has sd 0.0005.
  lora = _probe_lora()
  f = lojax.lorafy(_scan_fn)
  x = jnp.ones((STEPS, ROWS, C), jnp.float32)
  det = np.asarray(f(lora, x, lora_deterministic=True))
  np.testing.assert_allclose(det, 1.0, rtol=1e-6)
  keys = jax.random.split(jax.random.key(11), 1000)
  outs = np.asarray(jax.jit(jax.vmap(lambda k: f(lora, x, lora_rng=k)))(keys), np.float64)
  mean = outs.mean(0)
  assert abs(mean.mean() - 1.0) < 0.005, mean.mean()   # 10 sd
  assert np.abs(mean - 1.0).max() < 0.2, np.abs(mean - 1.0).max()   # ~6 sd over 1024 entries
