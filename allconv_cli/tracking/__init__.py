"""The tracking layer: everything allconv writes to and reads from MLflow.

``schema`` names every tag, metric, param and Optuna attribute and the one status type (torch- and MLflow-free);
``store`` is the one door to the MLflow client (retries, runs, tags, artifacts). Nothing outside this package talks
to the MLflow client. This file imports nothing, so ``from allconv_cli.tracking import schema`` stays cheap.
"""
