"""The malicious-server attacks: imprint (Robbing the Fed), trap weights, class fishing.

Where the expected numbers come from: all three are closed forms, exact by
construction (Fowl et al., ICLR 2022, sec. 3; Boenisch et al., EuroS&P 2023,
sec. 4; Wen et al., ICML 2022, with the first layer's closed form of Phong et
al. 2017), so the bars are exactness bounds: PSNR >= 60 dB is an RMS error
under 1e-3 of the pixel range, far above what float32 gradients allow. Which
images imprint must recover is counted independently of the attack, from the
thresholds the server sent and the images' brightness.
"""

from __future__ import annotations

import json

import pytest
import torch

from fl_core import Client, LocalTraining, Server, build_model
from fl_core.malicious import ClassFishing, TrapWeights
from leakage import score_images
from leakage.app.cli import main
from leakage.attacks import Fishing, Trap, invert_imprint
from leakage.attacks import Imprint as ImprintAttack

SHAPE = (3, 16, 16)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def victim(name: str = "mlp", **kw):
    return build_model(name, in_shape=SHAPE, generator=torch.Generator().manual_seed(0), **kw)


def observe(model, data, labels, modification, *, clients=1, training=None):
    seen, truth = [], []
    chunks = list(zip(data.chunk(clients), labels.chunk(clients)))
    kw = {"training": training} if training else {}
    key = "aggregate_listeners" if clients > 1 else "listeners"
    server = Server(
        model,
        [Client(i, x, y, **kw) for i, (x, y) in enumerate(chunks)],
        modification=modification,
        truth_listeners=[truth.append],
        **{key: [seen.append]},
    )
    server.run_round()
    return seen[0], torch.cat([t.images for t in truth]), server


def alone_in_their_bin(server, data):
    """Which images no other image shares a bin with (from the sent thresholds)."""
    block = server.sent_model(0).imprint.measure
    t = -block.bias.detach().double()
    m = data.double().flatten(1) @ block.weight.detach().double()[0]
    bins = torch.searchsorted(t, m, right=True) - 1
    return torch.bincount(bins, minlength=len(t))[bins] == 1


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_imprint_recovers_exactly_the_images_alone_in_their_bins(name):
    data, labels = images(24, 1), torch.arange(24) % 10
    attack = ImprintAttack(bins=64)
    obs, truth, server = observe(victim(name), data, labels, attack.modification(images(400, 2)))
    rec = attack.reconstruct(obs)
    scores = score_images(rec.images, truth, data_range=1.0, candidates=rec.candidates)
    alone = alone_in_their_bin(server, data)
    assert alone.sum() >= 8  # the draw leaves enough singletons for the test to mean something
    assert (scores.psnr[alone] >= 60).all()
    assert (scores.psnr[~alone] < 60).all()  # a mixture is never exact
    assert rec.options["expected_recovery"] == pytest.approx((1 - 1 / 64) ** 23)


def test_imprint_sees_through_the_aggregate_of_many_clients():
    """Secure aggregation sums the rows: a bin with one image of all the clients still gives it."""
    data, labels = images(32, 3), torch.arange(32) % 10
    attack = ImprintAttack(bins=128)
    obs, truth, server = observe(
        victim(), data, labels, attack.modification(images(4000, 2)), clients=8
    )
    assert obs.protocol.num_samples == 32
    rec = attack.reconstruct(obs)
    scores = score_images(rec.images, truth, data_range=1.0, candidates=rec.candidates)
    alone = alone_in_their_bin(server, data)
    assert alone.sum() >= 16 and (scores.psnr[alone] >= 60).all()


def test_a_loud_imprint_reads_images_through_the_clients_noise():
    """A server that weighs its block's way back to the input heavily (spread 1e5) lifts
    the rows' gradients far above local Gaussian noise of σ = 0.1 on every entry."""
    from defenses.transforms import GaussianNoise

    data, labels = images(16, 1), torch.arange(16) % 10
    attack = ImprintAttack(bins=64, spread=1e5)
    seen, truth = [], []
    Server(
        victim("mlp", activation="relu"),
        [Client(0, data, labels)],
        modification=attack.modification(images(2000, 2)),
        client_defenses=[GaussianNoise(1e-1)],
        listeners=[seen.append],
        truth_listeners=[truth.append],
    ).run_round()
    rec = attack.reconstruct(seen[0])
    scores = score_images(rec.images, truth[0].images, data_range=1.0, candidates=rec.candidates)
    assert (scores.psnr >= 25).sum() >= 8
    quiet = ImprintAttack(bins=64)  # the default block drowns in the same noise
    seen.clear()
    truth.clear()
    Server(
        victim("mlp", activation="relu"),
        [Client(0, data, labels)],
        modification=quiet.modification(images(2000, 2)),
        client_defenses=[GaussianNoise(1e-1)],
        listeners=[seen.append],
        truth_listeners=[truth.append],
    ).run_round()
    rec = quiet.reconstruct(seen[0])
    drowned = score_images(rec.images, truth[0].images, data_range=1.0, candidates=rec.candidates)
    assert (drowned.psnr >= 25).sum() == 0


def test_a_swamped_bias_difference_falls_back_to_the_bins_brightness():
    """Bias gradients ruined, weight gradients intact: each image comes back as its weight
    difference rescaled to its bin's central brightness, off only by the bin's width."""
    x = torch.tensor([[0.2, 0.4], [0.5, 0.7]], dtype=torch.float64)  # brightness 0.3, 0.6
    t = torch.tensor([-1.0, 0.25, 0.35, 0.55, 0.65])  # bins [.25,.35) and [.55,.65)
    fires = torch.tensor([[1, 1], [1, 1], [0, 1], [0, 1], [0, 0]]).double()
    c = torch.tensor([2.0, -3.0], dtype=torch.float64)
    w, b = fires @ (c[:, None] * x), fires @ c
    spoiled = b + torch.tensor([0.0, 0.0, 0.0, 50.0, 0.0], dtype=torch.float64)
    v = torch.full((2,), 0.5, dtype=torch.float64)
    ratio, _ = invert_imprint(w, spoiled)
    assert not torch.allclose(ratio[1], x[1], atol=0.1)  # the plain ratio is ruined
    found, bins = invert_imprint(w, spoiled, measure=v, thresholds=t)
    assert bins.tolist() == [1, 3]
    assert torch.allclose(found, x, atol=1e-12)  # both sit at their bin's centre brightness


def test_invert_imprint_reads_a_synthetic_layer():
    """Rows fire for the images above their threshold; bins 1 and 3 hold one image each."""
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0]], dtype=torch.float64)
    c = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)
    fires = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [0, 0, 1]]).double()
    w, b = fires @ (c[:, None] * x), fires @ c  # rows 0..4; bins: {0}, {}, {1}, {}, {2}
    found, bins = invert_imprint(w, b)
    assert bins.tolist() == [1, 3, 4]
    assert torch.allclose(found, x, atol=1e-12)


def test_the_malicious_attacks_refuse_what_they_cannot_read():
    data, labels = images(4, 1), torch.arange(4)
    honest, _, _ = observe(victim(), data, labels, None)
    for attack in (ImprintAttack(bins=8), Trap(bins=8), Fishing()):
        with pytest.raises(ValueError, match="malicious server"):
            attack.reconstruct(honest)
    training = LocalTraining("fedavg", local_steps=3, lr=0.1)
    attack = ImprintAttack(bins=8)
    several, _, _ = observe(
        victim(), data, labels, attack.modification(images(50, 2)), training=training
    )
    with pytest.raises(ValueError, match="local steps"):
        attack.reconstruct(several)
    fished, _, _ = observe(
        victim("cnn"), data, labels, ClassFishing(target=1, reference=images(50, 2))
    )
    with pytest.raises(ValueError, match="fully connected"):
        Fishing(target=1).reconstruct(fished)


def test_trap_weights_recover_most_of_a_batch_and_its_confirmed_images_exactly():
    data, labels = images(32, 5), torch.arange(32) % 10
    attack = Trap(bins=1024, rate=1 / 32)
    obs, truth, _ = observe(victim(), data, labels, attack.modification(images(600, 2)))
    assert isinstance(attack.modification(images(10, 2)), TrapWeights)
    rec = attack.reconstruct(obs)
    scores = score_images(rec.images, truth, data_range=1.0, candidates=rec.candidates)
    confirmed = rec.options["confirmed"]
    assert confirmed >= 16  # at least half the batch confirmed by two or more rows
    assert (scores.psnr[scores.order < confirmed] >= 60).all()


def test_class_fishing_recovers_the_target_client_through_an_aggregate_of_eight():
    """Eight clients, one image each, distinct classes; the server fishes for client 0's."""
    data, labels = images(8, 7), torch.tensor([4, 0, 1, 2, 3, 5, 6, 7])
    attack = Fishing(target=4)
    model = victim("mlp", activation="relu")
    obs, truth, _ = observe(model, data, labels, attack.modification(images(100, 2)), clients=8)
    rec = attack.reconstruct(obs)
    scores = score_images(rec.images, truth, data_range=1.0, candidates=rec.candidates)
    assert scores.order[0] == 0 and scores.psnr[0] >= 60
    # an honest server's aggregate of the same round gives a mixture, not the image
    honest = dict(target=4, margin=1e-9)  # a "fishing" that changes nothing measurable
    obs2, truth2, _ = observe(
        model, data, labels, ClassFishing(reference=images(100, 2), **honest), clients=8
    )
    rec2 = Fishing(target=4).reconstruct(obs2)
    s2 = score_images(rec2.images, truth2, data_range=1.0, candidates=1)
    assert s2.psnr.max() < 30


def test_class_fishing_separates_several_images_of_the_target_class():
    """Three images of class 4 among eight clients: the target bias counts them, and the
    ReLU first layer's rows that one of them fires alone give each exactly."""
    data, labels = images(8, 9), torch.tensor([4, 0, 4, 1, 2, 4, 6, 7])
    attack = Fishing(target=4)
    model = victim("mlp", activation="relu")
    obs, truth, _ = observe(model, data, labels, attack.modification(images(100, 2)), clients=8)
    rec = attack.reconstruct(obs)
    assert rec.options["target_images"] == 3
    scores = score_images(rec.images, truth, data_range=1.0, candidates=rec.candidates)
    assert (scores.psnr[labels == 4] >= 60).all()


def test_scoring_matches_the_attempts_before_the_placeholders():
    """An exact attempt must keep its original even when a blank fits that original well.

    Originals 0.7 and 0.6 (flat), attempt = the 0.6 one, blank 0.5: the least total
    MSE pairs 0.6 with the blank (0.01) and 0.7 with the attempt (0.01), 0.02 in all,
    against 0.04 for the right pairing."""
    originals = torch.stack([torch.full(SHAPE, 0.7), torch.full(SHAPE, 0.6)])
    padded = torch.cat([originals[1:2].clone(), torch.full((1, *SHAPE), 0.5)])
    assert score_images(padded, originals, data_range=1.0).order.tolist() == [0, 1]
    scores = score_images(padded, originals, data_range=1.0, candidates=1)
    assert scores.order.tolist() == [1, 0]
    assert torch.isinf(scores.psnr[1])


def test_cli_imprint_writes_the_recovered_fraction_and_the_threat_model(tmp_path, capsys):
    folder = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    from PIL import Image

    for c in range(2):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(150):
            pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i:03d}.png")
    out = tmp_path / "run"
    code = main(
        ["attack", "--attack", "imprint", "--bins", "64", "--batch-size", "8",
         "--dataset", str(folder), "--sample-seed", "1", "--model", "mlp",
         "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["observation"]["server"] == "malicious"
    assert result["observation"]["sent_model"]["modification"] == {"bins": 64, "name": "imprint"}
    fraction = result["summary"]["recovered_fraction"]
    assert fraction == pytest.approx(
        sum((i["psnr"] is None or i["psnr"] >= 30) for i in result["images"]) / 8
    )
    assert fraction >= 0.5
    assert "recovered" in capsys.readouterr().out
    code = main(
        ["attack", "--attack", "imprint", "--images", str(folder / "class0" / "000.png"),
         "--out", str(tmp_path / "files"), "--quiet"]
    )  # fmt: skip
    assert code == 2 and "public images" in capsys.readouterr().err
    assert not (tmp_path / "files").exists()
