"""adaface-eval output helpers: the recommended threshold and the results table."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from adaface_client.eval_cli import print_table, recommended_threshold
from adaface_client.evaluation import DatasetResult
from adaface_client.verification import verification_result


@pytest.mark.parametrize("t", [0.5, 0.29, -0.3, 0.1234565, 0.999999, 0.4123456789])
def test_recommended_threshold_is_just_above(t: float) -> None:
    rec = recommended_threshold(t)
    # The server accepts score >= rec: a score equal to t (a measured false accept) must
    # stay rejected, and the value must survive printing with 6 decimals.
    assert rec > t
    assert rec - t <= 1e-6 + 1e-12
    assert float(f"{rec:.6f}") == rec


def test_table_rows() -> None:
    rng = np.random.default_rng(0)
    issame = np.arange(40) % 2 == 0
    scores = np.where(issame, rng.uniform(0.5, 1, 40), rng.uniform(-1, 0.4, 40))
    result = verification_result(scores, issame, fars=(0.1, 1e-3))
    out = io.StringIO()
    print_table([DatasetResult("lfw", True, result, scores, issame)], (0.1, 1e-3), out)
    head, row = out.getvalue().splitlines()[:2]
    assert head.split() == [
        "dataset", "flip", "pairs", "accuracy", "%", "threshold",
        "TAR@FAR=1e-01", "%", "TAR@FAR=1e-03", "%",
    ]  # fmt: skip
    tar = result.at_far[0.1]
    assert tar is not None and result.at_far[1e-3] is None  # 20 impostors: 1e-3 unmeasurable
    assert row.split() == [
        "lfw",
        "on",
        "40",
        f"{100 * result.accuracy_mean:.2f}",
        "±",
        f"{100 * result.accuracy_std:.2f}",
        f"{result.best_threshold:.3f}",
        f"{100 * tar[0]:.2f}",
        "n/a",
    ]


def test_roc_without_matplotlib_says_how_to_get_it(tmp_path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from adaface_client.eval_cli import main\n"
        f"sys.exit(main([{str(tmp_path / 'x.bin')!r}, '--roc', 'roc.png']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--roc needs matplotlib: pip install 'adaface-serving[plot]'" in proc.stderr
