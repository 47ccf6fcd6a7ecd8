"""Property-based fuzzing of both CLIs' options and YAML keys (Hypothesis).

For every invalid value of every ``leakage fl`` config key (as ``--set KEY=VALUE`` and as a
YAML key), every ``--attack`` and ``--defense`` option, and every ``leakage attack`` option
and YAML key: exit code 2, exactly one line on stderr, no traceback, and no output folder left
behind (or an existing one left byte for byte as it was). Invalid input is rejected before any
training, so each example takes milliseconds; the CLIs run in process (``main(argv)``).
Examples are derandomised (the same ones on every run) and the example database is off;
``LEAKAGE_FUZZ_EXAMPLES`` and ``LEAKAGE_FUZZ_RANDOM`` make a longer, fresh hunt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

hypothesis = pytest.importorskip(
    "hypothesis", reason='needs the dev extra: pip install -e ".[dev]"'
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from defenses.config import DEFENSES  # noqa: E402
from fl_core.adversaries import ADVERSARIES  # noqa: E402
from fl_core.data import DATASETS  # noqa: E402
from fl_core.models import ACTIVATIONS, MODELS  # noqa: E402
from leakage.app.checks import MAX_SEED  # noqa: E402
from leakage.app.cli import main  # noqa: E402
from leakage.app.experiment import AttackConfig  # noqa: E402
from leakage.app.fl_cmd import ENGINES, FLConfig  # noqa: E402
from leakage.attacks import ATTACKS  # noqa: E402
from leakage.labels import LABEL_STRATEGIES  # noqa: E402
from leakage.metrics import IMAGE_METRICS, LPIPS_NETS  # noqa: E402
from leakage.simulate import THREAT_MODELS  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

_EXAMPLES = int(os.environ.get("LEAKAGE_FUZZ_EXAMPLES", "20"))  # per key or option
FUZZ = settings(  # LEAKAGE_FUZZ_EXAMPLES=500 LEAKAGE_FUZZ_RANDOM=1 for a longer, fresh hunt
    max_examples=_EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("LEAKAGE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FUZZ_MORE = settings(FUZZ, max_examples=2 * _EXAMPLES)  # one strategy for a whole option

# ----------------------------------------------------------------- invalid values, by rule

WORD = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,7}", fullmatch=True)
JUNK = st.one_of(
    st.lists(st.integers(-3, 3), min_size=1, max_size=2),
    st.dictionaries(st.sampled_from("ab"), st.integers(0, 3), min_size=1, max_size=1),
)
FRACTIONAL = st.one_of(  # near the valid whole numbers (1.5 rounds) and anywhere else
    st.builds(lambda i, f: i + f, st.integers(-3, 30), st.sampled_from([0.5, 0.25, 0.75, 0.1])),
    st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda x: not (math.isfinite(x) and x.is_integer())
    ),
)


def bad_whole(low=None, high=None, optional=False):
    """Not a whole number in [low, high] (None allowed when optional)."""
    options = [st.booleans(), WORD, st.text(max_size=4), JUNK, FRACTIONAL]
    if low is not None:
        options.append(st.integers(max_value=low - 1))
    if high is not None:
        options.append(st.integers(min_value=high + 1))
    if not optional:
        options.append(st.none())
    return st.one_of(options)


def bad_number(low=None, above=False, optional=False):
    """Not a finite number >= low (> low with ``above``)."""
    options = [st.booleans(), WORD, JUNK, st.sampled_from([math.nan, math.inf, -math.inf])]
    if low is not None:
        below = st.floats(max_value=low, allow_nan=False, allow_infinity=False)
        options.append(below.filter(lambda x: x <= low if above else x < low))
    if not optional:
        options.append(st.none())
    return st.one_of(options)


def bad_choice(valid, optional=False):
    options = [WORD.filter(lambda w: w not in valid), st.integers(), st.booleans(), JUNK]
    if not optional:
        options.append(st.none())
    return st.one_of(options)


def bad_text(optional=False):
    """Not text at all (or empty text)."""
    options = [st.integers(), st.booleans(), JUNK, st.just("")]
    if not optional:
        options.append(st.none())
    return st.one_of(options)


def _dataset_name(w: str) -> bool:
    return w.lower().replace("_", "-") in DATASETS or Path(w).exists()


def _cpu(w: str) -> bool:
    try:
        kind = torch.device(w).type
    except (RuntimeError, ValueError):
        return False
    return kind == "cpu" or (kind == "cuda" and torch.cuda.is_available())


BAD_DATASET = st.one_of(bad_text(), WORD.filter(lambda w: not _dataset_name(w)))
BAD_DEVICE = st.one_of(bad_text(), WORD.filter(lambda w: not _cpu(w)))


def render(value) -> str:
    """A value as the YAML text of a ``--set`` flag (JSON is YAML's flow style)."""
    return json.dumps(value)


# ----------------------------------------------------------------- running the CLI


def _snapshot(folder: Path):
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _rejected(argv, out: Path, before=None) -> str:
    """Run ``leakage ARGV``: exit 2, one line on stderr, no traceback, ``out`` untouched."""
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    lines = err.getvalue().splitlines()
    assert code == 2, (argv, code, err.getvalue(), std.getvalue())
    assert len(lines) == 1, (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()
    assert _snapshot(out) == before, f"{argv}: the output folder changed"
    return lines[0]


@contextlib.contextmanager
def _scratch():
    """A fresh empty working folder (relative paths in the values land there)."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            yield Path(d)
        finally:
            os.chdir(previous)


# ----------------------------------------------------------------- leakage fl

FL_BASE = {"dataset": "samples", "model": "lenet", "num_clients": 2, "local_steps": 1, "rounds": 1}

FL_BAD = {
    "dataset": BAD_DATASET,
    "data_root": bad_text(),
    "train_limit": bad_whole(1, optional=True),
    "test_limit": bad_whole(1, optional=True),
    "model": st.one_of(bad_text(), WORD.filter(lambda w: w not in MODELS.names())),
    "activation": st.one_of(bad_text(optional=True), WORD.filter(lambda w: w not in ACTIVATIONS)),
    "num_clients": bad_whole(1),
    "clients_per_round": bad_whole(1, high=FL_BASE["num_clients"], optional=True),
    "partition": bad_choice(("iid", "dirichlet")),
    "alpha": bad_number(0, above=True),
    "rounds": bad_whole(1),
    "algorithm": bad_choice(("fedavg", "fedsgd")),
    "local_steps": bad_whole(1),
    "batch_size": bad_whole(1, optional=True),
    "lr": bad_number(0, above=True),
    "momentum": bad_number(0),
    "weight_decay": bad_number(0),
    "weighting": bad_choice(("dataset", "processed")),
    "server_lr": bad_number(0, above=True),
    "eval_every": bad_whole(1),
    "attack_args": st.one_of(st.integers(), WORD, st.lists(st.integers(), min_size=1)),
    "defense_args": st.one_of(st.integers(), WORD, st.lists(st.integers(), min_size=1)),
    "seed": bad_whole(0, MAX_SEED),
    "device": BAD_DEVICE,
    "engine": bad_choice(ENGINES),
    "batched": st.one_of(WORD.filter(lambda w: w != "auto"), st.integers(), JUNK, st.none()),
    "ray_address": bad_text(optional=True),
    "out": bad_text(optional=True),
}


def test_every_fl_config_key_has_a_fuzzer():
    assert set(FL_BAD) == {f.name for f in dataclasses.fields(FLConfig)}


def _fl_flags():
    return [x for k, v in FL_BASE.items() for x in ("--set", f"{k}={render(v)}")]


@pytest.mark.parametrize("key", sorted(FL_BAD))
@FUZZ
@given(data=st.data())
def test_fl_set_rejects_every_invalid_value(key, data):
    value = data.draw(FL_BAD[key], label="value")
    with _scratch() as d:
        out = d / "out"
        flags = ["--set", f"{key}={render(value)}"]
        _rejected(["fl", *_fl_flags(), *flags, "--out", out, "--quiet"], out)


@pytest.mark.parametrize("key", sorted(FL_BAD))
@FUZZ
@given(data=st.data())
def test_fl_yaml_keys_reject_every_invalid_value(key, data):
    value = data.draw(FL_BAD[key], label="value")
    with _scratch() as d:
        out = d / "out"
        config = d / "run.yaml"
        config.write_text(yaml.safe_dump({**FL_BASE, key: value}))
        argv = ["fl", config, "--quiet"] + (["--out", out] if key != "out" else [])
        _rejected(argv, out)


def _params(pairs) -> str:
    return ",".join(f"{k}={render(v)}" for k, v in pairs)


ALNUM = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
BAD_ATTACK = st.one_of(
    # an unknown type, or a bare known one (no fraction or ids)
    ALNUM.filter(lambda w: w not in ADVERSARIES.names()),
    st.sampled_from(ADVERSARIES.names()),
    # a known type with a bad selection
    st.tuples(
        st.sampled_from(["byzantine:mode=zero", "lazy:mode=stale", "label_flip:"]),
        st.one_of(
            st.tuples(st.just("fraction"), bad_number(0)),
            st.tuples(st.just("fraction"), st.floats(min_value=1, exclude_min=True)),
            st.tuples(st.just("ids"), st.lists(st.integers(2, 9), min_size=1, max_size=2)),
            st.tuples(st.just("ids"), st.just([0, 0])),
            st.tuples(st.just("ids"), st.one_of(WORD, st.integers(), st.lists(WORD, min_size=1))),
        ),
    ).map(lambda t: f"{t[0]}{',' if not t[0].endswith(':') else ''}{_params([t[1]])}"),
    # a known type, a good selection, one bad parameter
    st.tuples(
        st.sampled_from(["byzantine:mode=zero,ids=[0]", "model_replacement:gamma=2,ids=[0]"]),
        st.one_of(
            st.tuples(st.just("rounds"), st.one_of(st.integers(), WORD, st.just([2, 1]))),
            st.tuples(st.just("rounds"), st.tuples(st.integers(max_value=-1), st.none())),
            st.tuples(ALNUM.filter(lambda w: w not in ("mode", "gamma", "ids")), st.integers()),
        ),
    ).map(lambda t: f"{t[0]},{_params([t[1]])}"),
    st.tuples(st.just("byzantine:ids=[0]"), st.tuples(st.just("mode"), bad_choice(("flip",)))).map(
        lambda t: f"{t[0]},{_params([t[1]])}"
    ),
    st.tuples(
        st.just("model_replacement:ids=[0]"),
        st.one_of(
            st.tuples(st.just("gamma"), bad_number(0, above=True)),
            st.tuples(st.just("target"), st.one_of(WORD, FRACTIONAL, st.integers(max_value=-1))),
            st.tuples(st.just("poison_fraction"), st.one_of(WORD, st.floats(min_value=1.5))),
            st.tuples(st.just("trigger"), WORD),
        ),
    ).map(lambda t: f"{t[0]},{_params([t[1]])}"),
)


@FUZZ_MORE
@given(attack=BAD_ATTACK)
def test_fl_attack_option_rejects_every_invalid_attack(attack):
    with _scratch() as d:
        out = d / "out"
        _rejected(["fl", *_fl_flags(), "--attack", attack, "--out", out, "--quiet"], out)


def _defense_parameters(name):
    return set(DEFENSES[name].parameters())


BAD_DEFENSE = st.one_of(
    st.lists(ALNUM.filter(lambda w: w not in DEFENSES), min_size=1, max_size=2),
    st.tuples(st.sampled_from(sorted(DEFENSES)), ALNUM, st.integers(0, 3))
    .filter(lambda t: t[1] not in _defense_parameters(t[0]))
    .map(lambda t: [f"{t[0]}:{t[1]}={t[2]}"]),
    st.tuples(
        st.sampled_from(["clip:max_norm", "krum:f", "trimmed_mean:beta", "weak_dp:sigma"]),
        st.one_of(WORD, JUNK, st.booleans()),
    ).map(lambda t: [f"{t[0]}={render(t[1])}"]),
    st.sampled_from(
        [
            ["krum"],
            ["clip"],
            ["dpsgd:noise_multiplier=1"],
            ["median", "clip:max_norm=1"],
            ["median", "krum:f=0"],
            ["weak_dp:sigma=0.1", "median"],
        ]
    ),
    st.sampled_from([["dpsgd:noise_multiplier=1,max_grad_norm=1"]]).map(
        lambda d: [*d, "--set", "model=resnet20"]
    ),
)


@FUZZ_MORE
@given(defenses=BAD_DEFENSE)
def test_fl_defense_option_rejects_every_invalid_defense(defenses):
    flags = []
    for item in defenses:
        flags += [item] if item.startswith("--") or flags[-1:] == ["--set"] else ["--defense", item]
    with _scratch() as d:
        out = d / "out"
        _rejected(["fl", *_fl_flags(), *flags, "--out", out, "--quiet"], out)


@pytest.fixture(scope="module")
def finished_fl_run(tmp_path_factory):
    """A tiny finished run: invalid flags must leave its folder exactly as it is."""
    out = tmp_path_factory.mktemp("fl") / "done"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fl", *_fl_flags(), "--out", str(out), "--quiet"]) == 0
    return out


@FUZZ_MORE
@given(data=st.data())
def test_invalid_fl_flags_leave_an_existing_run_as_it_was(finished_fl_run, data):
    key = data.draw(st.sampled_from(sorted(k for k in FL_BAD if k != "out")), label="key")
    value = data.draw(FL_BAD[key], label="value")
    before = _snapshot(finished_fl_run)
    with _scratch():
        argv = ["fl", *_fl_flags(), "--set", f"{key}={render(value)}", "--quiet"]
        _rejected([*argv, "--out", finished_fl_run], finished_fl_run, before)


# ----------------------------------------------------------------- leakage attack

FAST = ["--steps", "2", "--restarts", "1", "--quiet"]


def _int_option(low, high=None):
    options = [st.integers(max_value=low - 1).map(str), WORD, FRACTIONAL.map(str)]
    if high is not None:
        options.append(st.integers(min_value=high + 1).map(str))
    return st.one_of(options)


def _float_option(low, above):
    values = st.floats(max_value=low, allow_nan=False).filter(
        lambda x: x <= low if above else x < low
    )
    return st.one_of(values.map(str), st.sampled_from(["nan", "inf", "-inf"]), WORD)


def _word_not(valid):
    return WORD.filter(lambda w: w not in valid)


ATTACK_OPTIONS = {  # option -> strategy of argv lists after the option
    "--attack": _word_not(ATTACKS.names()).map(lambda w: [w]),
    "--model": _word_not(MODELS.names()).map(lambda w: [w]),
    "--activation": _word_not(ACTIVATIONS).map(lambda w: [w]),
    "--num-classes": _int_option(2).map(lambda w: [w]),
    "--dataset": WORD.filter(lambda w: not _dataset_name(w)).map(lambda w: [w]),
    "--images": WORD.map(lambda w: [f"{w}.png"]),
    "--labels": st.one_of(
        st.lists(st.integers(min_value=10), min_size=1, max_size=1),  # >= num_classes
        st.lists(st.integers(0, 9), min_size=2, max_size=3),  # more labels than images
    ).map(lambda xs: [str(x) for x in xs]),
    "--index": st.one_of(_int_option(0), st.integers(min_value=18).map(str)).map(lambda w: [w]),
    "--shape": st.one_of(
        st.tuples(st.sampled_from([0, 2, 4, -1]), st.integers(11, 40), st.integers(11, 40)),
        st.tuples(st.sampled_from([1, 3]), st.integers(-3, 10), st.integers(11, 40)),
        st.tuples(st.sampled_from([1, 3]), st.integers(11, 40), st.integers(-3, 10)),
    ).map(lambda t: [str(v) for v in t]),
    "--batch-size": _int_option(1).map(lambda w: [w]),
    "--threat": _word_not(THREAT_MODELS).map(lambda w: [w]),
    "--local-steps": _int_option(1).map(lambda w: ["--threat", "fedavg", "--local-steps", w]),
    "--local-lr": _float_option(0, above=True).map(lambda w: [w]),
    "--local-batch-size": _int_option(1).map(lambda w: [w]),
    "--clients": st.one_of(
        st.integers(2, 5).map(lambda n: [str(n)]),  # more clients than images
        _int_option(1).map(lambda w: [w]),
    ).map(lambda xs: ["--threat", "aggregate", "--clients", *xs]),
    "--label-strategy": _word_not([*LABEL_STRATEGIES.names(), "joint"]).map(lambda w: [w]),
    "--checkpoint": WORD.map(lambda w: [f"{w}.pt"]),
    "--steps": _int_option(1).map(lambda w: [w]),
    "--restarts": _int_option(1).map(lambda w: [w]),
    "--tv": _float_option(0, above=False).map(lambda w: ["--attack", "ig", "--tv", w]),
    "--defense": BAD_DEFENSE.filter(lambda d: "--set" not in d).map(
        lambda d: [x for item in d for x in ("--defense", item)]
    ),
    "--normalize": _word_not(("auto", "dataset", "none")).map(lambda w: [w]),
    "--bn-mode": _word_not(("train", "eval")).map(lambda w: [w]),
    "--precision": _word_not(("auto", "float32", "float64")).map(lambda w: [w]),
    "--metrics": _word_not(IMAGE_METRICS).map(lambda w: [w]),
    "--lpips-net": _word_not(LPIPS_NETS).map(lambda w: [w]),
    "--seed": _int_option(0, MAX_SEED).map(lambda w: [w]),
    "--device": WORD.filter(lambda w: not _cpu(w)).map(lambda w: [w]),
}


@pytest.mark.parametrize("option", sorted(ATTACK_OPTIONS))
@FUZZ
@given(data=st.data())
def test_attack_options_reject_every_invalid_value(option, data):
    tail = data.draw(ATTACK_OPTIONS[option], label="values")
    if tail[0] != option and not tail[0].startswith("--"):
        tail = [option, *tail]
    with _scratch() as d:
        out = d / "out"
        _rejected(["attack", *FAST, *tail, "--out", out], out)


ATTACK_BAD = {  # YAML key -> invalid values (any YAML type)
    "metrics": st.one_of(st.integers(), st.booleans(), JUNK, _word_not(IMAGE_METRICS)),
    "lpips_net": bad_choice(LPIPS_NETS),
    "attack": st.one_of(bad_text(), _word_not(ATTACKS.names())),
    "model": st.one_of(bad_text(), _word_not(MODELS.names())),
    "activation": st.one_of(bad_text(optional=True), _word_not(ACTIVATIONS)),
    "num_classes": bad_whole(2),
    "dataset": BAD_DATASET,
    "data_root": bad_text(),
    "download": st.one_of(st.integers(), WORD, JUNK, st.none()),
    "train_split": st.one_of(st.integers(), WORD, JUNK, st.none()),
    "images": st.one_of(WORD, st.integers(), st.lists(st.integers(), min_size=1)),
    "labels": st.one_of(WORD, st.integers(), st.lists(WORD, min_size=1)),
    "index": bad_whole(0),
    "shape": st.one_of(
        WORD, st.integers(), st.lists(st.integers(11, 40), max_size=2), st.just([3, 8, 8])
    ),
    "batch_size": bad_whole(1, optional=True),
    "threat": bad_choice(THREAT_MODELS),
    "local_steps": bad_whole(1),
    "local_lr": bad_number(0, above=True),
    "local_batch_size": bad_whole(1, optional=True),
    "clients": st.one_of(bad_whole(1, optional=True), st.integers(1, 3)),  # not aggregate
    "label_strategy": st.one_of(
        bad_text(optional=True), _word_not([*LABEL_STRATEGIES.names(), "joint"])
    ),
    "checkpoint": st.one_of(bad_text(optional=True), WORD.map(lambda w: f"{w}.pt")),
    "steps": bad_whole(1, optional=True),
    "restarts": bad_whole(1, optional=True),
    "tv": bad_number(0, optional=True),
    "bins": bad_whole(2, optional=True),
    "target_class": bad_whole(0, optional=True),
    "sample_seed": bad_whole(0, MAX_SEED, optional=True),
    "defenses": st.one_of(st.integers(), WORD, st.lists(st.integers(), min_size=1)),
    "precision": bad_choice(("auto", "float32", "float64")),
    "normalize": bad_choice(("auto", "dataset", "none")),
    "bn_mode": bad_choice(("train", "eval")),
    "seed": bad_whole(0, MAX_SEED),
    "device": BAD_DEVICE,
    "out": bad_text(optional=True),
}


def test_every_attack_config_key_has_a_fuzzer():
    assert set(ATTACK_BAD) == {f.name for f in dataclasses.fields(AttackConfig)}


@pytest.mark.parametrize("key", sorted(ATTACK_BAD))
@FUZZ
@given(data=st.data())
def test_attack_yaml_keys_reject_every_invalid_value(key, data):
    value = data.draw(ATTACK_BAD[key], label="value")
    with _scratch() as d:
        out = d / "out"
        config = d / "attack.yaml"
        config.write_text(yaml.safe_dump({"steps": 2, "restarts": 1, key: value}))
        argv = ["attack", "--config", config, "--quiet"] + (["--out", out] if key != "out" else [])
        _rejected(argv, out)


@FUZZ_MORE
@given(data=st.data())
def test_invalid_attack_options_leave_an_existing_folder_as_it_was(data):
    option = data.draw(st.sampled_from(sorted(ATTACK_OPTIONS)), label="option")
    tail = data.draw(ATTACK_OPTIONS[option], label="values")
    if tail[0] != option and not tail[0].startswith("--"):
        tail = [option, *tail]
    with _scratch() as d:
        out = d / "kept"
        out.mkdir()
        (out / "results.json").write_text('{"earlier": "run"}\n')
        _rejected(["attack", *FAST, *tail, "--out", out], out, _snapshot(out))
