"""Training plumbing: masks and labels for optax, parameter counts, adapters."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np

from lojax._src import model
from lojax._src.model import LoraMeta, LoraParams


def _label_tree(lora: LoraParams, yes, no):
  adapters = {name: jax.tree.map(lambda _: yes if name in lora.meta.active else no, ad)
              for name, ad in lora.adapters.items()}
  return LoraParams(jax.tree.map(lambda _: no, lora.base), adapters, lora.meta)


def trainable_mask(lora: LoraParams) -> LoraParams:
  """A tree like ``lora`` with True on trainable leaves (for ``optax.masked``).

  Prefer differentiating ``lora.trainable`` only; the mask is for code that
  keeps one tree. XLA drops the unused base gradients in a jitted step.

  >>> import jax, jax.numpy as jnp, lojax, optax
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((4, 3))}},
  ...                   lojax.LoraSpec(target_modules=["d"]), key=jax.random.key(0))
  >>> tx = optax.masked(optax.adam(1e-3), lojax.trainable_mask(lora))
  """
  model.require_lora(lora, "lojax.trainable_mask")
  return _label_tree(lora, True, False)


def partition_labels(lora: LoraParams) -> LoraParams:
  """``"trainable"`` / ``"frozen"`` labels for ``optax.multi_transform``.

  >>> import jax, jax.numpy as jnp, lojax, optax
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((4, 3))}},
  ...                   lojax.LoraSpec(target_modules=["d"]), key=jax.random.key(0))
  >>> tx = optax.multi_transform({"trainable": optax.adam(1e-3),
  ...                             "frozen": optax.set_to_zero()},
  ...                            lojax.partition_labels(lora))
  """
  model.require_lora(lora, "lojax.partition_labels")
  return _label_tree(lora, "trainable", "frozen")


@dataclasses.dataclass(frozen=True)
class ParameterCount:
  """Trainable and total parameter counts (PEFT's print_trainable_parameters)."""
  trainable: int
  total: int

  @property
  def percent(self) -> float:
    return 100.0 * self.trainable / self.total if self.total else 0.0

  def __str__(self):
    return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {self.percent:.4f}")


def _size(tree) -> int:
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


def count_parameters(lora: LoraParams) -> ParameterCount:
  """Counts trainable (active adapters) and all parameters.

  As PEFT counts them: all = base + every adapter's LoRA factors,
  modules_to_save copies and trainable token rows (and the frozen scalars
  PEFT keeps per module, e.g. AdaLoRA's ``ranknum``); trainable = the active
  adapters' factors, copies, token rows and trained biases. A trained bias is the base bias made trainable (lojax
  stores it as a delta), so it adds nothing to the total.

  >>> import jax, jax.numpy as jnp, lojax
  >>> lora = lojax.wrap({"d": {"kernel": jnp.ones((4, 3))}},
  ...                   lojax.LoraSpec(r=1, target_modules=["d"]), key=jax.random.key(0))
  >>> print(lojax.count_parameters(lora))
  trainable params: 7 || all params: 19 || trainable%: 36.8421
  """
  model.require_lora(lora, "lojax.count_parameters")
  trainable = 0
  for name, ad in lora.trainable.items():
    meta = lora.meta.adapter(name)
    state = meta.variant.adapter_state(meta.spec)   # bookkeeping arrays, not parameters
    trainable += _size({k: v for k, v in ad.items() if k not in state})
  extra = sum(_size(ad[model.LORA]) + _size(ad[model.SAVED]) + _size(ad.get(model.TOKENS, {}))
              for ad in lora.adapters.values())
  extra += sum(m.variant.peft_buffers(t) for m in lora.meta.adapters for t in m.targets)
  total = _size(lora.base) + extra
  return ParameterCount(trainable, total)


def print_trainable_parameters(lora: LoraParams) -> None:
  """Prints ``trainable params: … || all params: … || trainable%: …``."""
  print(count_parameters(lora))


def set_adapter(lora: LoraParams, names: str | Sequence[str], /) -> LoraParams:
  """Makes ``names`` the active (trained, applied) adapters; several are summed.

  >>> import jax, jax.numpy as jnp, lojax
  >>> p = {"d": {"kernel": jnp.ones((4, 3))}}
  >>> spec = lojax.LoraSpec(target_modules=["d"])
  >>> lora = lojax.wrap(p, spec, key=jax.random.key(0))
  >>> lora = lojax.wrap(lora, spec, key=jax.random.key(1), adapter_name="other")
  >>> lojax.set_adapter(lora, "other").meta.active
  ('other',)
  """
  model.require_lora(lora, "lojax.set_adapter")
  names = model.name_list(names, "lojax.set_adapter", "names")
  unknown = [n for n in names if n not in lora.meta.names]
  if unknown:
    raise ValueError(f"Unknown adapter names {unknown}; this LoRA tree has "
                     f"{list(lora.meta.names)}.")
  if len(set(names)) != len(names):
    raise ValueError(f"Adapter names are repeated in {list(names)}.")
  return LoraParams(lora.base, lora.adapters, LoraMeta(lora.meta.adapters, names))
