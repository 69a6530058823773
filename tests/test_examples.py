"""The examples run end to end (with few steps) and report what they promise."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run(script, *args, cwd):
  env = dict(os.environ, PYTHONPATH=str(EXAMPLES.parent))
  out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_quickstart(tmp_path):
  out = run("quickstart.py", "--steps", "40", "--pretrain-steps", "20", cwd=tmp_path)
  assert "trainable params:" in out and "held-out loss" in out
  assert "merge check:" in out and "OK" in out


@pytest.mark.filterwarnings("ignore")
def test_adalora_example(tmp_path):
  out = run("adalora.py", "--steps", "40", "--pretrain-steps", "10", "--plot", "ranks.png",
            cwd=tmp_path)
  assert "budget" in out and "resized to the kept ranks" in out
  assert (tmp_path / "ranks.png").stat().st_size > 10_000


def test_checkpointing_example(tmp_path):
  out = run("checkpointing.py", "--steps", "12", "--every", "3", "--kill-at", "8", cwd=tmp_path)
  assert "identical to the uninterrupted run: True" in out
  assert (tmp_path / "checkpointing_out" / "peft" / "adapter_model.safetensors").exists()

def test_generate_example(tmp_path):
  out = run("generate.py", "--steps", "20", "--pretrain-steps", "20", "--tokens", "16",
            cwd=tmp_path)
  assert "frozen base:" in out and "with LoRA:" in out
  assert "agree on 32 of 32 tokens" in out and "tokens/s" in out


# examples/sharded_training.py runs in tests/test_sharding.py, in its 8-device process.
