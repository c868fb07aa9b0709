"""Moved to :mod:`allconv_cli.tracking.model` (the tracking layer owns every MLflow call).

Kept for two readers: ``tracked_run.py`` until it imports ``tracking.model``, and the pyfunc models already in users'
stores, whose pickled ``python_model`` names ``allconv_cli.served_model.RawImageClassifier``.
"""

from allconv_cli.tracking.model import RawImageClassifier, load_bundle, log_models, save_bundle

__all__ = ["RawImageClassifier", "load_bundle", "log_models", "save_bundle"]
