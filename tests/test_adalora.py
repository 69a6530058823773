"""AdaLoRA: schedule, masking, allocation, regulariser, resize, validation."""

import fractions
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lojax


def two_branch_model():
  """y = x @ A + 1e-3 * (x @ B): branch "a" matters, branch "b" barely."""
  k = jax.random.split(jax.random.key(0), 4)
  params = {"a": {"kernel": 0.1 * jax.random.normal(k[0], (8, 8))},
            "b": {"kernel": 0.1 * jax.random.normal(k[1], (8, 8))}}
  f = lambda p, x: x @ p["a"]["kernel"] + 1e-3 * (x @ p["b"]["kernel"])
  x = jax.random.normal(k[2], (64, 8))
  y = x @ jax.random.normal(k[3], (8, 8))
  return params, f, x, y


def train(spec, steps, seed=0, lr=1e-2, opt_state=None, lora=None, record=None):
  params, f, x, y = two_branch_model()
  if lora is None:
    lora = lojax.wrap(params, spec, key=jax.random.key(seed))
  tx = lojax.adalora(optax.adam(lr), spec)
  opt_state = tx.init(lora.trainable) if opt_state is None else opt_state
  apply = lojax.lorafy(f)
  traces = []

  @jax.jit
  def step(lora, opt_state):
    traces.append(1)
    def loss_fn(t):
      return jnp.mean((apply(lora.with_trainable(t), x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return lora.with_trainable(optax.apply_updates(lora.trainable, updates)), opt_state, loss

  for _ in range(steps):
    lora, opt_state, loss = step(lora, opt_state)
    if record is not None:
      record.append((lojax.adalora_budget(opt_state),
                     {p: np.asarray(v["lora_E"]) for p, v in lora.adapters["default"]["lora"].items()}))
  return lora, opt_state, loss, len(traces)


def reference_budget(t, init_bgt, target_bgt, tinit, tfinal, T, deltaT):
  """The cubic schedule of the AdaLoRA paper (Zhang et al., 2023, eq. 12), in exact rationals:
  b(t) = b(T) + floor((b(0) - b(T)) * ((T - t_f - t) / (T - t_f - t_i))^3) during the decay,
  b(0) before it and b(T) after it; PEFT counts the decay from step t_i + 1 and masks every
  deltaT-th step of it."""
  if t <= tinit:
    return init_bgt, False
  if t > T - tfinal:
    return target_bgt, True
  left = fractions.Fraction(T - tfinal - t, T - tfinal - tinit)
  return target_bgt + math.floor((init_bgt - target_bgt) * left ** 3), t % deltaT == 0


@pytest.mark.parametrize("tinit,tfinal,deltaT", [(0, 0, 1), (5, 8, 3), (3, 0, 4), (0, 6, 2)])
def test_budget_schedule_every_step(tinit, tfinal, deltaT):
  T = 30
  spec = lojax.AdaLoraSpec(init_r=4, target_r=1, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                           total_step=T, target_modules=["a", "b"])
  record = []
  train(spec, T + 3, record=record)
  for t, (budget, E) in enumerate(record):
    want, mask_ind = reference_budget(t, 8, 2, tinit, tfinal, T, deltaT)
    assert budget == want, (t, budget, want)
    masked = (mask_ind or t == T - tfinal) and want < 8
    zeros = sum(int((e == 0).sum()) for e in E.values())
    if masked:
      assert zeros >= 8 - want, (t, zeros, want)   # at least k triplets zeroed
    else:
      assert zeros == 0, (t, zeros)                # E untouched between masking steps


def crafted_state(spec, lora, scores_e):
  """An AdaLoRA state at step T - tfinal whose triplet scores are ``scores_e``."""
  tx = lojax.adalora(optax.sgd(0.0), spec)
  state = tx.init(lora.trainable)
  ipt, unc = {}, {}
  for p, v in lora.trainable["default"]["lora"].items():
    # A and B scores of 0 so the triplet score is the crafted E score.
    ipt[p] = {k: jnp.zeros_like(x) for k, x in v.items()}
    unc[p] = {k: jnp.zeros_like(x) for k, x in v.items()}
    ipt[p]["lora_E"] = jnp.asarray(scores_e[p], jnp.float32)
    unc[p]["lora_E"] = jnp.ones_like(v["lora_E"])
  T = spec.total_step - spec.tfinal
  return tx, state._replace(step=jnp.asarray(T, jnp.int32), ipt=ipt, unc=unc)


def test_masking_picks_the_k_lowest_triplets_ties_included():
  spec = lojax.AdaLoraSpec(init_r=4, target_r=2, tfinal=2, total_step=10, target_modules=["a", "b"])
  params, *_ = two_branch_model()
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  trainable = jax.tree.map(lambda x: x + 1.0, lora.trainable)  # E != 0 everywhere
  # 8 triplets, budget 4: k = 4 lowest are masked; 0.3 appears twice at the threshold.
  scores = {"a": [0.9, 0.1, 0.3, 0.8], "b": [0.3, 0.05, 0.7, 0.6]}
  tx, state = crafted_state(spec, lora, scores)
  zero_grads = jax.tree.map(jnp.zeros_like, trainable)
  for fn in (tx.update, jax.jit(tx.update)):
    updates, new_state = fn(zero_grads, state, trainable)
    new = optax.apply_updates(trainable, updates)
    flat = np.concatenate([scores["a"], scores["b"]])
    tau = np.sort(flat)[4 - 1]                                    # k-th smallest, k = 8 - 4
    for p in ("a", "b"):
      e = np.asarray(new["default"]["lora"][p]["lora_E"])
      keep = np.asarray(scores[p]) > tau
      np.testing.assert_array_equal(e != 0, keep)
      np.testing.assert_array_equal(np.asarray(new_state.final_mask[p]), keep)
    assert lojax.adalora_ranks(new_state) == {"a": 2, "b": 2}
  # The final mask is re-applied at every later step, even if E regrows.
  regrown = jax.tree.map(lambda x: x + 0.5, new)
  updates, _ = tx.update(zero_grads, new_state, regrown)
  after = optax.apply_updates(regrown, updates)
  assert np.count_nonzero(after["default"]["lora"]["a"]["lora_E"]) == 2


def test_importance_emas_follow_the_formulas():
  spec = lojax.AdaLoraSpec(init_r=2, target_r=1, total_step=100, beta1=0.8, beta2=0.7,
                           target_modules=["a"])
  params, *_ = two_branch_model()
  lora = lojax.wrap(params, spec, key=jax.random.key(1))
  trainable = lora.trainable
  tx = lojax.adalora(optax.sgd(0.1), spec)
  state = tx.init(trainable)
  rng = np.random.default_rng(0)
  ipt = unc = None
  for _ in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), trainable)
    updates, state = tx.update(grads, state, trainable)
    p_new = np.asarray(trainable["default"]["lora"]["a"]["lora_A"], np.float64) - 0.1 * np.asarray(
        grads["default"]["lora"]["a"]["lora_A"], np.float64)
    i_now = np.abs(p_new * np.asarray(grads["default"]["lora"]["a"]["lora_A"]))
    ipt = (1 - 0.8) * i_now if ipt is None else 0.8 * ipt + 0.2 * i_now
    unc = (1 - 0.7) * np.abs(i_now - ipt) if unc is None else 0.7 * unc + 0.3 * np.abs(i_now - ipt)
    np.testing.assert_allclose(state.ipt["a"]["lora_A"], ipt, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(state.unc["a"]["lora_A"], unc, rtol=1e-5, atol=1e-8)
    trainable = optax.apply_updates(trainable, updates)


def test_training_allocates_rank_to_the_layer_that_matters_and_jits_once():
  spec = lojax.AdaLoraSpec(init_r=4, target_r=2, tinit=10, tfinal=20, deltaT=5, total_step=150,
                           target_modules=["a", "b"], lora_alpha=8)
  lora, opt_state, loss, n_traces = train(spec, 150, lr=3e-2)
  ranks = lojax.adalora_ranks(opt_state)
  assert sum(ranks.values()) == 2 * 2          # the target budget
  assert ranks["a"] > ranks["b"], ranks
  assert n_traces == 1
  pattern = lojax.adalora_rank_pattern(opt_state)
  assert sum(pattern["a"]) == ranks["a"] and len(pattern["a"]) == 4


def test_state_round_trips_through_a_checkpoint(tmp_path):
  spec = lojax.AdaLoraSpec(init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=2, total_step=20,
                           target_modules=["a", "b"])
  lora, opt_state, _, _ = train(spec, 8)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", {"opt": opt_state, "trainable": lora.trainable})
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "state", {"opt": opt_state, "trainable": lora.trainable})
  r_opt = restored["opt"]
  assert isinstance(r_opt, lojax.AdaLoraState)
  for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(r_opt)):
    np.testing.assert_array_equal(a, b)
  # Resuming from the restored state follows the same trajectory.
  _, s1, l1, _ = train(spec, 6, opt_state=opt_state, lora=lora)
  _, s2, l2, _ = train(spec, 6, opt_state=r_opt, lora=lora.with_trainable(restored["trainable"]))
  assert float(l1) == float(l2)
  assert lojax.adalora_ranks(s1) == lojax.adalora_ranks(s2)


def test_orth_reg_matches_numpy():
  spec = lojax.AdaLoraSpec(init_r=3, target_r=1, total_step=10, target_modules=["a", "b"],
                           orth_reg_weight=0.25)
  params, *_ = two_branch_model()
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  norms = []
  for v in lora.trainable["default"]["lora"].values():
    a, b = np.asarray(v["lora_A"], np.float64), np.asarray(v["lora_B"], np.float64)
    norms.append(np.linalg.norm(a.T @ a - np.eye(3)))
    norms.append(np.linalg.norm(b @ b.T - np.eye(3)))
  got = lojax.adalora_orth_reg(lora.trainable, spec=spec)
  np.testing.assert_allclose(got, 0.25 * np.mean(norms), rtol=1e-5)
  grads = jax.grad(lambda t: lojax.adalora_orth_reg(t, spec=spec))(lora.trainable)
  assert np.abs(grads["default"]["lora"]["a"]["lora_A"]).max() > 0


def test_delta_and_scaling_follow_peft():
  spec = lojax.AdaLoraSpec(init_r=3, target_r=1, total_step=10, target_modules=["a"], lora_alpha=6)
  params, f, x, _ = two_branch_model()
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  v = lora.trainable["default"]["lora"]["a"]
  assert not np.any(v["lora_E"])
  assert 0.01 < np.std(v["lora_A"]) < 0.03 and 0.01 < np.std(v["lora_B"]) < 0.03   # N(0, 0.02)
  e = jnp.asarray([0.5, -1.0, 2.0])
  t = jax.tree.map(lambda z: z, lora.trainable)
  t["default"]["lora"]["a"]["lora_E"] = e
  lora = lora.with_trainable(t)
  P, Q = np.asarray(v["lora_A"], np.float64), np.asarray(v["lora_B"], np.float64)
  delta = (P * np.asarray(e)) @ Q * 6 / (3 + 1e-5)
  ref = np.asarray(x, np.float64) @ (np.asarray(params["a"]["kernel"], np.float64) + delta) + \
      1e-3 * (np.asarray(x, np.float64) @ np.asarray(params["b"]["kernel"], np.float64))
  np.testing.assert_allclose(jax.jit(lojax.lorafy(f))(lora, x), ref, rtol=1e-5, atol=1e-5)


def test_rank_pattern_sets_per_module_init_r_and_budget():
  spec = lojax.AdaLoraSpec(init_r=4, target_r=2, total_step=10, target_modules=["a", "b"],
                           rank_pattern={"b": 6})
  params, *_ = two_branch_model()
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  assert lora.trainable["default"]["lora"]["b"]["lora_E"].shape == (6,)
  t = {x.path: x for x in lora.meta.adapters[0].targets}
  assert t["b"].scaling == pytest.approx(8 / 6, rel=1e-4)  # ranknum = the module's init_r
  state = lojax.adalora(optax.sgd(0.1), spec).init(lora.trainable)
  assert lojax.adalora_budget(state) == 10


def test_resize_truncates_and_merge_is_identical():
  spec = lojax.AdaLoraSpec(init_r=4, target_r=1, tinit=5, tfinal=10, deltaT=2, total_step=60,
                           target_modules=["a", "b"])
  lora, opt_state, _, _ = train(spec, 60, lr=3e-2)
  ranks = lojax.adalora_ranks(opt_state)
  small = lojax.adalora_resize(lora, opt_state)
  kept = {t.path: t.r for t in small.meta.adapters[0].targets}
  assert kept == {p: r for p, r in ranks.items() if r > 0}
  for p, r in kept.items():
    assert small.adapters["default"]["lora"][p]["lora_E"].shape == (r,)
  _, f, x, _ = two_branch_model()
  np.testing.assert_allclose(lojax.lorafy(f)(small, x), lojax.lorafy(f)(lora, x), rtol=1e-5,
                             atol=1e-6)
  for a, b in zip(jax.tree.leaves(lojax.merge(small)), jax.tree.leaves(lojax.merge(lora))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_module_can_end_at_rank_zero():
  spec = lojax.AdaLoraSpec(init_r=2, target_r=1, tfinal=1, total_step=5, target_modules=["a", "b"])
  params, *_ = two_branch_model()
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  trainable = jax.tree.map(lambda x: x + 1.0, lora.trainable)
  tx, state = crafted_state(spec, lora, {"a": [0.9, 0.8], "b": [0.1, 0.2]})
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, trainable), state, trainable)
  lora = lora.with_trainable(optax.apply_updates(trainable, updates))
  small = lojax.adalora_resize(lora, state)
  assert [t.path for t in small.meta.adapters[0].targets] == ["a"]
  assert "b" not in small.adapters["default"]["lora"]
  # "outputs and merged weights are unchanged": b's masked adapter contributed nothing
  _, f, x, _ = two_branch_model()
  np.testing.assert_allclose(lojax.lorafy(f)(small, x), lojax.lorafy(f)(lora, x), rtol=1e-6,
                             atol=1e-6)
  for p, q in zip(jax.tree.leaves(lojax.merge(small)), jax.tree.leaves(lojax.merge(lora))):
    np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-6)
  assert not np.allclose(lojax.lorafy(f)(small, x), f(params, x), atol=1e-4)  # a did change


def test_plain_optimizer_is_detected():
  spec = lojax.AdaLoraSpec(init_r=2, target_r=1, total_step=5, target_modules=["a"])
  params, f, x, y = two_branch_model()
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  tx = optax.adam(1e-2)
  state = tx.init(lora.trainable)
  grads = jax.grad(lambda t: jnp.mean((lojax.lorafy(f)(lora.with_trainable(t), x) - y) ** 2))(
      lora.trainable)
  updates, state = tx.update(grads, state, lora.trainable)
  lora = lora.with_trainable(optax.apply_updates(lora.trainable, updates))
  with pytest.warns(UserWarning, match=r"AdaLoRA adapter 'default' was trained but never allocated"):
    lojax.merge(lora)
  with pytest.raises(ValueError, match=r"no AdaLoRA allocation state.*lojax.adalora\(optax.adamw"):
    lojax.adalora_ranks(state)
  # Trained through lojax.adalora: no warning.
  lora2, *_ = train(spec, 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    lojax.merge(lora2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), r"`total_step` is required"),
    (dict(total_step=0), r"`total_step` must be an int > 0"),
    (dict(total_step=10, tinit=6, tfinal=4), r"`tinit` must be < `total_step - tfinal`.*tinit=6"),
    (dict(total_step=10, init_r=4, target_r=6), r"`target_r` must be <= `init_r`"),
    (dict(total_step=10, deltaT=0), r"`deltaT` must be an int >= 1"),
    (dict(total_step=10, beta1=1.0), r"`beta1` must be in \(0, 1\)"),
    (dict(total_step=10, use_rslora=True), r"does not combine with `use_rslora`"),
    (dict(total_step=10, init_lora_weights="gaussian"), r"`init_lora_weights` must stay True"),
])
def test_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lojax.AdaLoraSpec(target_modules=["a"], **kwargs)


def test_adalora_needs_an_adalora_adapter():
  params, *_ = two_branch_model()
  plain = lojax.wrap(params, lojax.LoraSpec(target_modules=["a"]), key=jax.random.key(0))
  spec = lojax.AdaLoraSpec(total_step=10, target_modules=["a"])
  with pytest.raises(ValueError, match="not an AdaLoRA adapter"):
    lojax.adalora(optax.adam(1e-3), spec).init(plain.trainable)
  with pytest.raises(TypeError, match="must be a lojax.AdaLoraSpec"):
    lojax.adalora(optax.adam(1e-3), lojax.LoraSpec(target_modules=["a"]))


def test_init_draws_and_parameter_counts_are_pinned():
  """P then Q from the documented per-path generator (so a seed gives the same adapter in every
  version), and the step counter is no parameter: PEFT's trainable count."""
  from lojax._src import inits
  spec = lojax.AdaLoraSpec(init_r=3, target_r=1, total_step=10, target_modules=["a", "b"])
  params, *_ = two_branch_model()
  lora = lojax.wrap(params, spec, key=jax.random.key(7))
  for path in ("a", "b"):
    rng = inits.generator(jax.random.key(7), path)
    v = lora.trainable["default"]["lora"][path]
    np.testing.assert_array_equal(v["lora_A"], np.float32(rng.standard_normal((8, 3)) * 0.02))
    np.testing.assert_array_equal(v["lora_B"], np.float32(rng.standard_normal((3, 8)) * 0.02))
  count = lojax.count_parameters(lora)
  assert count.trainable == 2 * (8 * 3 + 3 + 3 * 8)          # P, E, Q of two kernels
  assert count.total == 2 * 8 * 8 + count.trainable + 2   # + PEFT's ranknum per module


def test_ranks_of_a_stacked_kernel_are_a_list_per_layer():
  """Each layer of a scanned kernel is its own module for the budget (as in PEFT): with
  layer 0's triplets scored above layer 1's, the final mask keeps both of layer 0's."""
  w = 0.1 * jax.random.normal(jax.random.key(0), (2, 8, 8))
  params = {"s": {"kernel": w}}

  def f(p, x):
    return jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, p["s"]["kernel"])[0]

  x = jnp.ones((3, 8))
  spec = lojax.AdaLoraSpec(init_r=2, target_r=1, tfinal=1, total_step=5, target_modules=["s"])
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=f, example_args=(x,))
  assert lora.trainable["default"]["lora"]["s"]["lora_E"].shape == (2, 2)
  trainable = jax.tree.map(lambda v: v + 1.0, lora.trainable)
  tx, state = crafted_state(spec, lora, {"s": [[0.9, 0.8], [0.1, 0.2]]})
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, trainable), state, trainable)
  new = optax.apply_updates(trainable, updates)
  assert lojax.adalora_ranks(state) == {"s": [2, 0]}
  e = np.asarray(new["default"]["lora"]["s"]["lora_E"])
  assert [int(np.count_nonzero(row)) for row in e] == [2, 0]  # the kept entries, counted
