"""LoRA adapters as pytrees: PEFT import/export, exact ΔW algebra, folding, optax trainer."""
