"""EVA (explained variance adaptation): ``lora_A`` from the activations of a few batches.

:func:`eva_init` takes wrapped params (the adapter's targets and ranks as
:func:`lojax.wrap` chose them, any init) and data, and returns them with each
dense target re-initialised as PEFT's ``init_lora_weights="eva"`` does:

* every targeted kernel's input ``x`` (flattened over tokens: all of x's
  axes that are not contracted with the kernel; padding dropped with a token
  mask) is collected per batch;
* per kernel, a PCA of those inputs: the components are the top right-singular
  vectors of the centered stack of all its inputs seen so far, their
  explained-variance ratio is the eigenvalue over the total variance;
  ``round(r * rho)`` components are kept per kernel;
* after each batch the components are compared with the previous batch's
  (cosine of each component, signs fixed so that each component's largest
  entry is positive); those with cosine >= ``tau`` have converged, and a
  kernel whose first ``rank`` components have converged stops collecting
  (it resumes if a later redistribution gives it a higher rank);
* the rank budget (the sum of the targets' ranks) is redistributed: all
  kernels' components ranked together by explained-variance ratio, the
  budget's best ones kept; a kernel's rank is the number of its components
  kept (0: the kernel is not adapted);
* ``lora_A`` = the kernel's top ``rank`` components (divided by the square
  root of their singular values with ``whiten``), ``lora_B`` = 0, so the
  model is unchanged at init; with ``adjust_scaling_factors`` the target's
  alpha becomes ``alpha * rank / r`` (its scaling stays ``alpha / r``).

The data pass is lojax's interpreter under ``jax.jit``, one compiled step per
batch shape: it runs ``apply_fn`` on the base with each targeted kernel
tagged, and at each ``dot_general`` that reads one (seen through the
interpreter's ``Context.record`` hook and the equation's site) it reduces the
input to its token count, mean ``[in]`` and centered scatter ``x_cᵀ x_c``
``[in, in]``. Nothing kernel-sized (``[in, out]``) and no ``[tokens, in]``
array is kept across batches: the per-batch statistics are merged on the host
in float64 (Chan's parallel update), so the PCA is exact for the data each
kernel saw, where PEFT's ``IncrementalPCA`` truncates to the kept components
(and uses a randomized SVD) after each batch. Kernels that read the same
input (the same traced value, e.g. q, k and v of one attention block) share
one set of statistics, as PEFT's input hashing arranges.

A stacked kernel (``nn.scan``) is one PEFT module per layer: each adapted
layer has its own PCA and convergence. Its layers share one rank in lojax, so
it needs ``rho=1`` (each layer then keeps its rank, as every kernel does). Inside
the scan the moments cannot be returned by the step; they reach the host
through ``jax.debug.callback`` with the layer's index, which the kernel carries
as a marker term (``a`` = index + 1, ``b`` = 0: it adds nothing to the output).
Expert kernels, embeddings and convs are not handled (PEFT's EVA has none).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.extend import core as jcore

from lojax._src import interpret
from lojax._src import model
from lojax._src import paths as P
from lojax._src import rules
from lojax._src import tagged as tg
from lojax._src.model import LoraMeta, LoraParams

EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "whiten": False, "adjust_scaling_factors": True}
"""``eva_config`` keys and defaults (PEFT's ``EvaConfig`` names)."""
_RHO_THRESHOLD = 1000   # PEFT: above it rho is capped at the largest param dim // r


def check_config(config: Mapping[str, Any] | None) -> dict:
  """The checked ``eva_config`` with defaults filled in."""
  config = dict(config or {})
  if "use_label_mask" in config or "label_mask_value" in config:
    raise ValueError("`eva_config`: lojax has no labels to read; give `token_mask=` instead "
                     "(e.g. `lambda b: b['attention_mask'] & (b['labels'] != -100)`).")
  unknown = sorted(set(config) - set(EVA_DEFAULTS))
  if unknown:
    raise ValueError(f"`eva_config` has unknown keys {unknown}; valid keys are "
                     f"{sorted(EVA_DEFAULTS)}.")
  out = {**EVA_DEFAULTS, **config}
  if not isinstance(out["rho"], (int, float)) or out["rho"] < 1.0:
    raise ValueError(f"`eva_config['rho']` must be a number >= 1.0; got {out['rho']!r}.")
  if not isinstance(out["tau"], (int, float)) or not 0.0 <= out["tau"] <= 1.0:
    raise ValueError(f"`eva_config['tau']` must lie in [0, 1]; got {out['tau']!r}.")
  for k in ("whiten", "adjust_scaling_factors"):
    if not isinstance(out[k], (bool, np.bool_)):
      raise TypeError(f"`eva_config[{k!r}]` must be a bool; got {out[k]!r}.")
  return out


# ------------------------------------------------------------ statistics ---

@dataclasses.dataclass
class Moments:
  """Running token count, mean ``[in]`` and centered scatter ``[in, in]`` (float64)."""
  n: float = 0.0
  mean: np.ndarray | None = None
  scatter: np.ndarray | None = None

  def add(self, n, mean, scatter) -> None:
    """Merges one batch's moments (Chan et al.'s parallel update)."""
    n, mean, scatter = float(n), np.asarray(mean, np.float64), np.asarray(scatter, np.float64)
    if self.mean is None:
      self.n, self.mean, self.scatter = n, mean, scatter
      return
    total = self.n + n
    delta = mean - self.mean
    self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.n * n / total)
    self.mean = self.mean + delta * (n / total)
    self.n = total


def pca(scatter: np.ndarray, k: int):
  """(components [k, in], singular values [k], explained-variance ratios [k]).

  The components are the top right-singular vectors of the centered data whose
  scatter matrix is ``scatter``, each with its largest-magnitude entry positive.
  """
  n = scatter.shape[0]
  if k < n:   # only the top k eigenpairs (LAPACK's MRRR): ~50x faster than all at in = 2048
    vals, vecs = scipy.linalg.eigh(scatter, subset_by_index=[n - k, n - 1], driver="evr")
  else:
    vals, vecs = np.linalg.eigh(scatter)
  vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k].T
  vals = np.maximum(vals, 0.0)
  pick = np.argmax(np.abs(vecs), axis=1)
  vecs = vecs * np.sign(vecs[np.arange(len(vecs)), pick])[:, None]
  total = np.trace(scatter)
  return vecs, np.sqrt(vals), vals / total if total > 0 else np.zeros_like(vals)


def batch_moments(x2, w=None):
  """``(count, mean [C], centered scatter [C, C])`` of the rows of ``x2 [N, C]`` (float32).

  ``w [N]`` (0/1) drops rows (padding tokens)."""
  x2 = x2.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  if w is None:
    n = jnp.asarray(x2.shape[0], jnp.float32)
    mean = jnp.mean(x2, axis=0)
    xc = x2 - mean
    return n, mean, jnp.matmul(xc.T, xc, precision=hi)
  w = w.astype(jnp.float32)
  n = jnp.sum(w)
  mean = jnp.matmul(w, x2, precision=hi) / jnp.maximum(n, 1.0)
  xc = (x2 - mean) * w[:, None]
  return n, mean, jnp.matmul(xc.T, xc, precision=hi)


def _token_weights(mask, free_shape, path):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape == tuple(free_shape[:mask.ndim]):
    mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(free_shape) - mask.ndim)),
                            free_shape)
  elif mask.size == math.prod(free_shape):
    mask = mask.reshape(free_shape)
  else:
    raise ValueError(f"`token_mask` has shape {mask.shape}, but the input of '{path}' has "
                     f"token axes {tuple(free_shape)}: the mask must cover its leading token "
                     "axes (e.g. [batch, seq]).")
  return mask.reshape(-1)


def _read(env, v):
  return v.val if isinstance(v, jcore.Literal) else env[v]


def collect_inputs(ctx: rules.Context, targets: Mapping[str, Any], mask, found: dict,
                   groups: dict, sink: Callable) -> Callable:
  """The ``Context.record`` hook of the data pass.

  At each ``dot_general`` on a tagged kernel it reduces the kernel's input to
  :func:`batch_moments` (once per distinct input value), in ``groups``
  (``{id: moments}``), and notes ``found[path] = id``. Inside a scan over a
  stacked kernel the moments cannot leave the scan's trace: they go to the host
  through ``jax.debug.callback(sink, group, layer, *moments)``, the layer read
  from the kernel's marker term (see :func:`statistics_fn`), and ``groups``
  gets ``None``.
  """
  alive = []   # the inputs keyed by id(): kept so that no id is reused within the trace

  def record(k: tg.Tagged, op: str, **info):
    if op not in ("dot_general", "ragged_dot", "conv", "gather") or k.path not in targets:
      return
    t = targets[k.path]
    if op != "dot_general":
      raise ValueError(f"EVA: '{k.path}' is used by a {op}; lojax's EVA (as PEFT's) adapts "
                       "dense (matmul) kernels only.")
    if info["batch"] or len(k.stack) > 1 or (k.stack and not k.terms):
      raise ValueError(f"EVA: '{k.path}' is used as a batched matmul (experts), by nested "
                       "scans, or sliced by a scan without being a stacked target; lojax's EVA "
                       "does not support these yet.")
    off = 1 if t.stacked else 0
    eqn = ctx.site.eqn
    lhs, rhs = (_read(ctx.site.env, v) for v in eqn.invars[:2])
    (lc, rc), _ = eqn.params["dimension_numbers"]
    x, xc = (lhs, lc) if rhs is k else (rhs, rc)
    leaf_axes = [k.kaxes[j] - off for j in info["contract"]]
    if sorted(leaf_axes) != list(t.in_axes):
      raise ValueError(f"EVA: '{k.path}' is contracted on axes {sorted(leaf_axes)}, not on "
                       f"its input axes {list(t.in_axes)}.")
    feat = [a for _, a in sorted(zip(leaf_axes, xc))]
    key = (id(x), tuple(feat))
    if key not in groups:
      free = [a for a in range(x.ndim) if a not in xc]
      free_shape = [x.shape[a] for a in free]
      x2 = jnp.transpose(x, free + feat).reshape(math.prod(free_shape), t.fan_in)
      moments = batch_moments(x2, _token_weights(mask, free_shape, k.path))
      alive.append(x)
      if k.stack:
        layer = jnp.max(k.terms[0].a).astype(jnp.int32) - 1   # -1: a layer not adapted
        jax.debug.callback(sink, len(groups), layer, *moments)
        moments = None
      groups[key] = moments
    found.setdefault(k.path, [])
    if key not in found[k.path]:
      found[k.path].append(key)

  return record


def statistics_fn(lora: LoraParams, apply_fn: Callable, targets: Mapping[str, Any]):
  """``run(batch, mask) -> ({path: [group]}, [moments per group])``, one jitted step.

  Runs ``apply_fn`` on the (decoded) base with the ``targets`` tagged; the
  output of ``apply_fn`` is dropped, so XLA keeps only what the statistics need.
  """
  paths, _, treedef = P.flatten(lora.base)
  index = {paths.index(t.leaf_path): t for t in targets.values()}
  layout: dict = {}
  received: dict = {}

  def sink(group, layer, n, mean, scatter):
    if int(layer) >= 0:
      received[(int(group), int(layer))] = (n, mean, scatter)

  @jax.jit
  def step(leaves, batch, mask):
    leaves = [jax.lax.stop_gradient(model.decode(x)) for x in leaves]

    def flat_fn(tree_leaves, b):
      return apply_fn(jax.tree_util.tree_unflatten(treedef, tree_leaves), b)

    closed = jax.make_jaxpr(flat_fn)(leaves, batch)
    invals = list(leaves)
    for i, t in index.items():
      invals[i] = tg.Tagged(leaves[i], t.path, None, (), tuple(range(np.ndim(leaves[i]))))
      if t.stacked:   # a marker term, a = layer + 1 (0: not adapted), b = 0: adds nothing
        mark = np.zeros(t.stacked, np.float32)
        adapted = list(t.layers if t.layers is not None else range(t.stacked))
        mark[adapted] = np.arange(1, len(adapted) + 1)   # position in the adapted layers
        in_dims = [t.kernel_shape[a] for a in t.in_axes]
        out_dims = [t.kernel_shape[a] for a in t.out_axes]
        a = jnp.broadcast_to(jnp.asarray(mark).reshape((-1,) + (1,) * (len(in_dims) + 1)),
                             (t.stacked, *in_dims, 1))
        term = tg.Term(a, jnp.zeros((t.stacked, 1, *out_dims), jnp.float32), name=t.leaf_path)
        invals[i] = tg.Tagged(leaves[i], t.path, t.sides(), (term,),
                              tuple(range(np.ndim(leaves[i]))))
    dyn = jax.tree_util.tree_leaves(batch)
    found, groups = {}, {}
    ctx = rules.Context()
    ctx.record = collect_inputs(ctx, targets, mask, found, groups, sink)
    interpret.run_closed(closed, invals + dyn, ctx)
    keys = list(groups)
    layout["found"] = {p: [keys.index(g) for g in gs] for p, gs in found.items()}
    layout["stacked"] = {keys.index(g) for g in keys if groups[g] is None}
    return [groups[g] for g in keys if groups[g] is not None]

  def run(batch, mask, *, trace_only: bool = False):
    leaves = P.flatten(lora.base)[1]
    try:
      if trace_only:   # which kernels read which input: tracing tells, nothing runs
        jax.eval_shape(step, leaves, batch, mask)
        return layout["found"], None
      stats = step(leaves, batch, mask)
    except jax.errors.UnexpectedTracerError as e:
      raise ValueError("EVA: a targeted kernel is used inside a transformation lojax's EVA "
                       "cannot collect from (remat, cond, while): its statistics would leave "
                       f"that trace. ({str(e)[:200]})") from None
    stats = jax.device_get(stats)
    jax.effects_barrier()
    it = iter(stats)
    per_group = [None if g in layout["stacked"] else next(it) for g in range(
        max((g for gs in layout["found"].values() for g in gs), default=-1) + 1)]
    for (g, layer), m in received.items():
      per_group[g] = {**(per_group[g] or {}), layer: m}
    received.clear()
    return layout["found"], per_group

  run.step = step
  return run


# -------------------------------------------------------- rank and loop ---

def rank_distribution(ratios: Mapping[str, np.ndarray], budget: int,
                      equal: Mapping[str, str]) -> dict[str, int]:
  """PEFT's redistribution: ``{name: rank}`` from each name's explained-variance ratios.

  All names' ratios are ranked together (descending; ties in the order given);
  a name's rank is how many of its ratios are among the ``budget`` largest.
  ``equal`` maps a name to the name whose input it shares: that one keeps the
  larger rank of the two.
  """
  keys = [k for k, v in ratios.items() for _ in range(len(v))]
  vals = np.concatenate([np.asarray(v, np.float64) for v in ratios.values()]) if keys else []
  order = np.argsort(-np.asarray(vals), kind="stable")[:budget]
  counts = {k: 0 for k in ratios}
  for i in order:
    counts[keys[i]] += 1
  for k, hook in equal.items():
    if counts[hook] < counts[k]:
      counts[hook], counts[k] = counts[k], counts[hook]
  return counts


class _Kernel:
  """One distinct kernel input's running PCA and convergence (PEFT's SVD hook)."""

  def __init__(self, n_components: int, tau: float):
    self.k, self.tau = n_components, tau
    self.moments = Moments()
    self.components = self.singular = self.ratio = None
    self.converged = np.zeros(n_components, bool)

  def update(self, n, mean, scatter) -> None:
    if n < self.k:   # PEFT skips a batch with fewer tokens than components
      return
    self.moments.add(n, mean, scatter)
    prev = self.components
    self.components, self.singular, self.ratio = pca(self.moments.scatter, self.k)
    if prev is not None:
      cos = np.sum(self.components * prev, axis=1) / np.maximum(
          np.linalg.norm(self.components, axis=1) * np.linalg.norm(prev, axis=1), 1e-12)
      self.converged = cos >= self.tau


def eva_init(lora: LoraParams, apply_fn: Callable, batches: Iterable[Any], /, *,
             eva_config: Mapping[str, Any] | None = None,
             token_mask: Callable[[Any], Any] | None = None,
             adapter_name: str | None = None, max_steps: int | None = None) -> LoraParams:
  """Re-initialises an adapter with EVA (PEFT's ``init_lora_weights="eva"``).

  Args:
    lora: :class:`LoraParams` from :func:`lojax.wrap` (any init): its targets
      and ranks (``r``, ``rank_pattern``) set the rank budget.
    apply_fn: ``apply_fn(params, batch)``, the function the data runs through
      (e.g. ``lambda p, b: model.apply(p, b["input_ids"])``; its output is unused).
    batches: a few batches (pytrees of arrays), cycled until every kernel has
      converged (as PEFT cycles its dataloader).
    eva_config: PEFT's ``EvaConfig`` values: ``rho`` (>= 1, default 2.0),
      ``tau`` (default 0.99), ``whiten`` (False), ``adjust_scaling_factors`` (True).
    token_mask: optional ``batch -> bool array`` over the leading token axes of
      the kernels' inputs (e.g. ``[batch, seq]``): tokens where it is False are
      left out (PEFT's attention and label masks).
    adapter_name: the adapter to initialise (default: the only active one).
    max_steps: raise if the kernels have not converged after this many batches
      (default: 100 passes over ``batches``).

  Returns:
    The params with the adapter's dense targets at their EVA ranks (a target
    whose rank is 0 is no longer adapted), ``lora_A`` from the components and
    ``lora_B = 0``. Targets EVA does not handle (embeddings, convs) keep their
    init, with a warning, as in PEFT.

  Raises:
    ValueError: for a bad ``eva_config``, no data, more components than input
      features, a target the data never reaches, expert kernels, stacked
      kernels with ``rho != 1``, or no convergence within ``max_steps``.

  >>> import jax, jax.numpy as jnp, lojax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> lora = lojax.wrap(params, lojax.LoraSpec(r=1, target_modules=["dense"]),
  ...                   key=jax.random.key(0))
  >>> x = jax.random.normal(jax.random.key(1), (2, 8, 4))
  >>> lora = lojax.eva_init(lora, lambda p, x: x @ p["dense"]["kernel"], [x[:1], x[1:]])
  >>> lora.adapters["default"]["lora"]["dense"]["lora_A"].shape
  (4, 1)
  """
  if not isinstance(lora, LoraParams):
    raise TypeError(f"`lora` must be the LoraParams returned by lojax.wrap, got "
                    f"{type(lora).__name__}.")
  if not callable(apply_fn):
    raise TypeError(f"`apply_fn` must be the function of the params, got "
                    f"{type(apply_fn).__name__}.")
  config = check_config(eva_config)
  if adapter_name is None:
    if len(lora.meta.active) != 1:
      raise ValueError(f"EVA initialises one adapter; pass `adapter_name=` (active adapters: "
                       f"{list(lora.meta.active)}).")
    adapter_name = lora.meta.active[0]
  meta = lora.meta.adapter(adapter_name)
  if meta.variant.name != "lora":
    raise ValueError(f"EVA initialises plain LoRA adapters; adapter {adapter_name!r} is "
                     f"{meta.variant.name}.")
  batches = list(batches)
  if not batches:
    raise ValueError("`batches` is empty: EVA needs data.")
  dense = {t.path: t for t in meta.targets if t.kind == "dense"}
  others = [t.path for t in meta.targets if t.kind != "dense"]
  if others:
    warnings.warn(f"EVA adapts dense kernels only (as PEFT); these targets keep their init: "
                  f"{others}", stacklevel=2)
  bad = [t.path for t in dense.values() if t.expert_axes]
  if bad:
    raise ValueError(f"EVA does not support expert kernels yet: {bad}.")
  stacked = [t.path for t in dense.values() if t.stacked]
  if stacked and config["rho"] != 1.0:
    raise ValueError(
        f"EVA with `rho={config['rho']}` gives each layer its own rank, but the layers of a "
        f"stacked kernel share one rank in lojax: {stacked}. Use `rho=1.0` (each layer keeps "
        "its rank; EVA still picks the components) or unrolled layers.")
  # One unit per PEFT layer module: (path, None), or (path, i) for the i-th adapted layer.
  units = [(p, i) for p, t in dense.items() for i in (range(t.n_layers) if t.stacked else [None])]
  rho = config["rho"]
  if rho > _RHO_THRESHOLD:
    rho = min(rho, max(max(np.shape(x), default=0) for x in P.flatten(lora.base)[1])
              // meta.spec.r)
  max_comp = {u: round(dense[u[0]].r * rho) for u in units}
  budget = sum(dense[u[0]].r for u in units)
  for p, t in dense.items():
    if round(t.r * rho) > t.fan_in:
      raise ValueError(f"EVA: '{p}' would keep {round(t.r * rho)} components (r * rho), more "
                       f"than its {t.fan_in} input features; lower `rho` or its rank.")
  run = statistics_fn(lora, apply_fn, dense)
  mask_of = (lambda b: None) if token_mask is None else token_mask

  # Which kernels read the same input (PEFT hashes the inputs of a first pass).
  found, _ = run(batches[0], mask_of(batches[0]), trace_only=True)
  missing = [p for p in dense if p not in found]
  if missing:
    raise ValueError(f"EVA: no matmul of `apply_fn` on these batches reads {missing}.")
  group_of = {u: (tuple(found[u[0]]), u[1]) for u in units}
  hook_of: dict[tuple, Any] = {}
  for u in units:
    hook_of.setdefault(group_of[u], u)
  equal = {u: hook_of[group_of[u]] for u in units if hook_of[group_of[u]] != u}
  for g, h in hook_of.items():
    max_comp[h] = max(max_comp[u] for u in units if group_of[u] == g)
  for u, h in equal.items():
    max_comp[u] = max_comp[h]
  hooks = {h: _Kernel(max_comp[h], config["tau"]) for h in hook_of.values()}
  active = {h: True for h in hooks}
  done = {h: False for h in hooks}
  ranks = dict(max_comp)
  limit = max_steps if max_steps is not None else 100 * len(batches)
  steps = 0
  for batch in itertools.cycle(batches):
    for h, hook in hooks.items():
      converged = bool(np.all(hook.converged[:ranks[h]]))
      if not done[h] and converged and active[h]:
        active[h], done[h] = False, True
        continue
      if done[h] and not converged:
        active[h], done[h] = True, False
    if all(done.values()):
      break
    if steps >= limit:
      raise ValueError(f"EVA: the components have not converged after {steps} batches "
                       f"(tau={config['tau']}); pass more data, a lower tau or `max_steps`.")
    steps += 1
    found, stats = run(batch, mask_of(batch))
    for (path, layer), hook in hooks.items():
      if active[(path, layer)]:
        for g in found[path]:
          m = stats[g] if layer is None else stats[g].get(layer)
          if m is not None:
            hook.update(*m)
    if any(hook.components is None for hook in hooks.values()):
      continue
    ratios = {u: hooks[hook_of[group_of[u]]].ratio[:max_comp[u]] for u in units}
    ranks = rank_distribution(ratios, budget, equal)
  return _rebuild(lora, adapter_name, meta, dense, units,
                  {u: hooks[hook_of[group_of[u]]] for u in units}, ranks, config)


def _rebuild(lora, name, meta, dense, units, hook, ranks, config):
  """The LoraParams with the EVA factors and ranks of ``name``."""
  rslora = bool(getattr(meta.spec, "use_rslora", False))
  entries = dict(lora.adapters[name][model.LORA])
  targets = []
  for t in meta.targets:
    if t.path not in dense:
      targets.append(t)
      continue
    mine = [u for u in units if u[0] == t.path]
    k = ranks[mine[0]]
    assert all(ranks[u] == k for u in mine), (t.path, [ranks[u] for u in mine])
    for u in mine:
      if not np.all(hook[u].converged[:k]):
        raise AssertionError(f"EVA: '{t.path}' got rank {k} before converging")
    old = entries.pop(t.path)
    if k == 0:
      continue
    alpha = t.alpha * k / t.r if config["adjust_scaling_factors"] and k != t.r else t.alpha
    nt = dataclasses.replace(t, r=k, alpha=alpha,
                             scaling=alpha / (math.sqrt(k) if rslora else k))
    in_dims = [t.kernel_shape[a] for a in t.in_axes]
    a = []
    for u in mine:
      rows = hook[u].components[:k]
      if config["whiten"]:
        rows = rows / np.sqrt(hook[u].singular[:k])[:, None]
      a.append(rows.T.reshape(*in_dims, k))
    a = np.stack(a) if t.stacked else a[0]
    entries[t.path] = {**{key: v for key, v in old.items() if key not in ("lora_A", "lora_B")},
                       "lora_A": jnp.asarray(a, old["lora_A"].dtype),
                       "lora_B": jnp.zeros(nt.b_shape(), old["lora_B"].dtype)}
    targets.append(nt)
  new_meta = dataclasses.replace(meta, targets=tuple(targets))
  adapters = {**lora.adapters, name: {**lora.adapters[name], model.LORA: entries}}
  metas = tuple(new_meta if m.name == name else m for m in lora.meta.adapters)
  return LoraParams(lora.base, adapters, LoraMeta(metas, lora.meta.active))
