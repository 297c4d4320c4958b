"""memory_plan against hand-computed byte counts (tiny config) and published parameter counts."""

import pytest

from sst_jax.models.config import DecoderConfig
from sst_jax.models.memory import GB, PRESET_CONFIGS, MemoryPlan, activation_bytes, memory_plan, weight_bytes

# vocab 100, d 64, 2 layers, 4 heads / 2 kv heads of 16, d_ff 128.
TINY = DecoderConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
# Per layer: q 64·64 + k 32·64 + v 32·64 + o 64·64 + gate/up/down 3·128·64 = 36 864 matrix
# entries and 2·64 norm entries; embed + lm_head 2·100·64 = 12 800; final norm 64.
TINY_PARAMS = 12_800 + 64 + 2 * (36_864 + 128)  # 86 848


def test_tiny_weights_unsharded_are_all_params_in_bf16():
    assert weight_bytes(TINY, {"data": 1, "fsdp": 1, "tensor": 1}, "bfloat16") == 2 * TINY_PARAMS


def test_tiny_weights_split_over_fsdp_and_tensor_norms_replicated():
    # Every matrix dim is even, so each matrix is split 4 ways; the 5 norms (320 entries) are not.
    want = 2 * ((12_800 + 2 * 36_864) // 4 + 64 + 2 * 128)
    assert weight_bytes(TINY, {"data": 2, "fsdp": 2, "tensor": 2}, "bfloat16") == want == 43_904


def test_an_axis_that_does_not_divide_replicates_that_dimension():
    # tensor=3 divides none of 100, 64, 32, 128: nothing is split, as param_specs does.
    assert weight_bytes(TINY, {"data": 1, "fsdp": 1, "tensor": 3}, "float32") == 4 * TINY_PARAMS


@pytest.mark.parametrize("name,n_params", [("mistral-7b", 7_241_732_096), ("llama-3.1-8b", 8_030_261_248),
                                           ("qwen-2.5-14b", 14_770_033_664)])
def test_preset_weights_are_the_published_parameter_counts(name, n_params):
    assert weight_bytes(PRESET_CONFIGS[name], {"fsdp": 1}, "bfloat16") == 2 * n_params
    sharded = weight_bytes(PRESET_CONFIGS[name], {"fsdp": 8}, "bfloat16")
    assert 2 * n_params / 8 <= sharded < 2 * n_params / 8 * 1.001  # norms (and biases' extra) replicated


def test_tiny_activations_hand_computed():
    # Per token per layer in bf16: 4·64 + (2·64 + 2·32) + 3·128 = 832 entries = 1 664 B, plus
    # scores (f32) and probabilities (bf16) over 4 heads × 8 keys = 192 B; 2 layers × 8 tokens;
    # logits and their gradient in f32: 2·8·100·4 = 6 400 B per sample.
    per_sample = 2 * 8 * (1_664 + 192) + 6_400
    assert activation_bytes(TINY, samples=3, seq_len=8, dtype="bfloat16") == 3 * per_sample


def test_tiny_plan_lora_optimizer_and_kv_cache():
    plan = memory_plan(TINY, mesh_shape={"data": 1, "fsdp": 2, "tensor": 1}, dtype="bfloat16", lora_r=4,
                       lora_targets=("q_proj", "v_proj"), batch_size=4, seq_len=8, fisher_chunk=2,
                       gen_batch=4, max_new_tokens=4, device_bytes=10**6)
    n_lora = 2 * (4 * (64 + 64) + 4 * (32 + 64))  # 1 792
    assert (plan.lora_params, plan.lora_grads, plan.optimizer) == (4 * n_lora, 4 * n_lora, 8 * n_lora)
    # 2 layers × (k, v) × 2 sequences per device × 12 positions × kv_dim 32 × 2 B.
    assert plan.kv_cache == 2 * 2 * 2 * 12 * 32 * 2
    assert plan.train_activations == activation_bytes(TINY, samples=2, seq_len=8, dtype="bfloat16")
    assert plan.fisher_activations == activation_bytes(TINY, samples=1, seq_len=8, dtype="bfloat16")
    assert plan.fisher_state == 4 * 4 * (1 * 16 + 256)  # 4 modules × (per-sample r² grads + r⁴ Fisher) in f32
    assert plan.peak == plan.weights + plan.lora_params + max(plan.train_peak, plan.fisher_peak, plan.generation_peak)
    assert plan.fits and "| weights |" in plan.format()


def test_fits_keeps_the_reserve():
    plan = memory_plan(TINY, mesh_shape={"fsdp": 1}, seq_len=8, batch_size=1, fisher_chunk=1, gen_batch=1,
                       max_new_tokens=1, device_bytes=1)
    exact = MemoryPlan(**{**plan.__dict__, "device_bytes": plan.peak})
    assert not exact.fits  # 10 % is kept back for the runtime
    assert MemoryPlan(**{**plan.__dict__, "device_bytes": int(plan.peak / 0.9) + 1}).fits


def test_mistral_fsdp8_weights_and_does_not_fit_with_a_large_fisher_chunk_on_16gb():
    small = memory_plan(PRESET_CONFIGS["mistral-7b"], mesh_shape={"fsdp": 8}, fisher_chunk=8, batch_size=8,
                        seq_len=1024, device_bytes=16 * GB)
    big = memory_plan(PRESET_CONFIGS["mistral-7b"], mesh_shape={"fsdp": 8}, fisher_chunk=64, batch_size=8,
                      seq_len=1024, device_bytes=16 * GB)
    assert small.fits and not big.fits
    assert big.fisher_activations == 8 * small.fisher_activations


def test_the_fisher_chunk_is_per_data_shard():
    """accumulate pads every block to chunk × data and each data-parallel device scans `chunk`
    samples at a time: more data devices do not shrink a device's Fisher activations."""
    one, eight = (memory_plan(PRESET_CONFIGS["mistral-7b"], mesh_shape={"data": d}, fisher_chunk=8, batch_size=8,
                              seq_len=1024) for d in (1, 8))
    assert eight.fisher_activations == one.fisher_activations and eight.fisher_state == one.fisher_state
    assert eight.train_activations * 8 == one.train_activations  # the training batch does split over data


def test_unknown_mesh_axis_or_target_is_an_error():
    with pytest.raises(ValueError, match="mesh_shape"):
        memory_plan(TINY, mesh_shape={"model": 2})
    with pytest.raises(ValueError, match="LoRA targets"):
        memory_plan(TINY, mesh_shape={}, lora_targets=("qkv",))
