"""Adaptive attacks and sanity checks (docs/protocol.md §8): a deliberately masked toy model is caught, an
ordinary model is not flagged, surrogate views compute what they claim, and the AutoAttack
adapter passes the package's own warnings through."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import ra_policy
from toys import ToyRA
from utils.evaluation import adaptive, sanity
from utils.evaluation.autoattack_adapter import (
    capture_autoattack_output,
    parse_accuracies,
    run_apgd,
)
from utils.evaluation.suite import (
    BUDGETS,
    AttackResult,
    Evaluation,
    Settings,
    attack_catalogue,
    head_count,
    run_attacks,
    select_attacks,
)

EPS = 8 / 255
SIZE = 8


# ---------------------------------------------------------------- the masked toy model

class GatedToy(ToyRA):
    """An RA model whose argmax gate hides every class but the predicted one from the final logits.

    Evidence z_j = relu(G·(mean of x over pixel set S_j − 0.5) + 1) (disjoint sets); both RA
    blocks are identities and the classifier is the identity, so the auxiliary head 1 is z, the
    mask keeps only channel c = argmax z and the final logits are z_c·e_c. The final logits'
    gradient therefore only sees S_c: an attack on them can lower z_y by G·ε but never raise a
    rival class, while the clean margin is 1.5·G·ε — robust to PGD, broken by any attack that
    also raises a rival (aux head 1, straight-through, mask enumeration, RA removed).
    """

    def __init__(self, num_classes=5, gain=40.0, seed=0):
        super().__init__()
        self.reverse_attention = True
        dim = 3 * SIZE * SIZE
        self.groups = torch.randperm(dim, generator=torch.Generator().manual_seed(seed)) % num_classes
        self.evidence = nn.Linear(dim, num_classes)
        self.blocks = nn.ModuleList([nn.Identity(), nn.Identity()])
        self.fc = nn.Linear(num_classes, num_classes)
        with torch.no_grad():
            member = F.one_hot(self.groups, num_classes).T.float()
            self.evidence.weight.copy_(gain * member / member.sum(1, keepdim=True))
            self.evidence.bias.fill_(1.0 - 0.5 * gain)
            self.fc.weight.copy_(torch.eye(num_classes))
            self.fc.bias.zero_()

    def forward_trunk(self, x):
        return F.relu(self.evidence(x.flatten(1)))[:, :, None, None]

    def pool(self, z):
        return z.flatten(1)


def toy_data(model, n, seed=0):
    """Grey images with noise; every class region has mean exactly 0.5, the label's 0.5 + 1.5·ε."""
    g = torch.Generator().manual_seed(seed)
    num_classes = model.fc.out_features
    y = torch.randint(0, num_classes, (n,), generator=g)
    member = F.one_hot(model.groups, num_classes).float()
    x = 0.5 + 0.2 * (torch.rand(n, member.shape[0], generator=g) - 0.5)
    x = x - (x @ member / member.sum(0) - 0.5) @ member.T
    x = x + 1.5 * EPS * member.T[y]
    return x.view(n, 3, SIZE, SIZE), y


@pytest.fixture(scope="module")
def toy():
    model = GatedToy().eval()
    x, y = toy_data(model, 32)
    return model, x, y


# ---------------------------------------------------------------- an ordinary small model

class SmallCNN(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 2, 1)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def prototype_data(n, num_classes=5, seed=0):
    """Class prototypes of contrast 0.17 plus noise: learnable, and within reach of ε = 8/255 for some."""
    protos = torch.rand(num_classes, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(123)) - 0.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return 0.5 + 0.17 * protos[y] + 0.1 * (torch.rand(n, 3, SIZE, SIZE, generator=g) - 0.5), y


def trained_small_cnn(steps=150):
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = prototype_data(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def run(model, x, y, attacks, ra=True, cascade=False):
    settings = Settings(eps=EPS, budget=BUDGETS["small"])
    specs, skipped = select_attacks(attacks, attack_catalogue(settings, model.fc.out_features, head_count(model)), ra)
    evaluation = run_attacks(model, x, y, specs, eps=EPS, batch_size=32, seed=0, progress=False, skipped=skipped,
                             cascade=cascade)
    return evaluation, {c["name"]: c for c in sanity.run_checks(evaluation)}


# ---------------------------------------------------------------- the toy really is masked

def test_toy_final_gradient_sees_only_the_predicted_class_region(toy):
    model, x, y = toy
    x = x[:4].clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y[:4]), x)
    in_label_region = (model.groups[None, :] == y[:4, None]).view(4, 3, SIZE, SIZE)
    assert grad[~in_label_region].abs().max() == 0          # rivals are invisible
    assert (grad[in_label_region] != 0).all()
    with ra_policy(model, "straight_through", tau=1.0):
        st_grad, = torch.autograd.grad(F.cross_entropy(model(x), y[:4]), x)
    assert (st_grad[~in_label_region] != 0).all()           # the straight-through mask reveals them
    assert torch.equal(model(x).argmax(1), y[:4])


@pytest.mark.slow
def test_masked_toy_is_caught(toy):
    model, x, y = toy
    evaluation, checks = run(model, x, y, "fgsm,pgd40,cw40,pgd40+p,adaptive,sanity")
    acc = {r.name: r.accuracy for r in evaluation.results}
    assert evaluation.clean_accuracy == 1.0
    assert min(acc["fgsm"], acc["pgd40"], acc["cw40"], acc["pgd10"], acc["pgd100"]) >= 0.9  # plain PGD fails
    for name in ("st-pgd-ce-t1", "st-pgd-ce-t10", "enum-top2", "aux1-pgd-ce", "transfer-nora", "pgd40+p"):
        assert acc[name] <= 0.1, name                                                    # adaptive attacks win
    worst = evaluation.worst_case().mean()
    assert worst <= 0.05 and acc["pgd40"] - worst >= 0.85
    assert acc["aux2-pgd-ce"] >= 0.9 and acc["transfer-labelmask"] >= 0.9  # heads behind the gate stay blind
    for name in ("black-box/transfer never beat white-box", "aux/final agreement"):
        assert checks[name]["status"] == "FLAG"
        assert "gradient masking" in checks[name]["message"] and "Trust" in checks[name]["message"]
    assert checks["robust ≤ clean"]["status"] == "pass"


@pytest.mark.slow
def test_ordinary_model_raises_no_flag():
    model = trained_small_cnn()
    x, y = prototype_data(48, seed=5)
    evaluation, checks = run(model, x, y, "fgsm,pgd40,cw40,autoattack,square,sanity", ra=False)
    assert evaluation.clean_accuracy >= 0.8
    assert 0.1 < evaluation.result("pgd40").accuracy < evaluation.result("fgsm").accuracy  # a non-trivial threat model
    assert {c["status"] for c in checks.values()} <= {"pass", "n/a"}, [c["message"] for c in checks.values()]
    assert checks["ε = 1 reaches ~0 %"]["status"] == "pass"
    assert checks["black-box/transfer never beat white-box"]["status"] == "pass"
    assert checks["AutoAttack's own checks"]["status"] == "pass"


# ---------------------------------------------------------------- surrogate views

def test_views_compute_what_they_claim(toy):
    model, x, y = toy
    x = x[:6]
    with torch.no_grad():
        logits, aux = model(x, return_aux=True)
        assert torch.equal(adaptive.HeadView(model, 0)(x), aux[0])
        assert torch.allclose(adaptive.EnsembleView(model, 3.0)(x), logits + 1.5 * (aux[0] + aux[1]))
        no_ra = adaptive.PolicyView(model, "identity")(x)
        assert torch.allclose(no_ra, aux[0])  # RA removed: the final head sees z itself
        assert torch.equal(model(x), logits)  # the policy did not leak out of the view's forward
        target = (y[:6] + 1) % 5
        fixed = adaptive.PolicyView(model, "fixed", classes=target)(x)
        assert torch.equal(fixed.argmax(1), target)
        assert torch.equal(adaptive.LabelMaskView(model, target)(x), model(x, target))


def test_recorder_marks_examples_fooled_at_any_query(toy):
    model, x, y = toy
    x, y = x[:4], y[:4]
    recorder = adaptive.RealModelRecorder(adaptive.HeadView(model, 0), y, real=model)
    recorder(x)
    assert not recorder.fooled(model).any()
    brighter = x.clone().view(4, -1)
    brighter[:2, model.groups == (y[0] + 1) % 5] += 0.2   # examples 0, 1 now favour another class
    recorder(brighter.view_as(x))
    recorder(x)                                            # a later correct query does not undo it
    fooled = model(brighter.view_as(x)).argmax(1) != y
    assert torch.equal(recorder.fooled(model), fooled) and fooled[0] and not fooled[2:].any()
    recorder(x[:3])                                        # subsets (APGD restarts) are not recorded
    assert torch.equal(recorder.fooled(model), fooled)


def test_candidate_classes_skip_the_label_and_follow_the_scores():
    class Fixed(nn.Module):
        def forward(self, x, return_aux=False):
            logits = torch.tensor([[0.0, 5.0, 3.0, 1.0], [4.0, 0.0, 2.0, 3.0]])
            return (logits, [logits.roll(1, dims=1)]) if return_aux else logits

    top = adaptive.candidate_classes(Fixed(), torch.zeros(2, 1), torch.tensor([1, 0]), 2)
    # summed softmax of final and aux: row 0 ≈ [.02, .85, .95, .13] (label 1 excluded),
    # row 1 ≈ [.88, .65, .10, .32] (label 0 excluded)
    assert top.tolist() == [[2, 3], [1, 3]]


# ---------------------------------------------------------------- sanity checks on hand-made results

CATALOGUE = {s.name: s for s in attack_catalogue(Settings(budget=BUDGETS["small"]), 5, 2)}


def result_like(name, robust, paper=None):
    """A hand-made result carrying the registered attributes of the catalogue's attack ``name``."""
    spec = CATALOGUE[name]
    return AttackResult(spec, seed=0, seconds=0.0, robust=np.array(robust, bool),
                        paper=None if paper is None else np.array(paper, bool), in_worst_case=spec.in_threat_model(EPS))


def hand_evaluation(clean, attacks, agreement=None):
    """An Evaluation from {name: (family, with_p, robust list[, paper list])}; attributes from the catalogue."""
    results = []
    for name, (family, with_p, robust, *paper) in attacks.items():
        results.append(result_like(name, robust, paper[0] if paper else None))
        assert (results[-1].family, results[-1].with_p) == (family, with_p)
    n = len(clean)
    return Evaluation(np.zeros(n, int), np.array(clean, bool), agreement or {}, results)


def statuses(evaluation):
    return {c["name"]: c["status"] for c in sanity.run_checks(evaluation)}


def test_more_steps_flag_needs_evidence_beyond_noise():
    # exact one-sided McNemar on the examples pgd40 broke that pgd100 left (k) against the other way (m):
    # p = P(X >= k), X ~ Bin(k + m, 1/2). k = 4, m = 0: 1/16 = 0.0625 > 0.05 (pass); k = 5: 1/32 (FLAG);
    # k = 6, m = 1: (7 + 1)/128 = 0.0625 (pass)
    clean = [1] * 50
    base = [1] * 20 + [0] * 30

    def status(stronger):
        return statuses(hand_evaluation(clean, {"pgd40": ("paper", False, base),
                                                "pgd100": ("sanity", False, stronger)}))["more steps/restarts never help"]
    assert status([1] * 21 + [0] * 29) == "pass"
    assert status([1] * 24 + [0] * 26) == "pass"
    assert status([1] * 25 + [0] * 25) == "FLAG"
    assert status([0] + [1] * 25 + [0] * 24) == "pass"  # 6 examples one way, 1 the other
    check = {c["name"]: c for c in sanity.run_checks(hand_evaluation(clean, {
        "pgd40": ("paper", False, base), "pgd100": ("sanity", False, [1] * 25 + [0] * 25)}))}
    message = check["more steps/restarts never help"]["message"]
    assert "exact one-sided McNemar test at level 0.05: 5 examples against 0, p = 0.031" in message


def test_paper_count_above_clean_is_flagged():
    clean = [1] * 30 + [0] * 20
    paper_last = [1] * 40 + [0] * 10          # misclassified inputs become "robust", as in the paper's table
    evaluation = hand_evaluation(clean, {"pgd40": ("paper", False, clean, paper_last)})
    check = sanity.run_checks(evaluation)[0]
    assert check["status"] == "FLAG" and "80.00 %" in check["message"] and "60.00 %" in check["message"]


def test_noise_at_small_n_raises_no_flag():
    # one example above clean (paper's count) and 2 of 50 left at ε = 1 are within noise at n = 50
    clean = [1] * 30 + [0] * 20
    evaluation = hand_evaluation(clean, {"pgd40": ("paper", False, clean, [1] * 31 + [0] * 19),
                                         "pgd40-eps1": ("sanity", False, [1] * 2 + [0] * 48)})
    checks = {c["name"]: c for c in sanity.run_checks(evaluation)}
    assert checks["robust ≤ clean"]["status"] == "pass" and checks["ε = 1 reaches ~0 %"]["status"] == "pass"
    assert checks["ε = 1 reaches ~0 %"]["numbers"]["p"] == pytest.approx(1 - 0.98 ** 50 - 50 * 0.02 * 0.98 ** 49)


def test_square_beating_pgd_and_unbounded_eps_are_flagged():
    clean = [1] * 50
    evaluation = hand_evaluation(clean, {
        "fgsm": ("paper", False, [1] * 45 + [0] * 5),
        "pgd40": ("paper", False, [1] * 40 + [0] * 10),
        "square": ("black-box", False, [1] * 30 + [0] * 20),
        "pgd40-eps1": ("sanity", False, [1] * 5 + [0] * 45),
    })
    checks = {c["name"]: c for c in sanity.run_checks(evaluation)}
    assert checks["black-box/transfer never beat white-box"]["status"] == "FLAG"
    assert checks["black-box/transfer never beat white-box"]["numbers"]["broken_only_by"] == {"square": 10}
    # 5 of 50 left at ε = 1: P(X >= 5), X ~ Bin(50, 2 %), is 0.0032 (FLAG); 2 of 50 would be 0.26 (noise)
    assert checks["ε = 1 reaches ~0 %"]["status"] == "FLAG" and "p = 0.0032" in checks["ε = 1 reaches ~0 %"]["message"]
    assert checks["iterative beats single-step"]["status"] == "pass"
    assert checks["aux/final agreement"]["status"] == "n/a"


def test_head_attacks_beating_final_logit_attacks_is_flagged():
    clean = [1] * 50
    attacks = {"pgd40": ("paper", False, [1] * 40 + [0] * 10), "aux1-pgd-ce": ("aux-head", False, [1] * 10 + [0] * 40)}
    flagged = statuses(hand_evaluation(clean, attacks, {1: 1.0, 2: 1.0}))
    attacks["aux1-pgd-ce"] = ("aux-head", False, [1] * 40 + [0] * 10)
    passed = statuses(hand_evaluation(clean, attacks, {1: 1.0, 2: 1.0}))
    assert flagged["aux/final agreement"] == "FLAG" and passed["aux/final agreement"] == "pass"


def test_autoattack_warnings_become_a_flag_and_adaptive_ones_do_not():
    clean = [1] * 10
    evaluation = hand_evaluation(clean, {"autoattack": ("paper", False, clean),
                                         "aux1-apgd-dlr": ("aux-head", False, clean)})
    evaluation.results[1].warnings = ["there are 3 points with zero gradient!"]
    assert statuses(evaluation)["AutoAttack's own checks"] == "pass"
    evaluation.results[0].warnings = ["Square Attack has decreased the robust accuracy of 5.00%."]
    check = sanity.autoattack_checks(evaluation)
    assert check["status"] == "FLAG" and "autoattack: Square Attack has decreased" in check["message"]


# ---------------------------------------------------------------- AutoAttack adapter

def test_apgd_zero_gradient_warning_is_passed_through(toy, capsys):
    model, x, y = toy
    # DLR on the toy's final logits (z_y·e_y) is constant, so APGD sees zero gradients and the
    # package's own check must reach us instead of the console.
    x_adv, warnings = run_apgd(model, x[:8], y[:8], EPS, loss="dlr", n_iter=3, seed=0)
    assert any("zero gradient" in w for w in warnings)
    assert capsys.readouterr().out == ""
    assert (x_adv - x[:8]).abs().max() <= EPS + 1e-6


def test_apgd_attacks_examples_the_surrogate_already_misclassifies(toy):
    model, x, y = toy

    class Negated(nn.Module):  # wrong on every clean example, unlike the real model
        def forward(self, inputs):
            return -model(inputs, return_aux=True)[1][0]

    x_adv, _ = run_apgd(Negated(), x[:8], y[:8], EPS, loss="ce", n_iter=5, seed=0)
    moved = (x_adv - x[:8]).flatten(1).abs().amax(1)
    assert (moved > EPS / 2).all() and (moved <= EPS + 1e-6).all()


def test_capture_keeps_only_the_packages_own_warnings():
    import logging
    import warnings

    import pyautoattack.checks as package_checks
    with warnings.catch_warnings(record=True) as outside, capture_autoattack_output() as log:
        warnings.simplefilter("always")
        logging.getLogger("auto-attack").debug("robust accuracy after APGD-CE: 50.00% (total time 1.0 s)")
        logging.getLogger("auto-attack").warning("it seems to be a randomized defense!")
        warnings.warn_explicit("there are 3 points with zero gradient!", UserWarning, package_checks.__file__, 1)
        warnings.warn("the model's own warning, e.g. a Swish layer's deprecation", stacklevel=1)
        print("Warning: from the original package")
    # the model's warning is passed on to the caller, not quoted as AutoAttack's
    assert [str(w.message) for w in outside] == ["the model's own warning, e.g. a Swish layer's deprecation"]
    assert log.warnings == ["it seems to be a randomized defense!", "Warning: from the original package",
                            "there are 3 points with zero gradient!"]
    assert parse_accuracies(log.lines) == {"APGD-CE": 0.5}


def test_parse_accuracies_reads_autoattack_log_lines():
    lines = ["initial accuracy: 87.50%", "apgd-ce - 1/1 - 3 out of 7 successfully perturbed",
             "robust accuracy after APGD-CE: 50.00% (total time 0.1 s)",
             "robust accuracy after FAB-T: 37.50% (total time 0.3 s)", "robust accuracy: 37.50%"]
    assert parse_accuracies(lines) == {"clean": 0.875, "APGD-CE": 0.5, "FAB-T": 0.375, "final": 0.375}
