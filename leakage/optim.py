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
moved). The inverse form needs two k×k matrices of the pairs, R (SᵀY's upper
triangle) and YᵀY; SᵀS and SᵀY's lower triangle are not kept (keeping them
took four more k×k products per iteration, for [S; Y]·d, ~0.3 ms at
k = 400). The two are kept in chronological order, as a window that slides
along a larger buffer: storing a pair writes one column of R and one row and
column of YᵀY, dropping the oldest moves the window's corner, and the window
is copied back to the buffer's corner once every m/4 pairs. Gathering the
matrices from ring order at every iteration cost 0.9 ms per 400×400 matrix,
and rebuilding them (one copy each per pair) 0.4 ms per iteration, against
1.3 ms for both passes over 400 pairs of 3,172 unknowns. The triangular
solves take a contiguous copy of R's window in memory allocated once (torch
copies a strided one into column order for each solve, which is slower). An
inverse of R kept column by column instead of the solves stalled L-BFGS near
the optimum (the pairs' scales span many orders of magnitude there, and an
explicit inverse is not backward stable).

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
        history_dtype: precision the stored pairs are kept in (``None``: z's).
            float32 rows under a float64 z halve the memory the two passes read;
            the pairs are rounded before they are stored and R and YᵀY are
            those of the rounded rows (float64), so H stays the
            L-BFGS matrix of the pairs it holds. The projections are computed
            in the rows' precision; the changes' products with the history come
            from a pass of their own where the change is much smaller than the
            gradient (see :attr:`CHANGE_FLOOR`), since the difference of two
            rounded projections of consecutive gradients carries an error
            relative to the gradient, not to the change.
    """

    c1, c2, max_ls = 1e-4, 0.9, 25
    CHANGE_FLOOR = 0.25
    """With lower-precision rows, [S; Y]·y comes from the difference of the two
    gradients' projections only while ‖y‖ >= this fraction of ‖g‖ (the
    difference's rounding error is relative to ‖g‖, so at most ~4x that of a
    direct pass); DLG's changes on the LeNet are mostly of the gradient's size."""

    def __init__(
        self,
        fun: Objective | None,
        z: torch.Tensor,
        *,
        history: int = 100,
        lr: float = 1.0,
        tolerance_grad: float = 1e-12,
        tolerance_change: float = 1e-15,
        history_dtype: torch.dtype | None = None,
    ) -> None:
        if z.ndim != 1:
            raise ValueError("LBFGS works on one flat (n,) tensor")
        self.fun, self.z, self.lr = fun, z, lr
        self.tol_grad, self.tol_change = tolerance_grad, tolerance_change
        if history < 1:
            raise ValueError(f"history must be at least 1; got {history}")
        m, n = history, z.numel()
        self.m = m
        rows = z.dtype if history_dtype is None else history_dtype
        self._rounded = rows != z.dtype
        # ring buffers: steps s (rows :m), changes y (m:)
        self.SY_rows = torch.zeros(2 * m, n, dtype=rows, device=z.device)
        self.S, self.Y = self.SY_rows[:m], self.SY_rows[m:]
        self.k = 0  # pairs stored, in slots head, head + 1, … (mod m), oldest first
        self.head = 0
        self._cycle = torch.arange(2 * m, device=z.device) % m
        cap = m + max(8, m // 4)
        # SᵀY (upper triangle only: R) and YᵀY, chronological in the window [o, o + k)²
        self._gram = z.new_zeros(2, cap, cap)
        # R's window copied for the solves, into memory allocated once: copying
        # into a fresh k×k tensor each iteration (1.3 MB at k = 400) took ~0.66 ms
        # in the loop under torch.profiler, into this buffer ~0.13 ms
        self._r = z.new_empty(m * m)
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
        self.k = self.head = self._o = 0
        self._proj: torch.Tensor | None = None  # (2, k): S·g, Y·g in slot order

    @property
    def slots(self) -> list[int]:
        """The ring slots of the stored pairs, oldest first."""
        return [(self.head + i) % self.m for i in range(self.k)]

    @property
    def _order(self) -> torch.Tensor:
        """(k,) the slots, oldest first, as an index."""
        return self._cycle[self.head : self.head + self.k]

    def _window(self, which: int) -> torch.Tensor:
        o = self._o
        return self._gram[which, o : o + self.k, o : o + self.k]

    @property
    def R(self) -> torch.Tensor:
        """(k, k) R: sₐ·y_b for a <= b, zero below the diagonal, oldest first."""
        return self._window(0).triu()

    @property
    def YY(self) -> torch.Tensor:
        """(k, k) yₐ·y_b, oldest first."""
        return self._window(1)

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        """(2, k): the stored steps' and changes' dot products with v, in slot order."""
        k, m = self.k, self.m
        w = v.to(self.SY_rows.dtype)
        if k == m:  # one pass over both ring buffers
            return (self.SY_rows @ w).view(2, m).to(v.dtype)
        return torch.stack([self.S[:k] @ w, self.Y[:k] @ w]).to(v.dtype)

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """d = −H·g with H the compact L-BFGS inverse Hessian (BNS 1994, eq. 3.1):
        H = γI + [S γY]·[[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]]·[Sᵀ; γYᵀ], which
        needs R and YᵀY only, never SᵀS or SᵀY below its diagonal."""
        k = self.k
        if not k:
            return -g
        if self._proj is None:
            self._proj = self._project(g)
        order = self._order
        sg, yg = self._proj[:, order]  # (k,) each, chronological
        r = self._r[: k * k].view(k, k).copy_(self._window(0))  # upper triangle: R
        yy = self._window(1)
        diag = r.diagonal()
        gamma = diag[-1] / yy[-1, -1]
        u = torch.linalg.solve_triangular(r, sg[:, None], upper=True)[:, 0]
        rhs = diag * u + gamma * (yy @ u - yg)
        w1 = torch.linalg.solve_triangular(r.T, rhs[:, None], upper=False)[:, 0]
        w2 = -gamma * u
        ab = torch.empty(2, k, dtype=w1.dtype, device=w1.device)  # the weights in slot order
        ab[:, order] = torch.stack([w1, w2])
        if self._rounded:
            ab = ab.to(self.SY_rows.dtype)
            if k == self.m:
                d = (self.SY_rows.T @ ab.view(-1)).to(g.dtype).add_(g, alpha=float(gamma))
            else:
                d = torch.addmv(self.S[:k].T @ ab[0], self.Y[:k].T, ab[1]).to(g.dtype)
                d.add_(g, alpha=float(gamma))
        elif k == self.m:
            d = torch.addmv(gamma * g, self.SY_rows.T, ab.view(-1))
        else:
            d = torch.addmv(torch.addmv(gamma * g, self.S[:k].T, ab[0]), self.Y[:k].T, ab[1])
        return d.neg_()

    def _remember(self, s, y, g_new) -> None:
        """Store the pair (s, y) and project the new gradient on the history.

        One pass over the history per iteration, for [S; Y]·g_new: the pair's
        products with the history that H needs (R's new column Sᵀy, YᵀY's new row
        Yᵀy) come from it, [S; Y]·y = [S; Y]·g_new − [S; Y]·g; the slot the pair
        replaces is patched with direct dot products. Rows of a lower precision
        take a second pass, for [S; Y]·y, when the change is small against the
        gradient (below :attr:`CHANGE_FLOOR` of it).
        """
        k, m = self.k, self.m
        if self._rounded and (
            self._proj is None or float(y.norm()) < self.CHANGE_FLOOR * float(torch.dist(g_new, y))
        ):
            proj_g = None  # [S; Y]·y by a pass of its own
        else:
            proj_g = self._proj if self._proj is not None else self._project(g_new - y)
        proj_new = self._project(g_new)  # (2, k), slot order
        self._proj = proj_new
        if self._rounded:  # the pair as it will be stored
            rows = self.SY_rows.dtype
            s, y = s.to(rows).to(s.dtype), y.to(rows).to(y.dtype)
        sy_new = s @ y
        if not float(sy_new) > 1e-10 * float(s.norm() * y.norm()):
            return  # no positive curvature along s: keep the old pairs
        py = (self._project(y) if proj_g is None else proj_new - proj_g)[:, self._order]
        if k == m:  # the ring is full: the oldest pair's slot takes the new one
            slot, self.head, self._o, j = self.head, (self.head + 1) % m, self._o + 1, k - 1
            py = py[:, 1:]
        else:
            slot, j = k, k
        self.S[slot], self.Y[slot] = s, y
        gram, o = self._gram, self._o
        if o + j >= gram.shape[-1]:  # the window reached the buffer's end: back to its corner
            gram[:, :j, :j] = gram[:, o : o + j, o : o + j].clone()
            self._o = o = 0
        p, old = o + j, slice(o, o + j)  # the new pair's row and column; the kept pairs'
        gram[0, old, p] = py[0]  # s_a · y_new: R's new column
        gram[1, p, old] = gram[1, old, p] = py[1]
        gram[:, p, p] = torch.stack([sy_new, y @ y])
        self.k = j + 1
        news = torch.stack([s @ g_new, y @ g_new])
        if slot < k:
            proj_new[:, slot] = news
        else:
            self._proj = torch.cat([proj_new, news[:, None]], dim=1)

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
            d = self._direction(g)
            gtd = float(g @ d)
            if not gtd < 0:  # memory gave no descent direction: forget it
                self._forget()
                d, gtd = -g, -float(g @ g)
            t0 = self.lr if self.k else self.lr * min(1.0, 1.0 / float(g.abs().sum()))
            t, f_new, g_new = yield from self._line_search(f, g, d, gtd, t0)
            if t == 0.0:
                self.stopped = "no-progress"
                break
            s = t * d
            self.z += s
            self._remember(s, g_new - g, g_new)
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
