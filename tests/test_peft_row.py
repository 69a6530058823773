"""The PEFT-torch benchmark row (benchmarks/peft_row.py) times the same work as lojax's row."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import Config  # noqa: E402


def _torch_stack():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  pytest.importorskip("peft")
  import peft_row
  return peft_row


TINY = Config(vocab=64, d=32, heads=4, layers=2, seq=16, batch=2)


def test_peft_gpt2_computes_the_lojax_model():
  """Same weights and non-zero adapters: logits, loss and every adapter gradient agree."""
  peft_row = _torch_stack()
  diff = peft_row.check_equal_work(TINY, r=4, alpha=8.0)
  assert diff["factors"] == 2 * 4 * TINY.layers  # lora_A and lora_B on 4 linears per block
  assert diff["trainable_torch"] == diff["trainable_lojax"]
  assert diff["logit_scale"] > 1.0  # the comparison is not between near-zero logits
  assert diff["logits"] < 1e-5, diff
  assert diff["loss"] < 1e-5, diff
  assert diff["grads"] < 1e-5, diff


def test_peft_row_targets_only_the_block_linears():
  peft_row = _torch_stack()
  model = peft_row.peft_model(TINY, r=4, alpha=8.0)
  trained = sorted(n for n, q in model.named_parameters() if q.requires_grad)
  expected = sorted(f"base_model.model.transformer.h.{i}.{m}.lora_{f}.default.weight"
                    for i in range(TINY.layers)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                    for f in "AB")
  assert trained == expected


def test_written_out_flops_are_what_torch_counts():
  """With attention as plain matmuls (transformers' eager attention), torch's FlopCounterMode
  counts exactly peft_row.analytic_flops for one training step."""
  peft_row = _torch_stack()
  from torch.utils.flop_counter import FlopCounterMode
  step, _ = peft_row.peft_lora_step(TINY, r=4, alpha=8.0, attn_implementation="eager")
  step()
  counter = FlopCounterMode(display=False)
  with counter:
    step()
  assert counter.get_total_flops() == peft_row.analytic_flops(TINY, r=4)["total"]


def test_one_step_trains_only_the_adapters():
  peft_row = _torch_stack()
  import torch
  step, model = peft_row.peft_lora_step(TINY, r=4, alpha=8.0)
  before = {n: q.detach().clone() for n, q in model.named_parameters()}
  losses = [step() for _ in range(3)]
  changed = {n for n, q in model.named_parameters() if not torch.equal(q, before[n])}
  assert changed == {n for n, q in model.named_parameters() if q.requires_grad}
  assert losses[-1] < losses[0]


def test_readme_quotes_the_peft_ratio_of_cpu_json():
  res = json.loads((ROOT / "benchmarks" / "results" / "cpu.json").read_text())
  peft = res["rows"]["PEFT LoRA (torch)"]
  lojax_s = peft["same_run"]["lojax LoRA"]["step_s"]
  target = next(t for t in res["targets"] if t[0].startswith("lojax LoRA step <= 0.5 x PEFT"))
  assert target[1].startswith(f"{lojax_s / peft['step_s']:.3f}x ")
  speed = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
  eager = peft["variants"]["PEFT LoRA (torch, eager)"]
  limit_s = peft["same_run"]["frozen limit"]["step_s"]
  quoted = [f"the same {peft['matmul_flops'] / 1e9:.1f} matmul GFLOPs a step",
            f"a lojax LoRA step takes {lojax_s / peft['step_s']:.2f}x the time of a PEFT LoRA "
            f"step on torch ({peft['step_s']:.2f} s, {peft['variant']}) and "
            f"{lojax_s / eager:.2f}x an eager PEFT step",
            f"even the frozen limit takes {limit_s / peft['step_s']:.2f}x that PEFT step's time"]
  missing = [q for q in quoted if q not in speed]
  assert not missing, missing


def test_lojax_step_runs_the_written_out_matmul_flops():
  """The dots of lojax's compiled LoRA step (XLA's optimized HLO) add up to analytic_flops: the
  same matmul work torch counts for the PEFT step."""
  import jax
  import optax
  import lojax
  import peft_row
  from models import LinenGPT, batch
  model = LinenGPT(TINY)
  ids, labels = batch(TINY)
  params = model.init(jax.random.key(0), ids)
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, lora_alpha=8.0, target_modules="all-linear"),
                    key=jax.random.key(1))
  apply = lojax.lorafy(model.apply)
  tx = optax.adamw(1e-3)

  @jax.jit
  def step(lora, opt_state, ids, labels):
    loss, grads = jax.value_and_grad(lambda t: optax.softmax_cross_entropy_with_integer_labels(
        apply(lora.with_trainable(t), ids), labels).mean())(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss

  hlo = step.lower(lora, tx.init(lora.trainable), ids, labels).compile().as_text()
  assert " dot(" in hlo
  assert peft_row.hlo_dot_flops(hlo) == peft_row.analytic_flops(TINY, r=4)["total"]
