"""Tests for ``fl_core.batched``: many clients' updates in one vmapped call.

Expected values come from the general loop path: ``Client.compute_update`` on
a fresh copy of the global model per client, with a generator of the same
seed, exactly as the server's round loop runs it. The SGD step is checked
against ``torch.optim.SGD`` itself. Tolerances: float32 results reached by a
different order of the same operations (vmapped grouped convolutions, batched
matrix products) agree to a few units of 1e-7 relative to the tensor's scale;
1e-5 leaves room for the FedAvg steps compounding them.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_core import Client, GroundTruth, LocalTraining, Update, build_model
from fl_core.adversaries import Byzantine
from fl_core.batched import batchable, compute_updates, group_gradients, sgd_step

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SHAPE = (3, 12, 12)  # small images keep the tests fast; every batchable victim takes any size
REL_TOL = 1e-5  # max |batched - loop| / max |loop| per tensor, float32
MODELS = ["lenet", "cnn", "mlp"]
OPTIONS = {"mlp": {"width": 32}}  # the default width 1024 is slow and adds nothing here


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(name: str = "lenet", seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> nn.Module:
    options = OPTIONS.get(name, {})
    return build_model(name, num_classes=10, in_shape=shape, generator=_gen(seed), **options)


def _clients(
    sizes: list[int], trainings: list[LocalTraining], shape: tuple[int, int, int] = SHAPE
) -> list[Client]:
    out = []
    for i, (n, training) in enumerate(zip(sizes, trainings, strict=True)):
        g = _gen(1000 + i)
        x, y = torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
        out.append(Client(10 + i, x, y, training=training))  # ids unlike positions
    return out


def _loop(model: nn.Module, clients: list[Client], seeds: list[int], round: int):
    """The reference: each client on a fresh copy of the model, as the server's loop."""
    gens = [_gen(s) for s in seeds]
    results = [
        c.compute_update(copy.deepcopy(model), round=round, generator=g)
        for c, g in zip(clients, gens)
    ]
    return results, gens


def _batched(model: nn.Module, clients: list[Client], seeds: list[int], round: int, **kw):
    gens = [_gen(s) for s in seeds]
    return compute_updates(model, clients, round=round, generators=gens, **kw), gens


def _assert_same(got: list[tuple[Update, GroundTruth]], want: list[tuple[Update, GroundTruth]]):
    assert len(got) == len(want)
    for (u, t), (v, s) in zip(got, want):
        assert (u.kind, u.num_samples, u.client_id, u.round) == (
            v.kind,
            v.num_samples,
            v.client_id,
            v.round,
        )
        assert u.buffers == v.buffers == ()
        assert len(u.tensors) == len(v.tensors)
        for a, b in zip(u.tensors, v.tensors):
            assert a.shape == b.shape and a.dtype == b.dtype and not a.requires_grad
            scale = float(b.abs().max())
            assert scale > 0
            # a delta θ_local - θ_global keeps the rounding of θ (float32, |θ| < 1):
            # half an ulp of numbers in [0.125, 0.25) is 7.5e-9, whatever the delta's size
            floor = 1.5e-8 if u.kind == "delta" else 0.0
            assert float((a - b).abs().max()) <= REL_TOL * scale + floor
        # the same batches were drawn: the ground truths are identical
        assert torch.equal(t.images, s.images) and torch.equal(t.labels, s.labels)
        assert (t.client_id, t.round) == (s.client_id, s.round)


# ---------------------------------------------------------------- equality with the loop


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", MODELS)
def test_fedsgd_matches_loop(name, chunk_size):
    model = _model(name)
    # unequal data; effective batch sizes 4, 9 (None: all data), 3 (batch > data), 4, 5
    sizes = [7, 9, 3, 12, 5]
    batch_sizes = [4, None, 8, 4, None]
    clients = _clients(sizes, [LocalTraining("fedsgd", batch_size=b) for b in batch_sizes])
    seeds = list(range(5))
    want, gens_loop = _loop(model, clients, seeds, round=3)
    got, gens_batched = _batched(model, clients, seeds, round=3, chunk_size=chunk_size)
    _assert_same(got, want)
    assert [u.num_samples for u, _ in got] == [4, 9, 3, 4, 5]
    for a, b in zip(gens_batched, gens_loop):  # generators end in the loop's state
        assert torch.equal(a.get_state(), b.get_state())


class _Reused(nn.Module):
    """One Linear layer applied twice: per-group sums of its one recorded call would
    be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.inner = nn.Linear(3 * 12 * 12, 3 * 12 * 12)
        torch.nn.init.normal_(self.inner.weight, std=0.02, generator=_gen(4))
        self.head = nn.Linear(3 * 12 * 12, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(self.flat(x))))))


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_group_gradients_equal_each_groups_own_gradient(name, create_graph):
    """One pass over three groups of samples gives, per group, what autograd gives
    for that group's loss alone (the per-restart FedSGD gradients of a simulation)."""
    model = _model(name)
    g = _gen(7)
    x = torch.rand(3 * 4, *SHAPE, generator=g, requires_grad=create_graph)
    y = torch.randint(0, 10, (3 * 4,), generator=g)
    weights = torch.tensor([1.0, 0.5, 2.0]).repeat_interleave(4)  # a weight per sample

    def loss(logits):
        return (weights * F.cross_entropy(logits, y, reduction="none")).sum()

    got = group_gradients(model, x, loss, 3, create_graph=create_graph)
    params = list(model.parameters())
    for k in range(3):
        part = slice(4 * k, 4 * k + 4)
        own = (weights[part] * F.cross_entropy(model(x[part]), y[part], reduction="none")).sum()
        want = torch.autograd.grad(own, params)
        for (name_, tensor), w in zip(got.items(), want, strict=True):
            torch.testing.assert_close(tensor[k], w, rtol=1e-5, atol=1e-6, msg=name_)
    if create_graph:  # differentiable in the data, as gradient matching needs
        first = next(iter(got.values()))
        (dx,) = torch.autograd.grad(first.square().sum(), x)
        assert dx.shape == x.shape and float(dx.abs().max()) > 0


def test_group_gradients_refuse_a_reused_layer():
    """A layer applied twice records one input: its per-group sums would be wrong."""
    x = torch.rand(4, *SHAPE, generator=_gen(0))
    y = torch.randint(0, 10, (4,), generator=_gen(1))

    def loss(logits):
        return F.cross_entropy(logits, y, reduction="sum")

    assert group_gradients(_Reused(), x, loss, 2) is None
    assert group_gradients(_model("resnet20"), x, loss, 2) is None  # BatchNorm parameters
    assert group_gradients(_model("lenet"), x, loss, 3) is None  # 4 samples in 3 groups


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 1e-3)])
@pytest.mark.parametrize("name", MODELS)
def test_fedavg_matches_loop(name, momentum, weight_decay):
    model = _model(name, seed=1)
    a = LocalTraining(
        "fedavg", batch_size=3, local_steps=4, lr=0.1, momentum=momentum, weight_decay=weight_decay
    )
    b = LocalTraining("fedavg", batch_size=None, local_steps=2, lr=0.05, momentum=momentum)
    clients = _clients([7, 10, 5, 2, 4], [a, a, b, a, b])  # client 3: batch 2 (all its data)
    seeds = [5, 6, 7, 8, 9]
    want, gens_loop = _loop(model, clients, seeds, round=1)
    got, gens_batched = _batched(model, clients, seeds, round=1, chunk_size=2)
    _assert_same(got, want)
    for c, (u, _) in zip(clients, got):  # unique samples seen, as the protocol says
        assert u.num_samples == c.protocol().num_samples
    for x, y in zip(gens_batched, gens_loop):
        assert torch.equal(x.get_state(), y.get_state())


def test_mixed_algorithms_keep_client_order_and_generator_state():
    model = _model("lenet", seed=2)
    sgd = LocalTraining("fedsgd", batch_size=2)
    avg = LocalTraining("fedavg", batch_size=2, local_steps=3, lr=0.2, momentum=0.5)
    # same batch size and steps, other lr, momentum, weight decay: a group of its own
    other = LocalTraining("fedavg", batch_size=2, local_steps=3, lr=0.05, weight_decay=0.1)
    clients = _clients([5, 6, 4, 8, 5], [avg, sgd, other, sgd, avg])
    seeds = [3, 1, 4, 1, 5]  # two clients with equal seeds still use their own generators
    want, gens_loop = _loop(model, clients, seeds, round=7)
    got, gens_batched = _batched(model, clients, seeds, round=7)
    assert [u.kind for u, _ in got] == ["delta", "gradient", "delta", "gradient", "delta"]
    assert [u.client_id for u, _ in got] == [10, 11, 12, 13, 14]
    _assert_same(got, want)
    for x, y in zip(gens_batched, gens_loop):
        assert torch.equal(x.get_state(), y.get_state())


def test_global_model_and_its_mode_are_left_alone():
    model = _model("cnn").eval()
    before = [p.detach().clone() for p in model.parameters()]
    training = LocalTraining("fedavg", batch_size=2, local_steps=2, lr=0.5, momentum=0.9)
    clients = _clients([4, 4], [training, training])
    got, _ = _batched(model, clients, [0, 1], round=0)
    assert not model.training and not any(m.training for m in model.modules())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert any(float(t.abs().max()) > 0 for t in got[0][0].tensors)  # it did train


def test_updates_do_not_share_storage():
    model = _model("lenet")
    clients = _clients([3, 3], [LocalTraining("fedsgd")] * 2)
    (u0, _), (u1, _) = compute_updates(model, clients, generators=[_gen(0), _gen(1)])
    # an independent copy of the source tensors, not ``Update.flat`` (a cached property:
    # once computed it would compare a stale copy with itself)
    kept = [t.clone() for t in u1.tensors]
    for t in u0.tensors:
        t.zero_()  # a defense working in place on one client's update
    assert all(torch.equal(t, k) for t, k in zip(u1.tensors, kept))
    assert any(bool(k.ne(0).any()) for k in kept)  # there was something to overwrite
    storage = {t.untyped_storage().data_ptr() for t in u0.tensors}
    assert not storage & {t.untyped_storage().data_ptr() for t in u1.tensors}


def test_empty_client_list():
    assert compute_updates(_model(), [], generators=[]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_cuda_matches_loop(algorithm):
    model = _model("lenet").to("cuda")
    training = LocalTraining(algorithm, batch_size=3, local_steps=2, lr=0.1, momentum=0.9)
    clients = _clients([5, 7, 3], [training] * 3)  # data stays on the CPU, as in the loop
    want, _ = _loop(model, clients, [0, 1, 2], round=0)
    got, _ = _batched(model, clients, [0, 1, 2], round=0)
    assert all(t.is_cuda for u, _ in got for t in u.tensors)
    _assert_same(got, want)


# ---------------------------------------------------------------- the SGD step


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.8, 0.05)])
def test_sgd_step_is_torch_optim_sgd(momentum, weight_decay):
    g = _gen(0)
    start = torch.randn(4, 3, generator=g)
    grads = [torch.randn(4, 3, generator=g) for _ in range(3)]
    reference = start.clone().requires_grad_()
    opt = torch.optim.SGD([reference], lr=0.3, momentum=momentum, weight_decay=weight_decay)
    params, buffers = {"w": start.clone()}, {}
    for gi in grads:
        reference.grad = gi.clone()
        opt.step()
        sgd_step(params, {"w": gi}, buffers, lr=0.3, momentum=momentum, weight_decay=weight_decay)
    torch.testing.assert_close(params["w"], reference.detach(), rtol=0, atol=1e-6)
    assert (buffers != {}) == (momentum != 0)


# ---------------------------------------------------------------- batchable and input checks


class _WithDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 12 * 12, 10)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x.flatten(1)))


def test_batchable():
    (client,) = _clients([4], [LocalTraining("fedsgd")])
    for name in MODELS:
        assert batchable(_model(name), client)
    assert not batchable(_model("lenet"), Byzantine(client, mode="flip"))
    assert not batchable(_model("resnet20"), client)  # BatchNorm
    assert not batchable(_WithDropout(0.5), client)
    assert batchable(_WithDropout(0.0), client)
    # batch statistics without running statistics: no float buffers, still per-batch state
    norm = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 12 * 12, 10), nn.BatchNorm1d(10, track_running_stats=False)
    )
    assert not list(norm.buffers()) and not batchable(norm, client)
    with_buffer = _WithDropout(0.0)
    with_buffer.register_buffer("scale", torch.ones(1))  # a float buffer training might change
    assert not batchable(with_buffer, client)


def test_frozen_parameter_is_not_batchable():
    (client,) = _clients([4], [LocalTraining("fedsgd")])
    model = _model("lenet")
    next(model.parameters()).requires_grad_(False)
    assert not batchable(model, client)


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("adversary", "Byzantine"),
        ("resnet20", "BatchNorm"),
        ("shapes", "mixed input shapes"),
        ("spec", "mixed input shapes"),
        ("generators", "one per client"),
        ("chunk", "chunk_size"),
    ],
)
def test_input_checks(case, fragment):
    clients = _clients([4, 5], [LocalTraining("fedsgd")] * 2)
    model, gens, kw = _model("lenet"), [_gen(0), _gen(1)], {}
    if case == "adversary":
        clients[1] = Byzantine(clients[1], mode="zero")
    elif case == "resnet20":
        model = _model("resnet20")
    elif case == "shapes":
        clients += _clients([4], [LocalTraining("fedsgd")], shape=(3, 16, 16))
        gens.append(_gen(2))
    elif case == "spec":
        clients = _clients([4, 5], [LocalTraining("fedsgd")] * 2, shape=(1, 12, 12))
    elif case == "generators":
        gens = gens[:1]
    else:
        kw = {"chunk_size": 0}
    with pytest.raises(ValueError, match=fragment) as info:
        compute_updates(model, clients, generators=gens, **kw)
    assert "\n" not in str(info.value)
    assert all(g.get_state().equal(_gen(i).get_state()) for i, g in enumerate(gens))  # no draws


# --------------------------------------------------------------------------- in the server


def _assert_close(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        assert float((a - b).abs().max()) <= REL_TOL * max(float(b.abs().max()), 1e-3)


def _noise(update: Update, *, generator: torch.Generator) -> Update:
    """A client-side defense drawing from the client's generator after its computation."""
    return update.with_tensors(
        [t + 0.01 * torch.randn(t.shape, generator=generator) for t in update.tensors]
    )


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_server_rounds_match_between_batched_and_loop(algorithm):
    from fl_core import Server

    training = LocalTraining(algorithm, batch_size=3, local_steps=2, lr=0.1, momentum=0.5)
    runs = {}
    for engine in ("loop", "batched"):
        clients = _clients([5, 4, 6, 5, 3], [training] * 5)
        clients[2] = Byzantine(clients[2], mode="random")  # a wrapped client: the loop path
        seen: list = []
        server = Server(_model("lenet"), clients, clients_per_round=4, seed=3, engine=engine,
                        client_defenses=[_noise], listeners=[seen.append])  # fmt: skip
        for _ in range(2):
            server.run_round()
        runs[engine] = (seen, [p.detach().clone() for p in server.model.parameters()])
    (loop_seen, loop_params), (vmap_seen, vmap_params) = runs["loop"], runs["batched"]
    assert [(o.round, o.client_id) for o in vmap_seen] == [
        (o.round, o.client_id) for o in loop_seen
    ]
    for a, b in zip(loop_seen, vmap_seen):
        _assert_close(a.update.tensors, b.update.tensors)
    _assert_close(loop_params, vmap_params)
    initial = [p.detach() for p in _model().parameters()]
    assert max(float((p - q).abs().max()) for p, q in zip(loop_params, initial)) > 0


@pytest.mark.slow  # compiles four graphs: ~1 minute on 2 CPU cores
@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_compiled_engine_matches_loop(algorithm):
    """torch.compile reorders the float arithmetic only: the loop's updates to tolerance."""
    training = LocalTraining(algorithm, batch_size=3, local_steps=2, lr=0.1, momentum=0.5)
    clients = _clients([5, 4, 6, 3], [training] * 4)
    seeds = [5, 6, 7, 8]
    want, gens_loop = _loop(_model("lenet"), clients, seeds, round=2)
    got, gens_compiled = _batched(_model("lenet"), clients, seeds, round=2, compile=True)
    _assert_same(got, want)
    for x, y in zip(gens_compiled, gens_loop):
        assert torch.equal(x.get_state(), y.get_state())


def test_compiled_engine_runs_eager_where_compilation_fails(monkeypatch):
    """One warning per server, then exactly the batched engine's numbers."""
    from fl_core import Server

    def broken(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler")

        return call

    training = LocalTraining("fedsgd", batch_size=3)
    params = {}
    for engine in ("batched", "compiled"):
        server = Server(_model(), _clients([4, 5, 3], [training] * 3), seed=1, engine=engine)
        if engine == "compiled":
            monkeypatch.setattr(torch, "compile", broken)
            with pytest.warns(RuntimeWarning, match="no C.. compiler.*engine runs eager"):
                server.run_round()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the second round does not warn again
                server.run_round()
        else:
            server.run_round()
            server.run_round()
        params[engine] = [p.detach().clone() for p in server.model.parameters()]
    for a, b in zip(params["batched"], params["compiled"]):
        assert torch.equal(a, b)


def test_compiled_cache_follows_the_model_it_is_given(monkeypatch):
    """A cache kept across calls never runs another model's functions."""

    def broken(fn, **_):  # no compilation: the cached eager functions decide the result
        def call(*args):
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    clients = _clients([4, 5], [LocalTraining("fedsgd", batch_size=3)] * 2)
    cache: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _batched(_model("lenet"), clients, [1, 2], round=0, compile=True, compiled=cache)
        got, _ = _batched(_model("cnn"), clients, [1, 2], round=0, compile=True, compiled=cache)
    want, _ = _batched(_model("cnn"), clients, [1, 2], round=0)
    for (u, _), (v, _) in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(u.tensors, v.tensors))


def test_server_auto_engine_batches_only_on_cuda():
    from fl_core import Server

    clients = _clients([4, 4], [LocalTraining("fedsgd")] * 2)
    assert Server(_model(), clients, engine="auto")._batchable(clients) == []
    assert len(Server(_model(), clients, engine="batched")._batchable(clients)) == 2
    with pytest.raises(ValueError, match="unknown engine 'vmap'; valid: auto, batched, compiled"):
        Server(_model(), clients, engine="vmap")


def test_batchable_clients_keeps_plain_clients_in_order():
    from fl_core.batched import batchable_clients

    clients = _clients([4, 4, 4], [LocalTraining("fedsgd")] * 3)
    mixed = [clients[0], Byzantine(clients[1], mode="zero"), clients[2]]
    assert batchable_clients(_model(), mixed) == [clients[0], clients[2]]
    assert batchable_clients(_model("resnet20", shape=(3, 32, 32)), clients) == []
