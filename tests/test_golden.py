"""The golden runs (tests/golden.py) still give the recorded codes, scales, zero points and saved weights.

A refactoring must leave every digest unchanged; a change meant to alter results regenerates the fixture
(``python tests/golden.py NAME ...``) and says why in its commit.
"""

import json

import pytest
from golden import GOLDEN, RUNS, run


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.endswith("-2p") else n for n in RUNS])
def test_golden_run_is_unchanged(name, tmp_path):
    expected = json.loads(GOLDEN.read_text())[name]
    got = run(name, tmp_path / "out")
    assert sorted(got) == sorted(expected)
    changed = sorted(k for k in expected if got[k] != expected[k])
    assert not changed, f"{len(changed)} of {len(expected)} tensors changed, e.g. {changed[:5]}"
