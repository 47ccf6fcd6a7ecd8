"""The saved state of a ``leakage fl`` run (``state.pt``), so an interrupted run resumes.

The file holds tensors and plain containers only and is read with
``torch.load(weights_only=True)``: a file planted in the output folder cannot run
code. Objects are taken apart into plain data when saved and put back into the
objects a fresh build of the same config makes (never constructed from the file).
"""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# ------------------------------------------------------------------ the run's saved state
#
# state.pt holds tensors and plain containers only, so it is read with
# torch.load(weights_only=True): a file planted in the output folder cannot run
# code. Objects are taken apart into plain data when saved and put back into the
# objects a fresh build of the same config makes (never constructed from the file).

STATE_FORMAT = "leakage-fl-state/2"
"""``state.pt`` holds tensors and plain containers only (``torch.load(weights_only=True)``)."""

_MISSING = object()


def _record_types() -> dict[str, type]:
    """The dataclasses a client's carried state may hold (rebuilt from their fields)."""
    from fl_core.types import GroundTruth, Protocol, Update

    return {c.__name__: c for c in (Update, GroundTruth, Protocol)}


def _encode(value: Any, where: str) -> Any:
    """A client's carried state as tensors and plain containers."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, tuple):
        return tuple(_encode(v, where) for v in value)
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {k: _encode(v, where) for k, v in value.items()}
    name = type(value).__name__
    if dataclasses.is_dataclass(value) and _record_types().get(name) is type(value):
        fields = [f.name for f in dataclasses.fields(value) if f.init]
        encoded = {f: _encode(getattr(value, f), where) for f in fields}
        return {"__dataclass__": name, "fields": encoded}
    raise ValueError(f"{where}: the run state cannot hold a {name}")


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        if "__dataclass__" in value:
            cls = _record_types().get(value["__dataclass__"])
            if cls is None:
                raise ValueError(f"{where}: unknown record type {value['__dataclass__']!r}")
            return cls(**{k: _decode(v, where) for k, v in value["fields"].items()})
        return {k: _decode(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(v, where) for v in value)
    return value


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _export(obj: Any, where: str) -> Any:
    """The data of a server hook (aggregator, post-aggregation defense) as plain containers."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, tuple):
        return tuple(_export(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [_export(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise ValueError(f"{where}: the run state cannot hold a mapping with such keys")
        return {k: _export(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if inspect.isroutine(obj):
        return {"__callable__": f"{obj.__module__}.{obj.__qualname__}"}
    if hasattr(obj, "__dict__") and not inspect.isclass(obj):
        state = {k: _export(v, f"{where}.{k}") for k, v in vars(obj).items()}
        return {"__object__": _type_name(obj), "state": state}
    raise ValueError(f"{where}: the run state cannot hold a {type(obj).__qualname__}")


def _restore(current: Any, saved: Any, where: str) -> Any:
    """``saved`` (from :func:`_export`) put back into ``current``, the freshly built object."""
    if isinstance(saved, dict) and "__object__" in saved:
        if current is _MISSING or _type_name(current) != saved["__object__"]:
            found = "nothing" if current is _MISSING else _type_name(current)
            raise ValueError(
                f"{where}: the saved state is a {saved['__object__']}, the config builds {found}"
            )
        for k, v in saved["state"].items():
            object.__setattr__(current, k, _restore(vars(current).get(k, _MISSING), v, where))
        return current
    if isinstance(saved, dict) and "__callable__" in saved:
        name = (
            f"{current.__module__}.{current.__qualname__}" if inspect.isroutine(current) else None
        )
        if name != saved["__callable__"]:
            raise ValueError(f"{where}: the saved state names {saved['__callable__']}")
        return current
    if isinstance(saved, (list, tuple)):
        olds = (
            list(current)
            if isinstance(current, (list, tuple)) and len(current) == len(saved)
            else [_MISSING] * len(saved)
        )
        return type(saved)(_restore(o, v, where) for o, v in zip(olds, saved))
    if isinstance(saved, dict):
        base = current if isinstance(current, dict) else {}
        return {k: _restore(base.get(k, _MISSING), v, where) for k, v in saved.items()}
    return saved


def _layers(client: Any):
    """The client and every client it wraps (``.client``), outermost first."""
    while client is not None:
        yield client
        client = getattr(client, "client", None)


def _stateful_layers(client: Any) -> bool:
    return any(hasattr(layer, "client_state") for layer in _layers(client))


def _client_states(server) -> dict[int, list[Any]]:
    """What the clients carry between rounds (``client_state()``, e.g. a lazy worker's
    remembered update), per client id and wrapper layer; clients carrying nothing left out."""
    out = {}
    for c in server.clients:
        states = [
            _encode(layer.client_state(), f"client {c.client_id}")
            if hasattr(layer, "client_state")
            else None
            for layer in _layers(c)
        ]
        if any(s is not None for s in states):
            out[int(c.client_id)] = states
    return out


def _restore_clients(server, saved: Mapping[int, Sequence[Any]]) -> None:
    by_id = {c.client_id: c for c in server.clients}
    for cid, states in saved.items():
        if cid not in by_id:
            raise ValueError(f"the saved state has client {cid}, which this config does not")
        for layer, state in zip(_layers(by_id[cid]), states):
            if state is None:
                continue
            if not hasattr(layer, "load_client_state"):
                raise ValueError(f"client {cid}: the saved state does not fit this config")
            layer.load_client_state(_decode(state, f"client {cid}"))


def _run_state(server) -> dict[str, Any]:
    """Everything a resumed run needs, as tensors and plain containers."""
    return {
        "format": STATE_FORMAT,
        "round": int(server.round),
        "model": {k: v.detach().clone() for k, v in server.model.state_dict().items()},
        "aggregator": _export(server.aggregator, "aggregator"),
        "post_aggregation": _export(list(server.post_aggregation), "post_aggregation"),
        "clients": _client_states(server),
    }


def _read_state(path: Path, device: str) -> dict[str, Any]:
    """A state file of this module, loaded with ``weights_only=True``; one-line errors."""
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path} holds Python objects, not only tensors and plain data, so it is not "
            "loaded (an older leakage fl or something else wrote it): delete it to restart "
            "the run, or use another --out"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        message = f"{path} cannot be read ({reason}): delete it, or use another --out"
        raise ValueError(message) from None
    if (
        not isinstance(state, dict)
        or state.get("format") != STATE_FORMAT
        or not isinstance(state.get("round"), int)
        or not isinstance(state.get("model"), dict)
    ):
        raise ValueError(
            f"{path} is not a state file of this version of leakage fl: delete it to restart "
            "the run, or use another --out"
        )
    return state


def _apply_state(server, state: dict[str, Any]) -> None:
    try:
        server.model.load_state_dict(state["model"])
    except RuntimeError as e:
        reason = (str(e).splitlines() or ["mismatch"])[0]
        raise ValueError(f"state.pt does not fit this config's model ({reason})") from None
    server.round = state["round"]
    server.aggregator = _restore(server.aggregator, state.get("aggregator"), "aggregator")
    post = _restore(list(server.post_aggregation), state.get("post_aggregation", []), "post")
    server.post_aggregation = list(post)
    _restore_clients(server, state.get("clients", {}))


class _Mirror:
    """Keeps the server's copies of stateful clients (lazy workers) in step with the remote ones.

    Under Flower a client's carried state lives in its node (``context.state``),
    not in the server's client objects, so ``state.pt`` would lose it. After each
    round the mirror recomputes, on the server, the round of each sampled client
    that carries state, from the model that round broadcast and with the
    generator the node used: the server's copy then carries what the node
    carries. Only those clients are recomputed (a lazy worker's stale rounds cost
    nothing).
    """

    def __init__(self, server) -> None:
        self.server = server
        self.work = server.model.spec.build().to(next(server.model.parameters()).device)
        self.broadcast = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.server.model.state_dict().items()}

    def after(self, record) -> None:
        from fl_core.server import client_generator

        by_id = {c.client_id: c for c in self.server.clients}
        for cid in record.client_ids:
            client = by_id.get(cid)
            if client is None or not _stateful_layers(client):
                continue
            self.work.load_state_dict(self.broadcast)
            g = client_generator(self.server.seed, record.round, cid)
            client.compute_update(self.work, round=record.round, generator=g)
        self.broadcast = self._snapshot()  # what the next round broadcasts


def _valid_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r for r in records if isinstance(r.get("round"), int) and not isinstance(r["round"], bool)
    ]
