"""bench/fold_throughput.py's refusals (not its speed): a missing --dir is named before any work."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "fold_throughput.py"


def test_a_missing_dir_is_refused_with_its_code_and_nothing_written(tmp_path):
    out = tmp_path / "results" / "throughput"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--dir", str(tmp_path / "absent"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "error[not-found]" in run.stderr and "Traceback" not in run.stderr
    assert str(tmp_path / "absent") in run.stderr
    assert not (tmp_path / "results").exists()
