"""L-BFGS on one flat tensor, with the compact (matrix) form of the inverse Hessian.

torch's ``optim.LBFGS`` runs the two-loop recursion as ~4·m scalar tensor
operations per iteration (m = history size); for the small attack problems of
the lab (a few thousand unknowns, ~1 ms per objective evaluation) that loop
took ~40% of DLG's time. The compact representation (Byrd, Nocedal, Schnabel,
"Representations of quasi-Newton matrices and their use in limited memory
methods", Math. Prog. 63, 1994, eq. 3.1) computes the same direction with one
pass over the stored pairs for the direction, one for the new gradient's
projections, and two k×k triangular solves (k ≤ m pairs stored).

The pairs stay in a ring of slots (no row of the n-wide history is ever
moved); their k×k Gram matrices are kept in chronological order, rebuilt in
O(k²) when a pair is stored, so the solves need no reordering. Gathering
them from ring order at every iteration cost 0.9 ms per 400×400 matrix, more
than the passes themselves (0.7 ms for 400 pairs of 3,172 unknowns).

Also unlike torch's version: a curvature pair is kept when sᵀy > 1e-10·‖s‖‖y‖
(relative, so the scale of the objective does not matter), and the strong-Wolfe
line search (Nocedal & Wright, *Numerical Optimization*, Alg. 3.5-3.6) treats a
non-finite objective as "step too long" rather than failing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["LBFGS", "step_together"]

Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _cubic_min(t1, f1, g1, t2, f2, g2, lo, hi) -> float:
    """Minimiser of the cubic through (t1, f1, g1), (t2, f2, g2), clipped to [lo, hi]."""
    d1 = g1 + g2 - 3 * (f1 - f2) / (t1 - t2)
    d2sq = d1 * d1 - g1 * g2
    if d2sq >= 0 and math.isfinite(d2sq):
        d2 = math.copysign(math.sqrt(d2sq), t2 - t1)
        t = t2 - (t2 - t1) * (g2 + d2 - d1) / (g2 - g1 + 2 * d2)
        if math.isfinite(t):
            return min(max(t, lo), hi)
    return (lo + hi) / 2


def _grown(block: torch.Tensor, row, col, corner) -> torch.Tensor:
    """``[[block, col], [row, corner]]``: a (j, j) block with one more row and column."""
    j = len(block)
    out = block.new_empty(j + 1, j + 1)
    out[:j, :j] = block
    out[j, :j], out[:j, j], out[j, j] = row, col, corner
    return out


class LBFGS:
    """Minimise ``fun`` over a flat tensor ``z`` (changed in place).

    Args:
        fun: ``z -> (loss, grad)``, loss a 0-d tensor, grad shaped like z; ``None``
            when the caller evaluates (see :meth:`steps` and :func:`step_together`).
        z: (n,) the variable.
        history: curvature pairs kept (m).
        lr: scale of the first step (as torch's ``lr``).
        tolerance_grad: stop when max |grad| falls below it.
        tolerance_change: stop when a step changes the loss or z less than this.
    """

    c1, c2, max_ls = 1e-4, 0.9, 25

    def __init__(
        self,
        fun: Objective | None,
        z: torch.Tensor,
        *,
        history: int = 100,
        lr: float = 1.0,
        tolerance_grad: float = 1e-12,
        tolerance_change: float = 1e-15,
    ) -> None:
        if z.ndim != 1:
            raise ValueError("LBFGS works on one flat (n,) tensor")
        self.fun, self.z, self.lr = fun, z, lr
        self.tol_grad, self.tol_change = tolerance_grad, tolerance_change
        if history < 1:
            raise ValueError(f"history must be at least 1; got {history}")
        m, n = history, z.numel()
        self.m = m
        self.SY_rows = z.new_zeros(2 * m, n)  # ring buffers: steps s (rows :m), changes y (m:)
        self.S, self.Y = self.SY_rows[:m], self.SY_rows[m:]
        self.slots: list[int] = []  # ring slots, oldest first; always {0, …, k − 1}
        self._forget()
        self.evaluations = 0
        self.stopped: str | None = None
        self.f: float | None = None
        self.g: torch.Tensor | None = None

    def _evaluate(self, z: torch.Tensor):
        """Generator: yields the trial point z, receives ``(loss, grad)``, returns them."""
        self.evaluations += 1
        loss, grad = yield z
        return float(loss), grad

    def _forget(self) -> None:
        """Drop every stored pair."""
        self.slots.clear()
        empty = self.SY_rows.new_zeros(0, 0)
        self.SS, self.SY, self.YY = empty, empty, empty  # chronological Gram blocks (k, k)
        self._order = torch.zeros(0, dtype=torch.long, device=self.SY_rows.device)
        self._proj: torch.Tensor | None = None  # (2, k): S·g, Y·g in slot order

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        """(2, k): the stored steps' and changes' dot products with v, in slot order."""
        k = len(self.slots)
        return torch.stack([self.S[:k] @ v, self.Y[:k] @ v])

    def _direction(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(d, [S; Y]·d)``: d = −H·g with H the compact L-BFGS inverse Hessian (BNS
        1994, eq. 3.1), and its projections (2, k) on the stored pairs in
        chronological order, from their Gram matrices (no pass over the history);
        ``None`` without history."""
        k = len(self.slots)
        if not k:
            return -g, None
        if self._proj is None:
            self._proj = self._project(g)
        order = self._order
        sg, yg = self._proj[:, order]  # (k,) each, chronological
        sy, yy = self.SY, self.YY  # (k, k), chronological; sy's upper triangle is R
        diag = sy.diagonal()
        gamma = diag[-1] / yy[-1, -1]
        u = torch.linalg.solve_triangular(sy, sg[:, None], upper=True)[:, 0]
        rhs = diag * u + gamma * (yy @ u) - gamma * yg
        w1 = torch.linalg.solve_triangular(sy.T, rhs[:, None], upper=False)[:, 0]
        w2 = -gamma * u
        a, b = torch.empty_like(w1), torch.empty_like(w2)  # the weights in slot order
        a[order], b[order] = w1, w2
        d = torch.addmv(torch.addmv(gamma * g, self.S[:k].T, a), self.Y[:k].T, b).neg_()
        # [S; Y]·d = −(γ·[S; Y]·g + G·[w1; w2]), G = [[SS, SY], [SYᵀ, YY]]
        gram = torch.stack([self.SS @ w1 + sy @ w2, sy.T @ w1 + yy @ w2])
        return d, -(gamma * torch.stack([sg, yg]) + gram)

    def _remember(self, s, y, g_new, proj_d, t) -> None:
        """Store the pair (s, y) and project the new gradient on the history.

        One pass over the history per iteration, for [S; Y]·g_new: the pair's own
        products with the history come from it ([S; Y]·y = [S; Y]·g_new − [S; Y]·g)
        and from the direction's ([S; Y]·s = t·[S; Y]·d); the slot the pair
        replaces is patched with direct dot products.
        """
        k = len(self.slots)
        proj_g = self._proj if self._proj is not None else self._project(g_new - y)
        proj_new = self._project(g_new)  # (2, k), slot order
        self._proj = proj_new
        sy_new = s @ y
        if not float(sy_new) > 1e-10 * float(s.norm() * y.norm()):
            return  # no positive curvature along s: keep the old pairs
        order = self._order
        ps = t * proj_d if proj_d is not None else self._project(s)[:, order]  # chronological
        py = (proj_new - proj_g)[:, order]
        if k == self.m:  # the ring is full: the oldest pair's slot takes the new one
            slot, keep = self.slots.pop(0), slice(1, k)
        else:
            slot, keep = k, slice(0, k)
        ps, py = ps[:, keep], py[:, keep]
        self.slots.append(slot)
        self.S[slot], self.Y[slot] = s, y
        self.SS = _grown(self.SS[keep, keep], ps[0], ps[0], s @ s)
        self.YY = _grown(self.YY[keep, keep], py[1], py[1], y @ y)
        self.SY = _grown(self.SY[keep, keep], ps[1], py[0], sy_new)  # s_a · y_b
        news = torch.stack([s @ g_new, y @ g_new])
        if slot < k:
            proj_new[:, slot] = news
        else:
            self._proj = torch.cat([proj_new, news[:, None]], dim=1)
        self._order = torch.tensor(self.slots, device=s.device)

    def _line_search(self, f0, g0, d, gtd0, t):
        """Strong-Wolfe step along d (a generator, see :meth:`steps`); returns (t, f, g),
        t = 0 when no decrease was found."""
        z0 = self.z
        best = (0.0, f0, g0)
        t_prev, f_prev, gtd_prev = 0.0, f0, gtd0
        lo = hi = None
        for i in range(self.max_ls):
            f, g = yield from self._evaluate(z0 + t * d)
            gtd = float(g @ d) if math.isfinite(f) else math.nan
            if math.isfinite(f) and f < best[1]:
                best = (t, f, g)
            if not math.isfinite(f) or f > f0 + self.c1 * t * gtd0 or (i and f >= f_prev):
                lo, hi = (t_prev, f_prev, gtd_prev), (t, f, gtd)
                break
            if abs(gtd) <= -self.c2 * gtd0:
                return t, f, g
            if gtd >= 0:
                lo, hi = (t, f, gtd), (t_prev, f_prev, gtd_prev)
                break
            t_prev, f_prev, gtd_prev, t = (
                t,
                f,
                gtd,
                min(4 * t, _cubic_min(t_prev, f_prev, gtd_prev, t, f, gtd, 1.1 * t, 10 * t)),
            )
        else:
            return best
        for _ in range(self.max_ls):  # zoom in [lo, hi]
            (tl, fl, gl), (th, fh, gh) = lo, hi
            a, b = min(tl, th), max(tl, th)
            if (b - a) * float(d.abs().max()) < self.tol_change:
                break
            if math.isfinite(fh):
                t = _cubic_min(tl, fl, gl, th, fh, gh, a + 0.1 * (b - a), b - 0.1 * (b - a))
            else:
                t = (a + b) / 2
            f, g = yield from self._evaluate(z0 + t * d)
            gtd = float(g @ d) if math.isfinite(f) else math.nan
            if math.isfinite(f) and f < best[1]:
                best = (t, f, g)
            if not math.isfinite(f) or f > f0 + self.c1 * t * gtd0 or f >= fl:
                hi = (t, f, gtd)
            else:
                if abs(gtd) <= -self.c2 * gtd0:
                    return t, f, g
                if gtd * (th - tl) >= 0:
                    hi = lo
                lo = (t, f, gtd)
        return best

    def step(self, max_iter: int = 20) -> float:
        """Up to ``max_iter`` iterations; returns the loss at the start of the step.

        ``self.stopped`` tells why the step ended early (``"gradient"``,
        ``"no-progress"``, ``"non-finite"`` at the start point) or is ``None``.
        """
        if self.fun is None:
            raise ValueError("this LBFGS has no objective; drive it with step_together")
        steps = self.steps(max_iter)
        try:
            z = next(steps)
            while True:
                loss, grad = self.fun(z)
                z = steps.send((loss, grad))
        except StopIteration as done:
            return done.value

    def steps(self, max_iter: int = 20):
        """:meth:`step` as a generator: yields each trial point z (n,), must be sent
        ``(loss, grad)`` at it, and returns the loss at the start of the step.

        This lets one caller evaluate many independent problems in one batch
        (:func:`step_together`) while each keeps exactly its own trajectory.
        """
        self.stopped = None
        if self.f is None:
            self.f, self.g = yield from self._evaluate(self.z)
            if not math.isfinite(self.f):
                self.stopped = "non-finite"
                return self.f
        f, g = self.f, self.g
        start = f
        for _ in range(max_iter):
            if float(g.abs().max()) <= self.tol_grad:
                self.stopped = "gradient"
                break
            d, proj_d = self._direction(g)
            gtd = float(g @ d)
            if not gtd < 0:  # memory gave no descent direction: forget it
                self._forget()
                d, gtd, proj_d = -g, -float(g @ g), None
            t0 = self.lr if self.slots else self.lr * min(1.0, 1.0 / float(g.abs().sum()))
            t, f_new, g_new = yield from self._line_search(f, g, d, gtd, t0)
            if t == 0.0:
                self.stopped = "no-progress"
                break
            s = t * d
            self.z += s
            self._remember(s, g_new - g, g_new, proj_d, t)
            small = abs(f - f_new) < self.tol_change or float(s.abs().max()) < self.tol_change
            f, g = f_new, g_new
            if small:
                self.stopped = "no-progress"
                break
        self.f, self.g = f, g
        return start


BatchObjective = Callable[[torch.Tensor, list[int]], tuple[torch.Tensor, torch.Tensor]]


def step_together(optimizers: list[LBFGS], fun: BatchObjective, max_iter: int = 20) -> list[float]:
    """One :meth:`LBFGS.step` of every optimizer, their evaluations batched.

    Each optimizer runs its own iterations and line search; whenever all
    unfinished ones have proposed a trial point, ``fun`` evaluates them in one
    call. A problem that finishes early simply drops out of later batches, so
    every trajectory is the one it would follow alone (up to the floating-point
    effect of batching).

    Args:
        optimizers: independent problems, each over its own flat variable (n,).
        fun: ``(Z, which) -> (losses, grads)``: Z (k, n) stacks the trial points
            of the optimizers listed in ``which`` (indices into ``optimizers``);
            returns losses (k,) and gradients (k, n).
        max_iter: iterations per step, as :meth:`LBFGS.step`.

    Returns:
        The loss of each problem at the start of its step.
    """
    gens = [o.steps(max_iter) for o in optimizers]
    out: list[float] = [math.nan] * len(optimizers)
    pending: dict[int, torch.Tensor] = {}
    for i, gen in enumerate(gens):
        try:
            pending[i] = next(gen)
        except StopIteration as done:
            out[i] = done.value
    while pending:
        which = list(pending)
        z = pending[which[0]][None] if len(which) == 1 else torch.stack([pending[i] for i in which])
        losses, grads = fun(z, which)
        for j, (i, loss) in enumerate(zip(which, losses.tolist())):
            try:
                pending[i] = gens[i].send((loss, grads[j]))
            except StopIteration as done:
                out[i] = done.value
                del pending[i]
    return out
