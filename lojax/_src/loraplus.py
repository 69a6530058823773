"""LoRA+: ``lora_B`` learns ``loraplus_lr_ratio`` times faster than ``lora_A``.

:func:`loraplus` is PEFT's ``create_loraplus_optimizer`` (Hayou et al. 2024,
"LoRA+: Efficient Low Rank Adaptation of Large Models") for optax: one
``GradientTransformation`` over ``lora.trainable`` that sorts the leaves into
PEFT's four parameter groups and runs one optimizer per group, each built from
the user's optimizer factory with the group's learning rate and weight decay
(``optax.multi_transform``). The groups, with PEFT's rules restated on lojax's
tree (``lr`` is ``learning_rate``, ``wd`` is ``loraplus_weight_decay``):

=================  =====================  ======  ==========================================
group              learning rate          decay   leaves
=================  =====================  ======  ==========================================
``"A"``            lr                     wd      ``lora_A`` of kernels other than tables;
                                                  other rank-axis factors (AdaLoRA's E,
                                                  which PEFT holds as ``[r, 1]``);
                                                  ``modules_to_save`` leaves that are not 1-D
``"embedding"``    loraplus_lr_embedding  wd      ``lora_A`` and ``lora_B`` of embedding tables
``"B"``            lr * ratio             wd      ``lora_B``; per-feature vectors without a
                                                  rank axis (DoRA's magnitude); other 1-D
                                                  ``modules_to_save`` leaves
``"B_no_decay"``   lr * ratio             0       trained biases; 1-D ``modules_to_save``
                                                  leaves whose path holds ``bias`` or that
                                                  are named ``scale`` (norm layers)
``"frozen"``       (set to zero)                  bookkeeping arrays (AdaLoRA's step
                                                  counter); the base and inactive adapters
                                                  when a whole :class:`LoraParams` is given
=================  =====================  ======  ==========================================

One deviation: PEFT exempts the weights of ``nn.LayerNorm`` modules only, so a
saved RMSNorm weight is decayed there; lojax cannot see module types and reads
a saved 1-D ``scale`` as a norm weight, whichever norm it is. The group names
are the keys of the optimizer state's ``inner_states``.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Mapping

import jax
import optax

from lojax._src import lora as lora_lib
from lojax._src import model
from lojax._src import spec as spec_lib
from lojax._src.model import LoraMeta, LoraParams

A, B, B_NO_DECAY, EMBEDDING, FROZEN = "A", "B", "B_no_decay", "embedding", "frozen"
GROUPS = (A, EMBEDDING, B, B_NO_DECAY)


def _factor_group(t: model.TargetMeta, param: str, roles: tuple) -> str:
  """The group of one target parameter (its axis roles say what it is)."""
  has_rank = model.RANK in roles
  if t.kind == "embed" and has_rank:
    return EMBEDDING        # PEFT: every factor of a LoRA Embedding layer
  if param == lora_lib.B:
    return B
  if param == lora_lib.BIAS:
    return B_NO_DECAY       # PEFT: lora_B.bias, a "bias" name: not decayed
  if has_rank:
    return A                # lora_A, and rank-axis vectors (PEFT's [r, 1] lora_E)
  return B                  # a vector per output feature (PEFT: 1-D, decayed)


def _saved_group(path: str, x: Any) -> str:
  if len(x.shape) != 1:
    return A
  if "bias" in path or path.rpartition("/")[2] == "scale":
    return B_NO_DECAY
  return B


def _adapter_labels(meta: model.AdapterMeta, ad: Any, problems: list[str]) -> Any:
  """Labels for one adapter's tree, or problems when it is not lojax's."""
  name = meta.name
  if not isinstance(ad, Mapping):
    problems.append(f"adapter {name!r} is a {type(ad).__name__}, not lojax's adapter dict")
    return ad
  state = set(meta.variant.adapter_state(meta.spec))
  groups = {model.LORA, model.BIAS, model.SAVED}
  if extra := sorted(set(map(str, ad)) - groups - state - ({model.TOKENS} if meta.tokens
                                                           else set())):
    problems.append(f"adapter {name!r} has keys {extra} that lojax adapters do not have")
  missing = sorted(groups - set(ad))
  if missing:
    problems.append(f"adapter {name!r} lacks {missing}")
    return ad
  targets = {t.path: t for t in meta.targets}
  out = {k: FROZEN for k in ad if k in state}

  def leaf(where, x, group):
    if not hasattr(x, "shape"):
      problems.append(f"{name}/{where} is a {type(x).__name__}, not an array")
    return group

  lora_labels = {}
  for path, entry in _items(ad[model.LORA], f"{name}/lora", problems):
    t = targets.get(path)
    if t is None or not isinstance(entry, Mapping):
      problems.append(f"{name}/lora/{path} is not a target of adapter {name!r}")
      continue
    layout = meta.variant.layout(t)
    if unknown := sorted(set(entry) - set(layout)):
      problems.append(f"{name}/lora/{path} holds {unknown}; a {meta.variant.name} target "
                      f"holds {sorted(layout)}")
      continue
    lora_labels[path] = {k: leaf(f"lora/{path}/{k}", x, _factor_group(t, k, layout[k]))
                         for k, x in entry.items()}
  out[model.LORA] = lora_labels
  out[model.BIAS] = {p: leaf(f"bias/{p}", x, B_NO_DECAY)
                     for p, x in _items(ad[model.BIAS], f"{name}/bias", problems)}
  out[model.SAVED] = {p: leaf(f"modules_to_save/{p}", x,
                              _saved_group(p, x) if hasattr(x, "shape") else A)
                      for p, x in _items(ad[model.SAVED], f"{name}/modules_to_save", problems)}
  if model.TOKENS in ad:   # PEFT: trainable_tokens_delta, a 2-D parameter of no Embedding
    out[model.TOKENS] = {p: leaf(f"trainable_tokens/{p}", x, A)
                         for p, x in _items(ad[model.TOKENS], f"{name}/trainable_tokens",
                                            problems)}
  return out


def _items(group: Any, where: str, problems: list[str]):
  if not isinstance(group, Mapping):
    problems.append(f"{where} is a {type(group).__name__}, not a dict")
    return []
  return list(group.items())


def _labels(meta: LoraMeta, params: Any) -> Any:
  """The group label of every leaf of ``params`` (``lora.trainable`` or a whole LoraParams)."""
  problems: list[str] = []
  if isinstance(params, LoraParams):
    adapters = {n: (_adapter_labels(params.meta.adapter(n), ad, problems)
                    if n in params.meta.active else jax.tree.map(lambda _: FROZEN, ad))
                for n, ad in params.adapters.items()}
    labels = LoraParams(jax.tree.map(lambda _: FROZEN, params.base), adapters, params.meta)
  elif isinstance(params, Mapping) and params:
    labels = {}
    for n, ad in params.items():
      if n not in meta.names:
        problems.append(f"no adapter named {n!r} (the LoraParams has {list(meta.names)})")
      else:
        labels[n] = _adapter_labels(meta.adapter(n), ad, problems)
  else:
    problems.append(f"got a {type(params).__name__}")
  if problems:
    raise ValueError("lojax.loraplus: the params are not the tree of the LoraParams it was "
                     "built with (pass `lora.trainable`, or the LoraParams itself): " +
                     "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "") + ".")
  return labels


def _rate(value: Any, name: str, problems: list[str], *, positive: bool = True) -> None:
  if callable(value):
    return
  low = "> 0" if positive else ">= 0"
  ok = spec_lib._is_real(value) and math.isfinite(value) and (value > 0 if positive else
                                                                value >= 0)
  if not ok:
    problems.append(f"`{name}` must be a finite number {low} or a schedule (a callable of the "
                    f"step count); got {name}={value!r:.60}.")


def _takes(fn: Callable, arg: str) -> bool | None:
  """Whether ``fn`` accepts keyword ``arg`` (None when its signature cannot be read)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return None
  return any(p.name == arg and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD
             for p in params)


def loraplus(optimizer: Callable[..., optax.GradientTransformation], lora: LoraParams, /, *,
             learning_rate: float | optax.Schedule, loraplus_lr_ratio: float,
             loraplus_lr_embedding: float | optax.Schedule = 1e-6,
             loraplus_weight_decay: float = 0.0) -> optax.GradientTransformation:
  """LoRA+ (PEFT's ``create_loraplus_optimizer``): ``lora_B`` at ``learning_rate * ratio``.

  The leaves of ``lora.trainable`` fall into PEFT's groups (the module
  docstring lists them): ``lora_A`` at ``learning_rate``, ``lora_B`` (and
  DoRA magnitudes, trained biases, 1-D saved leaves) at ``learning_rate *
  loraplus_lr_ratio``, the factors of embedding tables at
  ``loraplus_lr_embedding``. Each group gets its own optimizer,
  ``optimizer(learning_rate=<group rate>, weight_decay=<group decay>)``, so
  the result is exact for every optimizer, as PEFT's torch parameter groups
  are. (Scaling the final updates of B by the ratio would give the same for
  optimizers whose update is the learning rate times a function of the
  gradients, such as SGD with momentum, Adam, AdamW with its decoupled decay
  or Lion, but not the embedding's rate, the undecayed biases, nor
  optimizers whose state depends on the rate.) Global operations, such as
  ``optax.clip_by_global_norm``, belong outside: ``optax.chain(clip,
  lojax.loraplus(...))``; inside the factory they would see one group each.

  As in PEFT, the decay of every group is ``loraplus_weight_decay`` (0 by
  default, whatever the factory's default is; PEFT ignores a
  ``weight_decay`` passed beside it), and biases and norm weights are never
  decayed. A factory without a ``weight_decay`` argument (``optax.sgd``,
  ``optax.adam``) is called with the rate only, and needs
  ``loraplus_weight_decay=0``.

  For AdaLoRA, LoRA+ is the optimizer that :func:`lojax.adalora` wraps:
  ``lojax.adalora(lojax.loraplus(...), spec)``, so the allocation sees the
  raw gradients and masks ``E`` after the LoRA+ step.

  Args:
    optimizer: an optax optimizer factory taking ``learning_rate`` (and
      ``weight_decay``) by keyword: ``optax.adamw``, ``optax.sgd``,
      ``functools.partial(optax.adamw, b2=0.95)``, or a function returning
      any ``GradientTransformation``.
    lora: the :class:`LoraParams` whose trainable tree is optimised (its
      targets say which tables are embeddings).
    learning_rate: the rate of ``lora_A`` (PEFT's ``lr``): a number or an
      optax schedule; B's is ``loraplus_lr_ratio`` times it at every step.
    loraplus_lr_ratio: ``lr_B / lr_A`` (the paper suggests ~16), > 0.
    loraplus_lr_embedding: the rate of embedding adapters (PEFT's default
      1e-6), a number or a schedule; it does not follow ``learning_rate``'s
      schedule unless given one (torch's schedulers scale every group).
    loraplus_weight_decay: the decay of the groups that decay (PEFT's).

  Returns:
    An optax ``GradientTransformation`` over ``lora.trainable`` (or over the
    whole ``lora``: the base and inactive adapters are then left alone);
    ``update`` needs ``params`` when the factory's optimizer does.

  Raises:
    TypeError: ``lora`` is not a LoraParams, or ``optimizer`` is not a factory
      of optax optimizers (e.g. ``optax.adamw(1e-3)`` instead of ``optax.adamw``).
    ValueError: a rate, the ratio or the decay is not a finite number > 0
      (>= 0 for the decay and the embedding rate); at ``init`` / ``update``,
      params that are not the tree of ``lora``.

  >>> import jax, jax.numpy as jnp, optax, lojax
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((4, 3))}},
  ...                   lojax.LoraSpec(r=2, target_modules=["d"]), key=jax.random.key(0))
  >>> tx = lojax.loraplus(optax.sgd, lora, learning_rate=0.1, loraplus_lr_ratio=16)
  >>> grads = jax.tree.map(jnp.ones_like, lora.trainable)
  >>> updates, _ = tx.update(grads, tx.init(lora.trainable), lora.trainable)
  >>> ad = updates["default"]["lora"]["d"]
  >>> ad["lora_A"][0, 0], ad["lora_B"][0, 0]        # -lr * g and -lr * ratio * g
  (Array(-0.1, dtype=float32), Array(-1.6, dtype=float32))
  """
  model.require_lora(lora, "lojax.loraplus")
  if isinstance(optimizer, optax.GradientTransformation) or not callable(optimizer):
    raise TypeError(
        "lojax.loraplus: `optimizer` must be an optax optimizer factory such as optax.adamw "
        "(it builds one optimizer per parameter group with the group's learning rate), got "
        f"{type(optimizer).__name__}; pass `optax.adamw`, not `optax.adamw(1e-3)`, and the "
        "rate as `learning_rate=`.")
  problems: list[str] = []
  _rate(learning_rate, "learning_rate", problems)
  ratio = loraplus_lr_ratio
  if not (spec_lib._is_real(ratio) and math.isfinite(ratio) and ratio > 0):
    problems.append(f"`loraplus_lr_ratio` must be a finite number > 0 (lr_B / lr_A, e.g. 16); "
                    f"got loraplus_lr_ratio={ratio!r:.60}.")
  _rate(loraplus_lr_embedding, "loraplus_lr_embedding", problems, positive=False)
  wd = loraplus_weight_decay
  if not (spec_lib._is_real(wd) and math.isfinite(wd) and wd >= 0):
    problems.append(f"`loraplus_weight_decay` must be a finite number >= 0; got "
                    f"loraplus_weight_decay={wd!r:.60}.")
  if problems:
    raise ValueError("lojax.loraplus: " + " ".join(problems))
  takes_decay = _takes(optimizer, "weight_decay")
  if wd and takes_decay is False:
    raise TypeError(
        f"lojax.loraplus: `loraplus_weight_decay={wd}` but the factory "
        f"{getattr(optimizer, '__name__', optimizer)!r} takes no `weight_decay` argument; use "
        "one that does (optax.adamw, or `lambda learning_rate, weight_decay: optax.chain("
        "optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))` for torch's "
        "coupled decay) or leave `loraplus_weight_decay=0`.")
  if callable(learning_rate):
    scaled = lambda count: ratio * learning_rate(count)
  else:
    scaled = ratio * learning_rate
  rates = {A: learning_rate, EMBEDDING: loraplus_lr_embedding, B: scaled, B_NO_DECAY: scaled}
  decays = {A: wd, EMBEDDING: wd, B: wd, B_NO_DECAY: 0.0}

  def build(group):
    kwargs = {"learning_rate": rates[group]}
    if takes_decay or (takes_decay is None and wd):
      kwargs["weight_decay"] = decays[group]
    tx = optimizer(**kwargs)
    if not isinstance(tx, optax.GradientTransformation):
      raise TypeError(f"lojax.loraplus: `optimizer(**{kwargs})` returned a "
                      f"{type(tx).__name__}, not an optax GradientTransformation.")
    return tx

  transforms = {g: build(g) for g in GROUPS}
  transforms[FROZEN] = optax.set_to_zero()
  return optax.multi_transform(transforms, functools.partial(_labels, lora.meta))
