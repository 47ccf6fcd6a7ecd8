"""The ``leakage attack`` command: outputs, reproducibility and bad input."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import urllib.error

import pytest
from PIL import Image

from fl_core import load_samples
from leakage.app.cli import main

FAST = ["--steps", "15", "--restarts", "1", "--quiet"]
needs_lpips = pytest.mark.skipif(
    importlib.util.find_spec("lpips") is None,
    reason="needs the lpips package: pip install -e '.[dev]'",
)


def run(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_attack_writes_three_files(tmp_path, capsys):
    code, out, err = run(["attack", "--out", str(tmp_path / "r"), *FAST], capsys)
    assert code == 0, err
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"results.json", "reconstruction.png", "history.png"} <= files
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(res["summary"]) == {
        "psnr",
        "ssim",
        "label_accuracy",
        "label_set_accuracy",
        "recovered_fraction",
    }
    assert res["config"]["attack"] == "dlg" and res["config"]["model"] == "lenet"
    assert res["config"]["activation"] == "sigmoid" and res["seed"] == 0
    assert res["versions"]["torch"] and res["seconds"] > 0
    assert len(res["images"]) == 1 and res["images"][0]["name"] == "astronaut"
    assert {"psnr", "ssim", "true_label", "recovered_label"} <= set(res["images"][0])
    assert "lpips" not in res["images"][0] and res["config"]["metrics"] == ["psnr", "ssim"]
    assert "PSNR" in out and "LPIPS" not in out


def _numbers(path):
    res = json.loads(path.read_text())
    for k in ("seconds", "versions"):
        res.pop(k)
    res["config"].pop("out")
    return res


def test_same_seed_same_numbers(tmp_path, capsys):
    args = ["attack", "--batch-size", "2", "--attack", "idlg", *FAST]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert run([*args, "--seed", seed, "--out", str(tmp_path / name)], capsys)[0] == 0
    a, b, c = (_numbers(tmp_path / n / "results.json") for n in "abc")
    assert a == b
    assert a["images"] != c["images"]


def test_own_images_and_yaml_config(tmp_path, capsys):
    data = load_samples(count=2)
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray((data.images[i].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(p)
        paths.append(str(p))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("attack: idlg\nnum-classes: 10\nsteps: 15\nrestarts: 1\n")
    code, _, err = run(
        [
            "attack",
            "--config",
            str(cfg),
            "--images",
            *paths,
            "--labels",
            "4",
            "7",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["config"]["attack"] == "idlg" and res["config"]["batch_size"] == 2
    assert sorted(i["true_label"] for i in res["images"]) == [4, 7]
    assert res["summary"]["label_accuracy"] == 1.0  # iDLG batch labels, distinct classes


@pytest.fixture
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a png")
    yaml_bad = tmp_path / "bad.yaml"
    yaml_bad.write_text("attack: dlg\nlearning_rate: 3\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    return {"corrupt": corrupt, "yaml": yaml_bad, "unwritable": blocker / "sub"}


BAD = {
    "batch size 0": (["--batch-size", "0"], "batch size 0"),
    "unknown model": (["--model", "vgg"], "lenet"),
    "unknown attack": (["--attack", "magic"], "dlg"),
    "unknown dataset": (["--dataset", "imagenet-x"], "samples"),
    "missing image": (["--images", "/nonexistent/x.png"], "/nonexistent/x.png"),
    "corrupt image": (["--images", "{corrupt}"], "corrupt.png"),
    "images vs batch": (["--images", "{corrupt}", "--batch-size", "2"], "batch size"),
    "yaml unknown key": (["--config", "{yaml}"], "learning_rate"),
    "unwritable out": (["--out", "{unwritable}"], "cannot write"),
    "unknown activation": (["--activation", "swish2"], "sigmoid"),
    "missing config": (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    "unknown threat": (["--threat", "eavesdrop"], "aggregate"),
    "clients without aggregate": (["--clients", "2"], "--threat aggregate"),
    "too many clients": (["--threat", "aggregate", "--clients", "3"], "at least one"),
    "unknown label strategy": (["--label-strategy", "guess"], "ilrg"),
    "option the attack lacks": (["--tv", "0.1"], "takes no --tv"),
    "analytic on lenet": (["--attack", "analytic"], "--model mlp"),
    "missing checkpoint": (["--checkpoint", "/nonexistent.pt"], "/nonexistent.pt"),
    "zero local steps": (["--threat", "fedavg", "--local-steps", "0"], "local_steps"),
    "unknown defense": (["--defense", "blur:sigma=1"], "valid: inspect, dpsgd, clip"),
    "defense parameter": (["--defense", "clip:norm=1"], "valid parameters: max_norm"),
    "defense syntax": (["--defense", "clip:max_norm"], "name:key=value"),
    "defense overflow": (["--defense", "crfl:rounds=.inf"], "whole number"),
    "dpsgd subsampling": (
        ["--threat", "fedavg", "--batch-size", "4", "--local-batch-size", "1"]
        + ["--local-steps", "2", "--defense", "dpsgd:noise_multiplier=1,max_grad_norm=1"],
        "--local-batch-size",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2(case, bad_files, tmp_path, capsys):
    argv, needle = BAD[case]
    argv = [a.format(**bad_files) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    fast = (
        [a for a in FAST if a not in ("--steps", "15", "--restarts", "1")]
        if "analytic" in argv
        else FAST
    )
    code, out, err = run(["attack", *argv, *fast], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0]


def test_console_script_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "leakage", "attack", "--model", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv, threat, samples",
    [
        (["--threat", "fedavg", "--local-steps", "2", "--batch-size", "2"], "fedavg", []),
        (["--threat", "aggregate", "--batch-size", "3", "--clients", "2"], "aggregate", [2, 1]),
    ],
)
def test_threat_models_from_the_command_line(argv, threat, samples, tmp_path, capsys):
    code, out, err = run(
        ["attack", *argv, "--attack", "idlg", "--out", str(tmp_path), *FAST], capsys
    )
    assert code == 0, err
    res = json.loads((tmp_path / "results.json").read_text())
    proto = res["observation"]["protocol"]
    assert res["observation"]["threat"] == threat and proto["client_samples"] == samples
    if threat == "fedavg":
        assert proto["algorithm"] == "fedavg" and proto["local_steps"] == 2
    assert len(res["images"]) == sum(samples) or len(res["images"]) == 2
    assert res["attack_options"]["label_strategy"] == "auto"


def test_label_accuracy_counts_repeated_labels(tmp_path, capsys):
    """summary.label_accuracy = multiset overlap / batch size; set accuracy ignores counts."""
    argv = ["attack", "--attack", "ig", "--batch-size", "3", "--labels", "1", "1", "2"]
    argv += ["--label-strategy", "yin", "--out", str(tmp_path), "--steps", "2", "--quiet"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "results.json").read_text())["summary"]
    # yin returns 3 distinct classes: at most {1, 2} of them are right, 2 of the 3 labels
    assert s["label_accuracy"] <= 2 / 3 and s["label_set_accuracy"] == 1.0


def test_attack_a_trained_checkpoint(tmp_path, capsys):
    import torch

    from fl_core import build_model, save_checkpoint

    model = build_model("mlp", activation="relu", generator=torch.Generator().manual_seed(1))
    path = save_checkpoint(model, tmp_path / "victim.pt", meta={"epochs": 0})
    argv = [
        "attack",
        "--attack",
        "analytic",
        "--checkpoint",
        str(path),
        "--out",
        str(tmp_path / "r"),
    ]
    code, out, err = run([*argv, "--quiet"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["config"]["model"] == "mlp" and res["checkpoint"]["path"] == str(path)
    assert res["checkpoint"]["epochs"] == 0
    assert res["summary"]["psnr"] is None or res["summary"]["psnr"] >= 60  # exact: inf


def test_train_then_attack_the_checkpoint(tmp_path, capsys):
    """``leakage train`` writes a checkpoint that ``leakage attack --checkpoint`` loads."""
    ckpt = tmp_path / "lenet.pt"
    argv = ["train", "--model", "lenet", "--dataset", "samples", "--epochs", "1"]
    code, out, err = run([*argv, "--out", str(ckpt), "--quiet"], capsys)
    assert code == 0 and ckpt.is_file(), err
    argv = ["attack", "--attack", "idlg", "--checkpoint", str(ckpt), "--out", str(tmp_path / "r")]
    code, out, err = run([*argv, *FAST], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["checkpoint"]["path"] == str(ckpt) and res["config"]["model"] == "lenet"


def _no_attack(monkeypatch):
    """Make any attack that starts fail the test: bad input must stop before it."""
    import leakage.app.experiment

    def never(*_, **__):
        raise AssertionError("the round was observed: the check came too late")

    monkeypatch.setattr(leakage.app.experiment, "observe_round", never)


def test_a_shape_too_small_to_score_stops_before_the_attack(tmp_path, capsys, monkeypatch):
    _no_attack(monkeypatch)
    out = tmp_path / "r"
    code, _, err = run(["attack", "--shape", "3", "8", "8", "--out", str(out), *FAST], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "shape 3 8 8 cannot be scored" in lines[0] and "11x11" in lines[0]
    assert not out.exists()


def test_a_dataset_of_small_images_stops_before_the_attack(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / label / "0.png")
    _no_attack(monkeypatch)
    out = tmp_path / "r"
    code, _, err = run(["attack", "--dataset", str(folder), "--out", str(out), *FAST], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "images of shape 3 8 8 cannot be scored" in lines[0]
    assert not out.exists()


def test_a_scoring_failure_keeps_the_finished_attack(tmp_path, capsys, monkeypatch):
    import torch

    import leakage.app.experiment

    real = leakage.app.experiment.score_images

    def fails_on_real_images(reconstructed, original, **kw):
        if float(reconstructed.abs().sum()) > 0:  # the up-front check scores blank images
            raise ValueError("metric blew up")
        return real(reconstructed, original, **kw)

    monkeypatch.setattr(leakage.app.experiment, "score_images", fails_on_real_images)
    out = tmp_path / "r"
    code, _, err = run(["attack", "--out", str(out), *FAST], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "could not be scored (metric blew up)" in lines[0] and "reconstruction.pt" in lines[0]
    saved = torch.load(out / "reconstruction.pt", weights_only=True)
    assert saved["images"].shape == (1, 3, 32, 32) and saved["labels"].shape == (1,)
    res = json.loads((out / "results.json").read_text())
    assert res["scoring_error"] == "metric blew up" and res["attack"]["steps"] > 0
    assert res["summary"] is None


def test_bad_input_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "deep" / "r"
    code, _, err = run(["attack", "--attack", "analytic", "--out", str(out), "--quiet"], capsys)
    assert code == 2 and "--model mlp" in err  # found by the attack itself, on its first step
    assert not (tmp_path / "deep").exists()  # the folders it had made are gone again


# ----------------------------------------------------------------- --metrics (LPIPS)


def _seeded_lpips(monkeypatch, seed=0):
    """Make LPIPS use the random backbone of ``seed`` (the package's linear heads): the
    ImageNet weights cannot be downloaded where the tests run. Returns the real function."""
    import leakage.metrics

    real = leakage.metrics.lpips

    def seeded(x, y, **kw):
        return real(x, y, **{**kw, "backbone_seed": seed})

    monkeypatch.setattr(leakage.metrics.scoring, "lpips", seeded)
    return real


@needs_lpips
@pytest.mark.parametrize("source", ["option", "yaml"])
def test_metrics_lpips_writes_lpips_per_image_and_in_the_summary(
    source, tmp_path, capsys, monkeypatch
):
    import torch

    from leakage.metrics import match_images

    real = _seeded_lpips(monkeypatch)
    out = tmp_path / "r"
    argv = ["attack", "--attack", "idlg", "--batch-size", "2", "--out", str(out), *FAST]
    if source == "option":
        argv += ["--metrics", "psnr,ssim,lpips"]
        net = "alex"
    else:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("metrics: [lpips]\nlpips-net: squeeze\n")
        argv += ["--config", str(cfg)]
        net = "squeeze"
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["metrics"] == ["psnr", "ssim", "lpips"]
    assert res["config"]["lpips_net"] == net
    assert res["versions"]["lpips"] == importlib.metadata.version("lpips")
    # the same number from the saved reconstruction, matched to the originals by MSE
    rec = torch.load(out / "reconstruction.pt", weights_only=True)["images"]
    original = load_samples(count=2).images
    paired = rec[match_images(rec, original)]
    expected = real(paired, original, net=net, backbone_seed=0).tolist()
    assert [image["lpips"] for image in res["images"]] == pytest.approx(expected, rel=1e-9)
    assert res["summary"]["lpips"] == pytest.approx(sum(expected) / 2, rel=1e-9)
    assert f"LPIPS {res['summary']['lpips']:.4f}" in stdout


@pytest.mark.parametrize(
    "argv, yaml_text, needle",
    [
        (["--metrics", "psnr,fid"], None, "unknown metric 'fid'; valid: psnr, ssim, lpips"),
        ([], "metrics: [psnr, fid]\n", "unknown metric 'fid'; valid: psnr, ssim, lpips"),
        ([], "metrics: 3\n", "comma-separated"),
        (["--lpips-net", "resnet"], None, "unknown lpips_net 'resnet'; valid: alex, vgg, squeeze"),
        (["--metrics", "lpips", "--shape", "3", "24", "24"], None, "31x31"),
    ],
    ids=["option", "yaml", "yaml-not-a-list", "lpips-net", "too-small-for-lpips"],
)
def test_bad_metrics_stop_before_the_attack(argv, yaml_text, needle, tmp_path, capsys, monkeypatch):
    _no_attack(monkeypatch)
    out = tmp_path / "r"
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = [*argv, "--config", str(tmp_path / "c.yaml")]
    code, _, err = run(["attack", *argv, "--out", str(out), *FAST], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0]
    assert not out.exists()


def test_attack_config_checks_metrics_when_made():
    from leakage.app.experiment import AttackConfig

    cfg = AttackConfig(metrics="lpips, ssim", lpips_net="vgg")
    assert cfg.metrics == ("psnr", "ssim", "lpips")
    assert cfg.to_dict()["metrics"] == ["psnr", "ssim", "lpips"]
    assert AttackConfig().metrics == ("psnr", "ssim") and AttackConfig().lpips_net == "alex"
    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        AttackConfig(metrics=["psnr", "fid"])
    with pytest.raises(ValueError, match="unknown lpips_net None"):
        AttackConfig(lpips_net=None)


@pytest.mark.parametrize("missing", ["package", "weights"])
def test_lpips_unavailable_stops_before_the_attack(missing, tmp_path, capsys, monkeypatch):
    """LPIPS's network is loaded in the pre-attack checks: no attack runs only to fail."""
    import torch

    import leakage.metrics

    monkeypatch.setattr(leakage.metrics.perceptual, "_LPIPS_MODELS", {})
    if missing == "package":
        monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
        needles = ["pip install 'leakage-lab[lpips]'"]
    else:
        if importlib.util.find_spec("lpips") is None:
            pytest.skip("needs the lpips package: pip install -e '.[dev]'")
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached

        def offline(*_, **__):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

        monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
        needles = ["URLError", "leave lpips out of the metrics"]
    _no_attack(monkeypatch)
    out = tmp_path / "r"
    code, _, err = run(["attack", "--metrics", "psnr,ssim,lpips", "--out", str(out), *FAST], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    assert not out.exists()
