"""The models a finished run logs to MLflow.

``model``: an MLflow pyfunc whose input is raw uint8 CIFAR images (N, 32, 32, 3) and whose output is class
probabilities: the fitted GCN + ZCA (or other preprocessing) travels with it, so ``mlflow models predict/serve`` and
the model registry get something that works on real images. ``network``: the bare ``AllConvNet`` through
``mlflow.pytorch`` (inputs already preprocessed), for research and fine-tuning.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import torch

from allconv_cli import __version__
from allconv_cli.config import TrainConfig
from allconv_cli.data import Dataset, Preprocessor
from allconv_cli.errors import AllconvError

PREDICT_CHUNK = 1000  # images per forward pass: bounds memory whatever N is
BUNDLE = "bundle"  # the artifact key of the network weights + preprocessing inside the pyfunc model


def _requirements() -> list[str]:
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]


class RawImageClassifier(mlflow.pyfunc.PythonModel):
    """uint8 (N, 32, 32, 3) RGB images -> float32 (N, classes) probabilities, computed as the run evaluated."""

    # The signature is given when logging; MLflow would otherwise read predict's (absent) type hints as one and warn.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.network, self.preprocessor, self.classes = load_bundle(Path(context.artifacts[BUNDLE]))

    def predict(self, context, model_input, params=None):  # untyped, as MLflow expects (see above)
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != (32, 32, 3):
            raise AllconvError(f"input of shape {images.shape}: give uint8 images (N, 32, 32, 3), RGB, HWC")
        images = images.astype(np.uint8, copy=False)
        out = []
        with torch.no_grad():
            for start in range(0, len(images), PREDICT_CHUNK):
                x = self.preprocessor.apply(images[start : start + PREDICT_CHUNK])
                out.append(torch.softmax(self.network(x).float(), dim=1))
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)


def save_bundle(path: Path, cfg: TrainConfig, model: torch.nn.Module, data: Dataset) -> None:
    """Everything the pyfunc needs, as plain tensors (loadable with ``weights_only=True``)."""
    pre = data.preprocessor
    torch.save(
        {
            "config": cfg.to_dict(),
            "num_classes": data.num_classes,
            "classes": list(data.classes),
            "state_dict": {k: v.detach().cpu().float() for k, v in model.state_dict().items()},
            "preprocessor": {f.name: getattr(pre, f.name) for f in fields(Preprocessor)} if pre else None,
        },
        path,
    )


def load_bundle(path: Path) -> tuple[torch.nn.Module, Preprocessor, list[str]]:
    from allconv_cli.engine import build_model

    state = torch.load(path, map_location="cpu", weights_only=True)
    network = build_model(TrainConfig.from_dict(state["config"]), state["num_classes"])
    network.load_state_dict(state["state_dict"])
    pre = Preprocessor.from_fields(state["preprocessor"]) if state["preprocessor"] else Preprocessor(kind="none")
    return network.eval(), pre, list(state["classes"])


def log_models(run_id: str, cfg: TrainConfig, model: torch.nn.Module, data: Dataset,
               register: str | None = None) -> str:
    """Log ``model`` (raw images in) and ``network`` (bare torch module) into the run; register ``model`` under
    ``register`` when given. Returns the ``model``'s URI."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    cpu_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, data.num_classes))]),
    )
    # MLflow warns about (cloud)pickle on every call; the choice is deliberate (the network reloads as a real
    # AllConvNet, the pyfunc needs no models-from-code file).
    for name in ("mlflow.pytorch", "mlflow.pyfunc"):
        logging.getLogger(name).setLevel(logging.ERROR)
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="allconv-model-") as tmp, \
            mlflow.start_run(run_id=run_id, log_system_metrics=False):
        bundle = Path(tmp) / "bundle.pt"
        save_bundle(bundle, cfg, cpu_model, data)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=RawImageClassifier(),
            artifacts={BUNDLE: str(bundle)},
            code_paths=[str(package)],  # the model loads where allconv is not installed
            signature=signature,
            input_example=np.zeros((1, 32, 32, 3), np.uint8),
            pip_requirements=_requirements(),
            registered_model_name=register,
        )
        mlflow.pytorch.log_model(
            cpu_model,
            name="network",
            input_example=torch.zeros(1, 3, 32, 32).numpy(),
            serialization_format="pickle",
            pip_requirements=[*_requirements(), f"allconv=={__version__}"],
        )
    return info.model_uri
