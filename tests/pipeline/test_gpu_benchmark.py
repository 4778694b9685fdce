"""benchmarks/gpu.py: its --smoke mode runs the same code paths on CPU (tiny models) and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_gpu_benchmark_smoke_mode_runs_every_measurement(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHORUS_PROGRESS": "off", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--smoke", "--results",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert out["mode"].startswith("smoke") and "not GPU numbers" in out["mode"]
    assert len(out["cache"]) == 6 and len(out["train"]) == 2
    for row in out["cache"]:
        assert row["bare_tok_s"] > 0 and row["chunked_tok_s"] > 0 and row["body_tok_s"] > 0
        assert row["cache_vs_bare"] > 0 and row["pipelined_vs_bare"] > 0 and row["log_probs_vs_bare"] > 0
        assert row["per_row_tok_s"] > 0 if row["teacher"] == "teacher" else "per_row_tok_s" not in row
    for row in out["train"]:
        assert row["kd_cache_ms"] > 0 and row["ce_chunked_ms"] > 0 and row["ce_hf_ms"] > 0
    assert "cache/bare" in res.stdout and "KD/CE" in res.stdout
