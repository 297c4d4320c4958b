"""LoRA adapters as pytrees: PEFT import/export, exact ΔW algebra, folding, optax trainer."""

from sst_jax.lora.adapter import (AdapterMeta, LoraAdapter, LoraFactors, from_low_rank, init_lora,
                                  module_shapes, pattern_value)
from sst_jax.lora.algebra import (as_low_rank, dense_deltas, export_merged_hf, fold, hf_config_dict,
                                  hf_state_dict, svd_truncate, weighted_sum)
from sst_jax.lora.check import check_compatible
from sst_jax.lora.peft_io import load_peft, peft_config_dict, save_peft
from sst_jax.lora.train import TrainConfig, train_lora

__all__ = [
    "AdapterMeta", "LoraAdapter", "LoraFactors", "TrainConfig", "as_low_rank", "check_compatible",
    "dense_deltas", "export_merged_hf", "fold", "from_low_rank", "hf_config_dict", "hf_state_dict",
    "init_lora", "load_peft", "module_shapes", "pattern_value", "peft_config_dict", "save_peft",
    "svd_truncate", "train_lora", "weighted_sum",
]
