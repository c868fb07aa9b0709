"""The torch-free layer table: its arithmetic parameter counts equal the built networks', and the report, which
states them, never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from allconv_cli import architectures, models
from allconv_cli.paper import TABLE3


@pytest.mark.unit
@pytest.mark.parametrize(("base", "branch"), list(TABLE3))
def test_param_count_equals_the_built_network(base: str, branch: str) -> None:
    for bn in (False, True):
        for num_classes in (10, 100, 0):
            built = models.count_params(models.build(base, branch, num_classes=num_classes, bn=bn, init="torch"))
            assert architectures.param_count(base, branch, num_classes=num_classes, bn=bn) == built, (bn, num_classes)
    built = models.count_params(models.build(base, branch, in_chans=1))
    assert architectures.param_count(base, branch, in_chans=1) == built


@pytest.mark.unit
def test_the_table_is_the_one_models_builds_from() -> None:
    assert models.layer_plan is architectures.layer_plan and models.ARCHITECTURES is architectures.ARCHITECTURES
    assert set(architectures.ARCHITECTURES) == set(TABLE3)
    # All-CNN-C by hand: 3x3 convs 3-96-96-96(stride 2), 96-192-192-192(stride 2), 3x3 192 valid, 1x1 192, 1x1 10
    convs = [(3, 96, 3), (96, 96, 3), (96, 96, 3), (96, 192, 3), (192, 192, 3), (192, 192, 3), (192, 192, 3),
             (192, 192, 1), (192, 10, 1)]
    assert architectures.param_count("C", "allcnn") == sum(i * o * k * k + o for i, o, k in convs) == 1_369_738


@pytest.mark.unit
def test_build_report_imports_no_torch(tmp_path: Path) -> None:
    """``build_report`` on a real (empty) MLflow store, Table 3's exact parameter counts included, loads no torch."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("allconv-reproduce", artifact_location=str(tmp_path / "artifacts"))
    script = textwrap.dedent("""
        import json, sys
        from allconv_cli.report import build_report

        built = build_report()
        assert "torch" not in sys.modules, "build_report imported torch"
        print(json.dumps({f"{r.base}/{r.branch}": r.params for r in built.networks}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr
    params = json.loads(result.stdout.strip().splitlines()[-1])
    assert params == {f"{b}/{br}": models.count_params(models.build(b, br)) for b, br in TABLE3}
