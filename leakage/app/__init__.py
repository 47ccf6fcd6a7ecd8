"""The application that runs the lab, on top of the attacker's library.

* :mod:`~leakage.app.cli`: the ``leakage`` command (``attack``, ``train``, ``fl``);
* :mod:`~leakage.app.experiment`: one ``leakage attack`` run: its config, the round
  it observes, the attack, the scores and the files it writes;
* :mod:`~leakage.app.train_cmd` and :mod:`~leakage.app.fl_cmd`: ``leakage train`` and
  ``leakage fl`` (federated runs with poisoning clients and robust aggregation);
* :mod:`~leakage.app.sweep`: parallel cells (Ray or processes);
* :mod:`~leakage.app.store`: atomic files and resumable JSON-lines records;
* :mod:`~leakage.app.report`: the figures of a run;
* :mod:`~leakage.app.flower_app`: the deployable Flower apps.

Imports run one way: this package imports the library (:mod:`leakage.attacks`,
:mod:`leakage.labels`, :mod:`leakage.metrics`, ...), :mod:`defenses` and
:mod:`fl_core`; none of them imports it.
"""
