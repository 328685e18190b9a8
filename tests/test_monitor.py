"""The evaluation job end to end: CLI, gauges, alert rules (promtool), dashboard, real Pushgateway + Prometheus.

Real processes only: `prometheus-pushgateway` and `prometheus` (Debian binaries) are started on free loopback
ports by a module fixture and always stopped by it. The drift test needs the real default model (drift figures of
the tiny synthetic model mean nothing) and is skipped, with the reason, while `model_store/cifar10-lite0` is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import REPO_ROOT, free_port
from PIL import Image, ImageFilter

RULES_YAML = REPO_ROOT / "k8s" / "base" / "prometheus-rules.yaml"
RULES_TEST = REPO_ROOT / "deploy" / "prometheus" / "rules_test.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "deepclust-dashboard.json"
DESIGN = REPO_ROOT / "docs" / "design.md"
DEEPCLUST = [sys.executable, "-m", "deepclust.cli"]

# docs/design.md §4 (the contract); test_exported_names_match_design keeps this list honest.
EXPORTED = {
    "deepclust_requests_total",
    "deepclust_images_total",
    "deepclust_request_duration_seconds",
    "deepclust_inference_duration_seconds",
    "deepclust_batch_size",
    "deepclust_cluster_assignments_total",
    "deepclust_confidence",
    "deepclust_model_info",
    "deepclust_eval_accuracy",
    "deepclust_eval_nmi",
    "deepclust_eval_ari",
    "deepclust_drift_psi",
    "deepclust_drift_js_divergence",
    "deepclust_drift_confidence_ks",
    "deepclust_low_confidence_ratio",
    "deepclust_eval_last_success_timestamp_seconds",
}
HISTOGRAMS = {
    "deepclust_request_duration_seconds",
    "deepclust_inference_duration_seconds",
    "deepclust_batch_size",
    "deepclust_confidence",
}
EVAL_NAMES = {
    "acc": "deepclust_eval_accuracy",
    "nmi": "deepclust_eval_nmi",
    "ari": "deepclust_eval_ari",
    "psi": "deepclust_drift_psi",
    "js_divergence": "deepclust_drift_js_divergence",
    "confidence_ks": "deepclust_drift_confidence_ks",
    "low_confidence_ratio": "deepclust_low_confidence_ratio",
}
# Read by the dashboard's GPU row only (not ours): NVIDIA dcgm-exporter's default counters (etc/default-counters.csv);
# tests/test_gpu_dashboard.py checks that row.
DCGM = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}
# Alert thresholds in k8s/base/prometheus-rules.yaml, as the drift test asserts them.
PSI_ALERT, LOW_CONFIDENCE_ALERT, KS_ALERT = 0.25, 0.25, 0.3


def _needs(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (run `make system-deps`)")
    return path


# ------------------------------------------------------------------------------------------ PromQL names
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (label matchers, ranges, strings, grouping clauses removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def base_name(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def unknown_names(exprs: list[str]) -> set[str]:
    return {n for e in exprs for n in promql_metric_names(e) if base_name(n) not in EXPORTED}


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            match = re.match(r"label_values\((.+),\s*\w+\)", query["query"])
            assert match, f"unexpected variable query {query}"
            exprs.append(match.group(1))
    return exprs


def rules_exprs() -> list[str]:
    spec = yaml.safe_load(RULES_YAML.read_text())["spec"]
    return [rule["expr"] for group in spec["groups"] for rule in group["rules"]]


def test_promql_name_extractor_finds_names_and_ignores_syntax():
    expr = (
        "histogram_quantile(0.99, sum by (job, le) (rate(deepclust_request_duration_seconds_bucket"
        '{job=~"$job", le!="0.5"}[$__rate_interval]))) / on (job) group_left () x_total offset 5m > 1'
    )
    assert promql_metric_names(expr) == {"deepclust_request_duration_seconds_bucket", "x_total"}
    assert unknown_names([expr]) == {"x_total"}
    assert unknown_names(["time() - deepclust_eval_last_success_timestamp_seconds > 3 * 3600"]) == set()
    assert unknown_names(["rate(deepclust_eval_accuracy_bucket[5m])"]) == {"deepclust_eval_accuracy_bucket"}


def test_exported_names_match_design():
    text = DESIGN.read_text()
    section = text[text.index("## 4.") : text.index("## 5.")]
    assert set(re.findall(r"deepclust_[a-z_]+", section)) == EXPORTED
    for name in HISTOGRAMS:
        assert re.search(rf"`{name}` \(histogram\)", section), name


def test_dashboard_and_rules_use_only_exported_metric_names():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 15
    assert unknown_names(exprs) - DCGM == set()
    assert unknown_names(rules_exprs()) == set()
    used = {base_name(n) for e in exprs for n in promql_metric_names(e)} - DCGM
    assert used == EXPORTED, f"dashboard does not show {EXPORTED - used}"


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]


# ------------------------------------------------------------------------------------------------ promtool
@pytest.fixture()
def plain_rules(tmp_path: Path) -> Path:
    """The PrometheusRule's `spec` as the plain rules file promtool and Prometheus read."""
    document = yaml.safe_load(RULES_YAML.read_text())
    assert document["apiVersion"] == "monitoring.coreos.com/v1" and document["kind"] == "PrometheusRule"
    path = tmp_path / "deepclust-rules.yml"
    path.write_text(yaml.safe_dump(document["spec"], sort_keys=False))
    return path


def test_promtool_check_rules(plain_rules: Path):
    promtool = _needs("promtool")
    result = subprocess.run([promtool, "check", "rules", str(plain_rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    spec = yaml.safe_load(plain_rules.read_text())
    alerts = {r["alert"] for g in spec["groups"] for r in g["rules"]}
    assert {
        "DeepclustAccuracyDrop",
        "DeepclustClusterDriftPSI",
        "DeepclustConfidenceCollapse",
        "DeepclustHighErrorRate",
        "DeepclustHighLatencyP99",
        "DeepclustEvaluationStale",
        "DeepclustMeanConfidenceLow",
    } <= alerts


def test_promtool_unit_tests(plain_rules: Path, tmp_path: Path):
    promtool = _needs("promtool")
    tests = yaml.safe_load(RULES_TEST.read_text())
    tests["rule_files"] = [str(plain_rules)]
    test_file = tmp_path / "rules_test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for group in tests["tests"] for case in group.get("alert_rule_test", [])}
    spec = yaml.safe_load(plain_rules.read_text())
    assert tested == {r["alert"] for g in spec["groups"] for r in g["rules"]}, "every alert needs a unit test"


# ------------------------------------------------------------------------------------------- image folders
def _cifar_files(cifar_test_dir: Path) -> list[Path]:
    return sorted(cifar_test_dir.glob("*/*.jpg"))


def make_folder(target: Path, files: list[Path], *, labelled: bool, transform=None) -> Path:
    """Copy (or transform and save as PNG) `files` into `target`, as class sub-folders or flat."""
    target.mkdir(parents=True, exist_ok=True)
    for src in files:
        folder = target / src.parent.name if labelled else target
        folder.mkdir(exist_ok=True)
        name = f"{src.parent.name}-{src.name}" if not labelled else src.name
        if transform is None:
            shutil.copyfile(src, folder / name)
        else:
            with Image.open(src) as image:
                transform(image.convert("RGB")).save((folder / name).with_suffix(".png"))
    return target


def pick(files: list[Path], n: int, seed: int, exclude_class: str | None = None) -> list[Path]:
    pool = [f for f in files if f.parent.name != exclude_class]
    index = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[i] for i in sorted(index)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [*DEEPCLUST, "monitor", *args], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env
    )


@pytest.fixture(scope="module")
def probe_dir(cifar_test_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled probe set: 200 real CIFAR-10 test JPEGs in class folders."""
    return make_folder(
        tmp_path_factory.mktemp("probe") / "probe", pick(_cifar_files(cifar_test_dir), 200, 1), labelled=True
    )


# -------------------------------------------------------------------------------------------- CLI, textfile
def test_cli_labelled_textfile_and_json(tiny_model_dir: Path, probe_dir: Path, tmp_path: Path):
    textfile, report_path = tmp_path / "deepclust.prom", tmp_path / "report.json"
    result = run_cli(
        "--model",
        str(tiny_model_dir),
        "--reference",
        str(probe_dir),
        "--textfile",
        str(textfile),
        "--json",
        str(report_path),
        "--workers",
        "0",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert json.loads(result.stdout)["labelled"] == report["labelled"]  # stdout carries the same report
    labelled = report["labelled"]
    assert report["mode"] == "labelled" and report["n_ok"] == 200 and report["n_errors"] == 0
    assert labelled["n"] == 200 and 0.0 <= labelled["acc"] <= 1.0
    assert labelled["change"]["acc"] == pytest.approx(labelled["acc"] - 0.1)  # the tiny card says acc 0.1
    text = textfile.read_text()
    promtool = shutil.which("promtool")
    if promtool:
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, s.labels["dataset"]): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("deepclust_eval_accuracy", "probe")] == pytest.approx(labelled["acc"])
    assert samples[("deepclust_eval_nmi", "probe")] == pytest.approx(labelled["nmi"])
    assert samples[("deepclust_eval_accuracy", "export:synthetic:none")] == pytest.approx(0.1)
    assert time.time() - samples[("deepclust_eval_last_success_timestamp_seconds", "probe")] < 120
    assert {name for name, _ in samples} <= EXPORTED


def test_cli_unlabelled_reports_drift_and_bad_items(tiny_model_dir: Path, cifar_test_dir: Path, tmp_path: Path):
    sample = make_folder(tmp_path / "sample", pick(_cifar_files(cifar_test_dir), 60, 2), labelled=False)
    (sample / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (sample / "notes.txt").write_text("not an image: not walked")
    result = run_cli("--model", str(tiny_model_dir), "--sample", str(sample), "--workers", "0")
    assert result.returncode == 1, result.stderr  # finished, with one item error
    report = json.loads(result.stdout)
    assert report["n_ok"] == 60 and report["n_errors"] == 1
    assert report["errors"][0]["path"] == "broken.jpg" and report["errors"][0]["code"] == "decode_error"
    figures = report["drift"]
    assert figures["n"] == 60
    for key in (
        "psi",
        "js_divergence",
        "confidence_ks",
        "low_confidence_ratio",
        "chi2_p_value",
        "confidence_wasserstein",
        "mean_confidence",
    ):
        assert np.isfinite(figures[key]), key
    assert 0.0 <= figures["js_divergence"] <= 1.0 and 0.0 <= figures["chi2_p_value"] <= 1.0
    assert figures["low_confidence_threshold"] == pytest.approx(0.2)  # the tiny model's q0.05


def test_cli_bad_usage_exits_2(tiny_model_dir: Path, tmp_path: Path):
    both = run_cli("--model", str(tiny_model_dir), "--reference", str(tmp_path), "--sample", str(tmp_path))
    assert both.returncode == 2 and "exactly one" in both.stderr
    empty = run_cli("--model", str(tiny_model_dir), "--sample", str(tmp_path))
    assert empty.returncode == 2 and "no image files" in empty.stderr
    missing_model = run_cli("--model", str(tmp_path / "nope"), "--sample", str(tmp_path))
    assert missing_model.returncode == 2 and "model not found" in missing_model.stderr


def test_unreachable_pushgateway_exits_2_but_keeps_the_json(tiny_model_dir: Path, probe_dir: Path, tmp_path: Path):
    report_path = tmp_path / "report.json"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli(
        "--model", str(tiny_model_dir), "--sample", str(probe_dir), "--pushgateway", dead,
        "--json", str(report_path), "--workers", "0",
    )  # fmt: skip
    assert result.returncode == 2 and "could not publish" in result.stderr
    assert json.loads(report_path.read_text())["drift"]["n"] == 200


def test_model_agreement_with_itself_and_mmd(tiny_model_dir: Path, probe_dir: Path):
    from serving.hosts.monitor import MonitorConfig, run_monitor

    report = run_monitor(
        MonitorConfig(
            model=tiny_model_dir,
            sample_dir=probe_dir,
            compare_model=tiny_model_dir,
            embedding_baseline=probe_dir,
            workers=0,
        )
    )
    assert report["agreement"]["nmi"] == pytest.approx(1.0)
    assert report["agreement"]["ari"] == pytest.approx(1.0)
    assert report["embedding_mmd2"] == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------ Pushgateway + Prometheus
def _wait_ready(url: str, process: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready at {url} after {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def prometheus_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real Pushgateway and a real Prometheus (scraping it every second, with our alert rules loaded)."""
    pushgateway_bin, prometheus_bin = _needs("prometheus-pushgateway"), _needs("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    document = yaml.safe_load(RULES_YAML.read_text())
    (work / "rules.yml").write_text(yaml.safe_dump(document["spec"], sort_keys=False))
    gateway_port, prometheus_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yml")],
        "scrape_configs": [
            {
                "job_name": "pushgateway",
                "honor_labels": True,  # keep the pushed `job` label (docs/design.md §4: labels model, dataset, job)
                "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    logs = {name: open(work / f"{name}.log", "wb") for name in ("pushgateway", "prometheus")}  # noqa: SIM115
    processes: list[subprocess.Popen] = []
    try:
        processes.append(
            subprocess.Popen(
                [pushgateway_bin, f"--web.listen-address=127.0.0.1:{gateway_port}"],
                stdout=logs["pushgateway"],
                stderr=subprocess.STDOUT,
            )
        )
        processes.append(
            subprocess.Popen(
                [
                    prometheus_bin,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    "--log.level=warn",
                ],
                stdout=logs["prometheus"],
                stderr=subprocess.STDOUT,
            )
        )
        gateway, prometheus = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{prometheus_port}"
        _wait_ready(f"{gateway}/-/ready", processes[0], "pushgateway")
        _wait_ready(f"{prometheus}/-/ready", processes[1], "prometheus")
        yield {"pushgateway": gateway, "prometheus": prometheus}
    finally:
        for process in reversed(processes):
            _stop(process)
        for log in logs.values():
            log.close()


def query(prometheus: str, expr: str) -> list[dict]:
    response = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(prometheus: str, expr: str, timeout: float = 30.0) -> list[dict]:
    """Poll until the query returns something (the scrape and rule evaluation run every second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(prometheus, expr)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no result for {expr} within {timeout} s")


def value_of(prometheus: str, expr: str) -> float:
    result = wait_for(prometheus, expr)
    assert len(result) == 1, result
    return float(result[0]["value"][1])


@pytest.mark.slow
def test_push_scrape_query_end_to_end(
    prometheus_stack: dict[str, str], tiny_model_dir: Path, probe_dir: Path, tmp_path: Path
):
    prometheus = prometheus_stack["prometheus"]
    report_path = tmp_path / "report.json"
    result = run_cli(
        "--model",
        str(tiny_model_dir),
        "--reference",
        str(probe_dir),
        "--dataset",
        "probe-e2e",
        "--pushgateway",
        prometheus_stack["pushgateway"],
        "--json",
        str(report_path),
        "--workers",
        "0",
    )
    assert result.returncode == 0, result.stderr
    labelled = json.loads(report_path.read_text())["labelled"]
    where = 'job="deepclust-monitor", model="tiny-test", dataset="probe-e2e"'
    assert value_of(prometheus, f"deepclust_eval_accuracy{{{where}}}") == pytest.approx(labelled["acc"])
    assert value_of(prometheus, f"deepclust_eval_nmi{{{where}}}") == pytest.approx(labelled["nmi"])
    assert value_of(prometheus, f"deepclust_eval_ari{{{where}}}") == pytest.approx(labelled["ari"])
    assert time.time() - value_of(prometheus, f"deepclust_eval_last_success_timestamp_seconds{{{where}}}") < 300
    export = 'job="deepclust-monitor", model="tiny-test", dataset="export:synthetic:none"'
    assert value_of(prometheus, f"deepclust_eval_accuracy{{{export}}}") == pytest.approx(0.1)
    # The ACC-drop rule's join works on real data: "now minus export" is one series, and positive here.
    change = value_of(
        prometheus,
        'max by (job, model, dataset) (deepclust_eval_accuracy{model="tiny-test", '
        'dataset!~"export:.*"}) - on (job, model) group_left () max by (job, model) '
        '(deepclust_eval_accuracy{model="tiny-test", dataset=~"export:.*"})',
    )
    assert change == pytest.approx(labelled["acc"] - 0.1)


@pytest.mark.slow
def test_every_dashboard_query_is_valid_promql(prometheus_stack: dict[str, str]):
    dashboard = json.loads(DASHBOARD.read_text())
    for expr in dashboard_exprs(dashboard):
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$model", ".*")
        response = requests.get(
            f"{prometheus_stack['prometheus']}/api/v1/query", params={"query": concrete}, timeout=10
        )
        assert response.status_code == 200 and response.json()["status"] == "success", (expr, response.text)


# ------------------------------------------------------------------------------------ drift, real model
def blur_and_noise(image: Image.Image) -> Image.Image:
    """A camera gone bad: heavy blur plus sensor noise (fixed seed per image content, so runs repeat)."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=2.0)), dtype=np.float32)
    rng = np.random.default_rng(int(blurred.sum()) % (2**32))
    noisy = blurred + rng.normal(0.0, 40.0, size=blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


DRIFT_SAMPLE = 400


@pytest.mark.slow
def test_drifted_sample_crosses_alert_thresholds_and_clean_does_not(
    prometheus_stack: dict[str, str], default_model_dir: Path, cifar_test_dir: Path, tmp_path: Path
):
    prometheus = prometheus_stack["prometheus"]
    files = _cifar_files(cifar_test_dir)
    clean = make_folder(tmp_path / "clean", pick(files, DRIFT_SAMPLE, 11), labelled=False)
    drifted = make_folder(tmp_path / "drifted", pick(files, DRIFT_SAMPLE, 12), labelled=False, transform=blur_and_noise)
    reports = {}
    for name, folder in (("clean", clean), ("drifted", drifted)):
        path = tmp_path / f"{name}.json"
        result = run_cli(
            "--model",
            str(default_model_dir),
            "--sample",
            str(folder),
            "--dataset",
            f"e2e-{name}",
            "--pushgateway",
            prometheus_stack["pushgateway"],
            "--json",
            str(path),
        )
        assert result.returncode == 0, result.stderr
        reports[name] = json.loads(path.read_text())["drift"]
        keys = (
            "psi",
            "js_divergence",
            "chi2_p_value",
            "confidence_ks",
            "confidence_ks_lower_bound",
            "confidence_wasserstein",
            "mean_confidence",
            "low_confidence_ratio",
        )
        print(f"drift {name}: " + ", ".join(f"{k}={reports[name][k]:.4g}" for k in keys))
    clean_fig, drift_fig = reports["clean"], reports["drifted"]
    # A fresh sample of the reference distribution stays under every alert threshold ...
    assert clean_fig["psi"] < PSI_ALERT
    assert clean_fig["low_confidence_ratio"] < LOW_CONFIDENCE_ALERT
    assert clean_fig["confidence_ks"] < KS_ALERT
    # ... the drifted one crosses them, and every figure moves the right way.
    assert drift_fig["psi"] > PSI_ALERT
    assert drift_fig["low_confidence_ratio"] > LOW_CONFIDENCE_ALERT
    assert drift_fig["confidence_ks"] > KS_ALERT
    assert drift_fig["js_divergence"] > clean_fig["js_divergence"]
    assert drift_fig["chi2_p_value"] < 1e-6 and clean_fig["chi2_p_value"] > 1e-4
    assert drift_fig["mean_confidence"] < clean_fig["mean_confidence"]
    # Prometheus holds the pushed figures and our rules put the drifted sample (only) into alert.
    for name, figures in reports.items():
        for key in ("psi", "js_divergence", "confidence_ks", "low_confidence_ratio"):
            where = f'model="cifar10-lite0", dataset="e2e-{name}"'
            assert value_of(prometheus, f"{EVAL_NAMES[key]}{{{where}}}") == pytest.approx(figures[key])
    alerts = wait_for(prometheus, 'ALERTS{alertname="DeepclustClusterDriftPSI", model="cifar10-lite0"}')
    assert {a["metric"]["dataset"] for a in alerts} == {"e2e-drifted"}
    alerts = wait_for(prometheus, 'ALERTS{alertname="DeepclustConfidenceCollapse", model="cifar10-lite0"}')
    assert {a["metric"]["dataset"] for a in alerts} == {"e2e-drifted"}


# ------------------------------------------------------------------------------------ drift report (pure)
def test_drift_report_with_the_exported_quantile_grid():
    from serving.hosts.monitor import drift_report

    levels = [0.01, *[round(q, 2) for q in np.arange(0.05, 0.951, 0.05)], 0.99]  # training/export.py
    rng = np.random.default_rng(3)
    reference_conf = rng.beta(5, 1.5, size=20_000) * 0.9 + 0.1
    reference = {
        "cluster_hist": [0.1] * 10,
        "confidence_quantiles": {f"{q:g}": float(np.quantile(reference_conf, q)) for q in levels},
    }
    same = drift_report(rng.integers(0, 10, 500), rng.beta(5, 1.5, size=500) * 0.9 + 0.1, 10, reference)
    assert same["low_confidence_threshold"] == pytest.approx(reference["confidence_quantiles"]["0.05"])
    assert same["low_confidence_expected_ratio"] == 0.05
    assert same["psi"] < 0.05 and same["confidence_ks"] < 0.08 and same["low_confidence_ratio"] < 0.1
    collapsed = drift_report(np.zeros(500, np.int64), rng.uniform(0.1, 0.5, 500), 10, reference)
    assert collapsed["psi"] > 5 and collapsed["js_divergence"] > 0.5 and collapsed["chi2_p_value"] == 0.0
    assert collapsed["confidence_ks"] > 0.5 and collapsed["low_confidence_ratio"] > 0.5
    assert collapsed["chi2_statistic"] is not None  # finite here; None only when the reference had a 0 bin
    json.dumps(collapsed, allow_nan=False)


# ------------------------------------------------------------------------------------------ sample size
def test_rules_thresholds_are_the_monitor_sample_size_bounds():
    """The sample-size checks judge each statistic against the alert threshold Prometheus really uses."""
    from serving.hosts import monitor

    exprs = " ".join(rule.get("expr", "") for group in _rule_groups() for rule in group["rules"])
    assert f"deepclust_drift_psi > {monitor.PSI_ALERT}" in exprs
    assert f"deepclust_low_confidence_ratio > {monitor.LOW_CONFIDENCE_ALERT}" in exprs
    assert f"deepclust_drift_confidence_ks > {monitor.CONFIDENCE_KS_ALERT}" in exprs
    assert f"< -{monitor.ACCURACY_DROP_ALERT}" in exprs
    assert (monitor.PSI_ALERT, monitor.LOW_CONFIDENCE_ALERT, monitor.CONFIDENCE_KS_ALERT) == (
        PSI_ALERT,
        LOW_CONFIDENCE_ALERT,
        KS_ALERT,
    )


def _rule_groups() -> list[dict]:
    document = yaml.safe_load(RULES_YAML.read_text())
    return document["spec"]["groups"] if "spec" in document else document["groups"]


def test_undrifted_psi_matches_its_chi_square_limit_and_min_n_is_the_boundary():
    """PSI of an undrifted multinomial sample → χ²(K−1)/n for large n (expected (K−1)/n); `min_n` is the first size
    whose undrifted 99 % quantile is within the bound, so one image fewer is not."""
    from serving.core import drift

    reference = [0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.15, 0.15]
    assert drift.undrifted_psi(reference, 5000).mean() == pytest.approx(9 / 5000, rel=0.1)
    check = drift.psi_sample_check(reference, 40, 0.25)
    assert not check.sufficient and check.undrifted_mean > 0.25  # 40 images read as drift by themselves
    quantile = lambda n: np.quantile(drift.undrifted_psi(reference, n), 0.99)  # noqa: E731
    assert quantile(check.min_n) <= 0.25 < quantile(check.min_n - 1)
    ks = drift.ks_sample_check(10, 0.3)
    from scipy import stats

    assert stats.kstwo.ppf(0.99, ks.min_n) <= 0.3 < stats.kstwo.ppf(0.99, ks.min_n - 1)
    # Cochran: the rarest cluster (5 %) needs 5 expected images → 100.
    assert drift.chi_square_sample_check(reference, 99).min_n == 100


def test_too_small_sample_warns_with_the_minimum_and_why(tiny_model_dir: Path, cifar_test_dir: Path, tmp_path: Path):
    """The issue's case: 40 images of one class. The run still publishes, but says the sample is too small, how
    many images each statistic needs and why, on stderr and in the JSON report."""
    one_class = sorted((cifar_test_dir / "cat").glob("*.jpg"))[:40]
    sample = make_folder(tmp_path / "sample", one_class, labelled=False)
    report_path = tmp_path / "report.json"
    result = run_cli("--model", str(tiny_model_dir), "--sample", str(sample), "--json", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    size = report["sample_size"]
    assert size["n"] == 40 and not size["sufficient"]
    checks = {row["statistic"]: row for row in size["checks"]}
    assert set(checks) == {"psi", "chi2_p_value", "confidence_ks", "low_confidence_ratio"}
    psi = checks["psi"]
    assert not psi["sufficient"] and psi["min_n"] > 40 and psi["undrifted_mean"] > PSI_ALERT
    assert f"at least {psi['min_n']}" in result.stderr and "too few for psi" in result.stderr
    assert any("expected PSI" in warning for warning in report["warnings"])
    assert checks["confidence_ks"]["sufficient"]  # KS needs fewer images: no warning for it
    assert "too few for confidence_ks" not in result.stderr


def test_large_enough_sample_has_no_warning(tiny_model_dir: Path, probe_dir: Path):
    from serving.hosts.monitor import MonitorConfig, run_monitor

    report = run_monitor(MonitorConfig(model=tiny_model_dir, sample_dir=probe_dir, workers=0, progress="none"))
    assert report["sample_size"]["sufficient"] and report["warnings"] == []
    assert report["sample_size"]["min_n"] <= report["n_ok"] == 200


def test_progress_lines_advance_to_the_total_with_eta(tiny_model_dir: Path, probe_dir: Path, capsys):
    """Without a terminal (a CronJob's log) progress is JSON lines: they advance with the images, end at the
    total and carry a rate and an ETA."""
    from serving.hosts.monitor import MonitorConfig, run_monitor

    config = MonitorConfig(
        model=tiny_model_dir, sample_dir=probe_dir, workers=0, progress="log", progress_interval=0.0, batch_size=16
    )
    run_monitor(config)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"progress"' in line]
    done = [line["done"] for line in lines]
    assert len(lines) >= 10 and done == sorted(done) and done[-1] == 200 and done[0] < 200
    assert all(line["total"] == 200 and line["images_per_s"] > 0 for line in lines)
    assert lines[-1]["eta_s"] == 0 and lines[0]["eta_s"] > 0
