"""Every Caffe reference case, replayed through caffelayers.Net (and Solver, for solver
cases) at the default tolerances."""

from pathlib import Path

import pytest

from caffelayers.verify import verify_case

CASES_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "caffe"


def case_dirs():
    return sorted(p for p in CASES_DIR.iterdir() if (p / "reference.npz").is_file())


@pytest.mark.parametrize("case", case_dirs(), ids=lambda p: p.name)
def test_case_matches_caffe(case):
    result = verify_case(case)
    assert result.passed, "\n".join([c.describe() for c in result.failures] + [result.summary])
