"""Records PEFT's numbers for the torch-free half of tests/test_peft_oracle.py.

Run from the repository root with the ``peft-oracle`` extra installed::

  pip install -e '.[peft-oracle]'
  python tools/make_peft_fixtures.py          # rewrites tests/fixtures/peft_oracle/

For every case of ``tests/test_peft_oracle.py`` (``CASES``) it writes
``<case>/``: PEFT's own ``save_pretrained`` output (``adapter_config.json``,
``adapter_model.safetensors``), ``oracle.npz`` (float32 logits and the
gradient of every trainable tensor, keyed ``grad:<PEFT name>``) and
``numbers.json`` (loss, trainable/total counts from
``get_nb_trainable_parameters()``, the adapted modules with their rank and
scaling, AdaLoRA's orthogonal regulariser) and, for a PiSSA/OLoRA case, PEFT's conversion
of it to plain LoRA in ``converted/``. ``init.json`` holds the
statistics of PEFT's initial adapter draws (``INITS``), ``draws.json`` a
fingerprint of the NumPy draws of base weights and inputs, and
``versions.json`` the versions of torch, transformers, peft, safetensors
and numpy that produced it all. Base and adapter weights are not stored:
they are drawn by NumPy from a seed and each tensor's name
(``base_state_dict``, ``trained_value``), identically in the test.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile
import warnings

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_peft_oracle as oracle  # noqa: E402


def write_case(case, directory: pathlib.Path) -> int:
  """Writes one case's fixture; returns its size in bytes."""
  numbers = oracle.peft_numbers(case)
  with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
    warnings.simplefilter("ignore")   # save_embedding_layers notice (embedding targets)
    numbers["model"].save_pretrained(tmp)
    directory.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
      shutil.copy(os.path.join(tmp, name), directory / name)
  if case.convert:   # PEFT's rank-2r plain LoRA file of a PiSSA/OLoRA adapter
    with tempfile.TemporaryDirectory() as tmp:
      converted = oracle.peft_save_converted(case, numbers["model"], pathlib.Path(tmp))
      (directory / oracle.CONVERTED).mkdir()
      for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(converted / name, directory / oracle.CONVERTED / name)
  arrays = {"logits": numbers["logits"].astype(np.float32)}
  arrays.update({f"grad:{n}": g.astype(np.float32) for n, g in numbers["grads"].items()})
  np.savez_compressed(directory / oracle.ORACLE, **arrays)
  summary = {k: numbers[k] for k in ("loss", "trainable", "total", "orth_reg") if k in numbers}
  summary["targets"] = {m: list(v) for m, v in sorted(numbers["targets"].items())}
  (directory / "numbers.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
  return sum(p.stat().st_size for p in directory.iterdir())


def main() -> None:
  import peft
  import safetensors
  import torch
  import transformers
  out = oracle.FIXTURES
  if out.exists():
    shutil.rmtree(out)
  out.mkdir(parents=True)
  versions = {"torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "safetensors": safetensors.__version__,
              "numpy": np.__version__, "python": sys.version.split()[0]}
  (out / "versions.json").write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n")
  total = 0
  for case in oracle.CASES:
    size = write_case(case, out / case.name)
    total += size
    print(f"{case.name:28s} {size / 1024:6.1f} KiB")
  (out / "draws.json").write_text(json.dumps(oracle.draws(), indent=1, sort_keys=True) + "\n")
  init = {kind: oracle.peft_init_stats(kind) for kind in oracle.INITS}
  (out / "init.json").write_text(json.dumps(init, indent=1, sort_keys=True) + "\n")
  total += sum(p.stat().st_size for p in out.glob("*.json"))
  print(f"total {total / 1024:.1f} KiB in {out}, made with {versions}")


if __name__ == "__main__":
  if os.environ.get("PYTHONHASHSEED") != "0":
    # PEFT writes target_modules from a set: a fixed hash seed keeps reruns byte-identical.
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
  main()
