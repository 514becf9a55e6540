"""The adversarial folder: the corpus's runner and case directories, the Hypothesis
profiles, and a summary of the runs at the end of the session.

Profiles (``HYPOTHESIS_PROFILE``): ``adversarial-ci`` (the default: derandomized, a small
fixed budget, for ``make test``) and ``fuzz`` (``make fuzz``: thousands of examples, no
deadline). ``ADVERSARIAL_FULL=1`` (``make fuzz``) also runs every entry point on the cases
that ``make test`` samples; ``ADVERSARIAL_SPAWN=1`` runs the command line as fresh
``caffelayers`` processes instead of through the fork server.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adversarial_corpus import build_case
from adversarial_harness import RESULTS, Runner

settings.register_profile("adversarial-ci", max_examples=150, deadline=None,
                          derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.filter_too_much])
settings.register_profile("fuzz", max_examples=5000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.filter_too_much])


@pytest.fixture(scope="session")
def runner():
    runner = Runner(spawn=os.environ.get("ADVERSARIAL_SPAWN") == "1")
    yield runner
    runner.close()


def _copy_case(source: Path, target: Path) -> None:
    """Copy a built case; FIFOs are made anew (copying one would block on it)."""
    target.mkdir(parents=True)
    for entry in source.iterdir():
        mode = entry.lstat().st_mode
        if stat.S_ISFIFO(mode):
            os.mkfifo(target / entry.name)
        elif stat.S_ISDIR(mode):
            _copy_case(entry, target / entry.name)
        else:
            shutil.copy2(entry, target / entry.name)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """``corpus(case, entry) -> (directory, info)``: a fresh copy of the built case for one
    run (runs write snapshots and outputs into it)."""
    root = tmp_path_factory.mktemp("adversarial")
    built = {}

    def get(case, entry):
        key = case.name.replace("/", "__")
        if key not in built:
            pristine = root / "built" / key
            pristine.mkdir(parents=True)
            try:
                built[key] = (pristine, build_case(case, pristine))
            except Exception as error:  # every entry of the case reports the build's error
                built[key] = error
        if isinstance(built[key], Exception):
            raise built[key]
        pristine, info = built[key]
        run_dir = root / "runs" / key / entry.replace("+", "_")
        _copy_case(pristine, run_dir)
        return run_dir, info

    return get


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    cases = {case for case, *_ in RESULTS}
    bad = [(case, entry, problem) for case, entry, problem, _ in RESULTS if problem]
    terminalreporter.write_line(
        f"adversarial corpus: {len(cases)} cases, {len(RESULTS)} runs, {len(bad)} ending in "
        f"anything but a clean error or a correct result; "
        f"{sum(s for *_, s in RESULTS):.0f} s in runs")
    report = os.environ.get("ADVERSARIAL_REPORT")
    if report:
        Path(report).write_text(json.dumps(
            [{"case": c, "entry": e, "problem": p, "seconds": s} for c, e, p, s in RESULTS],
            indent=1))
