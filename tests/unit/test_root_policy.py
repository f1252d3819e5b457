"""Without root, tests that need it are skipped on a workstation and fail the run under CI."""

from tests.conftest import without_root


def test_root_runs_everything():
    assert without_root({"CI": "true"}, root=True, wanted=10) is None


def test_a_workstation_without_root_skips():
    assert without_root({}, root=False, wanted=10) == "skip"
    assert without_root({"CI": "false"}, root=False, wanted=10) == "skip"


def test_ci_without_root_fails():
    message = without_root({"CI": "true"}, root=False, wanted=10)
    assert message.startswith("CI=true: 10 tests need root")


def test_ci_without_root_tests_selected_is_fine():
    assert without_root({"CI": "true"}, root=False, wanted=0) is None
