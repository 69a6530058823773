"""benchmarks/scale.py on its tiny shape: the structure of a sharded LoRA step at scale.

The script compiles (nothing is run) a 2-layer Llama-style decoder on 8 fake
CPU devices (fsdp 4 x tp 2) in a subprocess, because the device count must be
set before jax is imported. The checks are the ones the 8B / 70B figures in
benchmarks/results/scale.md rest on: the LoRA step holds the base as sharded as
the frozen model does, its adapters are sharded too, it needs less memory per
device than full fine-tuning, and it moves no kernel-sized tensor in a
collective beyond the frozen model's own FSDP gathers (everything else it
moves is adapter-sized).
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "scale.py"


def run_scale(tmp_path, rows):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--rows", rows,
                         "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  res = json.loads((tmp_path / "scale.json").read_text())
  return res["models"]["tiny"], proc.stdout


def check_lora_row(model, name, limit_name):
  rows, check = model["rows"], model["checks"][name]
  cfg = model["config"]
  lora, limit = rows[name], rows[limit_name]
  # The LoRA step's collectives: no kernel-shaped tensor beyond the frozen model's, no larger
  # all-gather / reduce-scatter, and what the frozen model does not move is adapter-sized.
  assert check["kernel_shaped_not_in_limit"] == {}, check
  assert (check["largest_gather_or_scatter_elements"]
          <= check["limit_largest_gather_or_scatter_elements"]), check
  assert check["extra_tensors_per_step"] > 0, check   # the adapters' own traffic is counted
  assert 0 < check["largest_extra_elements"] <= check["largest_adapter_leaf_elements"]
  assert check["ok"], check
  # The base is stored as sharded as in the frozen step: per device, the step's arguments are
  # the frozen model's (less its perturbation input) plus the adapters' shards and their two
  # AdamW moments (fp32, sharded like the adapters; slack: AdamW's step count, alignment).
  expected = 3 * lora["adapter_bytes_per_device"] - limit["perturb_bytes_per_device"]
  extra_args = lora["memory"]["argument"] - limit["memory"]["argument"]
  assert expected <= extra_args <= expected + 4096, (extra_args, expected)
  # ... and the adapters are split over the devices, not replicated.
  assert lora["adapter_bytes_per_device"] <= 4 * lora["adapter_params"] / min(cfg["fsdp"],
                                                                              cfg["tp"])
  # The adapters are sharded like their kernels (A: the kernel's input axis, B: its output).
  specs = {k: v[1] for k, v in lora["adapter_leaves"].items()}
  assert specs["q_proj/lora_A"] == "P(None, 'fsdp')", specs
  assert specs["q_proj/lora_B"] == "P(None, None, 'tp')", specs
  assert specs["down_proj/lora_A"] == "P(None, 'tp')", specs
  assert specs["down_proj/lora_B"] == "P(None, None, 'fsdp')", specs


def test_tiny_scale_lora_step(tmp_path):
  """LoRA vs the frozen limit and full fine-tuning on 8 fake devices (fsdp 4 x tp 2)."""
  model, out = run_scale(tmp_path, "limit,lora,full")
  rows = model["rows"]
  assert set(rows) == {"limit", "lora", "full"}
  check_lora_row(model, "lora", "limit")
  # Per-device memory: LoRA below full fine-tuning, and not below the frozen limit.
  mem = {k: r["memory"]["total"] for k, r in rows.items()}
  assert mem["limit"] <= mem["lora"] < mem["full"], mem
  # Full FT reduce-scatters or all-reduces kernel-sized gradients; the frozen model does not
  # (the comparison the LoRA checks rely on can tell the two apart).
  full = [t for t in rows["full"]["ops"] if t["op"] in ("reduce-scatter", "all-reduce")]
  limit = [t for t in rows["limit"]["ops"] if t["op"] in ("reduce-scatter", "all-reduce")]
  grad_bytes = lambda ops: sum(o["bytes"] * o["times"] for o in ops)  # noqa: E731
  assert grad_bytes(full) > grad_bytes(limit), (grad_bytes(full), grad_bytes(limit))
  # The markdown table has a row per step.
  table = (tmp_path / "scale.md").read_text()
  for name in ("frozen limit", "LoRA", "full FT"):
    assert f"| tiny | 4 x 2 | 8 x 40 | {name} |" in table, table


@pytest.mark.slow
def test_tiny_scale_qlora_step(tmp_path):
  """QLoRA on the NF4 base: the same structure against the frozen NF4 model."""
  model, out = run_scale(tmp_path, "limit,qlora,qlora_g")
  assert "CHECK tiny: the abstract NF4 base" in out
  check_lora_row(model, "qlora", "qlimit")
  assert math.isfinite(model["rows"]["qlora"]["memory"]["total"])
  # No collective rebuilds a whole per-layer kernel (the codes are split like the kernel:
  # tests/test_sharding.py pins their specs).
  assert model["checks"]["qlora"]["full_kernel_gathers_per_step"] == 0
  # gather_codes_over="fsdp": the layers gather 4-bit codes, not decoded kernels.
  gathered = lambda r: model["rows"][r]["collectives"]["all-gather"]["bytes_per_step"]  # noqa
  assert gathered("qlora_g") < 0.5 * gathered("qlora"), (gathered("qlora_g"), gathered("qlora"))
