"""R-GAP's recursion: the chain of layers it can invert and each layer's linear system.

:func:`rgap_chain` reads a victim into steps (weighted layer, activation,
shapes), refusing what R-GAP cannot invert with the supported list; each
layer's gradient and forward constraints are assembled and solved by least
squares, and :func:`invert_chain` runs them from the last linear layer down
to the image. :mod:`leakage.attacks.rgap` explains the method (Zhu &
Blaschko, ICLR 2021) and runs it as an attack.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fl_core.models import InputNormalization

__all__ = ["conv_system", "invert_chain", "rgap_chain"]

_SUPPORTED = (
    "Conv2d, Linear, LeakyReLU (slope > 0), Sigmoid, Tanh, Identity, Flatten, Unflatten "
    "and the input normalisation"
)


_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)


_ACTIVATIONS = (nn.LeakyReLU, nn.Sigmoid, nn.Tanh)


_CHUNK = 1 << 22  # entries scattered per call when assembling a forward Gram matrix


@dataclass(frozen=True, eq=False)
class _Step:
    """One module of the victim's chain: per-sample input and output shapes."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def _conv_padding(conv: nn.Conv2d, name: str) -> tuple[int, int]:
    """The convolution's zero padding as (rows, columns), symmetric on each side."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError(f"rgap: {name} pads asymmetrically (padding='same', even kernel)")
        return (total[0] // 2, total[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def _check_module(name: str, module: nn.Module) -> None:
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(
                f"rgap: {name} ({kind}) has groups={module.groups}; only 1 is supported"
            )
        if module.padding_mode != "zeros":
            raise ValueError(f"rgap: {name} ({kind}) pads with {module.padding_mode!r}, not zeros")
        _conv_padding(module, name)
        return
    if isinstance(module, (nn.Linear, InputNormalization, *_RESHAPES)):
        return
    if isinstance(module, nn.LeakyReLU):
        if not module.negative_slope > 0:
            raise ValueError(
                f"rgap: {name} (LeakyReLU, slope {module.negative_slope}) is not invertible; "
                "R-GAP needs a positive slope"
            )
        return
    if isinstance(module, (nn.Sigmoid, nn.Tanh)):
        return
    if isinstance(module, nn.ReLU):
        raise ValueError(
            f"rgap: {name} (ReLU) zeroes negative pre-activations and cannot be inverted; "
            f"R-GAP supports {_SUPPORTED}"
        )
    raise ValueError(f"rgap: unsupported module {name} ({kind}); R-GAP supports {_SUPPORTED}")


def rgap_chain(model: nn.Module, in_shape: tuple[int, ...]) -> list[_Step]:
    """The victim as R-GAP sees it: its modules in the order they run, checked.

    A probe forward pass (float64, on a copy; the probe image is drawn from a
    fixed-seed generator) records every leaf module's input and output; the
    model must be their plain composition.

    Raises:
        ValueError: one line naming the first unsupported module, or saying
            why the victim is not a plain conv/linear chain.
    """
    probe_model = copy.deepcopy(model).double()
    records: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor | None]] = []
    handles = []
    names = {id(m): n or "model" for n, m in probe_model.named_modules()}
    for module in probe_model.modules():
        if next(module.children(), None) is not None:
            continue

        def pre(mod, args):
            records.append([names[id(mod)], mod, args[0].detach().clone(), None])

        def post(mod, args, out):
            records[-1][3] = out.detach().clone()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    x = torch.rand((1, *in_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        with torch.no_grad():
            out = probe_model(x)
    finally:
        for h in handles:
            h.remove()
    if not records:
        raise ValueError("rgap: the victim has no modules to invert")
    seen: set[int] = set()
    for name, module, _, _ in records:
        if id(module) in seen:
            raise ValueError(f"rgap: {name} runs twice in one forward pass; R-GAP needs a chain")
        seen.add(id(module))
        if any(True for _ in module.parameters()) and not isinstance(
            module, (nn.Conv2d, nn.Linear)
        ):
            raise ValueError(
                f"rgap: unsupported module {name} ({type(module).__name__}); "
                f"R-GAP supports {_SUPPORTED}"
            )
        _check_module(name, module)
    previous = x
    for name, _, inp, outp in records:
        if outp is None or not torch.equal(inp.reshape(-1), previous.reshape(-1)):
            raise ValueError(
                f"rgap: the input of {name} is not the previous module's output; R-GAP needs "
                "a plain chain of modules (no skip connections or functional operations)"
            )
        previous = outp
    if not torch.equal(out.reshape(-1), previous.reshape(-1)):
        raise ValueError(
            "rgap: the victim's output is not its last module's output; R-GAP needs a plain "
            "chain of modules"
        )
    last_name, last = records[-1][0], records[-1][1]
    if not isinstance(last, nn.Linear) or last.bias is None:
        raise ValueError(
            f"rgap: the last module {last_name} ({type(last).__name__}) must be a Linear layer "
            "with bias (its bias gradient starts the recursion)"
        )
    originals = dict(model.named_modules())
    return [
        _Step(name, originals[name], tuple(inp.shape[1:]), tuple(outp.shape[1:]))
        for name, _, inp, outp in records
    ]


# ---------------------------------------------------------------- the per-layer systems


def _tap_positions(conv: nn.Conv2d, name: str, in_shape: tuple[int, ...]) -> torch.Tensor:
    """(P, kh·kw) flat pixel index (row·W + col) each kernel tap reads at each output
    position, −1 where it reads padding."""
    _, h, w = in_shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = _conv_padding(conv, name)
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    iy = torch.arange(ho)[:, None] * sh - ph + torch.arange(kh)[None, :] * dh  # (ho, kh)
    ix = torch.arange(wo)[:, None] * sw - pw + torch.arange(kw)[None, :] * dw  # (wo, kw)
    oky, okx = (iy >= 0) & (iy < h), (ix >= 0) & (ix < w)
    pos = iy[:, None, :, None] * w + ix[None, :, None, :]  # (ho, wo, kh, kw)
    ok = oky[:, None, :, None] & okx[None, :, None, :]
    return torch.where(ok, pos, -1).reshape(ho * wo, kh * kw)


def _gradient_block(pos: torch.Tensor, k2: torch.Tensor, hw: int) -> torch.Tensor:
    """(H·W, H·W) block B with Kᵀ K = I_C ⊗ B for the gradient constraints of ``k2`` (O, P)."""
    ktk = k2.T @ k2  # (P, P)
    block = torch.zeros(hw, hw, dtype=k2.dtype)
    for j in range(pos.shape[1]):  # within one tap, output positions read distinct pixels
        a = pos[:, j]
        keep = a >= 0
        idx = a[keep]
        block[idx[:, None], idx[None, :]] += ktk[keep][:, keep]
    return block


def _forward_gram(pos: torch.Tensor, weight: torch.Tensor, hw: int) -> torch.Tensor:
    """(C·H·W, C·H·W) matrix Wᵀ W of the convolution ``weight`` (O, C, kh, kw)."""
    o, c = weight.shape[:2]
    taps = pos.shape[1]
    wk = weight.reshape(o, c, taps)
    pair = torch.einsum("ocj,odl->jlcd", wk, wk)  # (taps, taps, C, C)
    gram = torch.zeros(hw, hw, c, c, dtype=weight.dtype)
    j = torch.arange(taps)
    jj, ll = j[:, None].expand(taps, taps), j[None, :].expand(taps, taps)
    step = max(1, _CHUNK // (taps * taps * c * c))
    for start in range(0, pos.shape[0], step):
        a = pos[start : start + step]  # (p, taps)
        rows = a[:, :, None].expand(-1, taps, taps)
        cols = a[:, None, :].expand(-1, taps, taps)
        keep = (rows >= 0) & (cols >= 0)
        jsel = jj.expand_as(rows)[keep]
        lsel = ll.expand_as(rows)[keep]
        gram.index_put_((rows[keep], cols[keep]), pair[jsel, lsel], accumulate=True)
    return gram.permute(2, 0, 3, 1).reshape(c * hw, c * hw)


def conv_system(
    conv: nn.Conv2d, name: str, in_shape: tuple[int, ...], k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient Gram (D, D), forward Gram (D, D) and tap positions of a convolution."""
    c, h, w = in_shape
    pos = _tap_positions(conv, name, in_shape)
    weight = conv.weight.detach().double()
    k2 = k.reshape(weight.shape[0], -1)
    block = _gradient_block(pos, k2, h * w)
    n_grad = torch.block_diag(*([block] * c)) if c > 1 else block
    return n_grad, _forward_gram(pos, weight, h * w), pos


def _fold(conv: nn.Conv2d, name: str, cols: torch.Tensor, in_shape) -> torch.Tensor:
    """Adjoint of im2col: (C·kh·kw, P) columns summed back into a (C, H, W) image."""
    return F.fold(
        cols[None],
        output_size=in_shape[1:],
        kernel_size=conv.kernel_size,
        dilation=conv.dilation,
        padding=_conv_padding(conv, name),
        stride=conv.stride,
    )[0]


def _unfold(conv: nn.Conv2d, name: str, x: torch.Tensor) -> torch.Tensor:
    """im2col: (C, H, W) -> (C·kh·kw, P), zeros where a tap reads padding."""
    return F.unfold(
        x[None],
        kernel_size=conv.kernel_size,
        dilation=conv.dilation,
        padding=_conv_padding(conv, name),
        stride=conv.stride,
    )[0]


def _solve(normal: torch.Tensor, rhs: torch.Tensor, rcond: float) -> tuple[torch.Tensor, str]:
    """Least-squares solution from the normal equations: Cholesky, or an eigenvalue
    pseudo-inverse (eigenvalues under ``rcond²·max`` dropped) where it is ill-posed."""
    chol, info = torch.linalg.cholesky_ex(normal)
    if int(info) == 0:
        d = chol.diagonal()
        if float(d.min()) > rcond * float(d.max()):
            return torch.cholesky_solve(rhs[:, None], chol)[:, 0], "cholesky"
    vals, vecs = torch.linalg.eigh(normal)
    keep = vals > (rcond**2) * vals.max()
    coef = (vecs[:, keep].T @ rhs) / vals[keep]
    return vecs[:, keep] @ coef, f"pseudo-inverse (rank {int(keep.sum())}/{len(vals)})"


def _weights(balance: bool, *rhs: torch.Tensor) -> list[float]:
    if not balance:
        return [1.0] * len(rhs)
    return [1.0 / max(float(r.square().sum()), 1e-300) for r in rhs]


def _invert_conv(step, z, k, g, bias, *, balance, rcond):
    conv, c_in = step.module, step.in_shape[0]
    weight = conv.weight.detach().double()
    o = weight.shape[0]
    n_grad, n_fwd, _ = conv_system(conv, step.name, step.in_shape, k)
    k2, g2 = k.reshape(o, -1), g.reshape(o, -1)
    target = z if bias is None else z - bias[:, None, None]
    w2 = weight.reshape(o, -1)
    r_grad = _fold(conv, step.name, g2.T @ k2, step.in_shape).reshape(-1)
    r_fwd = _fold(conv, step.name, w2.T @ target.reshape(o, -1), step.in_shape).reshape(-1)
    a, b = _weights(balance, g2, target)
    x, how = _solve(a * n_grad + b * n_fwd, a * r_grad + b * r_fwd, rcond)
    x = x.view(step.in_shape)
    cols = _unfold(conv, step.name, x)
    info = {
        "layer": step.name,
        "unknowns": x.numel(),
        "solver": how,
        "gradient_residual": float((k2 @ cols.T - g2).norm() / g2.norm().clamp_min(1e-300)),
        "forward_residual": float(
            (w2 @ cols - target.reshape(o, -1)).norm() / target.norm().clamp_min(1e-300)
        ),
    }
    delta = _fold(conv, step.name, w2.T @ k2, step.in_shape)  # Wᵀ k, (C, H, W)
    assert delta.shape[0] == c_in
    return x, delta, info


def _invert_linear(step, z, k, g, bias, *, balance, rcond):
    weight = step.module.weight.detach().double()  # (out, D)
    target = z.reshape(-1) if bias is None else z.reshape(-1) - bias
    a, b = _weights(balance, g, target)
    n = a * float(k.square().sum()) * torch.eye(weight.shape[1], dtype=weight.dtype)
    n = n + b * weight.T @ weight
    x, how = _solve(n, a * (g.T @ k) + b * (weight.T @ target), rcond)
    info = {
        "layer": step.name,
        "unknowns": x.numel(),
        "solver": how,
        "gradient_residual": float((torch.outer(k, x) - g).norm() / g.norm().clamp_min(1e-300)),
        "forward_residual": float((weight @ x - target).norm() / target.norm().clamp_min(1e-300)),
    }
    return x.view(step.in_shape), (weight.T @ k).view(step.in_shape), info


def _undo_activation(module: nn.Module, v: torch.Tensor, delta: torch.Tensor):
    """(pre-activation, gradient at it) from an activation's output and output gradient."""
    if isinstance(module, nn.LeakyReLU):
        s = module.negative_slope
        negative = v < 0
        return torch.where(negative, v / s, v), torch.where(negative, delta * s, delta)
    tiny = torch.finfo(v.dtype).eps
    if isinstance(module, nn.Sigmoid):
        v = v.clamp(tiny, 1 - tiny)
        return torch.log(v) - torch.log1p(-v), delta * v * (1 - v)
    if isinstance(module, nn.Tanh):
        v = v.clamp(-1 + tiny, 1 - tiny)
        return torch.atanh(v), delta * (1 - v * v)
    raise AssertionError(module)  # rgap_chain admits nothing else


def _undo_normalization(module: InputNormalization, v: torch.Tensor) -> torch.Tensor:
    if module.mean is None:
        return v
    mean = torch.tensor(module.mean, dtype=v.dtype).view(-1, 1, 1)
    std = torch.tensor(module.std, dtype=v.dtype).view(-1, 1, 1)
    return v * std + mean


def invert_chain(
    steps: list[_Step],
    grad_of,
    *,
    balance: bool = True,
    rcond: float = 1e-7,
    progress: bool = False,
) -> tuple[torch.Tensor, list[dict]]:
    """The recursion: the chain's input (in_shape of the first step) from its gradients.

    Args:
        steps: :func:`rgap_chain` of the victim.
        grad_of: parameter -> its observed gradient (any float dtype).
        balance: weight each constraint block by its right-hand side's inverse squared norm.
        rcond: Cholesky pivots under ``rcond·max`` (condition number of the
            stacked system above ``1/rcond``) switch to the pseudo-inverse.
        progress: a progress bar over the layers, its postfix the last solved layer.

    Returns:
        ``(x, layers)``: the float64 input and one diagnostics dict per weighted layer.
    """
    last = steps[-1].module
    gw, gb = grad_of(last.weight).double(), grad_of(last.bias).double()
    if not float(gb.abs().max()) > 0:
        raise ValueError("rgap: the last layer's bias gradient is zero: nothing to invert")
    x = gw.T @ gb / gb.square().sum()  # batch 1: every row of gw is gb_i·x
    info = {
        "layer": steps[-1].name,
        "unknowns": x.numel(),
        "solver": "bias ratio",
        "gradient_residual": float((torch.outer(gb, x) - gw).norm() / gw.norm()),
    }
    layers = [info]
    v = x.view(steps[-1].in_shape)
    delta = (last.weight.detach().double().T @ gb).view(steps[-1].in_shape)
    bar = tqdm(list(reversed(steps[:-1])), disable=not progress, desc="rgap", leave=False)
    for step in bar:
        m = step.module
        if isinstance(m, _RESHAPES):
            v, delta = v.reshape(step.in_shape), delta.reshape(step.in_shape)
        elif isinstance(m, _ACTIVATIONS):
            v, delta = _undo_activation(m, v.reshape(step.out_shape), delta.reshape(step.out_shape))
        elif isinstance(m, InputNormalization):
            v = _undo_normalization(m, v.reshape(step.out_shape))
        else:
            g = grad_of(m.weight).double()
            bias = None if m.bias is None else m.bias.detach().double()
            k = delta.reshape(step.out_shape)
            if isinstance(m, nn.Linear) and m.bias is not None:
                k = grad_of(m.bias).double()  # observed exactly: better than propagated
            solver = _invert_conv if isinstance(m, nn.Conv2d) else _invert_linear
            v, delta, info = solver(
                step, v.reshape(step.out_shape), k, g, bias, balance=balance, rcond=rcond
            )
            layers.append(info)
        if progress and not isinstance(m, (*_RESHAPES, *_ACTIVATIONS)):
            bar.set_postfix_str(f"{step.name}: {layers[-1].get('solver', '')}")
    return v.reshape(steps[0].in_shape), layers[::-1]
