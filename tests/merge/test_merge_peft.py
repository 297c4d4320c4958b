"""Agreement with PEFT: `peft.utils.merge_utils` on full ΔW tensors, and
`LoraModel.add_weighted_adapter` (non-SVD combinations) on a tiny PEFT Llama.

Where conventions coincide: TIES with majority_sign="total" (PEFT's election) for any weights,
or our default "weighted" election with equal positive weights; magnitude pruning always.
DARE draws masks from JAX's PRNG, PEFT from torch.bernoulli, so PEFT's random pruning is
patched to use our masks: what is compared is everything but the random draw.
"""

import numpy as np
import pytest
import torch

import jax
from merge_helpers import dense_adapter, random_adapter
from sst_jax.merge import merge
from sst_jax.merge.dare import expert_mask
from sst_jax.merge.peft_factors import factor_masks
from sst_jax.models.branches import parse_module_path

merge_utils = pytest.importorskip("peft.utils.merge_utils")
K = (0, "q_proj")


def _three_tasks(rng):
    return [rng.normal(size=(6, 9)) for _ in range(3)]


def _t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


@pytest.mark.parametrize("weights,majority_sign", [([0.5, 1.2, -0.7], "total"), ([0.8, 0.8, 0.8], "weighted")])
def test_ties_matches_peft_merge_utils(rng, weights, majority_sign):
    tasks = _three_tasks(rng)
    res = merge("ties", [dense_adapter({K: t}) for t in tasks], weights, density=0.4, majority_sign=majority_sign)
    ref = merge_utils.ties([_t(t) for t in tasks], torch.tensor(weights, dtype=torch.float64), 0.4, "total")
    np.testing.assert_allclose(res.delta(K), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_ties_frequency_election_matches_peft(rng):
    tasks = _three_tasks(rng)
    res = merge("ties", [dense_adapter({K: t}) for t in tasks], [1.0, 2.0, 0.5], density=0.6, majority_sign="frequency")
    ref = merge_utils.ties([_t(t) for t in tasks], torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), 0.6, "frequency")
    np.testing.assert_allclose(res.delta(K), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_magnitude_prune_matches_peft_merge_utils(rng):
    tasks = _three_tasks(rng)
    res = merge("magnitude_prune", [dense_adapter({K: t}) for t in tasks], [0.5, 1.2, -0.7], density=0.3)
    ref = merge_utils.magnitude_prune([_t(t) for t in tasks], torch.tensor([0.5, 1.2, -0.7], dtype=torch.float64), 0.3)
    np.testing.assert_allclose(res.delta(K), ref.numpy(), rtol=1e-5, atol=1e-5)


def _patch_random_pruning(monkeypatch, table):
    """PEFT's random_pruning, but the mask of a tensor comes from `table` [(tensor, mask)]."""

    def fake(tensor, density, rescale):
        for ref, mask in table:
            if ref.shape == tensor.shape and torch.allclose(ref, tensor.double(), atol=1e-6):
                out = tensor * torch.tensor(mask, dtype=tensor.dtype)
                return out / density if rescale else out
        raise AssertionError("PEFT pruned a tensor the test does not know")

    monkeypatch.setattr(merge_utils, "random_pruning", fake)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_merge_utils_given_the_same_masks(rng, monkeypatch, method):
    tasks, weights = _three_tasks(rng), [0.6, 0.6, 0.6]
    adapters = [dense_adapter({K: t}) for t in tasks]
    res = merge(method, adapters, weights, density=0.4, seed=5)
    # Our masks (keyed by each adapter's factors), fed to PEFT in place of its torch.bernoulli.
    masks = [np.asarray(expert_mask(jax.random.PRNGKey(5), K, a[K], 0.4)) for a in adapters]
    _patch_random_pruning(monkeypatch, [(_t(t), m) for t, m in zip(tasks, masks)])
    fn = getattr(merge_utils, method)
    args = (0.4, "total") if method == "dare_ties" else (0.4,)
    ref = fn([_t(t) for t in tasks], torch.tensor(weights, dtype=torch.float64), *args)
    np.testing.assert_allclose(res.delta(K), ref.numpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- add_weighted_adapter


SHAPES = {"q_proj": (8, 6), "v_proj": (4, 6), "down_proj": (6, 10)}  # the tiny Llama below


@pytest.fixture(scope="module")
def peft_pair():
    """A tiny PEFT Llama with two LoRA adapters (r=3, α=6) set to known random factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=6, intermediate_size=10, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    model = LlamaForCausalLM(cfg)
    lcfg = dict(r=3, lora_alpha=6, target_modules=list(SHAPES), init_lora_weights=False)
    pm = get_peft_model(model, LoraConfig(**lcfg), adapter_name="u1")
    pm.add_adapter("u2", LoraConfig(**lcfg))
    rng = np.random.default_rng(1)
    ours = [random_adapter(rng, 3, modules=tuple(SHAPES), scale=2.0) for _ in range(2)]
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "u1" in getattr(mod, "lora_A", {}):
            key = parse_module_path(name)
            for adapter, lr in zip(("u1", "u2"), (ours[0][key], ours[1][key])):
                mod.lora_A[adapter].weight.data = torch.tensor(np.asarray(lr.a))
                mod.lora_B[adapter].weight.data = torch.tensor(np.asarray(lr.b))
    return pm, ours


def _peft_factors(pm, name):
    out = {}
    for path, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and name in getattr(mod, "lora_A", {}):
            assert mod.scaling[name] == 1.0
            out[parse_module_path(path)] = (mod.lora_A[name].weight.detach().numpy(),
                                            mod.lora_B[name].weight.detach().numpy())
    return out


def _factor_tables(ours, density, seed):
    table = []
    base = jax.random.PRNGKey(seed)
    for key in ours[0]:
        for side, field in ((0, "a"), (1, "b")):
            stack = [np.asarray(getattr(o[key], field)) for o in ours]
            masks = np.asarray(factor_masks(base, key, side, stack[0].shape, 2, density))
            table += [(_t(x), m) for x, m in zip(stack, masks)]
    return table


@pytest.mark.parametrize("combination", ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_factor_modes_match_peft_add_weighted_adapter(peft_pair, monkeypatch, combination):
    pm, ours = peft_pair
    weights, density, seed = [0.7, -0.4], 0.5, 2
    hp = {} if combination == "linear" else {"density": density}
    if combination.startswith("dare"):
        hp["seed"] = seed
        _patch_random_pruning(monkeypatch, _factor_tables(ours, density, seed))
    name = f"m_{combination}"
    pm.add_weighted_adapter(["u1", "u2"], weights, name, combination_type=combination,
                            density=None if combination == "linear" else density)
    ref = _peft_factors(pm, name)
    res = merge(f"peft_{combination}_factors", ours, weights, **hp)
    assert set(ref) == set(res.keys)
    for key, (a, b) in ref.items():
        (lr,) = res.factors[key]
        np.testing.assert_allclose(np.asarray(lr.a), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(lr.b), b, rtol=1e-5, atol=1e-6)
