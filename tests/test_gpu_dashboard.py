"""The dashboard's GPU row (issue #24): NVIDIA dcgm-exporter's series per pod and the provider each worker runs.

No GPU and no dcgm-exporter here: promtool parses every query, the DCGM names are checked against the exporter's
default counters, and the queries are checked to read the pod label in both forms Prometheus may store it (`pod`
with honorLabels, `exported_pod` without). Their values on real dcgm-exporter series are not checked here.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from test_monitor import DASHBOARD, DCGM, dashboard_exprs, promql_metric_names

# NVIDIA/dcgm-exporter etc/default-counters.csv (the counters it exports without a custom list) that we read.
DCGM_DEFAULT_COUNTERS = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_FB_USED",
}


def _gpu_panels() -> list[dict]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    row = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"].startswith("GPU"))
    following = [i for i, p in enumerate(panels) if p["type"] == "row" and i > row]
    return panels[row + 1 : following[0] if following else len(panels)]


def test_gpu_row_shows_utilisation_memory_and_provider():
    panels = _gpu_panels()
    names = {n for p in panels for t in p["targets"] for n in promql_metric_names(t["expr"])}
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "deepclust_model_info"} <= names
    assert names - {"deepclust_model_info"} <= DCGM <= DCGM_DEFAULT_COUNTERS
    provider = [t["expr"] for p in panels for t in p["targets"] if "deepclust_model_info" in t["expr"]]
    assert provider and all("by (provider)" in e for e in provider)
    for panel in panels:
        for target in panel["targets"]:
            if "DCGM_" in target["expr"]:  # the pod label in both forms Prometheus may store it
                assert 'exported_namespace="deepclust"' in target["expr"] and 'namespace="deepclust"' in target["expr"]
                assert "{{pod}}" in target["legendFormat"]


def test_every_dashboard_query_parses(tmp_path):
    """promtool parses every expression of the dashboard (as recording rules; the Grafana variables replaced)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (run `make system-deps`)")
    exprs = [
        e.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$model", ".*")
        for e in dashboard_exprs(json.loads(DASHBOARD.read_text()))
    ]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "max by (pod) (up"}]}]})
    )
    assert subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, timeout=60).returncode != 0
