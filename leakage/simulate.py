"""The attacker's model of how an observed update arose: the three threat models.

An attack proposes dummy data and asks what update it would have produced.
:class:`UpdateSimulator` answers that question for the protocol the
observation reveals, differentiably, for many restarts at once:

* ``fedsgd``: one client sends the gradient of the mean loss on its batch;
* ``fedavg``: one client sends θ_E − θ_0 after E local SGD steps (lr η,
  momentum μ, weight decay λ, local batch b); the attacker runs the same E
  steps on the dummy data with ``create_graph`` so the delta stays
  differentiable in the data (Geiping et al. 2020, sec. 6, "federated
  averaging");
* ``aggregate``: the server sees only the weighted mean of K clients'
  updates, as under secure aggregation; the dummy batch is the union of the K
  batches, split into the clients' groups in order (``client_samples``), and
  each group is pushed through its own fedsgd or fedavg computation before the
  mean with the clients' reported weights (``client_weights``: their dataset
  sizes n_k under FedAvg's default weighting, McMahan et al. 2017).

What the attacker does not know and assumes (document it when you rely on it):
the order in which a FedAvg client visits its samples. The simulation walks the
dummy samples in a fixed order (step e takes samples e·b … e·b + b − 1, wrapping
around), which loses nothing while one round covers at most one epoch (the dummy
order is free, and reconstructions are matched to the truth afterwards), but
is only an approximation when clients reshuffle between epochs.

Restarts are batched: R restarts cost one forward and one double backward over
R copies of the dummy data, and each restart's simulated update depends on its
own dummy data only. FedSGD updates of a victim made of Conv2d and Linear
layers (lenet, cnn, mlp) are separated per restart from one pass over all the
samples (:func:`fl_core.batched.group_gradients`, batched matrix products);
other updates and victims go through :func:`torch.func.vmap`, whose per-restart
weight gradients are grouped convolutions.

For priors on the victim's features (DeepInversion's BatchNorm-statistics
matching, used by GradInversion, Yin et al. CVPR 2021) the simulator can also
return, per restart, the distance of the BatchNorm inputs' batch statistics
from the server's running statistics, taken from the very forward passes the
simulation makes (:meth:`UpdateSimulator.track_batch_norm`), so the prior costs
no extra forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fl_core.types import Observation

from .priors import batch_moments, bn_statistics_distance

__all__ = ["THREAT_MODELS", "UpdateSimulator", "threat_model"]

THREAT_MODELS = ("fedsgd", "fedavg", "aggregate")


def threat_model(obs: Observation) -> str:
    """The threat model an observation belongs to: ``fedsgd``, ``fedavg`` or ``aggregate``."""
    if obs.protocol.client_samples:
        return "aggregate"
    return "fedavg" if obs.update.kind == "delta" else "fedsgd"


class UpdateSimulator:
    """Differentiable ``dummy data -> update`` for one observation's protocol.

    Args:
        obs: the observation (its protocol fixes the threat model).
        dtype: precision of the simulation.
        device: where it runs.

    Attributes:
        target: (d,) the observed update, flat, in ``dtype`` on ``device``.
        num_samples: N, the dummy samples the update is computed from.
        groups: (start, size) of each client's samples within the N.
        model: the victim, with BatchNorm layers that use batch statistics
            and keep no running statistics in train mode (so that the
            simulation has no side effects and batches over restarts).
        num_parameters: d.
    """

    def __init__(
        self,
        obs: Observation,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        proto = obs.protocol
        model = obs.model(device=device).to(dtype)
        if proto.train_mode:
            torch.func.replace_all_batch_norm_modules_(model)
        self.model = model
        self.kind = obs.update.kind
        self.threat = threat_model(obs)
        self.protocol = proto
        for p in model.parameters():
            p.requires_grad_(True)
        self.params = dict(model.named_parameters())
        self._leaves = list(self.params.values())
        self._fparams = {k: v.detach() for k, v in self.params.items()}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.target = obs.update.flat.detach().to(device, dtype)
        self.num_parameters = self.target.numel()
        counts = proto.client_samples or (proto.num_samples,)
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()[:-1]]
        self.groups = list(zip(starts, counts))
        self.num_samples = sum(counts)
        reported = proto.client_weights or counts
        if len(reported) != len(counts):
            raise ValueError(
                f"the aggregate reports {len(reported)} client weights for {len(counts)} clients"
            )
        self.weights = [w / sum(reported) for w in reported]
        if self.kind == "delta" and (proto.lr <= 0 or proto.local_steps < 1):
            raise ValueError("a FedAvg observation must reveal its local lr and steps")
        self._grad = grad(self._loss)
        self._plans = {n: self._local_batches(n) for n in counts}  # per client size, once
        self._server_buffers = dict(obs.buffers)
        self.support: torch.Tensor | None = None
        self._bn_running: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._bn_weights: list[float] = []
        self._moments: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._bn_terms: list[torch.Tensor] | None = None
        self._ungroupable = False
        self._sample_weights = torch.cat(  # each sample's weight in its client's mean: w_k / n_k
            [torch.full((size,), w / size) for w, (_, size) in zip(self.weights, self.groups)]
        )

    def restrict_to_support(self) -> float:
        """Simulate only the entries the observed update kept (an adaptive attack on pruning).

        A pruning defense (:class:`defenses.transforms.Prune`) sends zeros in place of
        the entries it drops, and which entries those are is visible in the update
        itself. Matching the dummy update there asks the dummy data to explain
        zeros the client never computed; after this call every simulated update
        is multiplied by the mask of the observed update's non-zero entries, so a
        matching loss compares the kept entries only (Kerckhoffs: the defense is
        public, the attacker adapts to it). Entries that are exactly zero in an
        undefended gradient (dead units) lose their constraint, which costs
        little.

        Returns:
            The fraction of entries kept.
        """
        self.support = (self.target != 0).to(self.target.dtype)  # (d,)
        return float(self.support.mean())

    def track_batch_norm(self, *, first_weight: float = 1.0) -> None:
        """Make ``bn=True`` calls return the BatchNorm-statistics prior too.

        Registers a forward hook on every BatchNorm layer of the victim that
        records the batch mean and variance of the layer's input (per restart
        under vmap) while a ``bn=True`` call runs; every forward pass of the
        simulation (one per local step and client) then contributes
        :func:`~leakage.priors.bn_statistics_distance` to the running
        statistics the server sent (the observation's buffers), and the prior
        is the mean over those passes. Calls with ``bn=False`` record nothing.

        Args:
            first_weight: factor of the first BatchNorm layer (DeepInversion's
                code and breaching: 10).

        Raises:
            ValueError: the victim has no BatchNorm layer, or the observation
                carries no running statistics for one.
        """
        layers = [
            (name, m)
            for name, m in self.model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        if not layers:
            raise ValueError(
                f"the BatchNorm prior needs a victim with BatchNorm layers; "
                f"{type(self.model).__name__} has none (set bn_prior=0)"
            )
        running = []
        for name, _ in layers:
            mean = self._server_buffers.get(f"{name}.running_mean")
            var = self._server_buffers.get(f"{name}.running_var")
            if mean is None or var is None:
                raise ValueError(
                    f"the BatchNorm prior needs the server's running statistics; the "
                    f"observation has none for layer {name!r} (set bn_prior=0)"
                )
            device, dtype = self.target.device, self.target.dtype
            running.append((mean.detach().to(device, dtype), var.detach().to(device, dtype)))
        if self._bn_running is None:
            for _, m in layers:
                m.register_forward_hook(self._record_moments)
        self._bn_running = running
        self._bn_weights = [first_weight] + [1.0] * (len(layers) - 1)
        self._grad_bn = grad(self._loss_bn, has_aux=True)

    @property
    def tracks_batch_norm(self) -> bool:
        """Whether :meth:`track_batch_norm` was called."""
        return self._bn_running is not None

    def _record_moments(self, module, inputs, output) -> None:
        if self._moments is not None:
            self._moments.append(batch_moments(inputs[0]))

    def _forward(self, params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and the BatchNorm prior of this pass while a ``bn=True`` call runs."""
        if self._bn_terms is None:
            if params is self.params:
                return self.model(x), None
            return functional_call(self.model, (params, self.buffers), (x,)), None
        self._moments = []
        try:
            if params is self.params:
                logits = self.model(x)
            else:
                logits = functional_call(self.model, (params, self.buffers), (x,))
            moments = self._moments
        finally:
            self._moments = None
        return logits, bn_statistics_distance(moments, self._bn_running, weights=self._bn_weights)

    def _loss(self, params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean soft cross-entropy of the model at ``params`` on (n, C, H, W), (n, K)."""
        logits = functional_call(self.model, (params, self.buffers), (x,))
        return -(y * F.log_softmax(logits, dim=-1)).sum(-1).mean()

    def _loss_bn(self, params, x: torch.Tensor, y: torch.Tensor):
        """:meth:`_loss` and, as auxiliary output, the pass's BatchNorm prior."""
        logits, bn = self._forward(params, x)
        return -(y * F.log_softmax(logits, dim=-1)).sum(-1).mean(), bn

    def _flat(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _gradient(self, params, x, y, batched: bool) -> dict[str, torch.Tensor]:
        """∂loss/∂θ at ``params`` with the graph kept (so the data stay differentiable).

        Under vmap this goes through :func:`torch.func.grad`; for a single
        restart plain autograd is ~30% cheaper (no functional re-binding of the
        module at the global parameters).
        """
        if batched:
            if self._bn_terms is None:
                return self._grad(params, x, y)
            grads, bn = self._grad_bn(params, x, y)
            self._bn_terms.append(bn)
            return grads
        logits, bn = self._forward(params, x)
        if bn is not None:
            self._bn_terms.append(bn)
        loss = -(y * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        return dict(zip(params, grads))

    def _local_batches(self, n: int) -> tuple[slice | list[int], ...]:
        """Indices of each local step's batch among a client's n samples.

        Step e takes samples e·b … e·b + b − 1, wrapping around; a slice where
        that range does not wrap (no copy), a list of indices where it does.
        """
        b = min(self.protocol.batch_size, n)
        out: list[slice | list[int]] = []
        for step in range(self.protocol.local_steps):
            start = step * b % n
            out.append(
                slice(start, start + b) if start + b <= n else [(start + i) % n for i in range(b)]
            )
        return tuple(out)

    def _client(self, x: torch.Tensor, y: torch.Tensor, batched: bool) -> torch.Tensor:
        """One client's flat update from its n samples.

        Under :mod:`torch.func` (``batched``) the victim's parameters enter as
        detached tensors: nothing differentiates with respect to them, and
        ``torch.compile`` then builds no backward graph for them.
        """
        start = self._fparams if batched else self.params
        if self.kind == "gradient":
            return self._flat(self._gradient(start, x, y, batched).values())
        proto = self.protocol
        params, velocity = start, None
        for idx in self._plans[len(x)]:
            g = self._gradient(params, x[idx], y[idx], batched)
            if proto.weight_decay:  # torch.optim.SGD: g ← g + λ·θ
                g = {k: g[k] + proto.weight_decay * params[k] for k in g}
            if proto.momentum:  # torch.optim.SGD: v ← μ·v + g, θ ← θ − η·v
                velocity = (
                    g if velocity is None else {k: proto.momentum * velocity[k] + g[k] for k in g}
                )
                g = velocity
            params = {k: params[k] - proto.lr * g[k] for k in params}
        return self._flat(params[k] - start[k] for k in params)

    def simulate_one(
        self, x: torch.Tensor, y: torch.Tensor, *, batched: bool = False, bn: bool = False
    ):
        """The update (d,) that dummy images (N, C, H, W) with soft labels (N, K) produce.

        ``batched``: called under :func:`torch.func.vmap` (by :meth:`__call__`).
        ``bn``: return ``(update (d,), BatchNorm prior ())`` (see
        :meth:`track_batch_norm`).
        """
        if not bn:
            parts = [
                w * self._client(x[s : s + n], y[s : s + n], batched)
                for w, (s, n) in zip(self.weights, self.groups)
            ]
            update = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            return update if self.support is None else update * self.support  # (d,)
        if not self.tracks_batch_norm:
            raise ValueError("bn=True needs track_batch_norm() first")
        self._bn_terms = []
        try:
            update = self.simulate_one(x, y, batched=batched)
            terms = self._bn_terms
        finally:
            self._bn_terms = None
        return update, (terms[0] if len(terms) == 1 else torch.stack(terms).mean(0))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, bn: bool = False):
        """Updates (R, d) of R restarts: images (R, N, C, H, W), soft labels (R, N, K).

        With ``bn=True``: ``(updates (R, d), BatchNorm prior (R,))``.
        """
        self._check(x)
        if len(x) == 1:
            out = self.simulate_one(x[0], y[0], bn=bn)
            return (out[0][None], out[1][None]) if bn else out[None]
        if not bn and self.kind == "gradient":
            out = self._restart_gradients(x, y)
            if out is not None:
                return out
        return self.functional(x, y, bn=bn)

    def _restart_gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """FedSGD updates (R, d) of R restarts in one pass over their R·N samples.

        The restarts' losses (each the weighted sum of its clients' mean losses)
        add up to one loss whose per-restart parts
        :func:`fl_core.batched.group_gradients` separates, with the graph kept:
        for a victim of Conv2d and Linear layers this replaces vmap's grouped
        convolutions by batched matrix products. ``None`` for other victims.
        """
        from fl_core.batched import group_gradients

        if self._ungroupable:
            return None
        r, n = x.shape[:2]
        weights = self._sample_weights.to(x.device, x.dtype)  # (N,)

        def loss(logits):  # (R·N, K) -> Σ_r Σ_n w_n · CE(r, n)
            ce = (y * F.log_softmax(logits, dim=-1).view(r, n, -1)).sum(-1)  # (R, N)
            return -(weights * ce).sum()

        grads = group_gradients(self.model, x.reshape(r * n, *x.shape[2:]), loss, r,
                                create_graph=True)  # fmt: skip
        if grads is None:
            self._ungroupable = True  # the victim will not change: use vmap from now on
            return None
        update = torch.cat([grads[k].reshape(r, -1) for k in self.params], dim=1)  # (R, d)
        return update if self.support is None else update * self.support

    def functional(self, x: torch.Tensor, y: torch.Tensor, *, bn: bool = False):
        """:meth:`__call__` written with :mod:`torch.func` only (``vmap`` over the
        restarts, ``grad`` for the victim's gradient), so that it composes with
        ``torch.func.grad`` and ``torch.compile``; the same values."""
        self._check(x)
        if len(x) == 1:  # no vmap: its per-restart weight gradients are grouped convolutions
            out = self.simulate_one(x[0], y[0], batched=True, bn=bn)
            return (out[0][None], out[1][None]) if bn else out[None]
        return vmap(lambda xr, yr: self.simulate_one(xr, yr, batched=True, bn=bn))(x, y)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.num_samples:
            raise ValueError(
                f"the observation covers {self.num_samples} samples; got {x.shape[1]} dummy images"
            )

    def to_channels_last(self) -> None:
        """Keep 4-D parameters and buffers in channels-last memory (faster CPU convolutions).

        Values, shapes and the flat update's order are unchanged.
        """
        with torch.no_grad():
            for p in self.params.values():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
        self._fparams = {k: v.detach() for k, v in self.params.items()}
