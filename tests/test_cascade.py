"""The cascade: the same per-example worst case as running every attack on every example, each
stage attacked only the survivors of the earlier ones, and the order runs the standalone
(paper / reference) attacks first, then cheap to expensive."""
import dataclasses

import numpy as np
import pytest
import torch

from test_adaptive import GatedToy, toy_data
from test_evaluation import prototype_data, trained_tiny
from utils.evaluation.catalogue import (
    COST_APGD,
    COST_AUTOATTACK,
    COST_BLACK_BOX,
    COST_FINAL_PGD,
    COST_SURROGATE_PGD,
)
from utils.evaluation.runner import (
    SPLIT_COUNT,
    BatchLimit,
    auto_batch_size,
    batch_from_memory,
    cascade_plan,
    memory_cost,
    run_attack,
    run_batch,
)
from utils.evaluation.suite import (
    BUDGETS,
    Settings,
    attack_catalogue,
    head_count,
    run_attacks,
    run_checks,
    select_attacks,
)

EPS = 8 / 255
ADAPTIVE_PGD = ("fgsm,pgd40,pgd40+p,pgd10,pgd100,aux1-pgd-ce,aux2-pgd-ce,joint-pgd-ce-w2,st-pgd-ce-t1,"
                "enum-top2,transfer-nora,transfer-labelmask,ref-fgsm")


def spied(specs, calls):
    """The specs with ``run`` wrapped to record which examples (set positions) each batch held."""
    def wrap(spec):
        def run(model, x, y, ctx):
            calls.setdefault(spec.name, []).extend(ctx.index.tolist())
            return spec.run(model, x, y, ctx)
        return dataclasses.replace(spec, run=run)
    return [wrap(spec) for spec in specs]


def both(model, x, y, attacks, eps=EPS, batch_size=16):
    catalogue = attack_catalogue(Settings(eps=eps, budget=BUDGETS["small"]), model.fc.out_features, head_count(model))
    specs, _ = select_attacks(attacks, catalogue, True)
    calls = {}
    cascade = run_attacks(model, x, y, spied(specs, calls), eps=eps, batch_size=batch_size, progress=False)
    full = run_attacks(model, x, y, specs, eps=eps, batch_size=batch_size, progress=False, cascade=False)
    return cascade, full, calls


def check_survivors_only(evaluation, calls):
    """Each cascade stage received exactly the clean-correct examples no earlier attack broke."""
    alive = evaluation.clean.copy()
    for result in evaluation.results:
        if not result.standalone:
            assert sorted(calls.get(result.name, [])) == np.flatnonzero(alive).tolist(), result.name
            assert np.array_equal(result.received, alive)
        if result.in_worst_case:
            alive &= result.robust


def test_cascade_equals_full_evaluation_on_the_masked_toy():
    model = GatedToy().eval()
    x, y = toy_data(model, 24)
    cascade, full, calls = both(model, x, y, ADAPTIVE_PGD)
    assert np.array_equal(cascade.worst_case(), full.worst_case())
    assert full.worst_case().sum() < full.result("pgd40").robust.sum()  # several attacks matter here
    check_survivors_only(cascade, calls)
    stages = [r for r in cascade.results if not r.standalone]
    assert sum(r.n_received for r in stages) < sum(full.result(r.name).n_received for r in stages)  # work saved
    checks = {c["name"]: c for c in run_checks(cascade)}
    assert checks["aux/final agreement"]["status"] == "FLAG"             # masking is still caught in a cascade
    assert sum(v or 0 for v in checks["aux/final agreement"]["numbers"]["broken_beyond_final"].values()) > 0
    assert checks["more steps/restarts never help"]["status"] == "pass"  # pgd10 broke nothing pgd40 left


@pytest.mark.slow
def test_cascade_equals_full_evaluation_on_a_small_trained_ra_model():
    model = trained_tiny(True)
    x, y = prototype_data(32, seed=5)
    cascade, full, calls = both(model, x, y, "all", eps=16 / 255)
    assert np.array_equal(cascade.worst_case(), full.worst_case())
    check_survivors_only(cascade, calls)
    broke = {r.name for r in full.results if r.in_worst_case and (full.clean & ~r.robust).any()}
    assert len(broke) >= 3  # several attacks each break examples


def test_order_standalone_first_then_cheap_to_expensive():
    catalogue = attack_catalogue(Settings(budget=BUDGETS["small"]), 10, 2)
    plan = cascade_plan(catalogue, cascade=True)
    standalone = [spec for spec, alone in plan if alone]
    assert {s.family for s in standalone} == {"paper", "reference", "sanity"}
    assert all(s.family != "sanity" or s.eps == 1.0 for s in standalone)      # only ε = 1, outside the threat model
    costs = [spec.cost for spec, alone in plan if not alone]
    assert costs == sorted(costs) and costs[0] == COST_FINAL_PGD and costs[-1] == COST_BLACK_BOX
    assert {COST_SURROGATE_PGD, COST_APGD, COST_AUTOATTACK} <= set(costs)
    assert plan[-1][0].name == "square"
    later = [spec.name for spec, alone in plan if not alone]
    assert later.index("autoattack") > later.index("aux1-apgd-ce")  # AutoAttack only on what APGD left
    assert [s.name for s, _ in cascade_plan(catalogue, cascade=False)] == [s.name for s in catalogue]


def test_full_set_keeps_named_attacks_on_every_example_within_the_cascade():
    catalogue = attack_catalogue(Settings(budget=BUDGETS["small"]), 10, 2)
    plan = dict((spec.name, alone) for spec, alone in cascade_plan(catalogue, True, ("autoattack", "square")))
    assert plan["autoattack"] and plan["square"] and not plan["autoattack+p"]
    ordered = [spec.name for spec, _ in cascade_plan(catalogue, True, ("autoattack",))]
    assert ordered.index("autoattack") < ordered.index("pgd10")  # run with the standalone attacks, first


def test_random_starts_do_not_depend_on_the_batch():
    model = trained_tiny(True, steps=30)
    x, y = prototype_data(12, seed=5)
    catalogue = attack_catalogue(Settings(budget=BUDGETS["small"]), 5, 2)
    specs, _ = select_attacks("pgd10,st-pgd-ce-t1", catalogue, True)
    results = [run_attacks(model, x, y, specs, eps=EPS, batch_size=b, progress=False, cascade=False) for b in (12, 5)]
    for a, b in zip(*(r.results for r in results)):
        assert np.array_equal(a.robust, b.robust)


# ---------------------------------------------------------------- batch sizes (issue 21, item 4)

PER_EXAMPLE_DETERMINISTIC = ("fgsm,fgsm+p,pgd40,pgd40+p,cw40,cw40+p,aux1-pgd-ce,aux2-pgd-ce,joint-pgd-ce-w2,"
                             "joint-pgd-margin-w0.5,st-pgd-ce-t1,enum-top2,transfer-nora,transfer-labelmask,pgd10,"
                             "pgd40-restarts,pgd40-eps1,ref-fgsm")


@pytest.mark.slow
def test_deterministic_attacks_give_the_same_per_example_result_at_batch_4_and_64():
    model = trained_tiny(True, steps=30)
    x, y = prototype_data(20, seed=7)
    catalogue = attack_catalogue(Settings(budget=BUDGETS["small"]), 5, 2)
    specs, _ = select_attacks(PER_EXAMPLE_DETERMINISTIC, catalogue, True)
    assert len(specs) == len(PER_EXAMPLE_DETERMINISTIC.split(","))
    small, large = (run_attacks(model, x, y, specs, eps=EPS, batch_size=b, progress=False, cascade=False) for b in (4, 64))
    assert np.array_equal(small.clean, large.clean) and small.clean.any()
    broken = 0
    for a, b in zip(small.results, large.results):
        assert a.name == b.name and np.array_equal(a.robust, b.robust), a.name
        assert (a.paper is None) == (b.paper is None) and (a.paper is None or np.array_equal(a.paper, b.paper)), a.name
        broken += int((a.robust != small.clean).sum())
    assert broken > 0  # the attacks do break examples, so equal results are not all-robust ones


def _fails_above_three(spec):
    """``(run, sizes)``: ``spec``'s attack that raises CUDA's out-of-memory error on batches over 3
    examples, and the list of batch sizes it was called with."""
    sizes = []

    def tight(model, xb, yb, ctx):
        sizes.append(len(yb))
        if len(yb) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return spec.run(model, xb, yb, ctx)
    return tight, sizes


def test_a_batch_that_runs_out_of_memory_is_rerun_as_halves_with_the_same_result():
    model = trained_tiny(True, steps=30)
    x, y = prototype_data(11, seed=7)
    spec = select_attacks("pgd10", attack_catalogue(Settings(budget=BUDGETS["small"]), 5, 2), True)[0][0]
    tight, sizes = _fails_above_three(spec)

    clean = run_attacks(model, x, y, [spec], eps=EPS, batch_size=2, progress=False).clean
    received = np.ones(len(y), bool)  # attack all 11, clean-correct or not
    args = dict(batch_size=16, seed=0, device="cpu", eps=EPS, progress=False)
    split = run_attack(model, dataclasses.replace(spec, run=tight), x, y, clean, received, **args)
    whole = run_attack(model, spec, x, y, clean, received, **dict(args, batch_size=2))
    attacked = int(received.sum())
    assert sizes[0] == attacked and max(s for s in sizes if s <= 3) <= 3
    assert sum(s for s in sizes if s <= 3) == attacked  # every example attacked exactly once
    assert np.array_equal(split.robust, whole.robust)
    assert split.counts[SPLIT_COUNT] == sum(1 for s in sizes if s > 3)


def test_a_shared_batch_limit_keeps_later_batches_and_attacks_below_the_size_that_failed():
    model = trained_tiny(True, steps=30)
    x, y = prototype_data(11, seed=7)
    spec = select_attacks("fgsm", attack_catalogue(Settings(budget=BUDGETS["small"]), 5, 2), True)[0][0]
    tight, sizes = _fails_above_three(spec)

    received, limit = np.ones(11, bool), BatchLimit(8)
    args = dict(batch_size=8, seed=0, device="cpu", eps=EPS, progress=False, limit=limit)
    first = run_attack(model, dataclasses.replace(spec, run=tight), x, y, received, received, **args)
    # 8 fails → limit 4, halves 4 (fails → limit 2, halves 2 + 2) and 4 (fails, halves 2 + 2); then 2 + 1 at limit 2
    assert sizes == [8, 4, 2, 2, 4, 2, 2, 2, 1] and limit.size == 2 and first.counts[SPLIT_COUNT] == 3
    sizes.clear()
    second = run_attack(model, dataclasses.replace(spec, run=tight), x, y, received, received, **args)
    assert sizes == [2, 2, 2, 2, 2, 1] and SPLIT_COUNT not in second.counts
    assert np.array_equal(first.robust, second.robust)


def test_an_example_that_alone_runs_out_of_memory_raises():
    x, y = prototype_data(2, seed=7)
    spec = select_attacks("pgd10", attack_catalogue(Settings(budget=BUDGETS["small"]), 5, 2), True)[0][0]

    def never(model, xb, yb, ctx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_batch(None, dataclasses.replace(spec, run=never), x, y, torch.arange(2), 0, "cpu")


def test_batch_from_memory_divides_the_usable_share_of_free_memory():
    gib, mib = 2 ** 30, 2 ** 20
    assert batch_from_memory(10 * gib, gib, mib, fraction=0.6) == 5120  # (6144 − 1024) MiB / 1 MiB
    assert batch_from_memory(10 * gib, 0, 3 * mib, fraction=0.5) == 1706  # 5120 MiB / 3 MiB, rounded down
    assert batch_from_memory(gib, 2 * gib, mib) == 1  # nothing usable: still one example
    assert batch_from_memory(10 * gib, 0, 1, cap=100) == 100


def test_memory_cost_is_the_slope_between_two_probe_batches():
    assert memory_cost({8: 1000 + 8 * 300, 4: 1000 + 4 * 300}) == (1000, 300)
    assert memory_cost({4: 5000, 8: 4000}) == (0, 500)  # no positive slope: the larger peak per example


def test_auto_batch_size_on_cuda_comes_from_free_memory_not_from_the_number_of_examples():
    x = torch.zeros(3, 3, 8, 8)
    probed = []

    def peak(size):
        probed.append(size)
        return 2 ** 30 + size * 2 ** 20  # 1 GiB fixed, 1 MiB per example

    for limit in (3, 10_000):
        size, note = auto_batch_size(None, x, "cuda", limit, peak=peak, free_bytes=10 * 2 ** 30)
        assert size == int((0.6 * 10 * 2 ** 30 - 2 ** 30) // 2 ** 20) == 5120
        assert "10.0 GiB free" in note and "1.00 MiB per example" in note
    assert probed == [32, 8, 32] * 2  # a warm-up, then the two measured probes


def test_auto_batch_size_on_cpu_is_fixed():
    assert auto_batch_size(None, torch.zeros(1, 3, 8, 8), "cpu", 1000)[0] == 128
    assert auto_batch_size(None, torch.zeros(1, 3, 8, 8), "cpu", 12)[0] == 12
