"""Backbones and reverse attention (docs/protocol.md §1): forwards recomputed by hand from the submodules,
mask layout, mask policies, parameter names and counts."""
import pytest
import torch
import torch.nn.functional as F

from models import CheckpointError, create_model, has_reverse_attention, load_model, ra_policy
from models.reverse_attention import class_mask


def close(a, b):
    """Equal up to float32 rounding (logits here are O(1)-O(10))."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def differ(a, b):
    """Clearly different: what a wrong mask choice would give."""
    return (a - b).abs().max().item() > 0.05


# ---------------------------------------------------------------- hand-written forwards

def _mask_rows(weight, choice):
    """Ω[c] for class indices, Σ_c w_c Ω[c] for an N×C weighting."""
    return weight[choice] if choice.dim() == 1 else choice @ weight


def resnet_by_hand(model, x, pick):
    """ResNet-18 RA: trunk → block → mask → block → mask → pool → fc; ``pick(k, p)``: block k's classes."""
    out = F.relu(model.bn1(model.conv1(x)))
    out = model.layer3(model.layer2(model.layer1(out)))
    weight, aux = model.fc.weight, []
    for k, block in enumerate(model.layer4):
        z = block(out)
        p = model.fc(z.mean((2, 3)))
        out = z * _mask_rows(weight, pick(k, p))[:, :, None, None]
        aux.append(p)
    return model.fc(out.mean((2, 3))), aux


def wrn_by_hand(model, x, pick):
    """WRN RA with n = 2 blocks per stage: z_k = relu(bn1(block output)), bn1 the final BN."""
    out = model.block2(model.block1(model.conv1(x)))
    weight, aux = model.fc.weight, []
    for k, block in enumerate(model.block3.layer):
        z = F.relu(model.bn1(block(out)))
        p = model.fc(z.mean((2, 3)))
        out = z * _mask_rows(weight, pick(k, p))[:, :, None, None]
        aux.append(p)
    return model.fc(out.mean((2, 3))), aux


def preact_by_hand(model, x, pick):
    """PreAct RA on 64×64: 8×8 maps, 4×4 pooling to a 2×2 grid, grid-shaped masks upsampled by 4."""
    out = model.layer3(model.layer2(model.layer1(model.conv1(x))))
    weight, aux = model.linear.weight, []
    for k, block in enumerate(model.layer4):
        z = F.relu(model.bn(block(out)))
        assert z.shape[-2:] == (8, 8)
        p = model.linear(F.avg_pool2d(z, 4).flatten(1))
        grid = _mask_rows(weight, pick(k, p)).view(-1, 512, 2, 2)
        out = z * grid.repeat_interleave(4, 2).repeat_interleave(4, 3)
        aux.append(p)
    return model.linear(F.avg_pool2d(out, 4).flatten(1)), aux


def argmax_pick(k, p):
    return p.argmax(1)


def label_pick(y):
    return lambda k, p: y


# ---------------------------------------------------------------- RA forward

def test_resnet_ra_forward_matches_hand_computation_label_vs_argmax(tiny_model):
    model = tiny_model("resnet18", 10)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        by_argmax, aux = resnet_by_hand(model, x, argmax_pick)
        y = (aux[0].argmax(1) + 1) % 10  # a label that is not block 1's argmax
        by_label, _ = resnet_by_hand(model, x, label_pick(y))
        out_default, out_aux = model(x, return_aux=True)
        out_label = model(x, y)
    assert close(out_default, by_argmax)
    assert close(out_label, by_label)
    for got, want in zip(out_aux, aux):
        assert close(got, want)
    assert differ(by_label, by_argmax)  # the two choices really differ here


def test_each_ra_block_chooses_its_own_class(tiny_model):
    model = tiny_model("resnet18", 10)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        _, aux = resnet_by_hand(model, x, argmax_pick)
        first = aux[0].argmax(1)
        target = (first + 3) % 10
        # shift block 2's map so that its pooled features gain 50·e_target in logit space
        push = torch.linalg.pinv(model.fc.weight) @ (50.0 * F.one_hot(target, 10).float()).t()
        handle = model.layer4[1].register_forward_hook(lambda m, i, out: out + push.t()[:, :, None, None])
        try:
            by_hand, hand_aux = resnet_by_hand(model, x, argmax_pick)
            logits, model_aux = model(x, return_aux=True)
            both_first, _ = resnet_by_hand(model, x, lambda k, p: first)
            # with labels, block 2 uses the label although its own head now says `target`
            label = (first + 5) % 10
            with_label = model(x, label)
            by_label, _ = resnet_by_hand(model, x, label_pick(label))
            label_then_argmax, mixed_aux = resnet_by_hand(model, x, lambda k, p: label if k == 0 else p.argmax(1))
        finally:
            handle.remove()
    assert torch.equal(hand_aux[1].argmax(1), target)
    assert torch.equal(model_aux[1].argmax(1), target)
    assert (target != first).all()
    assert close(logits, by_hand)
    assert differ(logits, both_first)
    assert torch.equal(mixed_aux[1].argmax(1), target) and (target != label).all()
    assert close(with_label, by_label) and differ(with_label, label_then_argmax)


def test_wrn_ra_uses_final_bn_for_both_blocks(tiny_model):
    model = tiny_model("wrn-16-1", 10)
    calls = []
    model.bn1.register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        by_hand, aux = wrn_by_hand(model, x, argmax_pick)
        calls.clear()
        logits, model_aux = model(x, return_aux=True)
        assert len(calls) == 2  # once per RA block, never again at the end
        y = (aux[1].argmax(1) + 1) % 10
        assert close(model(x, y), wrn_by_hand(model, x, label_pick(y))[0])
    assert close(logits, by_hand)
    assert all(close(a, b) for a, b in zip(model_aux, aux))

    plain = create_model("wrn-16-1", 10, reverse_attention=False)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    plain.bn1.register_forward_hook(lambda m, i, o: calls.append(1))
    calls.clear()
    with torch.no_grad():
        want = plain.fc(F.relu(plain.bn1(plain.block3(plain.block2(plain.block1(plain.conv1(x)))))).mean((2, 3)))
        calls.clear()
        assert close(plain(x), want)
    assert len(calls) == 1


def test_preact_ra_forward_on_64px_matches_hand_computation(tiny_model):
    model = tiny_model("preact-resnet18", 7, image_size=64, input_size=64)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        by_hand, aux = preact_by_hand(model, x, argmax_pick)
        logits, model_aux, feats = model(x, return_aux=True, return_features=True)
        y = (aux[0].argmax(1) + 1) % 7
        assert close(model(x, y), preact_by_hand(model, x, label_pick(y))[0])
    assert model.linear.in_features == 2048 and feats.shape == (2, 2048)
    assert close(logits, by_hand)
    assert all(close(a, b) for a, b in zip(model_aux, aux))


def test_class_mask_is_grid_row_nearest_upsampled():
    weight = torch.arange(24.0).view(3, 8) * 0.5 - 3  # C=3 classes, Ch=2 channels, 2×2 grid
    classes = torch.tensor([2, 0])
    mask = class_mask(weight, classes, 2, (8, 8))
    assert mask.shape == (2, 2, 8, 8)
    for n, c in enumerate(classes.tolist()):
        for ch in range(2):
            for gi in range(2):
                for gj in range(2):
                    quadrant = mask[n, ch, 4 * gi:4 * gi + 4, 4 * gj:4 * gj + 4]
                    want = weight[c, ch * 4 + gi * 2 + gj]
                    assert torch.equal(quadrant, torch.full((4, 4), want.item()))
    mix = torch.tensor([[0.25, 0.0, 0.75]])
    soft = class_mask(weight, mix, 2, (8, 8))
    assert torch.allclose(soft, 0.25 * mask[1:2] + 0.75 * mask[0:1])
    flat = class_mask(weight, classes, 1, (4, 4))  # 1×1 pooling: one weight per channel (Ch = 8)
    assert flat.shape == (2, 8, 1, 1) and torch.equal(flat[:, :, 0, 0], weight[classes])


# ---------------------------------------------------------------- plain models and features

@pytest.mark.parametrize("arch,size,width",
                         [("resnet18", 16, 512), ("wrn-16-1", 16, 64), ("preact-resnet18", 64, 2048)])
def test_plain_models_have_no_aux_and_right_features(arch, size, width):
    torch.manual_seed(0)
    model = create_model(arch, 5, reverse_attention=False).eval()
    assert not has_reverse_attention(model)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        logits, aux, feats = model(x, return_aux=True, return_features=True)
        alone = model(x)
    assert aux == [] and logits.shape == (2, 5) and feats.shape == (2, width)
    assert close(model.classifier(feats), logits)
    assert torch.equal(alone, logits)


def test_ra_features_are_pooled_masked_map(tiny_model):
    model = tiny_model("resnet18", 10)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
    assert feats.shape == (2, 512) and close(model.fc(feats), logits)


# ---------------------------------------------------------------- mask policies

def test_fixed_policy_equals_label_selected(tiny_model):
    model = tiny_model("resnet18", 10)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        classes = (model(x, return_aux=True)[1][0].argmax(1) + 2) % 10
        want = model(x, classes)
        with ra_policy(model, "fixed", classes=classes):
            got = model(x)
            got_with_other_labels = model(x, (classes + 1) % 10)
        after = model(x)
    assert close(got, want) and close(got_with_other_labels, want)
    assert differ(after, want)  # policy is gone after the block


def test_identity_policy_equals_no_mask(tiny_model):
    model = tiny_model("resnet18", 10)
    plain = create_model("resnet18", 10, reverse_attention=False)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad(), ra_policy(model, "identity"):
        logits, aux = model(x, return_aux=True)
    with torch.no_grad():
        _, hand_aux = resnet_by_hand(model, x, argmax_pick)  # block 1's head does not depend on masks
        assert close(logits, plain(x))
        assert close(aux[0], hand_aux[0])
        assert close(aux[1], logits)  # last head sees the unmasked map too
        assert differ(logits, model(x))
    assert len(aux) == 2


def test_soft_policy_uses_softmax_weighted_rows(tiny_model):
    model = tiny_model("resnet18", 10)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want, _ = resnet_by_hand(model, x, lambda k, p: torch.softmax(p / 0.5, 1))
        with ra_policy(model, "soft", tau=0.5):
            got = model(x)
    assert close(got, want)


def test_straight_through_forward_is_argmax_and_backward_is_soft(tiny_model):
    model = tiny_model("resnet18", 10)
    x = torch.rand(2, 3, 16, 16)
    seen = {}
    model.layer4[0].register_forward_hook(lambda m, i, out: seen.__setitem__("z1", out))
    model.layer4[1].register_forward_pre_hook(lambda m, i: seen.__setitem__("h1", i[0]))
    direction = torch.randn(2, 10)

    def run(kind):
        x_leaf = x.clone().requires_grad_(True)
        with ra_policy(model, kind, tau=0.5):
            logits, aux = model(x_leaf, return_aux=True)
        return x_leaf, logits, aux, (logits * direction).sum()

    x_st, logits_st, aux_st, loss_st = run("straight_through")
    g_h1, g_p1, g_x_st = torch.autograd.grad(loss_st, [seen["h1"], aux_st[0], x_st], retain_graph=True)
    z1 = seen["z1"].detach()
    p1 = aux_st[0].detach().requires_grad_(True)
    soft = (torch.softmax(p1 / 0.5, 1) @ model.fc.weight.detach())[:, :, None, None]
    want_g_p1, = torch.autograd.grad((g_h1.detach() * z1 * soft).sum(), p1)

    x_arg, logits_arg, aux_arg, loss_arg = run("default")
    blind, g_x_arg = torch.autograd.grad(loss_arg, [aux_arg[0], x_arg], allow_unused=True)

    assert close(logits_st, logits_arg)
    assert blind is None  # the argmax gate passes no gradient to the head
    scale = g_p1.abs().max().item()
    assert scale > 1e-3
    assert torch.allclose(g_p1, want_g_p1, rtol=1e-3, atol=1e-4 * scale)
    assert (g_x_st - g_x_arg).abs().max() > 0.01 * g_x_arg.abs().max()


def test_policy_errors():
    torch.manual_seed(0)
    plain = create_model("wrn-16-1", 10, reverse_attention=False)
    with pytest.raises(ValueError, match="plain"), ra_policy(plain):
        pass
    model = create_model("wrn-16-1", 10)
    with pytest.raises(ValueError, match="unknown RA policy"), ra_policy(model, "bogus"):
        pass
    with pytest.raises(ValueError, match="classes"), ra_policy(model, "fixed"):
        pass


# ---------------------------------------------------------------- names, counts, errors

def _groups(model):
    return {k.split(".")[0] for k in model.state_dict()}


def _keys_under(model, prefix):
    return {k[len(prefix) + 1:] for k in model.state_dict() if k.startswith(prefix + ".")}


def _bn(name):
    return {f"{name}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def test_resnet18_parameter_names_and_count():
    model = create_model("resnet18", 10)
    assert _groups(model) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
    block = {"conv1.weight", "conv2.weight"} | _bn("bn1") | _bn("bn2")
    assert _keys_under(model, "layer1.0") == block
    assert _keys_under(model, "layer2.0") == block | {"shortcut.0.weight"} | _bn("shortcut.1")
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def _wrn_count(depth, k, classes):
    """Parameters of a TRADES WRN (sub_block1 included), counted by hand."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]

    def stage(cin, cout):
        first = 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if cin != cout else 0)
        rest = (n - 1) * (4 * cout + 18 * cout * cout)
        return first + rest

    return (27 * 16 + 2 * stage(16, widths[1]) + stage(widths[1], widths[2]) + stage(widths[2], widths[3])
            + 2 * widths[3] + widths[3] * classes + classes)


@pytest.mark.parametrize("depth", [34, 28])
def test_wrn_parameter_names_and_count(depth):
    torch.manual_seed(0)
    model = create_model(f"wrn-{depth}-10", 10)
    n = (depth - 4) // 6
    assert _groups(model) == {"conv1", "block1", "sub_block1", "block2", "block3", "bn1", "fc"}
    assert {k.split(".")[2] for k in model.state_dict() if k.startswith("block3.layer.")} == {str(i) for i in range(n)}
    block = {"conv1.weight", "conv2.weight"} | _bn("bn1") | _bn("bn2")
    for stage in ("block1", "sub_block1", "block2", "block3"):
        assert _keys_under(model, f"{stage}.layer.0") == block | {"convShortcut.weight"}
        assert _keys_under(model, f"{stage}.layer.1") == block
    assert sum(p.numel() for p in model.parameters()) == _wrn_count(depth, 10, 10)
    used = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("sub_block1."))
    assert used == {34: 46_160_474, 28: 36_479_194}[depth]  # the published WRN sizes (without sub_block1)
    if depth == 34:
        with torch.no_grad():
            logits, aux = model.eval()(torch.rand(1, 3, 32, 32), return_aux=True)
        assert logits.shape == (1, 10) and len(aux) == 2


def test_preact_parameter_names():
    model = create_model("preact-resnet18", 200)
    assert _groups(model) == {"conv1", "layer1", "layer2", "layer3", "layer4", "bn", "linear"}
    block = {"conv1.weight", "conv2.weight"} | _bn("bn1") | _bn("bn2")
    assert _keys_under(model, "layer1.0") == block
    assert _keys_under(model, "layer2.0") == block | {"shortcut.0.weight"}
    assert model.state_dict()["linear.weight"].shape == (200, 2048)


@pytest.mark.parametrize("arch", ["resnet18", "wrn-16-1", "preact-resnet18"])
def test_plain_and_ra_state_dicts_match(arch):
    ra = create_model(arch, 10, reverse_attention=True).state_dict()
    plain = create_model(arch, 10, reverse_attention=False).state_dict()
    assert list(ra) == list(plain)
    assert all(ra[k].shape == plain[k].shape for k in ra)


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'.*resnet18.*wrn-D-K"):
        create_model("vgg16", 10)
    for bad in ("wrn-30-10", "wrn-10-1"):
        with pytest.raises(ValueError, match=r"6n\+4.*got"):
            create_model(bad, 10)
    with pytest.raises(ValueError, match="divisible by 32"):
        create_model("preact-resnet18", 10, image_size=40)


# ---------------------------------------------------------------- separate BatchNorms (ablation)

def _random_bn_stats(model, seed=3):
    """Distinct running statistics in every BatchNorm, so which BN a block uses shows in its output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


@pytest.mark.parametrize("arch,final", [("wrn-16-1", "bn1"), ("preact-resnet18", "bn")])
def test_separate_bn_only_adds_one_batchnorm_for_the_first_ra_block(arch, final):
    default = list(create_model(arch, 10).state_dict())
    assert list(create_model(arch, 10, separate_bn=False).state_dict()) == default
    separate = list(create_model(arch, 10, separate_bn=True).state_dict())
    assert separate == default + [f"ra_bn.0.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                                            "num_batches_tracked")]
    assert f"{final}.weight" in default and not any(k.startswith("ra_bn") for k in default)
    with pytest.raises(ValueError, match="separate_bn needs reverse attention"):
        create_model(arch, 10, reverse_attention=False, separate_bn=True)
    with pytest.raises(ValueError, match="takes no option 'separate_bn'"):
        create_model("resnet18", 10, separate_bn=True)


def test_separate_bn_wrn_forward_matches_hand_computation():
    torch.manual_seed(0)
    model = _random_bn_stats(create_model("wrn-16-1", 10, separate_bn=True))
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        out = model.block2(model.block1(model.conv1(x)))
        weight, want_aux = model.fc.weight, []
        for bn, block in zip((model.ra_bn[0], model.bn1), model.block3.layer):
            z = F.relu(bn(block(out)))
            p = model.fc(z.mean((2, 3)))
            out = z * weight[p.argmax(1)][:, :, None, None]
            want_aux.append(p)
        logits, aux = model(x, return_aux=True)
    assert close(logits, model.fc(out.mean((2, 3)))) and all(close(a, b) for a, b in zip(aux, want_aux))


@pytest.mark.parametrize("arch,final,size", [("wrn-16-1", "bn1", 16), ("preact-resnet18", "bn", 64)])
def test_changing_one_batchnorm_changes_only_its_ra_blocks_output(arch, final, size):
    torch.manual_seed(0)
    x = torch.rand(2, 3, size, size)

    def aux_after_shifting(model, name):
        with torch.no_grad():
            before = model(x, return_aux=True)[1]
            model.get_submodule(name).running_mean.add_(0.5)
            return before, model(x, return_aux=True)[1]

    separate = _random_bn_stats(create_model(arch, 10, separate_bn=True))
    before, after = aux_after_shifting(separate, final)
    assert torch.equal(after[0], before[0]) and differ(after[1], before[1])  # the final BN: last RA block only
    before, after = aux_after_shifting(separate, "ra_bn.0")
    assert differ(after[0], before[0])  # the first RA block's own BN
    shared = _random_bn_stats(create_model(arch, 10))
    before, after = aux_after_shifting(shared, final)
    assert differ(after[0], before[0]) and differ(after[1], before[1])  # default: one BN for both blocks


def test_separate_bn_is_recorded_and_rebuilt_by_load_model():
    torch.manual_seed(0)
    model = _random_bn_stats(create_model("wrn-16-1", 10, separate_bn=True))
    assert model.arch_config["separate_bn"] is True
    loaded, config = load_model({"model": model.state_dict(), "model_config": model.arch_config})
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert config["separate_bn"] is True and loaded.separate_bn
    with pytest.raises(CheckpointError, match=r"5 unexpected keys \(e\.g\. ra_bn\.0\.weight, ra_bn\.0\.bias, \.\.\.\)"):
        load_model({"model": model.state_dict(), "model_config": dict(model.arch_config, separate_bn=False)})


def test_no_unused_attributes_remain():
    from models.preact_resnet import PreActBlock
    from models.resnet import BasicBlock
    assert not hasattr(BasicBlock, "expansion") and not hasattr(PreActBlock, "expansion")
    assert not hasattr(create_model("wrn-16-1", 10), "relu")
