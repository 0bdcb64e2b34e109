"""Negatives (docs/protocol.md §3): the vectorised rules against a slow per-anchor loop, the random rule's
distribution, degenerate batches, warm-up and the targeted ``*_adv`` attack."""
from collections import Counter

import pytest
import torch

from utils.training.methods import training_loss
from utils.training.negatives import (
    STRATEGIES,
    choose_negatives,
    effective_strategy,
    make_negatives,
    random_negatives,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def slow_choice(strategy, y, logits):
    """Per-anchor reference, one example at a time: the index the rule must pick, or None when
    no candidate is left (then `random` is used)."""
    labels, preds = y.tolist(), logits.argmax(1).tolist()
    chosen = []
    rules = {"soft": lambda other, label, pred: other == pred,
             "hard": lambda other, label, pred: other == label,
             "easy": lambda other, label, pred: other not in (label, pred)}
    for label, pred in zip(labels, preds):
        candidates = []
        for j, (other_label, other_pred) in enumerate(zip(labels, preds)):
            if other_label == label:
                continue
            if rules[strategy](other_pred, label, pred):
                candidates.append(j)
        chosen.append(max(candidates, key=lambda j: logits[j, label].item()) if candidates else None)
    return chosen


def random_batch(num_classes, n, seed):
    """Labels from a few classes (most classes absent) and logits whose predictions mostly fall
    on half of the present classes, so every rule has candidates for some anchors and not others.
    Seeds 0 and 1 give two-class batches predicted within those classes (no `easy` candidate)."""
    g = gen(seed)
    narrow = seed < 2
    pool = torch.randperm(num_classes, generator=g)[:2 if narrow else max(4, min(num_classes, n // 4))]
    y = pool[torch.randint(0, len(pool), (n,), generator=g)]
    half = pool if narrow else pool[:len(pool) // 2]
    share = 1.0 if narrow else 0.7
    favourite = torch.where(torch.rand(n, generator=g) < share, half[torch.randint(0, len(half), (n,), generator=g)],
                            torch.randint(0, num_classes, (n,), generator=g))
    logits = torch.randn(n, num_classes, generator=g) + 4 * torch.nn.functional.one_hot(favourite, num_classes)
    return y, logits


@pytest.mark.parametrize("num_classes", [10, 100, 200])
@pytest.mark.parametrize("strategy", ["random", "soft", "hard", "easy"])
def test_vectorised_choice_matches_slow_loop(strategy, num_classes):
    used = Counter()
    for seed in range(6):
        n = 8 + 8 * seed
        y, logits = random_batch(num_classes, n, seed)
        index, valid = choose_negatives(strategy, y, num_classes, logits, gen(seed))
        assert index.shape == (n,) and valid.dtype == torch.bool
        has_other = [bool((y != y[i]).any()) for i in range(n)]
        assert valid.tolist() == has_other
        expected = slow_choice(strategy, y, logits) if strategy != "random" else [None] * n
        for i in range(n):
            if expected[i] is not None:
                assert index[i].item() == expected[i], (strategy, num_classes, seed, i)
                used["rule"] += 1
            elif valid[i]:  # random fallback: any example of another class
                assert y[index[i]] != y[i]
                used["fallback"] += 1
    if strategy != "random":
        assert used["rule"] >= 3 and used["fallback"] >= 3, used  # both branches were exercised


def test_random_is_uniform_over_present_classes_then_examples():
    y = torch.tensor([0] * 6 + [1] + [2] * 3 + [7] * 2)  # classes 3-6, 8, 9 absent
    g = gen(1)
    classes, examples = Counter(), Counter()
    for _ in range(400):
        index, valid = random_negatives(y, 10, g)
        assert valid.all()
        for i in range(6):  # anchors of class 0
            j = index[i].item()
            classes[y[j].item()] += 1
            if y[j] == 2:
                examples[j] += 1
        assert (y[index] != y).all()
    total = sum(classes.values())
    assert set(classes) == {1, 2, 7}
    for c in (1, 2, 7):  # uniform over classes, not over examples (1/3 each, not 1/6, 3/6, 2/6)
        assert abs(classes[c] / total - 1 / 3) < 0.03
    share = sum(examples.values())
    assert set(examples) == {7, 8, 9}
    assert all(abs(examples[j] / share - 1 / 3) < 0.04 for j in (7, 8, 9))


def test_rules_pick_largest_logit_for_the_anchor_label():
    # anchor 0: label 0, predicted 1
    y = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    logits = torch.tensor([
        [0.0, 5.0, 0.0],   # anchor: pred 1
        [2.0, 4.0, 0.0],   # pred 1, class-0 logit 2
        [3.0, 4.0, 0.0],   # pred 1, class-0 logit 3
        [6.0, 0.0, 5.0],   # pred 0, class-0 logit 6 (largest among other classes)
        [1.0, 0.0, 4.0],   # pred 2, class-0 logit 1
        [2.5, 0.0, 4.0],   # pred 2, class-0 logit 2.5
        [9.0, 10.0, 0.0],  # pred 1 but the anchor's own class: never a candidate
    ])
    pick = {s: choose_negatives(s, y, 3, logits, gen())[0][0].item() for s in ("soft", "hard", "easy")}
    assert pick == {"soft": 2, "hard": 3, "easy": 5}


def test_single_class_batch_has_no_valid_negative_and_zero_anc(tiny_model):
    model = tiny_model()
    x, y = torch.rand(4, 3, 16, 16), torch.full((4,), 3)
    for strategy in STRATEGIES:
        _index, valid = choose_negatives(effective_strategy(strategy), y, 10, torch.randn(4, 10), gen())
        assert not valid.any()
    neg = make_negatives("random_adv", model, x, y, 10, steps=2, generator=gen())
    assert not neg.valid.any() and torch.equal(neg.y, y)
    model.train()
    loss, metrics = training_loss("trades", model, x, y, x, neg.x, neg.y, neg_valid=neg.valid)
    assert torch.isfinite(loss)
    assert metrics["anc"].item() == 0.0 and metrics["anc_fired"].item() == 0.0
    assert metrics["neg_valid"].item() == 0.0


def test_warmup_uses_random_until_epoch_10(tiny_model):
    for strategy in ("soft", "hard_adv", "easy", "random_adv"):
        base = strategy.removesuffix("_adv")
        assert effective_strategy(strategy, 1) == "random"
        assert effective_strategy(strategy, 10) == "random"
        assert effective_strategy(strategy, 11) == base
        assert effective_strategy(strategy, None) == base
    with pytest.raises(ValueError, match="unknown negative strategy"):
        effective_strategy("hardest")

    model = tiny_model()
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    early = make_negatives("hard", model, x, y, 10, epoch=10, generator=gen(5))
    assert not calls  # warm-up: no selection forward
    assert torch.equal(early.index, random_negatives(y, 10, gen(5))[0])
    late = make_negatives("hard", model, x, y, 10, epoch=11, generator=gen(5))
    assert calls
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(late.index, choose_negatives("hard", y, 10, logits, gen(5))[0])


def test_selection_uses_eval_mode_and_restores_model(tiny_model):
    model = tiny_model().train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []
    model.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    make_negatives("soft_adv", model, x, y, 10, steps=2, generator=gen())
    assert modes and not any(modes) and model.training
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())  # no BN update
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("strategy", ["random_adv", "hard_adv"])
def test_adv_negatives_move_toward_anchor_label_within_eps(tiny_model, strategy):
    # a plain model: with RA the argmax mask may switch under the attack, which its gradient cannot see
    model = tiny_model(reverse_attention=False)
    g = gen(3)
    x, y = torch.rand(12, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3] * 3)
    eps = 8 / 255
    neg = make_negatives(strategy, model, x, y, 10, epoch=20, eps=eps, steps=5, generator=gen())
    source = x[neg.index]
    assert neg.valid.all() and (neg.y != y).all()
    assert torch.equal(neg.y, y[neg.index])  # negatives keep their true labels
    assert (neg.x - source).abs().max().item() <= eps + 1e-6
    assert neg.x.min() >= 0 and neg.x.max() <= 1
    with torch.no_grad():
        before = model(source).softmax(1).gather(1, y[:, None])
        after = model(neg.x).softmax(1).gather(1, y[:, None])
    assert (after > before).all()  # the anchor's class gained probability on every negative
