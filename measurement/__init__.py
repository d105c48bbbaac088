"""Measurement: what the served offers caused, read from the exposure ledger and the workspace.

Downstream of serving in the data flow (tables -> features -> ... -> serving -> exposure
ledger -> measurement -> stop-loss and retraining): this package may import ``features``,
``policy`` and ``serving``; nothing in ``features``, ``policy``, ``training`` or ``serving``
imports it.
"""
