"""The tracking layer: everything allconv writes to and reads from MLflow.

``schema`` names every tag, metric, param and Optuna attribute and the one status type (torch- and MLflow-free);
``store`` is the one door to the MLflow client (runs, tags, metrics, artifacts, experiments), every call through
``retry`` (the one retry layer, which also says when the store goes away and comes back); ``model`` logs the models
of a finished run (the torch side). Nothing outside this package talks to MLflow. This file imports nothing, so
``from allconv_cli.tracking import schema`` stays cheap.
"""
