"""The ``leakage fl`` run as a deployable Flower App (``flwr run``), for SuperLink and SuperNodes.

``engine: flower`` in a config runs the rounds on Flower's *simulation*
runtime from one Python process (:func:`fl_core.flower.run_flower`). This
module holds the same rounds as module-level apps that Flower's *deployment*
runtime loads by reference, so the clients can be real machines:

* ``server_app`` reads the run config's ``config`` (the path of a ``leakage
  fl`` YAML file, readable on the SuperLink's machine) and ``overrides`` (a
  JSON object of keys laid over it), then runs :func:`leakage.app.fl_cmd.run_fl`
  with Flower's grid: the same records, state and resumption as a local run;
* ``client_app`` answers for the client whose id is the SuperNode's
  ``partition-id`` (``--node-config "partition-id=3 num-partitions=20"``),
  building the run's clients from the same config (the data must be readable
  on each SuperNode's machine; each node uses only its own partition).

The recipe is in docs/scaling.md ("Past one machine").
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fl_core.flower import make_client_app, require_flower

__all__ = ["client_app", "config_of", "server_app"]

log = logging.getLogger(__name__)


def config_of(run_config: Any):
    """The :class:`~leakage.app.fl_config.FLConfig` of a Flower run config
    (``config``, ``overrides``)."""
    from leakage.app.fl_cmd import load_fl_config

    if "config" not in run_config:
        raise ValueError('the Flower run config needs config="path/to/run.yaml"')
    overrides = json.loads(str(run_config.get("overrides", "{}")) or "{}")
    return load_fl_config(str(run_config["config"]), **{**overrides, "engine": "flower"})


def _source(context):
    from leakage.app.fl_cmd import ConfigClients

    return ConfigClients(json.dumps(config_of(context.run_config).to_dict()))


require_flower()
from flwr.serverapp import ServerApp  # noqa: E402

server_app = ServerApp()


@server_app.main()
def _main(grid, context) -> None:
    from leakage.app.fl_cmd import run_fl

    records = run_fl(config_of(context.run_config), grid=grid)
    if records:
        log.info("round %d: accuracy %.4f", records[-1]["round"], records[-1]["accuracy"])


client_app = make_client_app(source_from_context=_source)
