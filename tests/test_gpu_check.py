"""benchmarks/gpu_check.py, the prepared GPU check: its CPU dry run writes every part (results or the
error that stopped it) with a passing packed = padded check, and its wheel installer installs only
what this Python lacks."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module; the sys.path entries it adds are undone afterwards."""
    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    return importlib.import_module("gpu_check")


def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel whose package sets ``VERSION``."""
    package, dist = name.replace("-", "_"), f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    files = {
        f"{package}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": metadata + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(
        f"{path},,\n" for path in [*files, f"{dist}.dist-info/RECORD"]
    )
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_only_missing_wheels_are_installed(gpu_check, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "gpu-check-probe", "1.0", requires=("packaging>=999", "torch"))
    fake_wheel(wheels, "packaging", "0.0.1")  # installed here: must be kept, never replaced
    report = gpu_check.install_missing_wheels(wheels, tmp_path / "site")
    assert report["installed"] == ["gpu_check_probe-1.0-py3-none-any.whl"]
    assert [line.split()[0] for line in report["kept"]] == ["packaging"]
    assert importlib.import_module("gpu_check_probe").VERSION == "1.0"
    assert importlib.import_module("packaging").__version__ != "0.0.1"
    assert len(report["unmet_requirements"]) == 1 and "packaging>=999" in report["unmet_requirements"][0]
    sys.modules.pop("gpu_check_probe")


@pytest.mark.slow
def test_the_dry_run_writes_every_part(tmp_path):
    """55-80 s on 2 cores: three training workers, the exactness worker and the sharded smoke."""
    command = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--cpu-dry-run", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["parts"]) == {"exactness", "dpo tiny 64", "sharded_smoke"}
    for name, part in report["parts"].items():
        assert ("result" in part) != ("error" in part), name
    for arm, row in report["parts"]["dpo tiny 64"].get("result", {}).get("arms", {}).items():
        assert "s_per_step" in row or row.get("error"), arm
    exactness = report["parts"]["exactness"]["result"]
    assert exactness["passed"] and exactness["control_dropped_token_caught"]
    assert report["versions"]["torch"] != "missing" and report["commit"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## One offline DPO step" in table and "overall: PASS" in table


def test_a_timed_out_part_takes_its_children_with_it(gpu_check):
    """A launcher killed at its cap must not leave its ranks running (they would hold the GPU)."""
    spawn = "import subprocess, sys, time; c = subprocess.Popen(['sleep', '60']); print(c.pid, flush=True); time.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        gpu_check.run_in_own_group([sys.executable, "-c", spawn], timeout=2)
    assert ends_within(int(caught.value.stdout.split()[0]), seconds=10)


def ends_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is gone, or dead and not yet reaped, within ``seconds``: a killed
    process has closed its files (which ends the parent's wait) a moment before it turns into a zombie."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if "\nState:\tZ" in status.read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
