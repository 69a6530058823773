"""The memory-lean training path, checked against what the README promises.

* It is taken: every adapted ``Dense`` use of a training step runs through
  ``fused.dense`` with a recomputation of its input (LayerNorm output, GELU
  output, attention output before its reshape), and the recomputation gives
  the kernel input back exactly.
* It is lean: the step's compiled temp memory is within 10% of the frozen
  limit's (the gradient w.r.t. an additive perturbation of the activations
  only: no weight gradients at all), and below the plain factorized path's.
* Forward mode (``remat=False``) gives the numbers of the dense formula
  ``W + s·A@B`` written out here, and of a finite difference.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lojax
from lojax._src import fused

import gpt


def _wrap(model, params, **kw):
  spec = lojax.LoraSpec(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                           "init_lora_weights": False, **kw})
  return lojax.wrap(params, spec, key=jax.random.key(0))


def _loss_fn(apply, lora, ids):
  labels = jnp.roll(ids, -1, axis=1)
  return lambda t: optax.softmax_cross_entropy_with_integer_labels(
      apply(lora.with_trainable(t), ids), labels).mean()


@pytest.fixture
def small():
  # d = 128: wide enough that every kernel input is worth recomputing (see fused.chain)
  model = gpt.GPT(vocab=64, d=128, heads=4, layers=2, max_len=16)
  params, ids = gpt.init(model, batch=2, seq=8)
  return model, params, ids, _wrap(model, params)


class _Spy:
  """Wraps ``fused.dense``: records each call's shapes and its ``recompute``."""

  def __init__(self, monkeypatch):
    self.calls = []
    self.orig = fused.dense
    monkeypatch.setattr(fused, "dense", self)

  def __call__(self, x2, w2, factors, recompute=None, **kw):
    self.calls.append((x2, w2.shape, recompute))
    return self.orig(x2, w2, factors, recompute, **kw)


def test_training_step_takes_the_lean_path_for_every_dense_use(small, monkeypatch):
  model, params, ids, lora = small
  spy = _Spy(monkeypatch)
  grad = jax.jit(jax.grad(_loss_fn(lojax.lorafy(model.apply), lora, ids)))
  grad.lower(lora.trainable)
  d, n = model.d, ids.size
  # Per block: c_attn (LayerNorm output), attn/c_proj (attention output, reshaped),
  # mlp/c_fc (LayerNorm output), mlp/c_proj (GELU output).
  expected = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * model.layers
  assert [w for _, w, _ in spy.calls] == expected, [w for _, w, _ in spy.calls]
  assert len(spy.calls) == len(lora.meta.adapters[0].targets) == 8
  for (x2, w, rc) in spy.calls:
    assert x2.shape == (n, w[0])
    assert rc is not None, f"kernel {w}: its input is kept, not recomputed"
  anchors = [[a.shape for a in rc.anchors] for _, _, rc in spy.calls[:4]]
  b, t = ids.shape
  # A LayerNorm output is recomputed from the residual stream (+ its statistics and the
  # scale/bias), the GELU output from the pre-activation, the reshape from the einsum output.
  assert (b, t, d) in anchors[0] and (b, t, d) in anchors[2], anchors
  assert len(anchors[1]) == 1 and np.prod(anchors[1][0]) == n * d, anchors   # heads x head_dim
  assert anchors[3] == [(b, t, 4 * d)], anchors
  # The plain path does not use it.
  spy.calls.clear()
  jax.jit(jax.grad(_loss_fn(lojax.lorafy(model.apply, remat=False), lora, ids))).lower(
      lora.trainable)
  assert spy.calls == []


def test_inside_a_checkpoint_the_plain_factorized_form_is_used(small, monkeypatch):
  """Under ``jax.checkpoint`` (nn.remat, nnx.remat) every residual is recomputed anyway:
  the lean op's own recomputation would only add work, so it is not taken there."""
  model, params, ids, lora = small
  spy = _Spy(monkeypatch)
  blocked = lambda p, ids: jax.checkpoint(model.apply)(p, ids)  # noqa: E731
  loss = _loss_fn(lojax.lorafy(blocked), lora, ids)
  lean_flops = jax.jit(jax.grad(loss)).lower(lora.trainable).compile().cost_analysis()
  assert spy.calls == []
  plain = _loss_fn(lojax.lorafy(blocked, remat=False), lora, ids)
  plain_flops = jax.jit(jax.grad(plain)).lower(lora.trainable).compile().cost_analysis()
  flops = lambda c: float((c[0] if isinstance(c, (list, tuple)) else c)["flops"])  # noqa: E731
  assert flops(lean_flops) == flops(plain_flops)
  np.testing.assert_allclose(jax.grad(loss)(lora.trainable)["default"]["lora"]["params/h_0/mlp/c_fc"][
      "lora_A"], jax.grad(_loss_fn(lojax.lorafy(model.apply), lora, ids))(lora.trainable)[
      "default"]["lora"]["params/h_0/mlp/c_fc"]["lora_A"], rtol=1e-5, atol=1e-6)


def _mlp(approximate: bool, d: int):
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm()(x)
      h = nn.gelu(nn.Dense(4 * d, name="fc1")(h), approximate=approximate)
      return x + nn.Dense(d, name="fc2")(h)

  return MLP()


@pytest.mark.parametrize("approximate,d,recomputed", [
    (False, 64, False), (True, 64, False), (False, 256, False), (True, 256, True)],
    ids=["erf-64", "tanh-64", "erf-256", "tanh-256"])
def test_recomputation_is_chosen_per_site_by_its_cost(approximate, d, recomputed, monkeypatch):
  """A kernel input is recomputed only where that is cheap next to the matmul it feeds: an
  exact GELU (an erf polynomial, ~250 FLOPs per element) is kept before a 64- or 256-column
  matmul, a tanh GELU is recomputed before 256 columns but not 64, the LayerNorm before
  fc1's 4d columns always. At d = 256 the step stays within 3% of the plain factorized
  path's FLOPs (an erf GELU recomputed there cost 8% more)."""
  model = _mlp(approximate, d)
  x = jax.random.normal(jax.random.key(0), (4, 32, d))
  params = model.init(jax.random.key(1), x)
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["fc1", "fc2"]),
                    key=jax.random.key(2))
  spy = _Spy(monkeypatch)
  # params and x are arguments: closed over, XLA would fold the frozen parts away
  loss = lambda apply: (lambda t, lora, x: jnp.mean(  # noqa: E731
      apply(lora.with_trainable(t), x) ** 2))
  lean = jax.jit(jax.grad(loss(lojax.lorafy(model.apply)))).lower(
      lora.trainable, lora, x).compile()
  by_width = {w[1]: rc for _, w, rc in spy.calls}
  assert by_width[4 * d] is not None                        # fc1: its LayerNorm
  assert (by_width[d] is not None) == recomputed, by_width  # fc2: the GELU
  plain = jax.jit(jax.grad(loss(lojax.lorafy(model.apply, remat=False)))).lower(
      lora.trainable, lora, x).compile()
  flops = lambda c: float(c.cost_analysis()["flops"])  # noqa: E731
  if d >= 256:  # at 64 columns the LayerNorm's recomputation alone is a few percent
    assert flops(lean) <= 1.03 * flops(plain), (flops(lean) / flops(plain))


def test_recomputation_returns_the_kernel_input_exactly(small, monkeypatch):
  model, params, ids, lora = small
  spy = _Spy(monkeypatch)
  with jax.disable_jit():                   # op by op: the recorded inputs are concrete
    lojax.lorafy(model.apply)(lora, ids)
  assert len(spy.calls) == 8
  for x2, w, rc in spy.calls:
    np.testing.assert_array_equal(np.asarray(rc.g(rc.anchors)), np.asarray(x2), err_msg=str(w))


def test_lean_gradients_equal_the_plain_paths(small):
  model, params, ids, lora = small
  lean = jax.jit(jax.value_and_grad(_loss_fn(lojax.lorafy(model.apply), lora, ids)))
  plain = jax.jit(jax.value_and_grad(_loss_fn(lojax.lorafy(model.apply, remat=False), lora, ids)))
  (l1, g1), (l2, g2) = lean(lora.trainable), plain(lora.trainable)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))
  assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(g1)) > 0


def _temp_bytes(f, *args) -> int:
  return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_lean_step_temp_memory_at_the_frozen_limit():
  # Tokens x width large against the params, as in training. Measured: lean 35.8 MiB, frozen
  # limit 34.1 MiB (1.05x), plain path 44.3 MiB; a backward that keeps the kernel inputs, or
  # whose recomputation XLA can merge with the forward (not tied to the cotangent), keeps
  # 40.3 MiB (1.18x the limit). The plain path keeps about one extra activation per adapted
  # kernel (the kernel input, for dA) and both summands x@W and (x@A)@B of the MLP
  # up-projection. Full fine-tuning's temp even leaves out the activations XLA parks in its
  # param / optimizer-state output buffers, and the lean step is still below it.
  model = gpt.GPT(vocab=512, d=128, heads=4, layers=2, max_len=128)
  params, ids = gpt.init(model, batch=8, seq=128)
  lora = lojax.wrap(params, lojax.LoraSpec(r=8, lora_alpha=16, target_modules="all-linear"),
                    key=jax.random.key(0))
  fns = gpt.step_fns(model, ids)
  opt_state = fns["tx"].init(lora.trainable)
  lean = _temp_bytes(fns["lora"], lora, opt_state, ids)
  plain = _temp_bytes(fns["plain"], lora, opt_state, ids)
  full = _temp_bytes(fns["full"], params, fns["tx"].init(params), ids)
  frozen = _temp_bytes(fns["limit"], params, jnp.zeros(ids.shape + (model.d,)), ids)
  mib = lambda x: f"{x / 2**20:.1f} MiB"
  sizes = dict(lean=mib(lean), frozen=mib(frozen), plain=mib(plain), full=mib(full))
  assert lean <= 1.1 * frozen, sizes
  assert lean < plain, sizes
  assert lean <= full, sizes


def _dense_reference(model, params, lora):
  """``f(t) = model.apply(params with W + s·A@B)``, the delta written out here."""
  targets = lora.meta.adapters[0].targets

  def f(trainable, ids):
    p = jax.tree.map(lambda x: x, params)
    for t in targets:
      node = p
      *parents, last = t.path.split("/")
      for k in parents:
        node = node[k]
      fac = trainable["default"]["lora"][t.path]
      node[last] = {**node[last], t.leaf: node[last][t.leaf]
                    + t.scaling * fac["lora_A"] @ fac["lora_B"]}
    return model.apply(p, ids)

  return f


def test_forward_mode_matches_the_dense_formula_and_a_finite_difference(small):
  model, params, ids, lora = small
  assert all(t.scaling == 2.0 for t in lora.meta.adapters[0].targets)
  plain = lojax.lorafy(model.apply, remat=False)
  f = lambda t: plain(lora.with_trainable(t), ids)
  ref = _dense_reference(model, params, lora)
  leaves, treedef = jax.tree.flatten(lora.trainable)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  tangent = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                         for k, x in zip(keys, leaves)])
  for g in (f, jax.jit(f)):
    out, dout = jax.jvp(g, (lora.trainable,), (tangent,))
    r_out, r_dout = jax.jvp(lambda t: ref(t, ids), (lora.trainable,), (tangent,))
    scale = float(jnp.abs(r_dout).max())
    assert scale > 1e-2, scale
    np.testing.assert_allclose(out, r_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dout, r_dout, rtol=1e-3, atol=1e-4 * scale)
  # Central difference of the lojax function itself (float32, eps = 1e-3: truncation
  # O(eps^2), rounding ~1e-7 * |f| / eps): agrees to ~1% of the tangent's size.
  eps = 1e-3
  shift = lambda s: jax.tree.map(lambda x, v: x + s * eps * v, lora.trainable, tangent)
  fd = (np.asarray(f(shift(1.0)), np.float64) - np.asarray(f(shift(-1.0)), np.float64)) / (2 * eps)
  np.testing.assert_allclose(dout, fd, atol=2e-2 * scale)


def _perturbed(lora, key=3):
  """``lora`` with every trainable leaf moved off its init (m != n: the DoRA scale is not 1)."""
  leaves, treedef = jax.tree.flatten(lora.trainable)
  keys = jax.random.split(jax.random.key(key), len(leaves))
  return lora.with_trainable(jax.tree.unflatten(treedef, [
      x * (1 + 0.3 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)]))


def test_dora_takes_the_lean_path_with_the_plain_paths_numbers(small, monkeypatch):
  """DoRA (one term, no dropout) runs through ``fused.dense`` at every Dense use, its input
  recomputed as LoRA's is, and gives the plain path's (PEFT's formula) loss and gradients,
  and the merged DoRA kernel's output."""
  model, params, ids, _ = small
  lora = _perturbed(_wrap(model, params, use_dora=True))
  spy = _Spy(monkeypatch)
  lean = jax.jit(jax.value_and_grad(_loss_fn(lojax.lorafy(model.apply), lora, ids)))
  lean.lower(lora.trainable)
  assert len(spy.calls) == 8, [w for _, w, _ in spy.calls]
  assert all(rc is not None for _, _, rc in spy.calls), [w for _, w, rc in spy.calls if rc is None]
  plain = jax.jit(jax.value_and_grad(_loss_fn(lojax.lorafy(model.apply, remat=False), lora, ids)))
  (l1, g1), (l2, g2) = lean(lora.trainable), plain(lora.trainable)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  mags = [g["lora_magnitude"] for g in g1["default"]["lora"].values()]
  assert len(mags) == 8 and min(float(jnp.abs(m).max()) for m in mags) > 0
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    # float32 sums in two orders: entries near zero (1e-3 of the largest) differ by a few ulp
    # of the largest, which only an absolute tolerance covers
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
  out = jax.jit(lojax.lorafy(model.apply))(lora, ids)
  np.testing.assert_allclose(out, model.apply(lojax.merge(lora), ids), rtol=1e-5, atol=1e-5)


def test_dora_step_keeps_one_output_per_kernel_beyond_lora():
  """m's gradient is colsum(dy * z) / n, z = x@W + s(x@A)@B the lean op's output: beyond
  LoRA's residuals a DoRA step keeps z ([N, D]) for each adapted kernel and [D] vectors, and
  nothing kernel-sized; the compiled temp memory stays within one f32 [N, D] per kernel of
  LoRA's. Measured: LoRA 35.8 MiB, DoRA 42.4 MiB (bound 44.8); the plain path's DoRA, which
  keeps x@W, (x@A)@B and the kernel input of every kernel, 54.3 MiB."""
  model = gpt.GPT(vocab=512, d=128, heads=4, layers=2, max_len=128)
  params, ids = gpt.init(model, batch=8, seq=128)
  fns = gpt.step_fns(model, ids)
  steps = {}
  for name, kw in (("lora", {}), ("dora", {"use_dora": True})):
    lora = _perturbed(lojax.wrap(params, lojax.LoraSpec(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **kw),
        key=jax.random.key(0)))
    _, f_vjp = jax.vjp(_loss_fn(lojax.lorafy(model.apply), lora, ids), lora.trainable)
    kept = collections.Counter((x.shape, x.dtype) for x in jax.tree.leaves(f_vjp))
    steps[name] = (lora, kept, _temp_bytes(fns["lora"], lora, fns["tx"].init(lora.trainable), ids))
  (_, lora_kept, lora_temp), (dora, dora_kept, dora_temp) = steps["lora"], steps["dora"]
  targets = dora.meta.adapters[0].targets
  outs = [(ids.size, math.prod(t.kernel_shape[a] for a in t.out_axes)) for t in targets]
  bound = lora_temp + sum(4 * math.prod(o) for o in outs)
  mib = lambda x: f"{x / 2**20:.1f} MiB"  # noqa: E731
  assert dora_temp <= bound, dict(dora=mib(dora_temp), lora=mib(lora_temp), bound=mib(bound))
  assert not lora_kept - dora_kept, lora_kept - dora_kept
  extra = dora_kept - lora_kept
  big = collections.Counter({k: n for k, n in extra.items() if math.prod(k[0]) > model.d * 4})
  assert big == collections.Counter((o, jnp.dtype(jnp.float32)) for o in outs), extra
