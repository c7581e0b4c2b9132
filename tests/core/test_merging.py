"""Model merging (``polytask.core.merging``) against direct computations on hand-made state
dicts, and against oracles transcribed from the authors' reference code (TIES:
prateeky2806/ties-merging ``src/utils/merge_utils.py``; DARE: yule-BUAA/MergeLM
``model_merging_methods/mask_weights_utils.py``), kept here and never in the library."""
from __future__ import annotations

import pytest
import torch

from polytask.core import merging
from polytask.core.merging import (dare, disjoint_mean, drop_and_rescale, elect_sign, merge,
                                   task_arithmetic, task_vectors, ties, trim)


# --- oracles, transcribed from the reference code ------------------------------------------

def ref_state_dict_to_vector(state_dict):
    return torch.nn.utils.parameters_to_vector(
        [value.reshape(-1) for key, value in sorted(state_dict.items())])


def ref_topk_values_mask(M, K):
    n, d = M.shape
    k = d - int(d * K)
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    return M * (M.abs() >= kth_values)


def ref_resolve_sign(T):
    sign_to_mult = torch.sign(T.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    return sign_to_mult


def ref_disjoint_merge(T, sign_to_mult):
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, T > 0, T < 0)
    selected_entries = T * rows_to_keep
    non_zero_counts = (selected_entries != 0).sum(dim=0).float()
    return torch.sum(selected_entries, dim=0) / torch.clamp(non_zero_counts, min=1)


def ref_ties(flat_ptm, tv_flat_checks, K, lam):
    updated = ref_topk_values_mask(tv_flat_checks.clone(), K)
    return flat_ptm + lam * ref_disjoint_merge(updated, ref_resolve_sign(updated))


def ref_mask_input_with_mask_rate(input_tensor, mask_rate):
    mask = torch.bernoulli(torch.full_like(input=input_tensor, fill_value=mask_rate))
    masked = input_tensor * (1 - mask)
    if mask_rate != 1.0:
        masked = torch.div(input=masked, other=1 - mask_rate)
    return masked


# --- fixtures -------------------------------------------------------------------------------

def states(k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g),
            "step": torch.tensor(7)}
    tuned = [{"w": base["w"] + torch.randn(4, 5, generator=g),
              "b": base["b"] + torch.randn(5, generator=g), "step": torch.tensor(7)}
             for _ in range(k)]
    return base, tuned


def floats(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


# --- task arithmetic ------------------------------------------------------------------------

def test_task_vectors_are_differences():
    base, tuned = states()
    taus = task_vectors(base, tuned)
    assert set(taus[0]) == {"w", "b"}                   # the integer buffer is not merged
    for tau, t in zip(taus, tuned):
        torch.testing.assert_close(tau["w"], (t["w"] - base["w"]).double())


def test_task_arithmetic_equals_the_direct_sum():
    base, tuned = states()
    out = task_arithmetic(base, tuned, 0.3)
    for k in ("w", "b"):
        want = base[k] + 0.3 * sum(t[k] - base[k] for t in tuned)
        torch.testing.assert_close(out[k], want)
        assert out[k].dtype == base[k].dtype
    assert torch.equal(out["step"], base["step"])


# --- TIES -----------------------------------------------------------------------------------

def test_trim_keeps_the_largest_magnitudes_of_the_whole_flattened_vector():
    taus = torch.tensor([[0.1, -5.0, 0.2, 3.0, -0.3, 0.05, 1.0, -0.01, 0.4, 2.0]])
    # d=10, density 0.2: rank 10 - 2 = 8th smallest magnitude (2.0) -> 2.0, 3.0, -5.0 kept
    want = torch.tensor([[0, -5.0, 0, 3.0, 0, 0, 0, 0, 0, 2.0]])
    assert torch.equal(trim(taus, 0.2), want)
    assert torch.equal(trim(taus, 0.2), ref_topk_values_mask(taus, 0.2))
    assert torch.equal(trim(taus, 1.0), taus)
    # per row (per task), over all coordinates at once: int(4 * 0.5) + 1 = 3 kept per row
    two = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-4.0, 3.0, -2.0, 1.0]])
    assert torch.equal(trim(two, 0.5), torch.tensor([[0, 2.0, 3.0, 4.0], [-4.0, 3.0, -2.0, 0]]))


def test_elect_sign_is_the_sign_of_the_total_mass_with_zero_sums_to_the_majority():
    trimmed = torch.tensor([[1.0, -3.0, 2.0, 0.0, 1.0],
                            [-2.0, 1.0, -2.0, 0.0, 0.5],
                            [0.5, 1.0, 0.0, 0.0, 0.0]])
    # sums: -0.5, -1, 0, 0, 1.5 -> signs -1, -1, 0, 0, +1; majority of signs: -1
    assert torch.equal(elect_sign(trimmed), torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0]))
    assert torch.equal(elect_sign(trimmed.clone()), ref_resolve_sign(trimmed.clone()))


def test_disjoint_mean_averages_only_the_agreeing_nonzero_values():
    trimmed = torch.tensor([[1.0, -3.0, 2.0, 0.0],
                            [-2.0, 1.0, 4.0, 0.0],
                            [3.0, -1.0, 0.0, 0.0]])
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0])
    # col 0: mean(1, 3) = 2; col 1: mean(-3, -1) = -2; col 2: mean(2, 4) = 3; col 3: none -> 0
    assert torch.equal(disjoint_mean(trimmed, sign), torch.tensor([2.0, -2.0, 3.0, 0.0]))
    assert torch.equal(disjoint_mean(trimmed, sign), ref_disjoint_merge(trimmed, sign))


@pytest.mark.parametrize("density,scale", [(0.2, 1.0), (0.5, 0.3), (1.0, 0.7), (0.05, 2.0)])
def test_ties_equals_the_reference_on_flattened_vectors(density, scale):
    base, tuned = states(k=4, seed=1)
    out = ties(base, tuned, density=density, scale=scale)
    fb = ref_state_dict_to_vector(floats(base))
    tv = torch.stack([ref_state_dict_to_vector(floats(t)) - fb for t in tuned])
    if density < 1:
        want = ref_ties(fb, tv, density, scale)
    else:                                  # the reference's kthvalue(0) fails: keep everything
        want = fb + scale * ref_disjoint_merge(tv, ref_resolve_sign(tv.clone()))
    torch.testing.assert_close(ref_state_dict_to_vector(floats(out)), want)
    assert torch.equal(out["step"], base["step"])


# --- DARE -----------------------------------------------------------------------------------

def test_dare_equals_the_reference_masks_for_one_seed():
    base, tuned = states(k=2, seed=2)
    out = dare(base, tuned, drop=0.6, seed=5, scale=0.5)
    torch.manual_seed(5)                   # the reference draws from the global generator
    dropped = [{k: ref_mask_input_with_mask_rate(t[k] - base[k], 0.6) for k in ("w", "b")}
               for t in tuned]
    for k in ("w", "b"):
        torch.testing.assert_close(out[k], base[k] + 0.5 * (dropped[0][k] + dropped[1][k]))
    # dropped coordinates are exactly 0, kept ones scaled by 1 / (1 - p)
    tau = torch.tensor([1.0, -2.0, 3.0, 4.0] * 50, dtype=torch.float64)
    kept = drop_and_rescale(tau, 0.75, torch.Generator().manual_seed(0))
    nonzero = kept != 0
    assert 0 < int(nonzero.sum()) < len(tau)
    torch.testing.assert_close(kept[nonzero], tau[nonzero] * 4)


def test_dare_is_unbiased_over_many_seeds():
    tau = torch.linspace(-1, 1, 50, dtype=torch.float64)
    mean = torch.stack([drop_and_rescale(tau, 0.5, torch.Generator().manual_seed(s))
                        for s in range(2000)]).mean(0)
    # each coordinate: mean of 2000 draws of tau*2*Bernoulli(0.5): std |tau| / sqrt(2000)
    assert (mean - tau).abs().max() < 5 * tau.abs().max() / 2000 ** 0.5
    biased = torch.stack([tau * (torch.rand(50, dtype=torch.float64) > 0.5)
                          for _ in range(2000)]).mean(0)   # no rescaling: E = tau / 2
    assert (biased - tau).abs().max() > 5 * tau.abs().max() / 2000 ** 0.5


def test_dare_with_ties_combine_is_ties_on_the_dropped_vectors():
    base, tuned = states(k=3, seed=3)
    out = dare(base, tuned, drop=0.3, seed=1, combine="ties", density=0.5)
    g = torch.Generator().manual_seed(1)
    dropped = [{k: drop_and_rescale(tau[k], 0.3, g) for k in tau}
               for tau in task_vectors(base, tuned)]
    fb = ref_state_dict_to_vector(floats(base)).double()
    want = ref_ties(fb, torch.stack([ref_state_dict_to_vector(d) for d in dropped]), 0.5, 1.0)
    torch.testing.assert_close(ref_state_dict_to_vector(floats(out)), want.float())


# --- identities and errors ------------------------------------------------------------------

@pytest.mark.parametrize("method,options", [("task_arithmetic", {"scale": 1.0}),
                                            ("ties", {"density": 1.0, "scale": 1.0}),
                                            ("dare", {"drop": 0.0, "seed": 3}),
                                            ("dare", {"drop": 0.0, "combine": "ties"})])
def test_merging_one_model_returns_it_unchanged(method, options):
    base, tuned = states(k=1, seed=4)
    out = merge(method, base, tuned, **options)
    assert all(torch.equal(out[k], tuned[0][k]) for k in base)


@pytest.mark.parametrize("call,match", [
    (lambda b, t: merge("average", b, t), r"unknown merge method 'average'; choose one of "
                                          r"task_arithmetic, ties, dare"),
    (lambda b, t: merge("ties", b, t, drop=0.1), r"'ties' takes no option 'drop'; its options: "
                                                 r"density, scale"),
    (lambda b, t: merge("dare", b, t, seed=1), r"'dare' needs option 'drop' \(no default\); "
                                               r"its options: drop, seed, scale, combine"),
    (lambda b, t: dare(b, t, drop=0.1, seed=1.5), r"seed = 1.5; expected an integer"),
    (lambda b, t: ties(b, t, density=0.0), r"density = 0.0; expected a number in \(0, 1\]"),
    (lambda b, t: dare(b, t, drop=1.0), r"drop = 1.0; expected a number in \[0, 1\)"),
    (lambda b, t: dare(b, t, drop=0.1, combine="mean"),
     r"combine = 'mean'; choose one of sum, ties"),
    (lambda b, t: task_arithmetic(b, t, float("nan")), r"scale = nan; expected a finite number"),
    (lambda b, t: task_arithmetic(b, []), r"at least one fine-tuned state dict"),
    (lambda b, t: task_arithmetic(b, [{**t[0], "extra": torch.ones(1)}]),
     r"finetuned_list\[0\] .* unexpected tensors: extra"),
    (lambda b, t: task_arithmetic(b, [t[0], {"w": t[1]["w"], "step": t[1]["step"]}]),
     r"finetuned_list\[1\] .* missing tensors: b"),
    (lambda b, t: task_arithmetic(b, [{**t[0], "w": torch.ones(5, 4)}]),
     r"mis-shaped tensors: w: \(5, 4\) vs base \(4, 5\)"),
    (lambda b, t: task_arithmetic(b, [{**t[0], "step": torch.tensor(8)}]),
     r"finetuned_list\[0\]\['step'\]: a non-floating tensor"),
])
def test_bad_inputs_are_one_line_errors(call, match):
    base, tuned = states(k=2)
    with pytest.raises(ValueError, match=match) as err:
        call(base, tuned)
    assert "\n" not in str(err.value)


def test_every_method_has_its_options_listed():
    assert set(merging.OPTIONS) == set(merging.METHODS)
