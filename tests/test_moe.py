"""Adapters on MoE expert kernels: each expert gets its own factors, in the step factorized.

An expert kernel ``[E, in, out]`` is consumed three ways in JAX MoE code: a
batched einsum with the expert axis as a batch axis, a loop that indexes one
expert at a time, or ``jax.lax.ragged_dot`` over tokens sorted by expert. In
each case lojax finds the expert axis by tracing, gives expert ``e`` its own
``A[e] [in, r]`` and ``B[e] [r, out]`` (PEFT's per-expert LoRA of
``target_parameters``), and computes ``x_e @ W_e + s (x_e @ A_e) @ B_e``.
The references below are written out per expert in float64 NumPy.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lojax

E, D, F, T, R = 4, 64, 128, 32, 4
S = 2.0  # lora_alpha / r
GROUPS = np.array([40, 0, 56, 32])   # ragged_dot: tokens per expert (one expert gets none)
M = int(GROUPS.sum())


def _params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"moe": {"wi": jax.random.normal(k[0], (E, D, F)) / math.sqrt(D),
                  "wo": jax.random.normal(k[1], (E, F, D)) / math.sqrt(F)},
          "norm": {"scale": jnp.ones((D,))}}


def batched(p, x):          # x: [E, T, D], tokens already dispatched to experts
  h = jnp.einsum("etd,edf->etf", x * p["norm"]["scale"], p["moe"]["wi"])
  return jnp.einsum("etf,efd->etd", jax.nn.relu(h), p["moe"]["wo"])


def loop(p, x):             # one expert at a time, a static index each
  outs = []
  for e in range(E):
    h = jax.nn.relu((x[e] * p["norm"]["scale"]) @ p["moe"]["wi"][e])
    outs.append(h @ p["moe"]["wo"][e])
  return jnp.stack(outs)


def fori(p, x):             # a traced expert index (dynamic_slice) in a fori_loop
  def body(e, out):
    wi = jax.lax.dynamic_index_in_dim(p["moe"]["wi"], e, keepdims=False)
    wo = jax.lax.dynamic_index_in_dim(p["moe"]["wo"], e, keepdims=False)
    xe = jax.lax.dynamic_index_in_dim(x, e, keepdims=False) * p["norm"]["scale"]
    return out.at[e].set(jax.nn.relu(xe @ wi) @ wo)
  return jax.lax.fori_loop(0, E, body, jnp.zeros_like(x))


def ragged(p, x):           # x: [M, D] sorted by expert, GROUPS tokens each
  g = jnp.asarray(GROUPS, jnp.int32)
  h = jax.lax.ragged_dot(x * p["norm"]["scale"], p["moe"]["wi"], g)
  return jax.lax.ragged_dot(jax.nn.relu(h), p["moe"]["wo"], g)


FORMS = {"batched": (batched, (E, T, D)), "loop": (loop, (E, T, D)),
         "fori": (fori, (E, T, D)), "ragged": (ragged, (M, D))}


def _x(shape):
  return jax.random.normal(jax.random.key(3), shape)


def _wrap(fn, x, **kw):
  spec = lojax.LoraSpec(r=R, lora_alpha=R * S, target_modules=["moe/wi", "moe/wo"], **kw)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    return lojax.wrap(_params(), spec, key=jax.random.key(1), apply_fn=fn, example_args=(x,))


def _numpy_moe(p, x, form):
  """The MoE layer in float64 NumPy with per-expert kernels ``p[name][e]``."""
  x = np.asarray(x, np.float64)
  if form == "ragged":
    rows = np.split(np.arange(M), np.cumsum(GROUPS)[:-1])
    out = np.zeros((M, D))
    for e, idx in enumerate(rows):
      out[idx] = np.maximum(x[idx] @ p["wi"][e], 0) @ p["wo"][e]
    return out
  return np.stack([np.maximum(x[e] @ p["wi"][e], 0) @ p["wo"][e] for e in range(E)])


def _adapted(lora):
  """Per-expert adapted kernels in float64: W_e + s * A_e @ B_e, written out."""
  base, entries = lora.base["moe"], lora.trainable["default"]["lora"]
  out = {}
  for name in ("wi", "wo"):
    a = np.asarray(entries[f"moe/{name}"]["lora_A"], np.float64)
    b = np.asarray(entries[f"moe/{name}"]["lora_B"], np.float64)
    w = np.asarray(base[name], np.float64)
    out[name] = np.stack([w[e] + S * a[e] @ b[e] for e in range(E)])
  return out


@pytest.mark.parametrize("form", FORMS)
def test_expert_axes_are_found_by_tracing(form):
  fn, shape = FORMS[form]
  found = lojax.kernel_paths(_params(), apply_fn=fn, example_args=(_x(shape),))
  assert found["moe/wi"]["expert_axes"] == (0,) and found["moe/wi"]["in_axes"] == (1,)
  assert found["moe/wo"]["expert_axes"] == (0,) and found["moe/wo"]["in_axes"] == (1,)
  lora = _wrap(fn, _x(shape))
  entries = lora.trainable["default"]["lora"]
  assert entries["moe/wi"]["lora_A"].shape == (E, D, R)
  assert entries["moe/wi"]["lora_B"].shape == (E, R, F)
  assert entries["moe/wo"]["lora_A"].shape == (E, F, R)
  assert entries["moe/wo"]["lora_B"].shape == (E, R, D)
  # PEFT's per-expert init: each expert's A ~ U(+-1/sqrt(in)), B = 0
  a = np.asarray(entries["moe/wi"]["lora_A"])
  assert np.abs(a).max() <= 1 / math.sqrt(D) and np.abs(a).max() > 0.9 / math.sqrt(D)
  assert not np.asarray(entries["moe/wi"]["lora_B"]).any()


@pytest.mark.parametrize("form", FORMS)
def test_each_expert_gets_its_own_delta(form):
  fn, shape = FORMS[form]
  x = _x(shape)
  lora = _wrap(fn, x, init_lora_weights=False)   # random A and B: a non-zero delta
  want = _numpy_moe(_adapted(lora), x, form)
  got = np.asarray(jax.jit(lojax.lorafy(fn))(lora, x))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
  # the deltas differ between experts (a shared factor would make them rank-r overall)
  d = _adapted(lora)["wi"] - np.asarray(lora.base["moe"]["wi"], np.float64)
  assert np.linalg.matrix_rank(d.transpose(1, 0, 2).reshape(D, E * F), tol=1e-6) == E * R
  merged = lojax.merge(lora)
  np.testing.assert_allclose(np.asarray(merged["moe"]["wi"]), _adapted(lora)["wi"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(lojax.unmerge(lora, merged)["moe"]["wi"]),
                             np.asarray(lora.base["moe"]["wi"]), atol=1e-5)


@pytest.mark.parametrize("form", ["batched", "ragged"])
def test_expert_factor_gradients_match_written_out_math(form):
  fn, shape = FORMS[form]
  x = _x(shape)
  lora = _wrap(fn, x, init_lora_weights=False)
  got = jax.grad(lambda t: jnp.sum(jnp.sin(lojax.lorafy(fn)(lora.with_trainable(t), x))))(
      lora.trainable)["default"]["lora"]
  with jax.enable_x64(True):
    base = {k: jnp.asarray(v, jnp.float64) for k, v in lora.base["moe"].items()}
    f64 = {k: {n: jnp.asarray(v, jnp.float64) for n, v in e.items()}
           for k, e in lora.trainable["default"]["lora"].items()}
    x64 = jnp.asarray(x, jnp.float64)

    def ref(f):
      w = {n: base[n] + S * jnp.einsum("eir,ero->eio", f[f"moe/{n}"]["lora_A"],
                                       f[f"moe/{n}"]["lora_B"]) for n in ("wi", "wo")}
      if form == "ragged":
        seg = np.repeat(np.arange(E), GROUPS)
        h = jax.nn.relu(jnp.einsum("md,mdf->mf", x64, w["wi"][seg]))
        y = jnp.einsum("mf,mfd->md", h, w["wo"][seg])
      else:
        y = jnp.einsum("etf,efd->etd", jax.nn.relu(jnp.einsum("etd,edf->etf", x64, w["wi"])),
                       w["wo"])
      return jnp.sum(jnp.sin(y))

    want = jax.grad(ref)(f64)
  for path in got:
    for name in ("lora_A", "lora_B"):
      w = np.asarray(want[path][name])
      np.testing.assert_allclose(np.asarray(got[path][name]), w, rtol=1e-4,
                                 atol=1e-4 * np.abs(w).max(), err_msg=f"{path} {name}")


def _flops(f, *args):
  cost = jax.jit(f).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("form", ["batched", "loop", "ragged"])
def test_expert_step_flops_stay_at_the_frozen_limit(form):
  """The step costs the frozen MoE layer's (gradient w.r.t. its input) plus the adapters'
  own work: never a merged ``W + s A@B`` per expert, nor a kernel-sized gradient."""
  fn, shape = FORMS[form]
  x = _x(shape)
  lora = _wrap(fn, x)
  params = _params()
  tx = optax.sgd(1e-2)
  opt_state = tx.init(lora.trainable)

  def step(lora, opt_state):
    g = jax.grad(lambda t: jnp.mean(lojax.lorafy(fn)(lora.with_trainable(t), x) ** 2))(
        lora.trainable)
    updates, opt_state = tx.update(g, opt_state)
    return optax.apply_updates(lora.trainable, updates), opt_state

  def limit(x):
    return jax.value_and_grad(lambda x: jnp.mean(fn(params, x) ** 2))(x)

  tokens = E * T if form != "ragged" else M
  adapters = 2 * 6 * tokens * R * (D + F)   # two kernels, forward + two backward matmuls
  frozen = _flops(limit, x)
  lora_flops = _flops(step, lora, opt_state)
  assert lora_flops <= 1.05 * (frozen + adapters), (lora_flops, frozen, adapters)
  # the merged form would add a full weight gradient: 2 * tokens * D * F per kernel
  assert lora_flops < frozen + 2 * tokens * D * F


def test_expert_adapters_train_and_checkpoint(tmp_path):
  x = _x((E, T, D))
  target = jnp.tanh(x)
  lora = _wrap(batched, x)
  tx = optax.adam(1e-2)
  opt_state = tx.init(lora.trainable)

  @jax.jit
  def step(lora, opt_state):
    loss, g = jax.value_and_grad(lambda t: jnp.mean(
        (lojax.lorafy(batched)(lora.with_trainable(t), x) - target) ** 2))(lora.trainable)
    updates, opt_state = tx.update(g, opt_state)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss

  losses = []
  for _ in range(10):
    trainable, opt_state, loss = step(lora, opt_state)
    lora = lora.with_trainable(trainable)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses
  lojax.save_adapters(tmp_path / "ckpt", lora, step=10)
  restored = lojax.restore_adapters(tmp_path / "ckpt", _params())
  assert restored.meta.adapter("default").targets[0].expert_axes == (0,)
  np.testing.assert_array_equal(np.asarray(jax.jit(lojax.lorafy(batched))(restored, x)),
                                np.asarray(jax.jit(lojax.lorafy(batched))(lora, x)))


def test_expert_kernels_refuse_what_they_do_not_support():
  x = _x((E, T, D))
  for kw, word in [(dict(use_dora=True), "DoRA"), (dict(init_lora_weights="pissa"), "pissa")]:
    with pytest.raises(ValueError, match=f"(?s){word}.*expert"):
      _wrap(batched, x, **kw)
  ada = lojax.AdaLoraSpec(init_r=4, target_r=2, target_modules=["moe/wi"], total_step=10)
  with pytest.raises(ValueError, match="(?s)AdaLoRA.*expert"):
    lojax.wrap(_params(), ada, key=jax.random.key(1), apply_fn=batched, example_args=(x,))
  # (PEFT files of expert kernels, `target_parameters`: tests/test_moe_peft.py)


def test_a_kernel_indexed_on_one_axis_and_batched_on_another_is_refused():
  params = _params()

  def two_ways(p, x):
    h = jnp.einsum("etd,edf->etf", x, p["moe"]["wi"])                     # experts on axis 0
    k = jnp.einsum("edt,edf->tf", jnp.swapaxes(x, 1, 2), p["moe"]["wi"])   # contracts axis 0
    return jnp.einsum("etf,efd->etd", h + k, p["moe"]["wo"])

  spec = lojax.LoraSpec(r=R, target_modules=["moe/wi"])
  with pytest.raises(ValueError, match=r"moe/wi.*(different|contract)"):
    lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=two_ways,
               example_args=(_x((E, T, D)),))


def scanned_experts(layers, e, d, f):
  """``{"wi": [L, E, d, f], "wo": [L, E, f, d]}`` and a residual MoE MLP scanned over layers."""
  k = jax.random.split(jax.random.key(5), 2)
  params = {"wi": jax.random.normal(k[0], (layers, e, d, f)) / math.sqrt(d),
            "wo": jax.random.normal(k[1], (layers, e, f, d)) / math.sqrt(f)}

  def fn(p, x):
    def body(x, w):
      h = jax.nn.relu(jnp.einsum("etd,edf->etf", x, w["wi"]))
      return x + jnp.einsum("etf,efd->etd", h, w["wo"]), None
    return jax.lax.scan(body, x, p)[0]
  return params, fn


def test_stacked_layers_of_experts_under_scan():
  """``[L, E, in, out]`` experts scanned over layers: factors ``[L, E, in, r]``, ``[L, E, r,
  out]``; the rank-r deltas of every (layer, expert) pair are their own."""
  layers = 3
  params, fn = scanned_experts(layers, E, D, F)
  x = _x((E, T, D))
  spec = lojax.LoraSpec(r=R, lora_alpha=R * S, target_modules=["wi", "wo"],
                        init_lora_weights=False, layers_to_transform=[0, 2])
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=fn, example_args=(x,))
  t = lora.meta.adapter("default").target("wi")
  assert (t.stacked, t.expert_axes, t.in_axes) == (layers, (0,), (1,))
  entries = lora.trainable["default"]["lora"]
  assert entries["wi"]["lora_A"].shape == (2, E, D, R)
  assert entries["wi"]["lora_B"].shape == (2, E, R, F)
  w = {n: np.asarray(params[n], np.float64).copy() for n in params}
  for n in w:
    a = np.asarray(entries[n]["lora_A"], np.float64)
    b = np.asarray(entries[n]["lora_B"], np.float64)
    for j, layer in enumerate([0, 2]):
      for e in range(E):
        w[n][layer, e] += S * a[j, e] @ b[j, e]
  h = np.asarray(x, np.float64)
  for layer in range(layers):
    h = h + np.stack([np.maximum(h[e] @ w["wi"][layer, e], 0) @ w["wo"][layer, e]
                      for e in range(E)])
  got = np.asarray(jax.jit(lojax.lorafy(fn))(lora, x))
  np.testing.assert_allclose(got, h, rtol=1e-4, atol=1e-4 * np.abs(h).max())
  np.testing.assert_allclose(np.asarray(lojax.merge(lora)["wi"]), w["wi"], rtol=1e-5, atol=1e-5)


def test_two_expert_axes_one_batched_one_indexed():
  """``[G, E, in, out]``: batched over G, one expert of E at a time (``w[:, e]``): both
  axes index experts, each (g, e) pair has its own factors."""
  G = 2
  w = jax.random.normal(jax.random.key(6), (G, E, D, F)) / math.sqrt(D)
  params = {"experts": w}

  def fn(p, x):  # x: [G, E, T, D]
    return jnp.stack([jnp.einsum("gtd,gdf->gtf", x[:, e], p["experts"][:, e])
                      for e in range(E)], axis=1)

  x = jax.random.normal(jax.random.key(7), (G, E, T, D))
  spec = lojax.LoraSpec(r=R, lora_alpha=R * S, target_modules=["experts"],
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=fn, example_args=(x,))
  assert lora.meta.adapter("default").target("experts").expert_axes == (0, 1)
  entry = lora.trainable["default"]["lora"]["experts"]
  a, b = (np.asarray(entry[n], np.float64) for n in ("lora_A", "lora_B"))
  assert a.shape == (G, E, D, R) and b.shape == (G, E, R, F)
  want = np.einsum("getd,gedf->getf", np.asarray(x, np.float64),
                   np.asarray(w, np.float64) + S * np.einsum("gedr,gerf->gedf", a, b))
  got = np.asarray(jax.jit(lojax.lorafy(fn))(lora, x))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
