"""The prepared GPU check runs end to end on the CPU in its dry-run mode.

GPU time is scarce, and a broken script would waste it. This runs every phase of
benchmarks/gpu_check.py under the Triton interpreter with tiny shapes and reads its JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check") / "report.json"
    environment = {key: value for key, value in os.environ.items() if key != "OUT"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(path)],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(path.read_text())


def test_dry_run_checks_pass(dry_run_report):
    assert dry_run_report["dry_run"] is True
    assert dry_run_report["checks_failed"] == 0, dry_run_report["failures"]
    assert dry_run_report["skipped"] == []
    cases = {check["case"] for check in dry_run_report["checks"]}
    assert any(case.startswith("13x13") for case in cases)
    assert any(case.endswith(" toeplitz") for case in cases)
    assert "sampling interpreter agreement" in cases
    assert sum(case.startswith("sampling B=") for case in cases) >= 2


def test_every_phase_reports_timings(dry_run_report):
    modes = {(row["row"], row["mode"]) for row in dry_run_report["timings"]}
    assert ("tiny", "forward_full_backward") in modes
    assert ("tiny_batch1", "forward") in modes
    assert all(row["toeplitz_ms"] > 0 for row in dry_run_report["timings"]
               if row["mode"] != "forward_full_backward")
    sampling = dry_run_report["sampling"]
    for key in ("write_bandwidth_gbps", "step_ieee_ms", "step_tf32_ms", "sample_speedup",
                "bank_speedup"):
        assert sampling[key] > 0, key
    # The interpreter multiplies in float32 whatever the precision, so the bias is only present.
    assert "tf32_covariance_bias" in sampling
    assert any(key.startswith("factorize_") for key in sampling)
