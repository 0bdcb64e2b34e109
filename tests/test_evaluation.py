"""Evaluation bookkeeping (docs/protocol.md §2, §8): attack selection, every attack on small RA and plain
models, per-example worst case, reports, and the test_white_attack.py script on our checkpoints
and on reference-format state dicts."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test_white_attack
from models import create_model
from toys import ToyRA
from utils import data as datasets
from utils.evaluation.sanity import run_checks
from utils.evaluation.suite import (
    BUDGETS,
    AttackResult,
    AttackSpec,
    Evaluation,
    EvaluationError,
    Settings,
    attack_catalogue,
    attack_seed,
    eps_text,
    head_count,
    json_report,
    markdown_report,
    merge_runs,
    run_attacks,
    select_attacks,
)

NUM_CLASSES = 5


class TinyNet(ToyRA):
    """A two-block conv net with the project's RA forward (or plain), small enough for CPU tests."""

    def __init__(self, reverse_attention=True, width=16):
        super().__init__()
        self.reverse_attention = reverse_attention
        self.stem = nn.Conv2d(3, width, 3, 2, 1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU()) for _ in range(2)])
        self.fc = nn.Linear(width, NUM_CLASSES)

    def forward_trunk(self, x):
        return F.relu(self.stem(x))

    def pool(self, z):
        return z.mean((2, 3))


def prototype_data(n, seed):
    protos = torch.rand(NUM_CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return (0.6 * protos[y] + 0.4 * torch.rand(n, 3, 8, 8, generator=g)).clamp(0, 1), y


def trained_tiny(reverse_attention, steps=200):
    """A few hundred Adam steps, label-selected masks and CE on every head for the RA model."""
    torch.manual_seed(0)
    model = TinyNet(reverse_attention)
    x, y = prototype_data(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,))
        logits, aux = model(x[idx], y[idx], return_aux=True)
        loss = sum(F.cross_entropy(out, y[idx]) for out in [logits, *aux])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def run_all(reverse_attention, cascade=False):
    model = trained_tiny(reverse_attention)
    x, y = prototype_data(24, seed=5)
    # ε = 16/255 so AutoAttack's Square has few survivors and the run stays short on a CPU.
    settings = Settings(eps=16 / 255, budget=BUDGETS["small"])
    catalogue = [s for s in attack_catalogue(settings, NUM_CLASSES, head_count(model)) if not s.reference]
    specs, skipped = select_attacks("all", catalogue, reverse_attention)
    evaluation = run_attacks(model, x, y, specs, eps=settings.eps, batch_size=16, seed=0, progress=False,
                             skipped=skipped, cascade=cascade)
    return evaluation, catalogue


@pytest.fixture(scope="module")
def ra_all():
    return run_all(True)


@pytest.fixture(scope="module")
def plain_all():
    return run_all(False)


# ---------------------------------------------------------------- selecting attacks

def catalogue():
    return attack_catalogue(Settings(budget=BUDGETS["small"]), 10, num_heads=2)


def test_paper_preset_is_the_papers_protocol_with_and_without_p():
    specs, skipped = select_attacks("paper", catalogue(), True)
    assert [s.name for s in specs] == ["fgsm", "fgsm+p", "pgd40", "pgd40+p", "cw40", "cw40+p", "autoattack",
                                       "autoattack+p"]
    assert skipped == []
    pgd40 = specs[2].params
    assert (pgd40["steps"], pgd40["step_size"], pgd40["loss"], pgd40["init"]) == (40, 0.007, "ce", "uniform")
    assert specs[3].params["aux_weight"] == 2.0 and specs[2].params["aux_weight"] == 0.0
    assert specs[0].params["init"] == "none" and specs[4].params["loss"] == "cw"


def test_plain_models_skip_what_needs_reverse_attention():
    specs, skipped = select_attacks("all", catalogue(), False)
    names = [s.name for s in specs]
    assert names == ["fgsm", "pgd40", "cw40", "autoattack", "square", "pgd10", "pgd100", "pgd40-restarts",
                     "pgd40-eps1"]
    assert "pgd40+p" in skipped and "enum-top2" in skipped and "st-pgd-ce-t1" in skipped


def test_adaptive_preset_covers_every_family():
    specs, _ = select_attacks("adaptive", catalogue(), True)
    names = {s.name for s in specs}
    assert {"aux1-pgd-ce", "aux2-apgd-dlr", "joint-pgd-margin-w8", "joint-apgd-dlr-w0.5", "st-pgd-ce-t0.1",
            "st-apgd-dlr-t10", "enum-top2", "transfer-labelmask", "transfer-nora", "square"} <= names
    assert {s.family for s in specs} == {"aux-head", "joint", "straight-through", "enumeration", "transfer",
                                         "black-box"}


def test_names_and_presets_combine_and_unknown_names_are_refused():
    specs, _ = select_attacks("pgd40, square,pgd40,sanity", catalogue(), True)
    assert [s.name for s in specs] == ["pgd40", "square", "pgd10", "pgd100", "pgd40-restarts", "pgd40-eps1"]
    with pytest.raises(EvaluationError, match="unknown attack .pgd41.*paper, adaptive, sanity, reference, all.*cw40"):
        select_attacks("pgd40,pgd41", catalogue(), True)


def test_attack_seed_depends_on_run_seed_and_name_only():
    assert attack_seed(0, "pgd40") == attack_seed(0, "pgd40")
    assert len({attack_seed(0, "pgd40"), attack_seed(1, "pgd40"), attack_seed(0, "cw40")}) == 3


def test_eps_text():
    assert eps_text(8 / 255) == "8/255" and eps_text(0.1) == "0.1"


# ---------------------------------------------------------------- bookkeeping by hand

def hand_evaluation():
    clean = np.array([1, 1, 1, 0], bool)
    pgd40 = AttackSpec("pgd40", "paper", ("paper",), None, {"steps": 40}, "final", 8 / 255)
    square = AttackSpec("square", "black-box", ("sanity",), None, {}, "black-box", 8 / 255)
    results = [
        AttackResult(pgd40, seed=7, seconds=1.5, robust=np.array([1, 1, 0, 0], bool),
                     paper=np.array([1, 1, 0, 1], bool)),
        AttackResult(square, seed=8, seconds=0.5, robust=np.array([1, 0, 1, 0], bool)),
    ]
    return Evaluation(np.array([0, 1, 2, 3]), clean, {}, results)


def test_worst_case_is_the_per_example_and_of_clean_and_every_attack():
    evaluation = hand_evaluation()
    assert evaluation.worst_case().tolist() == [True, False, False, False]
    assert evaluation.result("pgd40").accuracy == 0.5 and evaluation.result("pgd40").paper_accuracy == 0.75


def test_reports_hold_every_number_and_runs_merge():
    evaluation = hand_evaluation()
    meta = {"checkpoint": "x.pt", "arch": "tiny", "reverse_attention": False, "indices": [4, 5, 6, 7]}
    checks = run_checks(evaluation)
    text = markdown_report(evaluation, checks, meta)
    assert "| pgd40 | paper | no | 50.00 % | 2/4 | 75.00 % | 1.5 |" in text
    assert "| **worst case (threat model)** | — | — | **25.00 %** | 1/4 |" in text
    assert "Headline: worst-case robust accuracy 25.00 % (1/4) over 2 attacks" in text
    report = json.loads(json.dumps(json_report(evaluation, checks, meta)))
    assert report["attacks"][0]["correct"] == [1, 1, 0, 0] and report["attacks"][0]["paper_correct"] == [1, 1, 0, 1]
    assert report["attacks"][1]["seed"] == 8 and report["worst_case"]["correct"] == [1, 0, 0, 0]
    other = json.loads(json.dumps(report))
    other["attacks"][0]["correct"] = [0, 1, 1, 0]
    assert merge_runs([report, other])["correct"] == [0, 0, 0, 0]
    other["meta"]["indices"] = [1, 2, 3, 4]
    with pytest.raises(EvaluationError, match="different examples"):
        merge_runs([report, other])


# ---------------------------------------------------------------- every attack on small models

def check_invariants(evaluation, applicable):
    assert [r.name for r in evaluation.results] == [s.name for s in applicable]
    worst = evaluation.worst_case()
    for r, spec in zip(evaluation.results, applicable):
        assert 0.0 <= r.accuracy <= 1.0 and r.seconds >= 0
        assert not (r.robust & ~evaluation.clean).any(), r.name        # robust needs clean-correct
        assert worst.mean() <= r.accuracy and (not (worst & ~r.robust).any() or not r.in_worst_case)
        assert (r.paper is not None) == spec.all_examples


@pytest.mark.slow
def test_every_attack_runs_on_an_ra_model(ra_all):
    evaluation, catalogue = ra_all
    check_invariants(evaluation, catalogue)
    assert evaluation.clean_accuracy >= 0.8 and set(evaluation.agreement) == {1, 2}
    aa = evaluation.result("autoattack")
    # AutoAttack's own final figure, logged per batch, equals our per-example count.
    assert aa.counts["final"] == int(aa.robust.sum()) and aa.counts["clean"] == int(evaluation.clean.sum())
    report = json.loads(json.dumps(json_report(evaluation, run_checks(evaluation), {})))
    assert len(report["attacks"]) == len(catalogue) and all(len(a["correct"]) == 24 for a in report["attacks"])


@pytest.mark.slow
def test_every_attack_runs_on_a_plain_model(plain_all):
    evaluation, catalogue = plain_all
    applicable = [s for s in catalogue if not s.needs_ra]
    check_invariants(evaluation, applicable)
    assert evaluation.agreement == {} and len(evaluation.skipped) == len(catalogue) - len(applicable)


def test_same_seed_same_result_and_model_left_as_found():
    model = trained_tiny(True, steps=20).train()
    x, y = prototype_data(16, seed=5)
    specs, _ = select_attacks("pgd40,st-pgd-ce-t1", attack_catalogue(Settings(budget=BUDGETS["small"]), 5, 2), True)
    first = run_attacks(model, x, y, specs, eps=8 / 255, batch_size=8, seed=3, progress=False, cascade=False)
    second = run_attacks(model, x, y, specs, eps=8 / 255, batch_size=5, seed=3, progress=False, cascade=False)
    assert model.training and all(p.requires_grad for p in model.parameters())
    for a, b in zip(first.results, second.results):
        assert a.seed == b.seed and np.array_equal(a.robust, b.robust) and np.array_equal(a.paper, b.paper)


# ---------------------------------------------------------------- the script

def wrn_state(reverse_attention=True):
    torch.manual_seed(0)
    model = create_model("wrn-16-1", 10, reverse_attention)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, 16, 16))
    return model.eval()


def run_script(argv, capsys):
    code = test_white_attack.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_script_on_our_checkpoint_writes_report_and_json(tmp_path, capsys):
    model = wrn_state()
    path = tmp_path / "run" / "best.pt"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(),
                "model_config": {"arch": "wrn-16-1", "num_classes": 10, "reverse_attention": True, "image_size": 16},
                "args": {"dataset": "synthetic", "method": "trades"}, "epoch": 3}, path)
    code, out, _ = run_script(["--ckpt", str(path), "--n-examples", "12", "--batch-size", "8", "--budget", "small",
                               "--attacks", "pgd40,fgsm+p,transfer-nora,pgd40-eps1", "--quiet"], capsys)
    assert code == 0
    out_dir = next((tmp_path / "run").glob("eval_*"))
    report = json.loads((out_dir / "results.json").read_text())
    assert (out_dir / "report.md").read_text() in out
    # cascade: the standalone attacks first (paper protocol, then ε = 1 outside the threat model)
    assert [a["name"] for a in report["attacks"]] == ["fgsm+p", "pgd40", "pgd40-eps1", "transfer-nora"]
    assert report["worst_case"]["over"] == ["fgsm+p", "pgd40", "transfer-nora"]
    assert report["cascade"]["enabled"] and report["cascade"]["order"][3]["name"] == "transfer-nora"
    assert report["meta"]["dataset"] == "synthetic" and report["meta"]["image_size"] == 16
    # the clean column is the model's own prediction on the examples named in meta.indices
    test = datasets.load_dataset("synthetic", split="test", synthetic_image_size=16)
    chosen = test.subset(report["meta"]["indices"])
    with torch.no_grad():
        expected = (model(chosen.float()).argmax(1) == chosen.y).int().tolist()
    assert report["clean"]["correct"] == expected


@pytest.mark.slow
def test_script_loads_a_reference_format_state_dict(tmp_path, capsys):
    model = wrn_state(reverse_attention=False)
    path = tmp_path / "ref.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)  # DataParallel-saved, no args
    code, _, err = run_script(["--ckpt", str(path), "--attacks", "pgd40"], capsys)
    assert code == 2 and "--reverse-attention on" in err  # RA or plain cannot be read from the weights
    code, _, err = run_script(["--ckpt", str(path), "--attacks", "pgd40", "--reverse-attention", "off"], capsys)
    assert code == 2 and "pass --dataset" in err
    code, out, _ = run_script(["--ckpt", str(path), "--dataset", "synthetic", "--reverse-attention", "off",
                               "--n-examples", "6", "--attacks", "paper", "--budget", "small", "--quiet",
                               "--out-dir", str(tmp_path / "eval")], capsys)
    assert code == 0 and "model wrn-16-1 (plain, evaluated as plain; raw weights)" in out
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["skipped"] == ["fgsm+p", "pgd40+p", "cw40+p", "autoattack+p"]
    assert report["meta"]["autoattack_package"] in ("pyautoattack", "autoattack")


def test_script_refuses_unknown_attacks_with_one_sentence(tmp_path, capsys):
    path = tmp_path / "ref.pth"
    torch.save(wrn_state().state_dict(), path)
    code, _, err = run_script(["--ckpt", str(path), "--dataset", "synthetic", "--reverse-attention", "on",
                               "--attacks", "pgd400"], capsys)
    assert code == 2 and err.startswith("error: unknown attack 'pgd400'") and "Traceback" not in err


def test_script_asks_ra_or_plain_and_applies_a_normalisation_to_a_foreign_state_dict(tmp_path, capsys):
    """A state dict without a saved config is never evaluated on a guess; --normalize wraps the
    network so it still takes [0, 1] images, and results.json records both choices."""
    path = tmp_path / "foreign.pth"
    torch.save(wrn_state(reverse_attention=False).state_dict(), path)
    base = ["--ckpt", str(path), "--dataset", "synthetic", "--n-examples", "4", "--attacks", "fgsm", "--quiet"]
    code, _, err = run_script(base + ["--out-dir", str(tmp_path / "refused")], capsys)
    assert code == 2 and "--reverse-attention on" in err and err.count("\n") == 1
    assert not (tmp_path / "refused").exists()
    code, _, _ = run_script(base + ["--reverse-attention", "off", "--normalize", "cifar10",
                                    "--out-dir", str(tmp_path / "eval")], capsys)
    meta = json.loads((tmp_path / "eval" / "results.json").read_text())["meta"]
    assert code == 0 and meta["reverse_attention"] is False
    assert meta["normalization"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])


# ---------------------------------------------------------------- results.json records and their specs

# Three attack records of a results.json written by the code before AttackResult referred to its
# AttackSpec (commit be2b0a6: an RA wrn-16-1 on 6 synthetic examples, --attacks fgsm+p,...,ref-fgsm).
MAIN_RECORDS = (
    '[{"accuracy": 0.16666666666666666, "autoattack_counts": {}, "autoattack_warnings": [], "broken_count": 0, '
    '"correct": [0, 0, 1, 0, 0, 0], "eps": 0.03137254901960784, "family": "paper", "in_worst_case": true, "name": '
    '"fgsm+p", "notes": [], "order": 0, "package_checks": false, "paper_correct": [0, 0, 1, 0, 0, 0], '
    '"paper_last_iterate": 0.16666666666666666, "params": {"aux_weight": 2.0, "eps": 0.03137254901960784, "init": '
    '"none", "loss": "ce", "step_size": 0.03137254901960784, "steps": 1}, "received": [0, 0, 1, 0, 0, 0], '
    '"received_count": 1, "reference": false, "robust_count": 1, "seconds": 0.2241237869966426, "seed": 1535983085,'
    ' "sees": "heads", "standalone": true, "upper_bound": null, "with_p": true}, {"accuracy": 0.16666666666666666, '
    '"autoattack_counts": {}, "autoattack_warnings": [], "broken_count": 0, "correct": [0, 0, 1, 0, 0, 0], "eps": '
    '0.03137254901960784, "family": "reference", "in_worst_case": false, "name": "ref-fgsm", "notes": ["reproduces '
    'the reference code, not a robustness figure"], "order": 2, "package_checks": false, "paper_correct": [0, 0, 1,'
    ' 0, 0, 0], "paper_last_iterate": 0.16666666666666666, "params": {"aux_weight": 0.0, "eps": '
    '0.03137254901960784, "init": "uniform", "loss": "ce", "step_size": 0.03137254901960784, "steps": 1}, '
    '"received": [0, 0, 1, 0, 0, 0], "received_count": 1, "reference": true, "robust_count": 1, "seconds": '
    '0.016309892998833675, "seed": 1373728670, "sees": "final", "standalone": true, "upper_bound": null, "with_p": '
    'false}, {"accuracy": 0.16666666666666666, "autoattack_counts": {}, "autoattack_warnings": [], "broken_count": '
    '0, "correct": [0, 0, 1, 0, 0, 0], "eps": 0.03137254901960784, "family": "aux-head", "in_worst_case": true, '
    '"name": "aux1-pgd-ce", "notes": [], "order": 4, "package_checks": false, "paper_correct": null, '
    '"paper_last_iterate": null, "params": {"eps": 0.03137254901960784, "head": 0, "step_size": '
    '0.00784313725490196, "steps": 10}, "received": [0, 0, 1, 0, 0, 0], "received_count": 1, "reference": false, '
    '"robust_count": 1, "seconds": 0.05604495300212875, "seed": 287466098, "sees": "heads", "standalone": true, '
    '"upper_bound": null, "with_p": false}]'
)


def test_records_of_an_older_results_json_load_and_round_trip_to_identical_json():
    records = json.loads(MAIN_RECORDS)
    for record in records:
        result = AttackResult.from_json(record)
        assert isinstance(result.spec, AttackSpec) and result.spec.name == result.name == record["name"]
        assert json.dumps(result.to_json(), sort_keys=True) == json.dumps(record, sort_keys=True)
        assert result.to_json() == record
    ref = AttackResult.from_json(records[1])
    assert ref.reference and ref.notes == ("reproduces the reference code, not a robustness figure",)
    assert not ref.in_worst_case and ref.paper_accuracy == records[1]["paper_last_iterate"]


def test_a_result_refers_to_the_spec_it_ran_and_its_record_keeps_the_format():
    catalogue = attack_catalogue(Settings(eps=8 / 255, budget=BUDGETS["small"]), NUM_CLASSES, 2)
    specs, _ = select_attacks("fgsm,pgd10,pgd40-eps1", catalogue, True)
    model = trained_tiny(True, steps=20)
    x, y = prototype_data(12, seed=3)
    evaluation = run_attacks(model, x, y, specs, eps=8 / 255, batch_size=12, progress=False)
    by_name = {spec.name: spec for spec in specs}
    for result in evaluation.results:  # in cascade order
        spec = by_name[result.name]
        assert result.spec is spec and (result.name, result.eps, result.params) == (spec.name, spec.eps, spec.params)
        record = json.loads(json.dumps(result.to_json()))
        assert set(record) == set(json.loads(MAIN_RECORDS)[0])
        assert AttackResult.from_json(record).to_json() == record
    assert {r.name: r.in_worst_case for r in evaluation.results} == {"fgsm": True, "pgd10": True, "pgd40-eps1": False}
    report = json.loads(json.dumps(evaluation.to_json()))
    assert [AttackResult.from_json(a).to_json() for a in report["attacks"]] == report["attacks"]
