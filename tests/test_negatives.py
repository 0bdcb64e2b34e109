"""Negatives (docs/protocol.md §3): the vectorised rules against a slow per-anchor loop, the random rule's
distribution, and, through the training step itself, degenerate batches, warm-up and the targeted
``*_adv`` attack."""
import copy
from collections import Counter

import pytest
import torch

from models import has_reverse_attention
from utils.training.ancra import STRATEGIES, TrainStep, choose_negatives, effective_strategy, random_negatives
from utils.training.config import MethodConfig


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def anc_step(model, strategy, method="trades", steps=2, eps=8 / 255):
    """The training step of METHOD-ANC(RA) with ``strategy`` on ``model``; lr 0 keeps the weights."""
    config = MethodConfig(method, anc=True, ra=has_reverse_attention(model), strategy=strategy, attack_steps=steps,
                          eps=eps)
    return TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), config, 10)


def run_step(step, x, y, epoch, on_loss=None):
    """One step on (x, y); returns (the negatives the step handed to its loss, the step's metrics).
    ``on_loss(model)`` runs when the loss is first called, before any training forward."""
    seen = []
    loss = step.loss

    def spy(model, *args):
        if not seen and on_loss is not None:
            on_loss(model)
        seen.append(args[-1])
        return loss(model, *args)

    step.loss = spy
    metrics = step(x, y, epoch)
    step.loss = loss
    return seen[0], metrics


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
    neg, metrics = run_step(anc_step(model, "random_adv"), x, y, epoch=1)
    assert not neg.valid.any() and torch.equal(neg.y, y)
    assert torch.isfinite(metrics["loss"])
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
    selection = []  # forwards without gradients: the selection forward (attacks and training need gradients)
    model.register_forward_pre_hook(lambda m, i: selection.append(1) if not torch.is_grad_enabled() else None)
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    step = anc_step(model, "hard")

    def scores(seed):  # the random rule's draws of a step started from torch.manual_seed(seed)
        torch.manual_seed(seed)
        return step.draw(x)[1]

    early_scores = scores(5)
    torch.manual_seed(5)
    early, _ = run_step(step, x, y, epoch=10)
    assert not selection  # warm-up: no selection forward
    assert torch.equal(early.index, random_negatives(y, 10, scores=early_scores)[0])
    with torch.no_grad():
        logits = model.eval()(x)
    late_scores = scores(5)
    torch.manual_seed(5)
    late, _ = run_step(step, x, y, epoch=11)
    assert selection
    assert torch.equal(late.index, choose_negatives("hard", y, 10, logits, scores=late_scores)[0])


def test_selection_and_attacks_use_eval_mode_and_restore_model(tiny_model):
    model = tiny_model().train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []
    model.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    at_loss = {}

    def check(m):  # before the training forwards: only the step's selection and attacks have run
        at_loss.update(modes=list(modes), state={k: v.clone() for k, v in m.state_dict().items()},
                       grads=[p.grad for p in m.parameters()], flags=[p.requires_grad for p in m.parameters()])

    run_step(anc_step(model, "soft_adv"), x, y, epoch=11, on_loss=check)
    assert at_loss["modes"] and not any(at_loss["modes"]) and model.training
    assert all(torch.equal(v, stats[k]) for k, v in at_loss["state"].items())  # no BN update
    assert all(g is None for g in at_loss["grads"]) and all(at_loss["flags"])


@pytest.mark.parametrize("strategy", ["random_adv", "hard_adv"])
def test_adv_negatives_move_toward_anchor_label_within_eps(tiny_model, strategy):
    # a plain model: with RA the argmax mask may switch under the attack, which its gradient cannot see
    model = tiny_model(reverse_attention=False)
    initial = copy.deepcopy(model).eval()
    g = gen(3)
    x, y = torch.rand(12, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3] * 3)
    eps = 8 / 255
    torch.manual_seed(0)
    neg, _ = run_step(anc_step(model, strategy, "pgd-at", steps=5, eps=eps), x, y, epoch=20)
    source = x[neg.index]
    assert neg.valid.all() and (neg.y != y).all()
    assert torch.equal(neg.y, y[neg.index])  # negatives keep their true labels
    assert (neg.x - source).abs().max().item() <= eps + 1e-6
    assert neg.x.min() >= 0 and neg.x.max() <= 1
    with torch.no_grad():
        before = initial(source).softmax(1).gather(1, y[:, None])
        after = initial(neg.x).softmax(1).gather(1, y[:, None])
    assert (after > before).all()  # the anchor's class gained probability on every negative
