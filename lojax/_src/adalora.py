"""AdaLoRA: SVD-form adapters whose rank allocation runs inside the optimizer.

Each adapted kernel gets ``P [in..., r]``, ``E [r]`` and ``Q [r, out...]``
(``lora_A``, ``lora_E``, ``lora_B``) with the delta
``(P * E) @ Q * scaling / (ranknum + 1e-5)`` where ``scaling = alpha`` (or
``r`` when alpha is 0) and ``ranknum`` is the module's initial rank — PEFT's
numbers. :func:`adalora` wraps any optax optimizer into one
``GradientTransformation`` that, at every update and entirely inside jit:

1. runs the wrapped optimizer on the raw gradients;
2. scores every entry of P, E, Q after the step: ``I = |p * g|``,
   ``Ibar <- b1*Ibar + (1-b1)*I``, ``U <- b2*U + (1-b2)*|I - Ibar|``,
   ``score = Ibar * U`` (for steps ``t < T - tfinal``);
3. reads the budget of step ``t`` from PEFT's cubic schedule;
4. on masking steps (``tinit < t <= T - tfinal`` and ``t % deltaT == 0``, or
   ``t == T - tfinal`` which fixes the final mask) zeroes the entries of E
   whose triplet score ``score(E_i) + mean_row(score(P)_i) +
   mean_col(score(Q)_i)`` is at most the k-th smallest over all kernels
   (``k = init_budget - budget``; ties at the threshold are masked too);
5. after ``T - tfinal`` re-applies the final mask at every step.

``t`` counts the updates made before the current one (0 for the first). The
allocation cannot be forgotten: it is the optimizer. An AdaLoRA adapter
trained with a plain optimizer is detected — its ``adalora_step`` counter
(advanced only by :func:`adalora`) stays 0 — and :func:`lojax.merge` and
:func:`resize` warn about it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lojax._src import inits
from lojax._src import lora as lora_lib
from lojax._src import model
from lojax._src import quant
from lojax._src import spec as spec_lib
from lojax._src.model import Factors

STEP_KEY = "adalora_step"
E = "lora_E"


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class AdaLoraSpec(spec_lib.LoraSpec):
  """An AdaLoRA adapter: PEFT's AdaLoraConfig fields on top of :class:`LoraSpec`.

  Attributes:
    init_r: Initial rank of every adapted kernel (``rank_pattern`` overrides
      it per module). ``r`` is set to ``init_r``.
    target_r: Average final rank; the final budget is ``target_r`` times the
      number of adapted kernels (each layer of a stacked kernel counts once).
    tinit: Steps of full rank before pruning starts.
    tfinal: Steps at the end with the final (fixed) mask.
    deltaT: Prune every ``deltaT`` steps during the cubic decay.
    beta1: EMA factor of the sensitivity.
    beta2: EMA factor of the uncertainty.
    orth_reg_weight: Weight of :func:`adalora_orth_reg` in the loss.
    total_step: Total number of training steps (required).

  >>> spec = AdaLoraSpec(init_r=12, target_r=4, total_step=1000, target_modules="all-linear")
  >>> spec.r, spec.scaling(12, 32)
  (12, 2.66...)
  """

  init_r: int = 12
  target_r: int = 8
  tinit: int = 0
  tfinal: int = 0
  deltaT: int = 1
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg_weight: float = 0.5
  total_step: int | None = None

  def __post_init__(self):
    p = []
    ints = {"init_r": 1, "target_r": 1, "tinit": 0, "tfinal": 0, "deltaT": 1}
    for name, low in ints.items():
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        p.append(f"`{name}` must be an int >= {low}; got {name}={v!r}.")
    T = self.total_step
    if T is None:
      p.append("`total_step` is required: the total number of training steps, which the "
               "rank budget schedule needs (e.g. `total_step=len(loader) * epochs`).")
    elif isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T <= 0:
      p.append(f"`total_step` must be an int > 0; got total_step={T!r}.")
    if not p:
      if not self.tinit < T - self.tfinal:
        p.append(f"`tinit` must be < `total_step - tfinal` so that there are steps to prune "
                 f"in; got tinit={self.tinit}, total_step={T}, tfinal={self.tfinal}.")
      if self.target_r > self.init_r:
        p.append(f"`target_r` must be <= `init_r`; got target_r={self.target_r}, "
                 f"init_r={self.init_r}.")
    for name in ("beta1", "beta2"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not 0 < v < 1:
        p.append(f"`{name}` must be in (0, 1); got {name}={v!r}.")
    w = self.orth_reg_weight
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not (
        math.isfinite(w) and w >= 0):
      p.append(f"`orth_reg_weight` must be a finite number >= 0; got {w!r}.")
    if self.use_rslora is True or self.use_dora is True or self.lora_bias is True:
      p.append("AdaLoRA does not combine with `use_rslora`, `use_dora` or `lora_bias`; set "
               "them to False.")   # other values: the shared checks
    if self.init_lora_weights is not True:
      p.append("AdaLoRA initialises E = 0 and P, Q ~ N(0, 0.02); `init_lora_weights` must "
               f"stay True, got {self.init_lora_weights!r}.")
    if not p:
      object.__setattr__(self, "r", int(self.init_r))
    try:   # the shared fields' checks run too: every problem of the spec is listed at once
      super().__post_init__()
    except ValueError as e:
      shared = str(e).split(": ", 1)[1] if str(e).startswith("Invalid LoraSpec: ") else (
          str(e).split(":\n  - ", 1)[1])
      p += shared.split("\n  - ")
    if p:
      raise ValueError("Invalid AdaLoraSpec:\n  " + "\n  ".join(p))

  def scaling(self, r: int, alpha: float) -> float:
    """``(alpha if alpha > 0 else r) / (ranknum + 1e-5)``, ranknum = initial rank."""
    return (alpha if alpha > 0 else r) / (r + 1e-5)

  peft_type = "ADALORA"

  def variant(self):
    """The SVD-form variant (:class:`AdaLora`)."""
    return ADALORA

  def peft_fields(self, ranks):
    """PEFT's ADALORA entries: the schedule, and ``rank_pattern`` as kept-rank masks."""
    masks = {f"{tn}.{E}": [True] * r + [False] * (self.init_r - r)
             for tn, r in ranks.items() if r != self.init_r}
    return {"peft_type": self.peft_type, "use_dora": False, "rank_pattern": masks or None,
            **{f: getattr(self, f) for f in _own_fields()}}

  @classmethod
  def from_peft_fields(cls, config, fields, ranks):
    """The file's ranks are the allocated ones (kept per target); ``ranknum`` is ``init_r``."""
    del ranks
    if missing := [f for f in _own_fields() if f not in config]:
      raise ValueError(f"This ADALORA adapter_config.json lacks {missing}; PEFT writes every "
                       "AdaLoraConfig field. Save the adapter again with PEFT.")
    return cls(**fields, init_lora_weights=True, **{f: config[f] for f in _own_fields()})


def _own_fields() -> tuple[str, ...]:
  """The fields AdaLoraSpec adds to LoraSpec (PEFT's AdaLoraConfig extras)."""
  shared = {f.name for f in dataclasses.fields(spec_lib.LoraSpec)}
  return tuple(f.name for f in dataclasses.fields(AdaLoraSpec) if f.name not in shared)


class AdaLora(lora_lib.Lora):
  """SVD form: ``lora_A`` = P ``[L?, in..., r]``, ``lora_E`` = E ``[L?, r]``,
  ``lora_B`` = Q ``[L?, r, out...]``; the compute path's ``A`` is ``P * E``."""

  name = "adalora"
  splittable = False   # its rank budget counts per module

  def check_target(self, t):
    return self._refuse_experts(t, "AdaLoRA")

  def peft_buffers(self, t):
    """PEFT's ``ranknum``: one frozen scalar per adapted torch module (layer)."""
    return t.n_layers or 1

  def layout(self, t):
    lead = (model.LAYER,) if t.stacked else ()
    return {lora_lib.A: t.a_roles(), E: lead + (model.RANK,), lora_lib.B: t.b_roles()}

  def init(self, spec, key, t, kernel, dtype, quantize):
    """P, Q ~ N(0, 0.02), E = 0 (PEFT's AdaLoRA init); the base is only quantized."""
    rng = inits.generator(key, t.path)
    shapes = self.shapes(t)
    entry = {lora_lib.A: inits.to_device(rng.standard_normal(shapes[lora_lib.A]) * 0.02, dtype),
             E: inits.zeros(shapes[E], dtype),
             lora_lib.B: inits.to_device(rng.standard_normal(shapes[lora_lib.B]) * 0.02, dtype)}
    new = None if quantize is None else quant.quantize(kernel, quantize, in_axes=t.in_axes,
                                                       stacked=bool(t.stacked))
    return entry, new

  def adapter_state(self, spec):
    return {STEP_KEY: jnp.zeros((), jnp.float32)}

  def factors(self, t, entry):
    f = super().factors(t, entry)
    e = t.expand_layers(entry[E])
    lead = 1 if t.stacked else 0
    scale = e.reshape(e.shape[:lead] + (1,) * (f.a.ndim - lead - 1) + e.shape[-1:])
    return Factors(f.a * scale, f.b)

  def check_trained(self, name, adapter):
    """Warns when an AdaLoRA adapter was trained without :func:`adalora` (see module doc)."""
    step = adapter.get(STEP_KEY)
    if step is None or isinstance(step, jax.core.Tracer):
      return
    trained = any(np.any(np.asarray(v[E])) for v in adapter[model.LORA].values())
    if int(np.asarray(step)) == 0 and trained:
      warnings.warn(
          f"lojax: AdaLoRA adapter {name!r} was trained but never allocated: its ranks "
          "never changed. Train it with `lojax.adalora(optimizer, spec)` as the optimizer.",
          stacklevel=3)


  def to_peft(self, t, layer):
    """PEFT's SVD form: ``lora_A [r, in]``, ``lora_E [r, 1]``, ``lora_B [out, r]`` (dense only)."""
    self._check_dense(t)
    r = t.r
    return {"lora_A": layer[lora_lib.A].reshape(-1, r).T, E: layer[E].reshape(r, 1),
            "lora_B": layer[lora_lib.B].reshape(r, -1).T}

  def from_peft(self, t, tensors):
    self._check_dense(t)
    a, b, e = (tensors.get(k) for k in ("lora_A", "lora_B", E))
    if a is None or b is None or e is None:
      return None
    r = a.shape[0]
    kin = tuple(t.kernel_shape[i] for i in t.in_axes)
    kout = tuple(t.kernel_shape[i] for i in t.out_axes)
    if a.shape != (r, math.prod(kin)) or b.shape != (math.prod(kout), r) or e.shape != (r, 1):
      raise ValueError(f"AdaLoRA's factors are lora_A [r, {math.prod(kin)}], lora_E [r, 1] and "
                       f"lora_B [{math.prod(kout)}, r] in PEFT, got {a.shape}, {e.shape} and "
                       f"{b.shape}")
    return {lora_lib.A: a.T.reshape(kin + (r,)), E: e.reshape(r),
            lora_lib.B: b.T.reshape((r,) + kout)}

  def peft_target(self, t, layer):
    """PEFT allocated the ranks: the target keeps the file's rank (and ranknum = init_r)."""
    return dataclasses.replace(t, r=int(layer[E].shape[-1]))

  def peft_state(self, spec):
    """PEFT allocated the ranks: the adapter is marked as allocated (see :func:`adalora`)."""
    return {STEP_KEY: jnp.asarray(spec.total_step, jnp.float32)}

  @staticmethod
  def _check_dense(t):
    if t.kind != "dense":
      raise ValueError(f"PEFT's AdaLoRA adapts linear layers only; '{t.path}' is a {t.kind} "
                       "kernel. Export it with a plain LoraSpec instead.")


ADALORA = AdaLora()


# --------------------------------------------------------------------------
# Budget schedule (host side, exactly PEFT's double-precision formula)
# --------------------------------------------------------------------------

def budget_schedule(spec: AdaLoraSpec, init_bgt: int, target_bgt: int, step: int):
  """(budget, mask_ind) of PEFT's ``RankAllocator.budget_schedule``."""
  tinit, tfinal, T = spec.tinit, spec.tfinal, spec.total_step
  if step <= tinit:
    return init_bgt, False
  if step > T - tfinal:
    return target_bgt, True
  mul_coeff = 1 - (step - tinit) / (T - tfinal - tinit)
  budget = int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt)
  return budget, step % spec.deltaT == 0


def _tables(spec, init_bgt, target_bgt):
  n = spec.total_step - spec.tfinal + 1  # steps 0 .. T - tfinal
  rows = [budget_schedule(spec, init_bgt, target_bgt, t) for t in range(n)]
  return (np.asarray([b for b, _ in rows], np.int32), np.asarray([m for _, m in rows], bool))


# --------------------------------------------------------------------------
# The optax transform
# --------------------------------------------------------------------------

class AdaLoraState(NamedTuple):
  """State of :func:`adalora` (a pytree: jits, checkpoints and shards)."""
  step: jax.Array             # updates made so far
  ipt: Any                    # EMA of the sensitivity, like {path: {lora_A, lora_E, lora_B}}
  unc: Any                    # EMA of the uncertainty
  mask: Any                   # {path: bool [L?, r]} kept triplets of the latest allocation
  final_mask: Any             # {path: bool [L?, r]} fixed at step T - tfinal
  budget: jax.Array           # budget of the latest step
  inner: Any                  # state of the wrapped optimizer


def _sub(tree, name):
  if name not in tree:
    raise ValueError(f"The params given to lojax.adalora have no adapter {name!r} (they have "
                     f"{sorted(tree)}); pass `lora.trainable` and the spec's adapter name.")
  lora = tree[name]["lora"]
  bad = [p for p, v in lora.items() if "lora_E" not in v]
  if bad:
    raise ValueError(f"Adapter {name!r} is not an AdaLoRA adapter (no lora_E at {bad[:5]}); "
                     "wrap the params with a lojax.AdaLoraSpec.")
  return lora


def _triplet_scores(ipt, unc):
  """{path: [L?, r]} triplet scores from the element scores."""
  out = {}
  for path, v in ipt.items():
    s = {k: v[k] * unc[path][k] for k in v}
    a, e, b = s["lora_A"], s["lora_E"], s["lora_B"]
    stacked = e.ndim == 2
    lead = 1 if stacked else 0
    a_mean = jnp.mean(a, axis=tuple(range(lead, a.ndim - 1)))          # [L?, r]
    b_mean = jnp.mean(b, axis=tuple(range(lead + 1, b.ndim)))          # [L?, r]
    out[path] = e + a_mean + b_mean
  return out


def budgets(lora_sub, spec: AdaLoraSpec) -> tuple[int, int]:
  """(initial, target) budget: sum of initial ranks, target_r x kernels."""
  init_bgt, n = 0, 0
  for v in lora_sub.values():
    e = v["lora_E"]
    layers = e.shape[0] if e.ndim == 2 else 1
    init_bgt += layers * e.shape[-1]
    n += layers
  target_bgt = spec.target_r * n
  if target_bgt > init_bgt:
    raise ValueError(f"The target budget target_r x kernels = {target_bgt} exceeds the initial "
                     f"budget {init_bgt} (rank_pattern gives some kernels fewer than target_r="
                     f"{spec.target_r} ranks); lower `target_r`.")
  return init_bgt, target_bgt


def adalora(optimizer: optax.GradientTransformation, spec: AdaLoraSpec, /, *,
            adapter_name: str = "default") -> optax.GradientTransformation:
  """Wraps ``optimizer`` so that every update also does AdaLoRA's rank allocation.

  Args:
    optimizer: any optax optimizer (e.g. ``optax.adamw(1e-3)``); it sees the
      raw gradients, as AdaLoRA's importance needs them.
    spec: the :class:`AdaLoraSpec` the adapter was wrapped with.
    adapter_name: the AdaLoRA adapter to allocate (others are only optimised).

  Returns:
    An optax ``GradientTransformation``; ``update`` needs ``params``
    (``lora.trainable``). Read ranks with :func:`adalora_ranks`.

  >>> import jax, jax.numpy as jnp, optax, lojax
  >>> spec = lojax.AdaLoraSpec(init_r=4, target_r=2, total_step=10, target_modules=["d"])
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((6, 5))}}, spec, key=jax.random.key(0))
  >>> tx = lojax.adalora(optax.adam(1e-2), spec)
  >>> state = tx.init(lora.trainable)
  >>> lojax.adalora_ranks(state)
  {'d': 4}
  """
  if not isinstance(spec, AdaLoraSpec):
    raise TypeError(f"`spec` must be a lojax.AdaLoraSpec, got {type(spec).__name__}.")
  b1, b2 = spec.beta1, spec.beta2
  T_final = spec.total_step - spec.tfinal

  def init_fn(params):
    sub = _sub(params, adapter_name)
    init_bgt, _ = budgets(sub, spec)
    zeros = jax.tree.map(jnp.zeros_like, sub)
    ones = {p: jnp.ones(v["lora_E"].shape, bool) for p, v in sub.items()}
    return AdaLoraState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.zeros_like, sub), ones,
                        ones, jnp.asarray(init_bgt, jnp.int32), optimizer.init(params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("lojax.adalora needs `params` in update (pass lora.trainable).")
    sub, gsub = _sub(params, adapter_name), _sub(grads, adapter_name)
    init_bgt, target_bgt = budgets(sub, spec)
    budget_t, mask_t = _tables(spec, init_bgt, target_bgt)
    updates, inner = optimizer.update(grads, state.inner, params)
    usub = updates[adapter_name]["lora"]
    t = state.step
    new = jax.tree.map(lambda p, u: p + u, sub, usub)
    # Importance of every entry after the step, smoothed (t < T - tfinal only).
    live = t < T_final
    ipt_now = jax.tree.map(lambda p, g: jnp.abs(p * g), new, gsub)
    ipt = jax.tree.map(lambda old, i: jnp.where(live, b1 * old + (1 - b1) * i, old),
                       state.ipt, ipt_now)
    unc = jax.tree.map(lambda old, i, ib: jnp.where(live, b2 * old + (1 - b2) * jnp.abs(i - ib), old),
                       state.unc, ipt_now, ipt)
    # Budget of step t, and whether step t masks.
    ti = jnp.clip(t, 0, T_final)
    budget = jnp.where(t > T_final, target_bgt, jnp.asarray(budget_t)[ti])
    masking = jnp.where(t > T_final, False, jnp.asarray(mask_t)[ti]) | (t == T_final)
    scores = _triplet_scores(ipt, unc)
    flat = jnp.concatenate([s.ravel() for s in scores.values()])
    k = init_bgt - budget
    tau = jnp.where(k > 0, jnp.sort(flat)[jnp.maximum(k - 1, 0)], -jnp.inf)
    keep_now = {p: s > tau for p, s in scores.items()}
    mask = jax.tree.map(lambda m, n: jnp.where(masking, n, m), state.mask, keep_now)
    final_mask = jax.tree.map(lambda m, n: jnp.where(t == T_final, n, m), state.final_mask,
                              keep_now)
    final_phase = t > T_final
    new_usub = {}
    for path, u in usub.items():
      keep = jnp.where(final_phase, final_mask[path], jnp.where(masking, keep_now[path], True))
      u_e = jnp.where(keep, u["lora_E"], -sub[path]["lora_E"])  # masked entries become 0
      new_usub[path] = dict(u, lora_E=u_e)
    ad_updates = dict(updates[adapter_name], lora=new_usub)
    if STEP_KEY in params[adapter_name]:
      ad_updates[STEP_KEY] = jnp.ones_like(params[adapter_name][STEP_KEY])
    updates = dict(updates, **{adapter_name: ad_updates})
    state = AdaLoraState(t + 1, ipt, unc, mask, final_mask, budget.astype(jnp.int32), inner)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# Regulariser and observability
# --------------------------------------------------------------------------

def adalora_orth_reg(trainable, /, *, spec: AdaLoraSpec, adapter_name: str = "default"):
  """``orth_reg_weight`` x mean over all P, Q of ``||PᵀP - I||_F`` / ``||QQᵀ - I||_F``.

  Add it to the training loss (PEFT adds it inside the model's forward).
  Each layer of a stacked kernel counts as its own P and Q.

  >>> import jax, jax.numpy as jnp, lojax
  >>> spec = lojax.AdaLoraSpec(init_r=4, target_r=2, total_step=10, target_modules=["d"])
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((6, 5))}}, spec, key=jax.random.key(0))
  >>> float(lojax.adalora_orth_reg(lora.trainable, spec=spec)) > 0
  True
  """
  sub = _sub(trainable, adapter_name)
  norms = []
  for v in sub.values():
    stacked = v["lora_E"].ndim == 2
    r = v["lora_E"].shape[-1]
    a = v["lora_A"]
    b = v["lora_B"]
    a = a.reshape((a.shape[0], -1, r) if stacked else (-1, r))
    b = b.reshape((b.shape[0], r, -1) if stacked else (r, -1))
    eye = jnp.eye(r, dtype=a.dtype)
    ata = jnp.einsum("...ir,...is->...rs", a, a)
    bbt = jnp.einsum("...ri,...si->...rs", b, b)
    norms.append(jnp.sqrt(jnp.sum((ata - eye) ** 2, axis=(-2, -1))).ravel())
    norms.append(jnp.sqrt(jnp.sum((bbt - eye) ** 2, axis=(-2, -1))).ravel())
  return spec.orth_reg_weight * jnp.mean(jnp.concatenate(norms))


def _find_state(opt_state) -> AdaLoraState:
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AdaLoraState))
           if isinstance(x, AdaLoraState)]
  if not found:
    raise ValueError("This optimizer state has no AdaLoRA allocation state: build the "
                     "optimizer with `lojax.adalora(optax.adamw(...), spec)` so the rank "
                     "allocation runs inside every update.")
  return found[0]


def _ranks(mask) -> dict[str, Any]:
  out = {}
  for p, m in mask.items():
    m = np.asarray(m)
    out[p] = int(m.sum()) if m.ndim == 1 else [int(x) for x in m.sum(-1)]
  return out


def adalora_ranks(opt_state) -> dict[str, Any]:
  """Current kept rank per module (a list per layer for stacked kernels)."""
  return _ranks(_find_state(opt_state).mask)


def adalora_budget(opt_state) -> int:
  """The total rank budget of the latest step."""
  return int(_find_state(opt_state).budget)


def adalora_rank_pattern(opt_state) -> dict[str, list]:
  """The kept-rank mask per module (PEFT's ``rank_pattern``): final once fixed."""
  s = _find_state(opt_state)
  mask = s.mask
  return {p: np.asarray(m).tolist() for p, m in mask.items()}


def resize(lora, opt_state, /, *, adapter_name: str = "default"):
  """Truncates P, E, Q to the kept ranks: a smaller adapter, same outputs.

  Kept ranks come from the final mask (or the latest one before the final
  phase). A module whose rank drops to 0 loses its adapter. For a stacked
  kernel the rank becomes the largest kept rank over its layers (the other
  layers' extra slots get E = 0). The scaling (``ranknum``) is unchanged, so
  merged weights are identical before and after.

  >>> import jax, jax.numpy as jnp, optax, lojax
  >>> spec = lojax.AdaLoraSpec(init_r=4, target_r=2, total_step=10, target_modules=["d"])
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((6, 5))}}, spec, key=jax.random.key(0))
  >>> tx = lojax.adalora(optax.adam(1e-2), spec)
  >>> opt_state = tx.init(lora.trainable)        # ... train ...
  >>> small = lojax.adalora_resize(lora, opt_state)
  >>> small.adapters["default"]["lora"]["d"]["lora_E"].shape  # nothing pruned yet
  (4,)
  """
  model.require_lora(lora, "lojax.adalora_resize")
  if not isinstance(adapter_name, str):
    raise TypeError(f"`adapter_name` must be a str, got {adapter_name!r}.")
  meta = lora.meta.adapter(adapter_name)   # raises for an unknown name
  if not isinstance(meta.spec, AdaLoraSpec):
    raise ValueError(f"Adapter {adapter_name!r} is a {meta.variant.name} adapter; "
                     "lojax.adalora_resize truncates AdaLoRA adapters only.")
  ADALORA.check_trained(adapter_name, lora.adapters[adapter_name])
  state = _find_state(opt_state)
  ad = lora.adapters[adapter_name]
  in_final = int(state.step) > meta.spec.total_step - meta.spec.tfinal
  mask = state.final_mask if in_final else state.mask
  new_lora, targets = {}, []
  for t in meta.targets:
    v = ad["lora"][t.path]
    m = np.asarray(mask[t.path])
    stacked = m.ndim == 2
    rows = m if stacked else m[None]
    r_new = int(rows.sum(-1).max())
    if r_new == 0:
      continue
    # Per layer: kept indices first (in order), then dropped ones as padding.
    order = np.stack([np.concatenate([np.flatnonzero(row), np.flatnonzero(~row)])[:r_new]
                      for row in rows])
    valid = np.stack([np.arange(r_new) < row.sum() for row in rows])
    a, e, b = (np.asarray(v[k]) for k in ("lora_A", "lora_E", "lora_B"))
    if not stacked:
      a, e, b = a[None], e[None], b[None]
    a2 = np.stack([a[i][..., order[i]] for i in range(len(order))])
    e2 = np.stack([e[i][order[i]] * valid[i] for i in range(len(order))])
    b2 = np.stack([b[i][order[i]] for i in range(len(order))])
    if not stacked:
      a2, e2, b2 = a2[0], e2[0], b2[0]
    new_lora[t.path] = {"lora_A": jnp.asarray(a2), "lora_E": jnp.asarray(e2),
                        "lora_B": jnp.asarray(b2)}
    targets.append(dataclasses.replace(t, r=r_new))
  new_ad = dict(ad, lora=new_lora)
  return lora.with_adapter(meta.replace(targets=tuple(targets)), new_ad)

