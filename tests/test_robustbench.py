"""RobustBench models by name, offline, and RobustBench's model-info export
(docs/evaluation.md#robustbench-models). Most tests use a registry of the test's own; the ones marked
below use the robustbench package's registry and skip when it is not installed (it is an optional
extra: requirements-robustbench.txt)."""
import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

import test_white_attack
from utils.evaluation import robustbench

HAS_ROBUSTBENCH = importlib.util.find_spec("robustbench") is not None


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(4, 10))

    def forward(self, x):
        return self.model(x)


def save_weights(model, model_dir, name, wrap=True, dataset="cifar10", threat="Linf"):
    """Weights in RobustBench's layout and in its DataParallel form ({"state_dict": {"module.…": …}})."""
    path = robustbench.weight_path(model_dir, dataset, threat, name)
    path.parent.mkdir(parents=True)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state} if wrap else state, path)
    return path


def registry():
    return {"Tiny": {"model": Small, "gdrive_id": "x"}, "Pair": {"model": Small, "gdrive_id": ["a", "b"]}}


def test_weights_load_from_robustbenchs_layout_and_match_the_saved_model(tmp_path):
    torch.manual_seed(0)
    saved = Small()
    path = save_weights(saved, tmp_path, "Tiny")
    assert path == tmp_path / "cifar10" / "Linf" / "Tiny.pt"
    model, config, args = robustbench.load_robustbench("Tiny", model_dir=tmp_path, registry=registry())
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(model(x), saved.eval()(x)) and not model.training
    assert config["arch"] == "robustbench:Tiny" and config["reverse_attention"] is False and args == {"dataset": "cifar10"}


def test_state_dict_candidates_strip_module_then_model():
    t = torch.zeros(1)
    assert robustbench.state_dict_candidates({"state_dict": {"module.model.0.weight": t}}) == [
        {"model.0.weight": t}, {"0.weight": t}]
    assert robustbench.state_dict_candidates({"a": 1}) == []  # not a state dict of tensors


def test_every_refusal_is_one_sentence_saying_what_to_do(tmp_path):
    with pytest.raises(robustbench.RobustBenchError, match=r"no weights for Tiny at .*Tiny\.pt: download them once"):
        robustbench.load_robustbench("Tiny", model_dir=tmp_path, registry=registry())
    with pytest.raises(robustbench.RobustBenchError, match="is not in RobustBench's cifar10 Linf zoo"):
        robustbench.load_robustbench("Nope", model_dir=tmp_path, registry=registry())
    with pytest.raises(robustbench.RobustBenchError, match="ensemble"):
        robustbench.load_robustbench("Pair", model_dir=tmp_path, registry=registry())
    path = robustbench.weight_path(tmp_path, "cifar10", "Linf", "Tiny")
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"other.weight": torch.zeros(1)}}, path)
    with pytest.raises(robustbench.RobustBenchError, match="keys do not match"):
        robustbench.load_robustbench("Tiny", model_dir=tmp_path, registry=registry())
    torch.save({"state_dict": Small()}, path)  # a pickled module: refused, never run
    with pytest.raises(robustbench.RobustBenchError, match="cannot read .* as plain tensors"):
        robustbench.load_robustbench("Tiny", model_dir=tmp_path, registry=registry())


def test_missing_package_names_the_requirements_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "robustbench.model_zoo", None)
    with pytest.raises(robustbench.RobustBenchError, match="pip install -r requirements-robustbench.txt"):
        robustbench.zoo("cifar10", "Linf")


def hand_report(aa_accuracy=0.25):
    attacks = [{"name": "pgd40", "accuracy": 0.5}]
    if aa_accuracy is not None:
        attacks.append({"name": "autoattack", "accuracy": aa_accuracy})
    return {"meta": {"dataset": "cifar10", "arch": "wrn-34-10", "eps": 8 / 255, "n_examples": 4, "subset_seed": 0},
            "labels": [0, 1, 2, 3], "clean": {"accuracy": 0.875}, "attacks": attacks,
            "worst_case": {"accuracy": 0.125, "over": ["pgd40", "autoattack", "joint-pgd-ce-w2"]}}


def test_model_info_has_robustbenchs_fields_with_the_worst_case_as_external():
    info = robustbench.model_info(hand_report())
    for key in ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable"):
        assert key in info
    assert (info["eps"], info["clean_acc"], info["autoattack_acc"], info["external"]) == ("8/255", "87.50", "25.00",
                                                                                       "12.50")
    assert "3 attacks (pgd40, autoattack, joint-pgd-ce-w2) on 4 test examples" in info["footnote"]
    info = robustbench.model_info(hand_report(aa_accuracy=None))
    assert info["autoattack_acc"] is None and "--full-set autoattack" in info["footnote"]


def _wrn_checkpoint(tmp_path):
    from models import create_model
    torch.manual_seed(0)
    model = create_model("wrn-16-1", 10, False).eval()
    path = tmp_path / "plain.pt"
    torch.save({"model": model.state_dict(), "model_config": {"arch": "wrn-16-1", "num_classes": 10,
                "reverse_attention": False, "image_size": 16}, "args": {"dataset": "synthetic"}}, path)
    return path


def test_script_exports_model_info_and_refuses_rb_options_alone(tmp_path, capsys):
    path = _wrn_checkpoint(tmp_path)
    export = tmp_path / "info.json"
    code = test_white_attack.main(["--ckpt", str(path), "--n-examples", "6", "--attacks", "fgsm", "--quiet",
                                   "--indicators", "0", "--out-dir", str(tmp_path / "e"), "--export-robustbench",
                                   str(export)])
    assert code == 0
    info, results = json.loads(export.read_text()), json.loads((tmp_path / "e" / "results.json").read_text())
    assert info["clean_acc"] == f"{100 * results['clean']['accuracy']:.2f}"
    assert info["external"] == f"{100 * results['worst_case']['accuracy']:.2f}" and info["eps"] == "8/255"
    with pytest.raises(SystemExit) as stop:
        test_white_attack.parse_args(["--ckpt", str(path), "--model-dir", "x"])
    assert stop.value.code == 2 and "--model-dir would change nothing here" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_ROBUSTBENCH, reason="robustbench is an optional extra (requirements-robustbench.txt)")
@pytest.mark.slow
def test_script_evaluates_a_zoo_entry_built_by_robustbench(tmp_path, monkeypatch, capsys):
    zoo = robustbench.zoo("cifar10", "Linf")
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet
    monkeypatch.setitem(zoo, "TinyWRN", {"model": lambda: WideResNet(depth=10, widen_factor=1), "gdrive_id": "x"})
    torch.manual_seed(0)
    built = WideResNet(depth=10, widen_factor=1).eval()
    save_weights(built, tmp_path / "models", "TinyWRN", wrap=False)
    model, _, _ = robustbench.load_robustbench("TinyWRN", model_dir=tmp_path / "models")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), built(x))
    code = test_white_attack.main(["--robustbench", "TinyWRN", "--model-dir", str(tmp_path / "models"), "--dataset",
                                   "synthetic", "--n-examples", "4", "--attacks", "fgsm", "--quiet", "--indicators",
                                   "0", "--out-dir", str(tmp_path / "e")])
    assert code == 0
    meta = json.loads((tmp_path / "e" / "results.json").read_text())["meta"]
    assert meta["arch"] == "robustbench:TinyWRN" and meta["resume_key"]["model"] == "robustbench:cifar10/Linf/TinyWRN"
    code = test_white_attack.main(["--robustbench", "Missing0000", "--model-dir", str(tmp_path / "models"),
                                   "--out-dir", str(tmp_path / "f")])
    assert code == 2 and "is not in RobustBench's cifar10 Linf zoo" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_default_weight_folder_is_its_own_and_ignored_by_git():
    """RobustBench's weights never land in the project's models/ source package, and git ignores them."""
    from pathlib import Path

    from utils.evaluation.command import parse_args
    root = Path(test_white_attack.__file__).resolve().parent
    args = parse_args(["--robustbench", "TinyWRN"])
    assert args.model_dir == robustbench.DEFAULT_MODEL_DIR
    assert (root / args.model_dir).resolve() != (root / "models").resolve()
    ignored = (root / ".gitignore").read_text().splitlines()
    assert Path(args.model_dir).name + "/" in ignored
