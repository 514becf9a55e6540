"""Every corpus case through every entry point that reads what it breaks: each run ends in
one clean ``error: `` line (status 2, the file named, no traceback) or in a correct result
(status 0, checked by the run itself), within 60 s and 4 GB of address space."""

from __future__ import annotations

import re

import pytest
from adversarial_corpus import CASES, command, resolve
from adversarial_harness import FULL, RESULTS, Runner


def _pairs():
    for case in CASES:
        if not (case.ci or FULL):
            continue
        for entry in case.expects if FULL else case.options.get("ci_entries", case.expects):
            yield pytest.param(case, entry, id=f"{case.name}:{entry}")


@pytest.mark.parametrize("case,entry", list(_pairs()))
def test_clean_error_or_correct_result(case, entry, corpus, runner):
    d, info = corpus(case, entry)
    kind, job = command(entry, d, case.options)
    expect = resolve(case.expects[entry], entry, d, info)
    cwd = d.parent if case.options.get("cwd_up") else d
    run = (runner.cli if kind == "cli" else runner.api)(job, expect, cwd)
    problem = run.problem()
    RESULTS.append((case.name, entry, problem, run.seconds))
    assert problem is None, f"{' '.join(map(str, job)) if kind == 'cli' else job}\n{run.describe()}"


#: runs repeated through the installed console script, as fresh processes.
SPAWNED = ["typos/conv-num-output-2e9:inspect", "weights/conv-3x4x3x3:train",
           "reference/zip-bomb-8gb:verify-torch"]


@pytest.fixture(scope="module")
def spawner():
    spawner = Runner(spawn=True)
    yield spawner
    spawner.close()


@pytest.mark.parametrize("name", SPAWNED)
def test_the_console_script_ends_as_the_fork_server_runs_do(name, corpus, runner, spawner):
    """The fork server's children are the command line as a fresh ``caffelayers`` process
    with ``RLIMIT_AS`` set in ``preexec_fn`` would be: the same status and error line."""
    case_name, entry = name.split(":")
    case = next(case for case in CASES if case.name == case_name)
    results = []
    for run_with in (runner, spawner):
        d, info = corpus(case, f"{entry}-{'spawned' if run_with.spawn else 'forked'}")
        _, job = command(entry, d, case.options)
        run = run_with.cli(job, resolve(case.expects[entry], entry, d, info), d)
        assert run.problem() is None, run.describe()
        # the same line, but for the folder and what the address-space cap leaves free
        results.append((run.rc, [re.sub(r"[\d.]+ [KMGT]?B\b", "SIZE", line.replace(str(d), "DIR"))
                                 for line in run.error_lines]))
    assert results[0] == results[1]
