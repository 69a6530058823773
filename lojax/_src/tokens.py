"""Trainable tokens: some rows of an embedding table trained on their own.

PEFT's ``trainable_token_indices``: the adapter holds the new values ``V [n,
dim...]`` of rows ``idx`` of a table ``W [vocab, dim...]`` (initialised to the
rows themselves), and the model sees ``W`` with those rows replaced, in every
use of the table: lookups, and the logits of a tied head.

lojax composes the replacement like any adapter, as a low-rank delta
``S @ (V - W[idx])`` with ``S [vocab, n]`` the constant one-hot selector of the
rows: a lookup gathers ``S``'s rows (one-hot ``[tokens, n]``) and adds
``@ (V - W[idx])``; tied logits ``x @ Wᵀ`` add ``(x @ (V - W[idx])ᵀ) @ Sᵀ``,
``tokens * n * (dim + vocab)`` multiply-adds; the table is never copied and its
gradient never formed. Merging writes the rows (exactly ``V``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lojax._src import matcher
from lojax._src import model
from lojax._src.model import AdapterMeta, TargetMeta

# Tables PEFT's default (the model's input embedding) most likely is, by module name.
INPUT_NAMES = ("embed_tokens", "wte", "word_embeddings", "embedder", "token_embedder",
                "tok_embeddings", "embed_in", "shared")


def resolve(spec: Any, tables: Mapping[str, tuple[str, tuple[int, ...]]],
            targets: Sequence[TargetMeta]) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """``((table leaf path, rows), ...)`` that ``spec.trainable_token_indices`` selects.

  Args:
    spec: the LoraSpec.
    tables: ``{module path: (leaf path, shape)}`` of the embedding tables of the params.
    targets: the spec's LoRA targets (a table cannot be both).

  A list of rows goes to the input embedding: the table whose module is named like one
  (``embed_tokens``, ``wte``, ``word_embeddings``, ...), else the one with the most rows.
  """
  tti = spec.trainable_token_indices
  if tti is None:
    return ()
  problems = []
  if isinstance(tti, Mapping):
    chosen = []
    for key, rows in tti.items():
      match = matcher.list_match(key)
      hits = [m for m in tables if match(m)]
      if len(hits) != 1:
        problems.append(f"  `trainable_token_indices` key {key!r} matches "
                        f"{'no' if not hits else len(hits)} embedding table(s) "
                        f"{hits[:4] if hits else ''}; tables: {sorted(tables)[:8]}")
      else:
        chosen.append((hits[0], rows))
  else:
    named = [m for m in tables if m.rpartition("/")[2] in INPUT_NAMES]
    if len(named) == 1:
      pick = named[0]
    else:
      pool = named or list(tables)
      most = max((tables[m][1][0] for m in pool), default=0)
      top = [m for m in pool if tables[m][1][0] == most]
      pick = top[0] if len(top) == 1 else None
      if pick is None:
        problems.append(f"  `trainable_token_indices` is a list, but the input embedding "
                        f"is not clear among {sorted(pool) or 'no tables'}: pass "
                        "{module: [rows]}")
    chosen = [] if pick is None else [(pick, tti)]
  adapted = {t.path for t in targets}
  out = []
  for module, rows in chosen:
    leaf, shape = tables[module]
    if module in adapted:
      problems.append(f"  {module}: is a LoRA target and has trainable tokens; PEFT refuses "
                      "this too: leave it out of `target_modules`")
    if len(shape) < 2:
      problems.append(f"  {module}: a table of shape {shape} has no rows to train")
    elif max(rows) >= shape[0]:
      problems.append(f"  {module}: rows {[i for i in rows if i >= shape[0]]} are outside "
                      f"the table's {shape[0]} rows")
    out.append((leaf, tuple(rows)))
  if problems:
    raise ValueError("Cannot train these tokens:\n" + "\n".join(problems))
  return tuple(sorted(out))


def init(meta: AdapterMeta, by_path: Mapping[str, Any], dtype) -> dict[str, Any]:
  """The trainable rows at wrap time: copies of the table's rows (PEFT's init)."""
  return {p: jnp.asarray(model.decode(by_path[p]))[np.asarray(rows)].astype(dtype)
          for p, rows in meta.tokens}


def target(path: str, shape: tuple[int, ...], rows: Sequence[int]) -> TargetMeta:
  """The table as a rank-``len(rows)`` target: rows on the input side, the rest output."""
  module, _, leaf = path.rpartition("/")
  return TargetMeta(path=module, leaf=leaf, shape=tuple(shape), kind="embed", in_axes=(0,),
                    stacked=None, layers=None, r=len(rows), alpha=1.0, scaling=1.0,
                    dropout=0.0)


def factors(table: Any, rows: Sequence[int], values: Any) -> model.Factors:
  """``S [vocab, n]`` and ``V - W[rows]`` (the table a constant for the gradient)."""
  w = jax.lax.stop_gradient(jnp.asarray(table))
  idx = np.asarray(rows)
  select = jax.nn.one_hot(idx, w.shape[0], dtype=w.dtype, axis=0)       # [vocab, n]
  return model.Factors(select, values.astype(w.dtype) - w[idx], rows=tuple(rows))


def check_disjoint(metas: Sequence[AdapterMeta]) -> None:
  """Active adapters must train disjoint rows of a table (PEFT refuses overlaps too)."""
  seen: dict[tuple[str, int], str] = {}
  for m in metas:
    for p, rows in m.tokens:
      for i in rows:
        if (p, i) in seen:
          raise ValueError(f"Adapters {seen[p, i]!r} and {m.name!r} both train row {i} of "
                           f"'{p}' (trainable_token_indices); activate only one of them.")
        seen[p, i] = m.name


def write(w: Any, rows: Sequence[int], values: Any) -> Any:
  """``w`` with ``rows`` set to ``values`` (a merge, or an unmerge with the base rows)."""
  return jnp.asarray(w).at[np.asarray(rows)].set(jnp.asarray(values, w.dtype))
