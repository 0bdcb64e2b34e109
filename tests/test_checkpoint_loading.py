"""Checkpoint loading (models.loading): our format round trip, DataParallel prefixes, bare
reference-style state dicts, and one clear sentence for every mismatch or unreadable file."""
import argparse
import pickle

import pytest
import torch

from models import CheckpointError, checkpoint_model_config, create_model, load_model, read_checkpoint

OWN = {"weights": "raw", "source": "checkpoint config", "adaptations": [], "normalization": None}


def payload(model, arch, num_classes, ra, image_size=32):
    """A checkpoint in the project's format (weights_only-safe content only)."""
    return {
        "model": model.state_dict(),
        "model_config": {"arch": arch, "num_classes": num_classes, "reverse_attention": ra, "image_size": image_size},
        "args": {"dataset": "cifar10", "method": "trades", "strategy": "random_adv"},
        "epoch": 7,
    }


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_round_trip_through_file_gives_identical_outputs(tiny_model, tmp_path):
    model = tiny_model("wrn-16-1", 10)
    path = tmp_path / "ckpt.pt"
    torch.save(payload(model, "wrn-16-1", 10, True), path)
    loaded, config = load_model(str(path))
    x = torch.rand(3, 3, 16, 16)
    assert config == {"arch": "wrn-16-1", "num_classes": 10, "reverse_attention": True, "image_size": 32, **OWN}
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert read_checkpoint(path)["epoch"] == 7
    again, _ = load_model(path)  # a PathLike works too
    assert torch.equal(outputs(again, x), outputs(model, x))


def test_module_prefix_is_stripped(tiny_model, tmp_path):
    model = tiny_model("wrn-16-1", 10, reverse_attention=False)
    wrapped = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "dp.pt"
    torch.save({"model": wrapped, "model_config": payload(model, "wrn-16-1", 10, False)["model_config"]}, path)
    loaded, config = load_model(str(path))
    x = torch.rand(2, 3, 16, 16)
    assert config["reverse_attention"] is False
    assert torch.equal(outputs(loaded, x), outputs(model, x))


@pytest.mark.parametrize("arch,classes,image_size,size", [
    ("wrn-16-1", 7, 32, 16), ("resnet18", 100, 32, 16), ("preact-resnet18", 200, 64, 64)])
def test_bare_state_dict_loads_only_when_told_ra_or_plain(tiny_model, tmp_path, arch, classes, image_size, size):
    kwargs = {"image_size": image_size, "input_size": size} if arch.startswith("preact") else {}
    model = tiny_model(arch, classes, **kwargs)
    path = tmp_path / "ref.pth"
    torch.save(model.state_dict(), path)  # just the state dict, as the reference repo saves it
    with pytest.raises(CheckpointError) as err:  # RA adds no parameters: refuse to guess
        load_model(str(path))
    message = str(err.value)
    assert "--reverse-attention on" in message and "--reverse-attention off" in message
    assert "RA adds no parameters" in message and "\n" not in message and message.count(";") == 1
    loaded, config = load_model(str(path), reverse_attention=True)
    assert config == {"arch": arch, "num_classes": classes, "reverse_attention": True, "image_size": image_size,
                      "weights": "raw", "source": "parameter names", "adaptations": [], "normalization": None}
    x = torch.rand(2, 3, size, size)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    plain, config = load_model(str(path), reverse_attention=False)  # the same weights as a plain network
    assert config["reverse_attention"] is False and not torch.equal(outputs(plain, x), outputs(model, x))
    assert checkpoint_model_config(model.state_dict())["reverse_attention"] is None  # not recorded in a bare dict
    if arch == "preact-resnet18":  # the alias names the same architecture
        assert load_model(str(path), arch="PreActResNet18", reverse_attention=True)[1]["arch"] == "preact-resnet18"


def test_saved_config_is_read_before_names_are_inferred(tiny_model):
    model = tiny_model("wrn-16-1", 10, reverse_attention=False)
    old_config = {"arch": "wrn-16-1", "num_classes": 10, "reverse_attention": False}  # no image_size recorded
    loaded, config = load_model({"model": model.state_dict(), "model_config": old_config})
    assert config["image_size"] == 32 and config["source"] == "checkpoint config"
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    no_fc = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}  # inference would fail here
    with pytest.raises(CheckpointError, match=r"fit a plain wrn-16-1 with 10 classes: 2 keys missing \(e\.g\. fc"):
        load_model({"model": no_fc, "model_config": old_config})
    with pytest.raises(CheckpointError, match="does not look like"):
        load_model(no_fc, reverse_attention=False)


def test_wrn_34_10_is_recognised_from_its_names():
    state = create_model("wrn-34-10", 10, reverse_attention=False).state_dict()
    assert checkpoint_model_config(state)["arch"] == "wrn-34-10"


def test_mismatch_is_one_clear_sentence(tmp_path):
    model = create_model("resnet18", 100, reverse_attention=False)
    path = tmp_path / "plain.pt"
    torch.save(payload(model, "resnet18", 100, False), path)
    with pytest.raises(CheckpointError) as err:
        load_model(str(path), arch="resnet18", num_classes=10, reverse_attention=True)
    message = str(err.value)
    assert message == ("checkpoint is a plain resnet18 with 100 classes; "
                       "you asked for an RA resnet18 with 10 classes")
    with pytest.raises(CheckpointError, match="a plain resnet18 with 100 classes.*a plain wrn-34-10"):
        load_model(str(path), arch="wrn-34-10")
    with pytest.raises(CheckpointError, match="you asked for an RA resnet18 with 100 classes"):
        load_model(str(path), reverse_attention=True)


def test_unreadable_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"))
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(str(text))
    raw = tmp_path / "raw.pkl"
    with open(raw, "wb") as f:
        pickle.dump({"model": {}}, f, protocol=2)
    # a bare pickle is refused either way; torch 2.4 reports it as a pickle, newer torch as unreadable
    with pytest.raises(CheckpointError, match="cannot read checkpoint|holds pickled Python code or objects"):
        read_checkpoint(str(raw))
    unsafe = tmp_path / "unsafe.pt"  # an arbitrary Python object inside: refused by weights_only loading
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "args": argparse.Namespace(lr=0.1)}, unsafe)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(unsafe))
    message = str(err.value)
    assert message.startswith(f"checkpoint {unsafe} holds pickled Python code or objects (argparse.Namespace)")
    assert "refuses" in message and "torch.save(model.state_dict()" in message
    assert "\n" not in message and "\x1b" not in message and "weights_only" not in message
    whole = tmp_path / "whole_model.pt"  # torch.save(model): the module's class is pickled
    torch.save(torch.nn.Linear(2, 2), whole)
    with pytest.raises(CheckpointError, match=r"holds pickled Python code or objects \(torch\.nn"):
        load_model(str(whole))
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(CheckpointError, match="no model state dict"):
        load_model(str(empty))
    odd = tmp_path / "odd.pt"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, odd)
    with pytest.raises(CheckpointError, match="does not look like a state dict of resnet18, .*wrn-D-K"):
        load_model(str(odd))
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as err:
        read_checkpoint(str(truncated))
    assert "\n" not in str(err.value)


def test_missing_and_unexpected_keys_are_one_sentence_with_counts_and_examples(tmp_path):
    model = create_model("wrn-16-1", 10, reverse_attention=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("block2.")}
    state["extra.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointError) as err:
        load_model(state, reverse_attention=False)
    message = str(err.value)
    n_missing = sum(k.startswith("block2.") for k in model.state_dict())
    assert message.startswith("checkpoint does not fit a plain wrn-16-1 with 5 classes: ")
    assert f"{n_missing} keys missing (e.g. block2.layer.0.bn1.weight, block2.layer.0.bn1.bias, ...)" in message
    assert "1 unexpected keys (e.g. extra.weight)" in message and "\n" not in message
    state = dict(model.state_dict(), **{"fc.weight": torch.zeros(10, 8)})
    with pytest.raises(CheckpointError, match=r"1 tensors of the wrong shape \(e\.g\. fc\.weight: checkpoint 10×8, "
                                              r"model 10×64\)"):
        load_model({"model": state, "model_config": {"arch": "wrn-16-1", "num_classes": 10,
                                                     "reverse_attention": False}})
