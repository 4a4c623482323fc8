"""scripts/gpu_check.sh without a GPU: its stages run in child shells and must reach the helpers
and tools they call there; a stage's outcome lands in the summary. Tools are stand-in scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("bash", "timeout", "tee", "tar")), reason="needs bash, timeout, tee and tar"
)


def _stub(folder: Path, name: str, rc: int, rc_setup: int | None = None) -> Path:
    """A program that appends its name and arguments to ``calls.txt`` and exits with ``rc``
    (``rc_setup`` when its first argument is ``setup.py``)."""
    folder.mkdir(exist_ok=True)
    p = folder / name
    setup = f'[ "$1" = setup.py ] && exit {rc_setup}\n' if rc_setup is not None else ""
    p.write_text(f'#!/bin/sh\necho "{name} $*" >> "{folder}/calls.txt"\necho "stub {name} $*"\n{setup}exit {rc}\n')
    p.chmod(0o755)
    return p


def _run(tmp_path: Path, stages: list[str], path: str, **env) -> tuple[subprocess.CompletedProcess, str, list[str]]:
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path), PATH=path, PYTHON=sys.executable)
    full_env.update(env)
    r = subprocess.run(
        ["bash", str(SCRIPT), "--budget", "300", *stages],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    calls = tmp_path / "stubs" / "calls.txt"
    return r, (out / "summary.md").read_text(), calls.read_text().splitlines() if calls.exists() else []


def test_cuda_stages_reach_cmake_in_their_shells(tmp_path):
    stubs = tmp_path / "stubs"
    _stub(stubs, "cmake", 1)
    _stub(stubs, "compute-sanitizer", 0)
    r, summary, calls = _run(tmp_path, ["cuda", "sanitize"], f"{stubs}:{os.environ['PATH']}")
    log = r.stdout + r.stderr
    assert "command not found" not in log, log
    # Both stages configure the cuda_tests build (sanitize: no programs built yet), and fail with it.
    assert [c.split(" -B ")[0] for c in calls] == ["cmake -S .", "cmake -S ."], calls
    assert "| cuda | FAIL (rc 1) |" in summary, summary
    assert "| sanitize | FAIL (rc 1) |" in summary, summary
    assert r.returncode == 1


def test_missing_sanitizer_is_a_skipped_stage(tmp_path):
    stubs = tmp_path / "stubs"
    _stub(stubs, "cmake", 1)
    empty = tmp_path / "no_toolkit"
    empty.mkdir()
    # No compute-sanitizer on PATH nor under CUDA_HOME.
    path = f"{stubs}:/usr/bin:/bin"
    if not all(shutil.which(t, path=path) for t in ("bash", "timeout", "tee", "tar", "awk", "date")):
        pytest.skip("needs bash and the core tools in /usr/bin or /bin")
    if shutil.which("compute-sanitizer", path=path):
        pytest.skip("this machine has compute-sanitizer in /usr/bin")
    r, summary, calls = _run(tmp_path, ["sanitize"], path, CUDA_HOME=str(empty))
    assert calls == [], calls
    assert "| sanitize | skipped (compute-sanitizer not found" in summary, summary
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("failing", ["compile", "check"])
def test_a_failed_build_is_not_built_again_by_later_stages(tmp_path, failing):
    # "check": the build compiles, its import check (no CUDA kernels, no GPU) fails.
    stubs = tmp_path / "stubs"
    python = _stub(stubs, "python", 1, rc_setup=1 if failing == "compile" else 0)
    r, summary, calls = _run(tmp_path, ["build", "test", "bench"], os.environ["PATH"], PYTHON=str(python))
    assert [c for c in calls if "setup.py" in c] == ["python setup.py build_ext --inplace"], calls
    assert "earlytom_ext did not build earlier in this run (see build.log): not retried" in r.stdout, r.stdout
    for stage in ("build", "test", "bench"):
        assert f"| {stage} | FAIL (rc 1) |" in summary, summary
    assert r.returncode == 1


@pytest.mark.parametrize("where", ["root", "scripts"])
def test_help_prints_the_whole_header(where):
    cwd, script = (ROOT, str(SCRIPT)) if where == "root" else (SCRIPT.parent, SCRIPT.name)
    r = subprocess.run(["bash", script, "--help"], cwd=cwd, capture_output=True, text=True, timeout=30)
    lines = r.stdout.splitlines()
    assert r.returncode == 0
    assert lines[0].startswith("# All GPU work of earlytom_ext in ONE run")
    assert all(line.startswith("#") for line in lines), lines
    assert "BENCH_ARGS" in r.stdout and lines[-1] == "# arguments of bench.run)."


def test_test_stage_pytest_lists_failures(tmp_path):
    # pytest's short summary lists failures only when -r names them (a bare -rs drops them), and -v
    # shows each result as it comes (a stage stopped at its slice writes no summary).
    python = _stub(tmp_path / "stubs", "python", 0)
    r, summary, calls = _run(tmp_path, ["test"], os.environ["PATH"], PYTHON=str(python))
    runs = [c.split() for c in calls if " -m pytest " in c]
    assert len(runs) == 1, calls
    flags = runs[0]
    assert "-v" in flags and any(f.startswith("-r") and {"f", "E"} <= set(f[2:]) for f in flags), flags
    assert "| test | pass |" in summary, summary
