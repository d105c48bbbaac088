"""runtime: what training and serving both run on, beneath both of them.

``settings`` (where files live), ``registry`` (the MLflow model registry, the one module
that talks to ``MlflowClient``) and ``cluster`` (a Dask client). It imports ``features``
only; ``training``, ``serving`` and the CLI import it, and it imports none of them.
"""
