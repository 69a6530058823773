"""lojax: parameter-efficient fine-tuning (LoRA) as pure transforms of JAX param trees.

The architecture, one group per concept (docs/design.md draws the pipeline).
"""

# Configuration: what to adapt and how (PEFT's LoraConfig names).
from lojax._src.spec import LoraSpec
from lojax._src.spec import TaskType

# The data model and wrapping: a frozen base plus named adapters.
from lojax._src.model import LoraParams
from lojax._src.wrap import kernel_paths
from lojax._src.wrap import wrap
from lojax._src.eva import eva_init

# Computing with adapters: factorized inside any function of the params.
from lojax._src.apply import lorafy

# Folding adapters into the base and taking them out again.
from lojax._src.merge import merge
from lojax._src.merge import unmerge

# Training plumbing for optax: masks, labels, counts, the active set.
from lojax._src.training import ParameterCount
from lojax._src.training import count_parameters
from lojax._src.training import partition_labels
from lojax._src.training import print_trainable_parameters
from lojax._src.training import set_adapter
from lojax._src.training import trainable_mask
from lojax._src.loraplus import loraplus

# Several adapters on one base: delete, disable, combine, mixed batches.
from lojax._src.adapters import adapter_ids
from lojax._src.adapters import add_weighted_adapter
from lojax._src.adapters import delete_adapter
from lojax._src.adapters import disable_adapters

# AdaLoRA: SVD-form adapters whose rank allocation runs inside the optimizer.
from lojax._src.adalora import AdaLoraSpec
from lojax._src.adalora import AdaLoraState
from lojax._src.adalora import adalora
from lojax._src.adalora import adalora_budget
from lojax._src.adalora import adalora_orth_reg
from lojax._src.adalora import adalora_rank_pattern
from lojax._src.adalora import adalora_ranks
from lojax._src.adalora import resize as adalora_resize

# Quantized base kernels (QLoRA).
from lojax._src.quant import QuantizedArray
from lojax._src.quant import dequantize
from lojax._src.quant import quantize

# Checkpoints (Orbax) of adapters, optimizer state and merged models.
from lojax._src.checkpoint import AdapterCheckpointer
from lojax._src.checkpoint import restore_adapters
from lojax._src.checkpoint import save_adapters
from lojax._src.checkpoint import save_merged

# Hugging Face PEFT adapter files.
from lojax._src.mappings import BERT_MAPPING
from lojax._src.mappings import GEMMA_MAPPING
from lojax._src.mappings import GPT2_MAPPING
from lojax._src.mappings import LLAMA_MAPPING
from lojax._src.mappings import PeftMapping
from lojax._src.mappings import T5_MAPPING
from lojax._src.peft_format import load_peft
from lojax._src.peft_format import save_peft

# Serving: adapters swapped into a compiled function.
from lojax._src.serving import AdapterBank
from lojax._src.serving import adapter_bank
from lojax._src.serving import hotswap

# Sharding adapters and optimizer states with the base.
from lojax._src.sharding import lora_shardings
from lojax._src.sharding import opt_state_shardings
from lojax._src.sharding import shard

__version__ = "0.1.0"

__all__ = (
    "AdaLoraSpec",
    "AdapterBank",
    "AdaLoraState",
    "AdapterCheckpointer",
    "BERT_MAPPING",
    "GEMMA_MAPPING",
    "GPT2_MAPPING",
    "LLAMA_MAPPING",
    "LoraParams",
    "LoraSpec",
    "ParameterCount",
    "PeftMapping",
    "QuantizedArray",
    "T5_MAPPING",
    "TaskType",
    "adalora",
    "adalora_budget",
    "adalora_orth_reg",
    "adalora_rank_pattern",
    "adalora_ranks",
    "adalora_resize",
    "adapter_bank",
    "adapter_ids",
    "add_weighted_adapter",
    "count_parameters",
    "delete_adapter",
    "dequantize",
    "disable_adapters",
    "eva_init",
    "hotswap",
    "kernel_paths",
    "load_peft",
    "lora_shardings",
    "lorafy",
    "loraplus",
    "merge",
    "opt_state_shardings",
    "partition_labels",
    "print_trainable_parameters",
    "quantize",
    "restore_adapters",
    "save_adapters",
    "save_merged",
    "save_peft",
    "set_adapter",
    "shard",
    "trainable_mask",
    "unmerge",
    "wrap",
)
