"""The malicious server: what it recovers against batch size, bins and clients, and
which defenses stop it.

Threat model: a *malicious* server (it sends a model built to leak; the
clients' computation, their defenses and secure aggregation are untouched,
see :mod:`fl_core.malicious`). Attacks: ``imprint`` (Fowl et al., "Robbing
the Fed", ICLR 2022), ``trap`` (trap weights, Boenisch et al., EuroS&P 2023)
and ``fishing`` (class fishing, Wen et al., ICML 2022). Victims: the lab's
``cnn`` (untrained, CIFAR-10 input normalisation) for imprint and trap, which
put their block in front of it; the ReLU ``mlp`` (3072 -> 1024 -> 1024 -> 10)
for fishing, whose fished aggregate is read by the first layer's closed form.

Data: the CIFAR-10 test split (``--data``), split once with a seeded
permutation into 5,000 *reference* images (the public data the server sets
its bins and rows on) and 5,000 images the clients' batches are drawn from,
one seeded draw per trial. An image counts as recovered at PSNR >= 30 dB
after matching (``summary.recovered_fraction`` of ``leakage attack``) and as
exact at >= 60 dB. Imprint's closed-form expectation (1 - 1/k)^(n - 1)
(:func:`fl_core.malicious.expected_imprint_recovery`) is printed beside it.

Sweeps: ``batch`` (imprint with 128 bins and trap with 1,024 rows at rate
1/B, against the batch size B), ``bins`` (imprint at B = 64), ``clients``
(imprint's 64 images split among K clients behind secure aggregation, so the
server sees only the sum; fishing against K clients of one image each, the
target being client 0's class), and ``defenses`` (each attack in its
headline setting against local noise, clipping, DP-SGD with its ε, secure
aggregation and model inspection; imprint and trap also as a *loud* server,
whose block weighs :data:`LOUD` on the way back to the input so that its
gradients rise above the clients' noise).

Records go to ``<out>/records.jsonl`` as each run finishes (a rerun
resumes); ``<out>/summary.md`` and ``<out>/malicious_server.png`` are rebuilt
from them.

    python benchmarks/malicious_server.py --data ../shared/datasets/cifar10/test \\
        --out benchmarks/results/malicious_server
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_core import build_model, load_dataset  # noqa: E402
from fl_core.data import NORMALIZATION  # noqa: E402
from fl_core.malicious import expected_imprint_recovery  # noqa: E402
from leakage import ATTACKS, score_images  # noqa: E402
from leakage.app.experiment import RECOVERED_PSNR, AttackConfig, observe_round  # noqa: E402
from leakage.app.store import append_record, load_records, write_atomic  # noqa: E402

EXACT_PSNR = 60.0
REFERENCE = 5000

DEFENSES = {
    "none": [],
    "gaussian 1e-4": [{"gaussian": {"sigma": 1e-4}}],
    "gaussian 1e-2": [{"gaussian": {"sigma": 1e-2}}],
    "clip 1": [{"clip": {"max_norm": 1.0}}],
    **{
        f"dpsgd σ={s:g}": [{"dpsgd": {"noise_multiplier": s, "max_grad_norm": 1.0}}]
        for s in (0.001, 0.01, 0.1, 1.0)
    },
    "secure aggregation (8 clients)": "aggregate",
    "inspect": [{"inspect": {}}],
}
LOUD = 1e5
"""A loud server's block weight back to the input (``spread``): its gradients rise
far above the clients' noise; the victim's forward pass is disturbed, which a
malicious round, whose updates are not applied, does not mind. On a sigmoid
victim it saturates the activations instead, so the loud rows go with ``cnn-relu``."""
HEADLINE = {
    "imprint": dict(attack="imprint", options={"bins": 128}, batch=64, clients=1, victim="cnn"),
    "imprint loud": dict(attack="imprint", options={"bins": 128, "spread": LOUD}, batch=64,
                         clients=1, victim="cnn-relu"),
    "trap": dict(attack="trap", options={"bins": 1024, "rate": 1 / 64}, batch=64, clients=1,
                 victim="cnn"),
    "trap loud": dict(attack="trap", options={"bins": 1024, "rate": 1 / 64, "spread": LOUD},
                      batch=64, clients=1, victim="cnn-relu"),
    "fishing": dict(attack="fishing", options={}, batch=8, clients=8, victim="mlp"),
}  # fmt: skip
DEFENSE_TRIALS = 3


def cells(trials: int) -> list[dict]:
    """Every run of the benchmark: sweep, attack, options, batch, clients, defense, trial."""
    out = []

    def add(sweep, attack, options, batch, clients=1, victim="cnn", defense="none", n=trials):
        for t in range(n):
            out.append(dict(sweep=sweep, attack=attack, options=options, batch=batch,
                            clients=clients, victim=victim, defense=defense, trial=t))  # fmt: skip

    for b in (8, 16, 32, 64, 128, 256):
        add("batch", "imprint", {"bins": 128}, b)
    for b in (16, 32, 64, 128):
        add("batch", "trap", {"bins": 1024, "rate": 1 / b}, b)
    for k in (16, 32, 64, 128, 256, 512):
        add("bins", "imprint", {"bins": k}, 64)
    for c in (1, 8, 32):
        add("clients", "imprint", {"bins": 128}, 64, clients=c)
    for c in (2, 4, 8, 16, 32):
        add("clients", "fishing", {}, c, clients=c, victim="mlp")
    for name, h in HEADLINE.items():
        for defense in DEFENSES:
            if name == "fishing" and defense.startswith("secure"):
                continue  # fishing's headline is already the secure aggregate of 8
            clients = 8 if defense.startswith("secure") else h["clients"]
            add("defenses", h["attack"], h["options"], h["batch"], clients, h["victim"], defense,
                n=min(trials, DEFENSE_TRIALS))  # fmt: skip
    return out


def key(cell: dict) -> str:
    return json.dumps({k: cell[k] for k in sorted(cell)}, sort_keys=True)


def draw(pool_size: int, cell: dict) -> list[int]:
    """The trial's batch: a seeded draw from the clients' pool (same images across sweeps)."""
    g = torch.Generator().manual_seed(1000 + cell["trial"])
    # fishing: client 0 (the target) holds the first image; the draw is not filtered, so
    # the target's class may repeat among the other clients, as in a real round
    return torch.randperm(pool_size, generator=g)[: cell["batch"]].tolist()


def run_one(cell: dict, data, pool: list[int], reference: torch.Tensor) -> dict:
    idx = [pool[i] for i in draw(len(pool), cell)]
    batch = data.subset(idx)
    name, _, act = cell["victim"].partition("-")
    victim_kw = {"activation": "relu"} if name == "mlp" or act == "relu" else {}
    model = build_model(
        name,
        normalize=NORMALIZATION["cifar10"],
        generator=torch.Generator().manual_seed(0),
        **victim_kw,
    )
    options = dict(cell["options"])
    if cell["attack"] == "fishing":
        options["target"] = int(batch.labels[0])
    attack = ATTACKS.build(cell["attack"], **options)
    defense = DEFENSES[cell["defense"]]
    clients = cell["clients"]
    threat = "aggregate" if clients > 1 else "fedsgd"
    cfg = AttackConfig(
        attack=cell["attack"],
        model=name,
        batch_size=cell["batch"],
        threat=threat,
        clients=clients if clients > 1 else None,
        defenses=tuple(defense) if isinstance(defense, list) else (),
    )
    modification = attack.modification(reference)
    start = time.perf_counter()
    obs, gt, wrapped, plan = observe_round(cfg, model, batch, modification)
    observed = time.perf_counter() - start
    start = time.perf_counter()
    rec = attack.reconstruct(obs, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    scores = score_images(rec.images, gt.images, data_range=1.0, candidates=rec.candidates)
    psnr = [float(p) if math.isfinite(p) else 999.0 for p in scores.psnr.tolist()]
    record = {
        **cell,
        "key": key(cell),
        "recovered": sum(p >= RECOVERED_PSNR for p in psnr) / len(psnr),
        "exact": sum(p >= EXACT_PSNR for p in psnr) / len(psnr),
        "psnr": psnr,
        "candidates": rec.candidates,
        "options_out": {k: v for k, v in rec.options.items() if isinstance(v, (int, float, str))},
        "seconds_attack": seconds,
        "seconds_round": observed,
    }
    if cell["attack"] == "imprint":
        record["expected"] = expected_imprint_recovery(cell["options"]["bins"], cell["batch"])
    if cell["attack"] == "fishing":
        labels = batch.labels.tolist()
        record["target_psnr"] = psnr[0]
        record["target_unique"] = labels.count(labels[0]) == 1
    refusals = [c for c in wrapped if hasattr(c, "refusals")]
    if refusals:
        record["refused"] = sum(bool(c.refusals) for c in refusals) / len(refusals)
    if plan.client_wrapper is not None:
        from defenses.dpsgd import privacy_report

        record["epsilon"] = privacy_report(wrapped, plan.delta)["epsilon"]
    return record


def mean(xs):
    return statistics.fmean(xs) if xs else math.nan


def summarize(records: list[dict], args) -> str:
    by: dict[tuple, list[dict]] = {}
    for r in records:
        k = (r["sweep"], r["attack"], json.dumps(r["options"], sort_keys=True), r["batch"],
             r["clients"], r["defense"], r["victim"])  # fmt: skip
        by.setdefault(k, []).append(r)
    lines = [
        "# The malicious server: recovered share of the batch (CIFAR-10 test images)",
        "",
        "Threat model: malicious server (it sends a modified model; the clients' code, "
        "defenses and secure aggregation are unchanged). Recovered: PSNR >= 30 dB after "
        "matching; exact: >= 60 dB. Victims (untrained, CIFAR-10 input normalisation): "
        "`cnn` (sigmoid) and `cnn-relu` behind the imprint or trap block, ReLU `mlp` "
        "(fishing). `spread` is the block's weight back to the input: 0.001 by default "
        f"(the victim barely changes), {LOUD:g} for a loud server that lifts the block's "
        "gradients above the clients' noise. Reference (the server's public data): 5,000 "
        "test images disjoint from the clients' 5,000. "
        f"{args.trials} seeded batches per row ({DEFENSE_TRIALS} in the defense table). "
        "ε: DP-SGD's for the one step attacked (sample rate 1, δ = 1e-5). Command: "
        f"`python benchmarks/malicious_server.py --data <cifar10/test> --trials {args.trials}` "
        "(2 torch threads).",
        "",
    ]

    def table(sweep, title, columns):
        rows = [(k, v) for k, v in by.items() if k[0] == sweep]
        if not rows:
            return
        lines.extend([f"## {title}", "", "| " + " | ".join(c[0] for c in columns) + " |",
                      "|" + "|".join("--:" if c[2] else "---" for c in columns) + "|"])  # fmt: skip
        for k, rs in rows:
            lines.append("| " + " | ".join(c[1](k, rs) for c in columns) + " |")
        lines.append("")

    opt = lambda k, rs: ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}"  # noqa: E731
                                  for a, b in json.loads(k[2]).items()) or "-"  # fmt: skip
    pct = lambda f: lambda k, rs: f"{100 * mean([f(r) for r in rs]):.1f}%"  # noqa: E731
    expected = lambda k, rs: (  # noqa: E731
        f"{100 * rs[0]['expected']:.1f}%" if "expected" in rs[0] else "-"
    )
    secs = lambda k, rs: f"{mean([r['seconds_attack'] for r in rs]):.3f}"  # noqa: E731
    common = [
        ("attack", lambda k, rs: k[1], False),
        ("options", opt, False),
        ("victim", lambda k, rs: k[6], False),
        ("batch", lambda k, rs: str(k[3]), True),
        ("clients", lambda k, rs: str(k[4]), True),
        ("recovered", pct(lambda r: r["recovered"]), True),
        ("exact", pct(lambda r: r["exact"]), True),
        ("closed form", expected, True),
        ("s / attack", secs, True),
    ]
    table("batch", "Against the batch size", common)
    table("bins", "Imprint against the number of bins (batch 64)", common)
    fish = [
        ("target PSNR dB (mean)", lambda k, rs: f"{mean([r.get('target_psnr', math.nan) for r in rs]):.1f}", True),  # noqa: E501
        ("target >= 25 dB", pct(lambda r: r.get("target_psnr", 0) >= 25), True),
        ("target class alone in the round", pct(lambda r: r.get("target_unique", False)), True),
    ]  # fmt: skip
    table("clients", "Against the number of clients behind secure aggregation",
          common[:7] + fish + common[8:])  # fmt: skip

    def fished(k, rs):
        return pct(lambda r: r.get("target_psnr", 0) >= 25)(k, rs) if k[1] == "fishing" else "-"

    def refused(k, rs):
        return pct(lambda r: r["refused"])(k, rs) if "refused" in rs[0] else "-"

    def epsilon(k, rs):
        return f"{rs[0]['epsilon']:.3g}" if "epsilon" in rs[0] else "-"

    defended = [
        ("defense", lambda k, rs: k[5], False),
        *common[:3],
        ("clients", lambda k, rs: str(k[4]), True),
        ("recovered", pct(lambda r: r["recovered"]), True),
        ("exact", pct(lambda r: r["exact"]), True),
        ("fishing target >= 25 dB", fished, True),
        ("refused", refused, True),
        ("ε (δ=1e-5)", epsilon, True),
    ]
    table("defenses", "Defenses (each attack in its headline setting)", defended)
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    def series(sweep, attack, x):
        pts: dict[int, list[dict]] = {}
        for r in records:
            if r["sweep"] == sweep and r["attack"] == attack:
                pts.setdefault(x(r), []).append(r)
        xs = sorted(pts)
        return xs, [pts[v] for v in xs]

    ax = axes[0]
    for attack, style in (("imprint", "o-"), ("trap", "s-")):
        xs, groups = series("batch", attack, lambda r: r["batch"])
        if xs:
            ax.plot(xs, [100 * mean([r["recovered"] for r in g]) for g in groups], style,
                    label=f"{attack} (measured)")  # fmt: skip
    xs, groups = series("batch", "imprint", lambda r: r["batch"])
    if xs:
        ax.plot(xs, [100 * g[0]["expected"] for g in groups], "k--", label="imprint closed form")
    ax.set(xscale="log", xlabel="batch size", ylabel="recovered (%)", title="one client, FedSGD")
    ax.legend(fontsize=8)
    ax = axes[1]
    xs, groups = series("bins", "imprint", lambda r: r["options"]["bins"])
    if xs:
        ax.plot(xs, [100 * mean([r["recovered"] for r in g]) for g in groups], "o-",
                label="measured")  # fmt: skip
        ax.plot(xs, [100 * g[0]["expected"] for g in groups], "k--", label="closed form")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.minorticks_off()
    ax.set(xlabel="imprint bins", ylabel="recovered (%)", title="imprint, batch 64")
    ax.legend(fontsize=8)
    ax = axes[2]
    xs, groups = series("clients", "fishing", lambda r: r["clients"])
    if xs:
        ax.plot(xs, [100 * mean([r["target_psnr"] >= 25 for r in g]) for g in groups], "o-",
                label="fishing: target >= 25 dB")  # fmt: skip
        ax.plot(xs, [100 * mean([r["target_unique"] for r in g]) for g in groups], "k:",
                label="target class alone")  # fmt: skip
    xs, groups = series("clients", "imprint", lambda r: r["clients"])
    if xs:
        ax.plot(xs, [100 * mean([r["recovered"] for r in g]) for g in groups], "s-",
                label="imprint (64 images) recovered")  # fmt: skip
    ax.set(xscale="log", xlabel="clients behind secure aggregation", ylabel="%",
           title="through secure aggregation")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    from leakage.app.store import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/datasets/cifar10/test"),
                   help="CIFAR-10 test split as class folders")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results/malicious_server")
    p.add_argument("--trials", type=int, default=5, help="seeded batches per setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweeps", nargs="+", default=["batch", "bins", "clients", "defenses"])
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error("--trials must be a positive whole number")
    if not Path(args.data).is_dir():
        p.error(f"--data {args.data} is not a folder of class sub-folders (CIFAR-10 test split)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    if len(data) < REFERENCE + 256:
        p.error(f"--data holds {len(data)} images; this benchmark needs {REFERENCE + 256}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    reference = data.images[torch.tensor(order[:REFERENCE])]
    pool = order[REFERENCE:]
    path = out / "records.jsonl"
    done = {r["key"] for r in load_records(path)}
    todo = [c for c in cells(args.trials) if c["sweep"] in args.sweeps and key(c) not in done]
    for i, cell in enumerate(todo):
        record = run_one(cell, data, pool, reference)
        append_record(path, record)
        print(f"[{i + 1}/{len(todo)}] {cell['sweep']} {cell['attack']} B={cell['batch']} "
              f"K={cell['clients']} {cell['defense']}: recovered {record['recovered']:.2f}",
              flush=True)  # fmt: skip
    records = [r for r in load_records(path)]
    write_atomic(out / "summary.md", summarize(records, args) + "\n")
    plot(records, out / "malicious_server.png")
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
