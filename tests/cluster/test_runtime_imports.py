"""Ray imports `cluster.runtime` in every worker process it starts (the local Ray's setup hook)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_worker_setup_hook_imports_nothing_heavy():
    # Importing the job spec here once cost every Ray Train process ~2.2 s of CPU on the way to the
    # first step (docs/performance.md); the hook's module must stay as light as Ray itself.
    heavy = ("cluster.spec", "torch", "transformers", "datasets", "pydantic")
    code = ("import sys, cluster.runtime; cluster.runtime.quiet_worker_logs(); "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"cluster.runtime pulled in {out.stdout.strip()}"


def test_the_package_still_offers_the_job_spec():
    import cluster
    from cluster.spec import JobSpec, load_job

    assert cluster.JobSpec is JobSpec and cluster.load_job is load_job
