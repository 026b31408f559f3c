"""`./run bench soak` (bench/soak/) for one fault of each kind, as the command runs: nothing
acknowledged is lost, no deposed master takes a write, every group comes back to protected,
and the results files say so."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
FAULTS = 9  # every kind once (one round); without network namespaces one kind comes twice


def soak(workdir: Path, *args: str, timeout: float = 240) -> tuple[int, str]:
    """The benchmark as a command of its own (it enters network namespaces of its own: this
    process stays where it is); SIGTERM on a timeout, which stops it cleanly."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH"))))
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "soak", "--workdir", str(workdir / "x"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        pytest.fail(f"the soak did not end within {timeout:.0f} s:\n{output}")
    return process.returncode, output


def test_one_fault_of_each_kind_loses_nothing_and_every_group_comes_back(workdir: Path) -> None:
    results = workdir / "results"
    code, output = soak(workdir, "--faults", str(FAULTS), "--seed", "7", "--results-dir", str(results))
    print(output)
    found = list(results.glob("soak-*.json"))
    assert len(found) == 1, f"no results file in {results}:\n{output}"
    data = json.loads(found[0].read_text())
    figures = data["figures"]
    kinds = data["settings"]["kinds"].split(",")
    assert figures["error"] == "" and figures["final_check_error"] == "", output
    assert figures["faults_done"] == FAULTS
    assert {kind: figures["per_kind"].get(kind, {}).get("count", 0) >= 1 for kind in kinds} == dict.fromkeys(
        kinds, True
    ), figures["per_kind"]
    assert figures["acknowledged"] > 0, "nothing was acknowledged: nothing was tested"
    assert figures["lost_after_each_fault"] == 0
    assert figures["lost_via_coordinator"] == 0
    assert figures["lost_on_masters"] == {"dn1": 0, "dn2": 0}
    assert figures["unexpected_via_coordinator"] == 0 and set(figures["unexpected_on_masters"].values()) == {
        0
    }
    assert figures["deposed_writes"] == 0
    assert figures["not_returned"] == 0, [f for f in figures["faults"] if not f["returned"]]
    assert figures["two_writable_masters"] == 0
    moved = [f for f in figures["faults"] if f["kind"] in ("kill_master", "switchover", "partition_master")]
    assert all(f["master_after"] not in ("", f["master_before"]) for f in moved), moved
    assert all(f["protected_ms"] is not None for f in figures["faults"])
    assert code == 0, output
