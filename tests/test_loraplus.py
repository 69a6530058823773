"""LoRA+ (lojax.loraplus): PEFT's create_loraplus_optimizer as an optax transform.

* Live against PEFT (skips without torch/transformers/peft): the tiny GPT-2 of
  tests/test_peft_oracle.py, identical weights and adapter values on both sides,
  ``create_loraplus_optimizer(model, torch.optim.AdamW, ...)`` against
  ``lojax.loraplus(optax.adamw, ...)`` over 4 steps on the same batches; every trained
  tensor's movement agrees to 1e-5 (observed: at most ~3e-6 on movements of 4e-3..7e-2).
* Float64, NumPy-written: the update of every leaf of a tree with every kind of leaf
  (dense and embedding factors, DoRA magnitudes, AdaLoRA's E, biases, saved kernels and
  norms) is ``-rate * g`` (plus coupled decay) with the rate of PEFT's group, written out
  by path, under a schedule, with and without jit.
* Composition with ``lojax.adalora`` and the errors.
"""

from __future__ import annotations

import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lojax

sys.path.insert(0, os.path.dirname(__file__))
import test_peft_oracle as oracle  # noqa: E402

LR, RATIO, WD, EMB, STEPS = 1e-3, 16, 0.1, 4e-3, 4
TOL = 1e-5   # on each trained tensor's movement, float32 on both sides


# ---------------------------------------------------------------------------
# Against PEFT itself
# ---------------------------------------------------------------------------

CASES = {
    # lora_A / lora_B of Conv1D kernels, an embedding (its own rate), every bias (bias="all",
    # never decayed), a saved LayerNorm (1-D: lr * ratio, undecayed) and a saved nn.Linear
    # head (2-D: lr); with a learning-rate schedule (torch's LambdaLR on PEFT's side).
    "lora_embedding_bias_saved_schedule": oracle.Case(
        "loraplus_lora", **oracle._same(r=2, target_modules=["c_attn", "c_fc", "wte"],
                                        bias="all", modules_to_save=["ln_f", "lm_head"])),
    "dora": oracle.Case("loraplus_dora", **oracle._same(r=2, lora_alpha=8, use_dora=True,
                                                        target_modules=["c_attn", "c_fc"])),
    "adalora_plain": oracle.Case("loraplus_adalora", adalora=True,
                                 **oracle._same(**oracle.ADALORA)),
}
SCHEDULE = {"lora_embedding_bias_saved_schedule"}
ALLOCATE = "adalora_allocated"   # the AdaLoRA case again, with the rank allocation
CASE_OF = dict(CASES, **{ALLOCATE: CASES["adalora_plain"]})


def _factor(t):
  return 1.0 - t / 8.0     # the schedule's shape (torch: LambdaLR; optax: a schedule)


def batches():
  rng = np.random.default_rng(1)
  return [tuple(rng.integers(0, oracle.VOCAB, (2, oracle.SEQ)).astype(np.int32) for _ in "xy")
          for _ in range(STEPS)]


def peft_run(name):
  """``{PEFT name: (initial, final)}`` of PEFT's LoRA+ AdamW run."""
  torch, _, _ = oracle.import_torch_stack()
  from peft.optimizers import create_loraplus_optimizer
  case = CASE_OF[name]
  model = oracle.peft_model(case.peft, case.adalora)
  params = oracle.peft_trainable(model)
  with torch.no_grad():
    for n, p in params.items():
      p.copy_(torch.from_numpy(oracle.trained_value(n, tuple(p.shape))))
  init = {n: p.detach().numpy().copy() for n, p in params.items()}
  # weight_decay=0.5 has no effect in PEFT (each group sets its own, loraplus_weight_decay).
  opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                  weight_decay=0.5, loraplus_weight_decay=WD,
                                  loraplus_lr_embedding=EMB)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, _factor) if name in SCHEDULE else None
  for i, (ids, labels) in enumerate(batches()):
    ids, labels = torch.from_numpy(ids).long(), torch.from_numpy(labels).long()
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, oracle.VOCAB), labels.reshape(-1))
    loss.backward()
    opt.step()
    if sched is not None:
      sched.step()
    if name == ALLOCATE:
      model.base_model.update_and_allocate(i)
    opt.zero_grad()
  return {n: (init[n], p.detach().numpy().copy()) for n, p in params.items()}


def lojax_run(name):
  """``{PEFT name: (initial, final)}`` of lojax.loraplus(optax.adamw, ...)."""
  case = CASE_OF[name]
  lora = oracle.with_values(oracle.lojax_wrapped(case))
  if name in SCHEDULE:
    rates = dict(learning_rate=lambda t: LR * _factor(t),
                 loraplus_lr_embedding=lambda t: EMB * _factor(t))
  else:
    rates = dict(learning_rate=LR, loraplus_lr_embedding=EMB)
  tx = lojax.loraplus(optax.adamw, lora, loraplus_lr_ratio=RATIO, loraplus_weight_decay=WD,
                      **rates)
  if name == ALLOCATE:
    tx = lojax.adalora(tx, oracle.lojax_spec(case))
  trainable = lora.trainable
  state = tx.init(trainable)
  grad = oracle._loss_and_grad(case.scan)
  for ids, labels in batches():
    _, g = grad(trainable, lora, jnp.asarray(ids), jnp.asarray(labels))
    updates, state = tx.update(g, state, trainable)
    trainable = optax.apply_updates(trainable, updates)
  init, final = (oracle.to_peft_names(lora, t) for t in (lora.trainable, trainable))
  if name == ALLOCATE:
    assert lojax.adalora_budget(state) < 6, "the allocation should have pruned"
  return {n: (init[n], final[n]) for n in init}


def _key_bias(n):
  """The key slice of a c_attn bias: its gradient is 0 (softmax does not see a constant per
  query), so Adam turns float noise into full-size steps of random sign on either side."""
  return slice(oracle.D, 2 * oracle.D) if "c_attn.base_layer.bias" in n or (
      n.endswith("c_attn.bias")) else None


@pytest.mark.parametrize("name", list(CASES) + [ALLOCATE])
def test_adamw_steps_match_peft(name):
  want, got = peft_run(name), lojax_run(name)
  assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
  errs = {}
  for n in sorted(want):
    move_p = want[n][1] - want[n][0]
    move_l = np.asarray(got[n][1]) - np.asarray(got[n][0])   # a bias: lojax moves its delta
    if (s := _key_bias(n)) is not None:
      bound = STEPS * LR * RATIO * 1.01
      assert np.abs(move_l[s]).max() <= bound and np.abs(move_p[s]).max() <= bound, n
      move_p, move_l = np.delete(move_p, s), np.delete(move_l, s)
    assert np.abs(move_p).max() > 100 * TOL, f"{n} should move"
    errs[n] = float(np.abs(move_l - move_p).max())
  bad = {n: e for n, e in errs.items() if e > TOL}
  assert not bad, f"lojax's LoRA+ steps differ from PEFT's by more than {TOL}: {bad}"


# ---------------------------------------------------------------------------
# Float64, the rates written out
# ---------------------------------------------------------------------------

def _tree():
  rng = np.random.default_rng(0)
  return {"emb": {"embedding": rng.standard_normal((7, 3))},
          "dense": {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)},
          "norm": {"scale": 1 + rng.standard_normal(4), "bias": rng.standard_normal(4)},
          "head": {"kernel": rng.standard_normal((4, 2)), "bias": rng.standard_normal(2)},
          "gate": {"kernel": rng.standard_normal((4, 5))}}


def _lora(dora=False, adalora=False, dtype=jnp.float32):
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), _tree())
  kw = dict(bias="all", modules_to_save=["norm", "head"])
  if adalora:
    spec = lojax.AdaLoraSpec(init_r=3, target_r=2, total_step=10, target_modules=["dense", "gate"],
                             **kw)
  else:
    spec = lojax.LoraSpec(r=2, target_modules=["dense", "gate"] + ([] if dora else ["emb"]),
                          use_dora=dora, **kw)
  return lojax.wrap(params, spec, key=jax.random.key(0), dtype=dtype), spec


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# PEFT's groups, written out by the leaf's place in lojax's tree (not computed by lojax):
# (rate, decayed) with rate "A" = lr, "B" = lr * ratio, "E" = the embedding rate.
def _expected_group(key: str) -> tuple[str, bool]:
  if "'adalora_step'" in key:
    return "0", False                                    # bookkeeping, not trained
  if "['lora']['emb']" in key:
    return "E", True                                     # lora_embedding_A / _B
  if key.endswith("['lora_B']") or key.endswith("['lora_magnitude']"):
    return "B", True
  if key.endswith("['lora_A']") or key.endswith("['lora_E']"):
    return "A", True                                     # PEFT's lora_E is [r, 1]: 2-D
  if "['bias']" in key:
    return "B", False                                    # trained biases
  if key.endswith("['norm/scale']") or key.endswith("['norm/bias']") or key.endswith(
      "['head/bias']"):
    return "B", False                                    # 1-D saved: norm, bias
  if key.endswith("['head/kernel']"):
    return "A", True                                     # 2-D saved
  raise AssertionError(f"no expectation for {key}")


@pytest.mark.parametrize("variant", ["lora", "dora", "adalora"])
@pytest.mark.parametrize("jit", [False, True])
def test_sgd_rates_per_group_float64(variant, jit):
  with jax.enable_x64(True):
    lora, _ = _lora(dora=variant == "dora", adalora=variant == "adalora", dtype=jnp.float64)
    lr = lambda t: 0.1 * 0.5 ** t
    wd, emb = 0.01, 1e-6                                      # PEFT's default embedding rate
    coupled = lambda learning_rate, weight_decay: optax.chain(
        optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))
    tx = lojax.loraplus(coupled, lora, learning_rate=lr, loraplus_lr_ratio=RATIO,
                        loraplus_weight_decay=wd)
    update = jax.jit(tx.update) if jit else tx.update
    params = lora.trainable
    state = tx.init(params)
    rng = np.random.default_rng(1)
    seen = set()
    for t in range(3):
      grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), params)
      updates, state = update(grads, state, params)
      for key, u in _flat(updates).items():
        g, p = _flat(grads)[key], _flat(params)[key]
        rate, decayed = _expected_group(key)
        seen.add(rate)
        if rate == "0":
          np.testing.assert_array_equal(u, 0, err_msg=key)
          continue
        r = {"A": lr(t), "B": lr(t) * RATIO, "E": emb}[rate]
        want = -r * (g + (wd * p if decayed else 0.0))
        assert u.dtype == np.float64, key
        np.testing.assert_allclose(u, want, rtol=1e-12, atol=1e-300, err_msg=key)
      params = optax.apply_updates(params, updates)
    assert seen >= {"A", "B"} | ({"E"} if variant == "lora" else set())


def test_whole_lora_params_leave_the_base_and_inactive_adapters_alone():
  lora, spec = _lora()
  lora = lojax.wrap(lora, spec, key=jax.random.key(1), adapter_name="other")   # inactive
  tx = lojax.loraplus(optax.sgd, lora, learning_rate=0.1, loraplus_lr_ratio=RATIO)
  grads = jax.tree.map(jnp.ones_like, lora)
  updates, _ = tx.update(grads, tx.init(lora), lora)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(updates.base))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(updates.adapters["other"]))
  sub = lojax.loraplus(optax.sgd, lora, learning_rate=0.1, loraplus_lr_ratio=RATIO)
  want, _ = sub.update(jax.tree.map(jnp.ones_like, lora.trainable), sub.init(lora.trainable))
  for a, b in zip(jax.tree.leaves(updates.trainable), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(updates.trainable["default"]["lora"]["dense"]["lora_B"], -1.6,
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# With AdaLoRA's allocation
# ---------------------------------------------------------------------------

def test_adalora_wraps_loraplus_and_the_ratio_holds_for_lora_b():
  lora, spec = _lora(adalora=True)
  tx = lojax.adalora(lojax.loraplus(optax.sgd, lora, learning_rate=0.05, loraplus_lr_ratio=RATIO),
                     spec)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 3)))

  def loss(trainable):
    m = lora.with_trainable(trainable)
    apply = lojax.lorafy(lambda p, x: jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
                         @ p["gate"]["kernel"])
    return jnp.mean(apply(m, x) ** 2) + lojax.adalora_orth_reg(trainable, spec=spec)

  @jax.jit
  def step(trainable, state):
    g = jax.grad(loss)(trainable)
    updates, state = tx.update(g, state, trainable)
    return optax.apply_updates(trainable, updates), state, g, updates

  trainable, state = lora.trainable, tx.init(lora.trainable)
  for _ in range(6):
    trainable, state, g, updates = step(trainable, state)
    for path in ("dense", "gate"):
      u, gg = updates["default"]["lora"][path], g["default"]["lora"][path]
      np.testing.assert_allclose(u["lora_B"], -0.05 * RATIO * gg["lora_B"], rtol=1e-6,
                                 atol=1e-12)
      np.testing.assert_allclose(u["lora_A"], -0.05 * gg["lora_A"], rtol=1e-6, atol=1e-12)
  assert sum(lojax.adalora_ranks(state).values()) < 6, "the allocation should have pruned"
  assert int(trainable["default"]["adalora_step"]) == 6   # adalora counted every update
  with warnings.catch_warnings():
    warnings.simplefilter("error")                          # allocated: no warning
    lojax.merge(lora.with_trainable(trainable))


def test_loraplus_alone_on_adalora_does_not_count_as_allocation():
  lora, spec = _lora(adalora=True)
  tx = lojax.loraplus(optax.adamw, lora, learning_rate=0.1, loraplus_lr_ratio=RATIO)
  grads = jax.tree.map(jnp.ones_like, lora.trainable)
  updates, _ = tx.update(grads, tx.init(lora.trainable), lora.trainable)
  assert float(updates["default"]["adalora_step"]) == 0.0


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0, -2.0, float("nan"), float("inf"), True, "16", None])
def test_ratio_must_be_finite_and_positive(ratio):
  lora, _ = _lora()
  with pytest.raises(ValueError, match=r"`loraplus_lr_ratio` must be a finite number > 0"):
    lojax.loraplus(optax.adamw, lora, learning_rate=1e-3, loraplus_lr_ratio=ratio)


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=-1e-3), r"`learning_rate` must be a finite number > 0 or a schedule"),
    (dict(learning_rate=float("nan")), r"`learning_rate` must be a finite number"),
    (dict(loraplus_lr_embedding=-1.0), r"`loraplus_lr_embedding` must be a finite number >= 0"),
    (dict(loraplus_weight_decay=float("inf")), r"`loraplus_weight_decay` must be a finite"),
])
def test_rates_and_decay_are_checked(kwargs, match):
  lora, _ = _lora()
  kw = dict(learning_rate=1e-3, loraplus_lr_ratio=RATIO) | kwargs
  with pytest.raises(ValueError, match=match):
    lojax.loraplus(optax.adamw, lora, **kw)


def test_the_tree_must_be_lojax_s():
  lora, _ = _lora()
  with pytest.raises(TypeError, match=r"`lora` must be the LoraParams returned by lojax.wrap"):
    lojax.loraplus(optax.adamw, lora.trainable, learning_rate=1e-3, loraplus_lr_ratio=RATIO)
  tx = lojax.loraplus(optax.adamw, lora, learning_rate=1e-3, loraplus_lr_ratio=RATIO)
  other = lojax.wrap(lora.base, lojax.LoraSpec(r=2, target_modules=["head"]), key=jax.random.key(0))
  for wrong, what in [({"w": jnp.ones(3)}, r"no adapter named 'w'"),
                      (lora.base, r"no adapter named"),
                      (other.trainable, r"default/lora/head is not a target"),
                      (jnp.ones(3), r"got a ArrayImpl|got a Array")]:
    with pytest.raises(ValueError, match=r"lojax.loraplus: the params are not the tree.*" + what):
      tx.init(wrong)


def test_the_optimizer_must_be_a_factory():
  lora, _ = _lora()
  with pytest.raises(TypeError, match=r"pass `optax.adamw`, not `optax.adamw\(1e-3\)`"):
    lojax.loraplus(optax.adamw(1e-3), lora, learning_rate=1e-3, loraplus_lr_ratio=RATIO)
  with pytest.raises(TypeError, match=r"takes no `weight_decay` argument"):
    lojax.loraplus(optax.sgd, lora, learning_rate=1e-3, loraplus_lr_ratio=RATIO,
                   loraplus_weight_decay=0.1)
  with pytest.raises(TypeError, match=r"not an optax GradientTransformation"):
    lojax.loraplus(lambda learning_rate: learning_rate, lora, learning_rate=1e-3,
                   loraplus_lr_ratio=RATIO)
