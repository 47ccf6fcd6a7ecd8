"""Defenses from configuration: a list applied in order, each with its parameters.

In YAML::

    defenses:
      - clip: {max_norm: 1.0}
      - gaussian: {multiplier: 0.5}     # sigma = 0.5 x the preceding clip bound
      - prune: {ratio: 0.3}

and on the command line ``--defense clip:max_norm=1.0 --defense gaussian:sigma=0.01``
(see :func:`parse_defense_option`). :func:`build_plan` turns the list into a
:class:`DefensePlan` holding the hooks of :class:`fl_core.server.Server`.

Every defense acts at one stage of a round, and the list must follow the
order of the round: ``inspection`` (the client checks the model it received:
``inspect``), ``training`` (how the client trains: ``dpsgd``), then
``client`` (transforms of the update before it leaves: ``clip``,
``gaussian``, ``laplace``, ``prune``, ``quantize``), then ``aggregation``
(``norm_diff_clip``), then ``post`` (after aggregation: ``weak_dp``,
``crfl``). Unknown names, unknown or missing parameters and bad values are
rejected with a one-line message that lists the valid choices.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fl_core.server import fedavg

from .robust import AGGREGATORS, make_aggregator, rule_parameters
from .server_side import NormDiffClip, WeakDP
from .transforms import Clip, GaussianNoise, LaplaceNoise, Prune, Quantize

__all__ = [
    "DEFENSES",
    "DefensePlan",
    "STAGES",
    "build_plan",
    "normalize_defenses",
    "parse_defense_option",
    "parse_name_params",
]

STAGES = ("inspection", "training", "client", "aggregation", "post")


@dataclass(frozen=True)
class DefenseKind:
    """A configurable defense: its stage, its builder and what it does (one line)."""

    stage: str
    builder: Callable[..., Any]
    help: str

    def parameters(self) -> dict[str, inspect.Parameter]:
        sig = inspect.signature(self.builder)
        return {n: p for n, p in sig.parameters.items() if not n.startswith("_")}


def _clip(*, max_norm: float, per_layer: bool = False) -> Clip:
    return Clip(max_norm, per_layer)


def _relative(name: str, value: float | None, multiplier: float | None, clip: float | None, what):
    """An absolute noise scale, or ``multiplier`` x the preceding clipping bound."""
    if (value is None) == (multiplier is None):
        raise ValueError(f"{name} takes exactly one of {what} or multiplier")
    if multiplier is None:
        return value
    if multiplier < 0:
        raise ValueError(f"{name} multiplier must be non-negative; got {multiplier}")
    if clip is None:
        raise ValueError(
            f"{name} multiplier is relative to a clipping bound: put a whole-update clip "
            f"before {name}, or give {what}"
        )
    if multiplier == 0:
        return 0.0
    if math.isinf(clip):
        raise ValueError(f"{name} multiplier needs a finite clip bound before it; or give {what}")
    return multiplier * clip


def _gaussian(
    *, sigma: float | None = None, multiplier: float | None = None, _clip: float | None = None
):
    return GaussianNoise(_relative("gaussian", sigma, multiplier, _clip, "sigma"))


def _laplace(
    *, scale: float | None = None, multiplier: float | None = None, _clip: float | None = None
):
    return LaplaceNoise(_relative("laplace", scale, multiplier, _clip, "scale"))


def _prune(*, ratio: float, per_layer: bool = False) -> Prune:
    return Prune(ratio, per_layer)


def _quantize(*, format: str = "fp16") -> Quantize:
    return Quantize(format)  # type: ignore[arg-type]


def _dpsgd(
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str = "rdp",
    delta: float = 1e-5,
):
    from .dpsgd import DPSGDClient, _check, _check_delta

    _check(noise_multiplier, max_grad_norm, accountant)
    _check_delta(delta)

    def wrap(client):
        return DPSGDClient(
            client,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
        )

    wrap.delta = delta  # type: ignore[attr-defined]
    return wrap


def _inspect(*, checks: str = "all"):
    from .inspection import CHECKS, InspectingClient

    chosen = CHECKS if checks == "all" else tuple(c.strip() for c in checks.split("+"))
    unknown = sorted(set(chosen) - set(CHECKS))
    if unknown:
        raise ValueError(
            f"inspect checks: unknown {', '.join(unknown)}; valid: all or {'+'.join(CHECKS)}"
        )

    def wrap(client):
        return InspectingClient(client, checks=chosen)

    return wrap


def _norm_diff_clip(*, max_norm: float) -> float:
    NormDiffClip(max_norm)  # validates
    return max_norm


def _weak_dp(*, sigma: float) -> WeakDP:
    return WeakDP(sigma)


def _crfl(
    *,
    sigma: float = 0.01,
    rho_slope: float = 0.1,
    rho_offset: float = 2.0,
    rho_max: float = math.inf,
    rounds: int | None = None,
):
    from .crfl import CRFL

    return CRFL(
        sigma=sigma, rho_slope=rho_slope, rho_offset=rho_offset, rho_max=rho_max, rounds=rounds
    )


def _aggregator_kind(rule: str) -> DefenseKind:
    """A robust aggregation rule as a defense entry, e.g. ``{krum: {f: 2}}``."""

    def builder(**params):
        return make_aggregator(rule, **params)

    builder.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rule_parameters(rule).values()]
    )
    first = (inspect.getdoc(AGGREGATORS[rule]) or rule).splitlines()[0]
    return DefenseKind("aggregation", builder, f"aggregation rule: {first}")


DEFENSES: dict[str, DefenseKind] = {
    "inspect": DefenseKind(
        "inspection",
        _inspect,
        "the client refuses a model that is not the agreed architecture or looks built to leak",
    ),
    "dpsgd": DefenseKind(
        "training", _dpsgd, "DP-SGD local training through Opacus (per-sample clip + noise)"
    ),
    "clip": DefenseKind("client", _clip, "L2 norm clipping of the update"),
    "gaussian": DefenseKind("client", _gaussian, "Gaussian noise on the update"),
    "laplace": DefenseKind("client", _laplace, "Laplace noise on the update"),
    "prune": DefenseKind("client", _prune, "zero the smallest-magnitude fraction of entries"),
    "quantize": DefenseKind("client", _quantize, "send the update in fp16, bf16 or int8"),
    "norm_diff_clip": DefenseKind(
        "aggregation", _norm_diff_clip, "server clips each update's norm before aggregating"
    ),
    **{rule: _aggregator_kind(rule) for rule in AGGREGATORS},
    "weak_dp": DefenseKind("post", _weak_dp, "Gaussian noise on the aggregated global model"),
    "crfl": DefenseKind("post", _crfl, "CRFL: clip the global model's norm and add noise"),
}


def _coerce(name: str, param: inspect.Parameter, value: Any) -> Any:
    """``value`` as the parameter's annotated type (YAML reads ``1e-4`` as a string)."""
    ann = str(param.annotation)
    if value is None:
        return None
    try:
        if "bool" in ann:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError
        if "int" in ann:
            number = float(value)
            if isinstance(value, bool) or not math.isfinite(number) or number != int(number):
                raise ValueError
            return int(number)
        if "float" in ann:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if "str" in ann:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        kind = (
            "true or false"
            if "bool" in ann
            else "a whole number"
            if "int" in ann
            else "a number"
            if "float" in ann
            else "text"
        )
        raise ValueError(f"defense {name}: {param.name} must be {kind}; got {value!r}") from None
    return value


def normalize_defenses(defenses: Sequence[Any] | None) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Check a defense list and return it as ``((name, params), ...)`` with coerced values.

    Items are ``{name: {param: value}}``, ``{name: None}`` or a bare ``name``.
    """
    if defenses is None:
        return ()
    if isinstance(defenses, (str, dict)):
        raise ValueError("defenses must be a list, e.g. [{clip: {max_norm: 1.0}}]")
    out = []
    for item in defenses:
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            name, params = item
        elif isinstance(item, str):
            name, params = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            ((name, params),) = item.items()
        else:
            raise ValueError(
                f"defense entry {item!r} must be a name or a one-key mapping "
                "{name: {param: value}}"
            )
        name = str(name).replace("-", "_")
        if name not in DEFENSES:
            raise ValueError(f"unknown defense {name!r}; valid: {', '.join(DEFENSES)}")
        if params is not None and not isinstance(params, dict):
            raise ValueError(
                f"defense {name}: give its parameters as a mapping, e.g. "
                "{clip: {max_norm: 1.0}}; got " + repr(params)
            )
        params = dict(params or {})
        if not all(isinstance(k, str) for k in params):
            raise ValueError(f"defense {name}: parameter names must be text")
        params = {k.replace("-", "_"): v for k, v in params.items()}
        valid = DEFENSES[name].parameters()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"defense {name} takes no {', '.join(unknown)}; valid parameters: "
                f"{', '.join(valid) or 'none'}"
            )
        missing = [
            p
            for p, spec in valid.items()
            if spec.default is inspect.Parameter.empty and p not in params
        ]
        if missing:
            raise ValueError(f"defense {name} needs {', '.join(missing)}")
        params = {k: _coerce(name, valid[k], v) for k, v in params.items()}
        defaults = {
            k: spec.default
            for k, spec in valid.items()
            if spec.default not in (inspect.Parameter.empty, None) and k not in params
        }
        out.append((name, {**params, **defaults}))
    order = [STAGES.index(DEFENSES[n].stage) for n, _ in out]
    for i in range(1, len(out)):
        if order[i] < order[i - 1]:
            raise ValueError(
                f"defense {out[i][0]} ({DEFENSES[out[i][0]].stage}) is listed after "
                f"{out[i - 1][0]} ({DEFENSES[out[i - 1][0]].stage}); list them in the order "
                f"of a round: {' -> '.join(STAGES)}"
            )
    if sum(n == "dpsgd" for n, _ in out) > 1:
        raise ValueError("dpsgd may appear once: a client trains one way")
    rules = [n for n, _ in out if n in AGGREGATORS]
    if len(rules) > 1:
        raise ValueError(f"one aggregation rule per run; got {', '.join(rules)}")
    return tuple(out)


def parse_name_params(text: str, flag: str = "--defense") -> tuple[str, dict[str, Any]]:
    """One ``name`` or ``name:key=value,key=value`` command-line option.

    Values are read as YAML (``1e-2``, ``true``, ``[0, 3]``); commas inside
    brackets belong to the value, so ``ids=[0,3]`` is one parameter.
    """
    import yaml

    name, _, rest = text.partition(":")
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(rest):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(rest[start:i])
            start = i + 1
    parts.append(rest[start:])
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in parts)):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(
                f"{flag} {text!r}: write name:key=value,key=value (e.g. clip:max_norm=1.0)"
            )
        params[key.strip()] = yaml.safe_load(value.strip())
    if not name.strip():
        raise ValueError(f"{flag} {text!r}: the name is missing before ':'")
    return name.strip(), params


def parse_defense_option(text: str) -> tuple[str, dict[str, Any]]:
    """One ``--defense`` option: ``name`` or ``name:key=value,key=value``."""
    return parse_name_params(text, "--defense")


@dataclass(frozen=True)
class DefensePlan:
    """The hooks a defense list puts into a round.

    Attributes:
        entries: the normalised list ``((name, params), ...)``.
        client_wrapper: wraps each honest client to change how it trains
            (``dpsgd``), or ``None``; :meth:`wrap_clients` leaves the attacks of
            poisoning clients unwrapped.
        client_defenses: update transforms, in order.
        aggregation_clip: the server's per-update norm bound, or ``None``.
        aggregator: the robust aggregation rule (:mod:`defenses.robust`), or
            ``None`` for the server's default (FedAvg).
        post_aggregation: after-aggregation defenses, in order.
        delta: the δ at which a DP run reports ε (``dpsgd``'s parameter).
        inspector: wraps each honest client (outermost) so it inspects the
            model it receives (``inspect``), or ``None``.
    """

    entries: tuple[tuple[str, dict[str, Any]], ...] = ()
    client_wrapper: Callable[[Any], Any] | None = None
    client_defenses: tuple[Any, ...] = ()
    aggregation_clip: float | None = None
    aggregator: Callable | None = None
    post_aggregation: tuple[Any, ...] = ()
    delta: float | None = None
    inspector: Callable[[Any], Any] | None = None

    def wrap_clients(self, clients: Sequence[Any]) -> list[Any]:
        """The clients, honest ones wrapped by the training-stage defense if there is one.

        A poisoning client (an :class:`fl_core.adversaries.Adversary`) is not
        wrapped: a malicious client does not run the defense (DP-SGD) honestly,
        it sends its attack, computed as the attacker computes it. Only the
        rounds outside its schedule, where it is an honest client, go through
        the defense: the list holds a copy of the adversary whose
        :attr:`~fl_core.adversaries.Adversary.honest` computation is the wrapped
        honest client (:meth:`~fl_core.adversaries.Adversary.with_honest`). The
        clients given are not modified.
        """
        if self.client_wrapper is None and self.inspector is None:
            return list(clients)
        return [self._wrap(c) for c in clients]

    def _wrap(self, client: Any) -> Any:
        from fl_core.adversaries import Adversary

        if isinstance(client, Adversary):
            return client.with_honest(self._wrap(client.client))
        if self.client_wrapper is not None:
            client = self.client_wrapper(client)
        return client if self.inspector is None else self.inspector(client)

    def server_kwargs(self, aggregator: Callable = fedavg) -> dict[str, Any]:
        """Keyword arguments of :class:`fl_core.server.Server` for this plan.

        ``aggregator`` is used when the plan names no aggregation rule.
        """
        if self.aggregator is not None:
            aggregator = self.aggregator
        if self.aggregation_clip is not None:
            aggregator = NormDiffClip(self.aggregation_clip, aggregator)
        return {
            "client_defenses": list(self.client_defenses),
            "aggregator": aggregator,
            "post_aggregation": list(self.post_aggregation),
        }

    def to_list(self) -> list[dict[str, dict[str, Any]]]:
        """The plan as a YAML/JSON-writable list."""
        return [{name: dict(params)} for name, params in self.entries]


def build_plan(defenses: Sequence[Any] | None) -> DefensePlan:
    """Check ``defenses`` (see :func:`normalize_defenses`) and build their hooks."""
    entries = normalize_defenses(defenses)
    wrapper, inspector, client, post = None, None, [], []
    agg_clip, delta, last_clip, rule = None, None, None, None
    for name, params in entries:
        kind = DEFENSES[name]
        if name in ("gaussian", "laplace"):
            built = kind.builder(**params, _clip=last_clip)
        else:
            built = kind.builder(**params)
        if name == "clip":  # a per-layer clip bounds the whole update by C·√L, not C
            last_clip = None if params.get("per_layer") else params["max_norm"]
        if kind.stage == "inspection":
            inspector = built
        elif kind.stage == "training":
            wrapper, delta = built, built.delta
        elif kind.stage == "client":
            client.append(built)
        elif name == "norm_diff_clip":
            agg_clip = built if agg_clip is None else min(agg_clip, built)
        elif kind.stage == "aggregation":
            rule = built
        else:
            post.append(built)
    return DefensePlan(
        entries, wrapper, tuple(client), agg_clip, rule, tuple(post), delta, inspector
    )
