"""Every registered architecture builds, has >= 3 parameter groups, and takes one training step on a tiny batch."""

import pytest
import torch

from fastcls.archs import ARCHS, build_model, get_arch, resolve_weights, splitter
from fastcls.errors import FastclsError


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_arch_builds_splits_and_steps(arch):
    spec = ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(arch, n_out=3, ps=0.5, pretrained=False)
    model.body_groups = spec.body_groups
    groups = splitter(model)
    assert len(groups) >= 3, f"{arch}: only {len(groups)} parameter groups"
    assert all(len(g) for g in groups)
    ids = [id(p) for g in groups for p in g]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()), "groups must cover every parameter exactly once"
    x, y = torch.randn(2, 3, spec.min_size, spec.min_size), torch.tensor([0, 2])
    opt = torch.optim.SGD([{"params": g, "lr": lr} for g, lr in zip(groups, [1e-3] * len(groups))], lr=1e-3)
    model.train()
    before = [p.detach().clone() for p in groups[0][:1] + groups[-1][:1]]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    after = [p.detach() for p in groups[0][:1] + groups[-1][:1]]
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, after)), "the step must change body and head weights"


def test_head_dropout_is_ps():
    model = build_model("simple_cnn", 4, ps=0.3)
    drops = [m.p for m in model[1].modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and drops[-1] == pytest.approx(0.3)


def test_unknown_arch_suggests():
    with pytest.raises(FastclsError, match="Did you mean: resnet18"):
        get_arch("resnet_18")


def test_missing_pretrained_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCLS_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FastclsError) as e:
        build_model("resnet18", 3, pretrained=True)
    msg = str(e.value)
    assert str(tmp_path / "resnet18.safetensors") in msg and "--weights" in msg and "--no-pretrained" in msg


def test_local_weights_folder_is_used(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import timm
    src = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.constant_(src.conv1.weight, 0.125)
    save_file(src.state_dict(), tmp_path / "resnet18.safetensors")
    monkeypatch.setenv("FASTCLS_WEIGHTS", str(tmp_path))
    assert resolve_weights(get_arch("resnet18"), True) == tmp_path / "resnet18.safetensors"
    model = build_model("resnet18", 3, pretrained=True)
    assert torch.all(model[0].conv1.weight == 0.125)
    # --weights FILE takes any path, and a missing one is a clear error
    model = build_model("resnet18", 3, pretrained=False, weights=tmp_path / "resnet18.safetensors")
    assert torch.all(model[0].conv1.weight == 0.125)
    with pytest.raises(FastclsError, match="does not exist"):
        build_model("resnet18", 3, weights=tmp_path / "nope.safetensors")


def test_archs_lists_curated_and_all_lists_timm(cli):
    res = cli("archs")
    assert res.exit_code == 0 and "seed_cnn64" in res.stdout and "convnext_atto" not in res.stdout
    res = cli("archs", "--all", "efficientnet_lite")
    assert res.exit_code == 0 and "tf_efficientnet_lite0" in res.stdout and "0.5,0.5,0.5" in res.stdout
    assert "resnet18" not in res.stdout
    res = cli("archs", "convnext")
    assert res.exit_code == 2 and "--all" in res.stderr


def test_any_timm_name_is_an_arch():
    spec = get_arch("regnetx_002")
    assert spec.timm_name == "regnetx_002" and spec.name not in ARCHS
    assert resolve_weights(spec, False) is None
