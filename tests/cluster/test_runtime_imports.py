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


def test_a_private_ray_that_fails_to_start_leaves_no_temp_dir():
    """Each failed start left its /tmp/tfray-* behind (an impossible CPU count stands in for any failure)."""
    code = ("import os, tempfile\n"
            "from cluster import runtime\n"
            "made, real = [], tempfile.mkdtemp\n"
            "runtime.tempfile.mkdtemp = lambda *a, **k: made.append(real(*a, **k)) or made[-1]  # records it\n"
            "try:\n"
            "    with runtime.ray_session(num_cpus=-1):\n"
            "        pass\n"
            "except ValueError as err:\n"
            "    print('refused' if 'nonnegative' in str(err) else err)\n"
            "print(made[0].startswith('/tmp/tfray-'), os.path.exists(made[0]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["refused", "True", "False"], out.stdout + out.stderr[-2000:]


def test_sigterm_stops_a_private_ray_and_removes_its_temp_dir():
    """`kill`/`timeout` on a command: Ray's own driver handler died on the spot, leaving /tmp/tfray-* behind."""
    import glob
    import signal

    code = ("import time\n"
            "from cluster import runtime\n"
            "with runtime.ray_session(num_cpus=1):\n"
            "    print('up', flush=True)\n"
            "    time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in process.stdout:  # Ray's own lines first (a token-auth warning)
            seen.append(line)
            if line.strip() == "up":
                break
        assert seen and seen[-1].strip() == "up", "".join(seen)
        [temp_dir] = [str(Path(d).parent) for d in glob.glob(f"/tmp/tfray-*/session_*_{process.pid}")]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert not Path(temp_dir).exists()
    assert "SIGTERM received" not in process.stdout.read()  # Ray's stack dump on the way down
