"""Real-host tests: they need a ComfyUI source checkout in COMFYUI_PATH (its environment made by setup_comfyui.sh,
its interpreter in COMFYUI_PYTHON). Without one they are skipped with that reason, except in CI (CI set in the
environment): there every real-host test must run, so a missing host and any skip of these tests is a failure.
The terminal summary names the host and counts its tests, so a CI log shows what ran where."""

import os
from pathlib import Path

import pytest
from comfy_server import ComfyServer, comfyui_path, comfyui_version

SKIP_REASON = ("COMFYUI_PATH is not set to a ComfyUI source tree; real-host tests skipped "
               "(see tests/integration/setup_comfyui.sh)")
HERE = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def is_real_host_test(path) -> bool:
    return HERE in Path(path).resolve().parents


def pytest_collection_modifyitems(config, items):
    if comfyui_path() is not None or IN_CI:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if is_real_host_test(item.path):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail") and is_real_host_test(item.path):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"real-host test skipped in CI, which counts as a failure: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if IN_CI and report.skipped and is_real_host_test(collector.path):
        report.outcome = "failed"
        report.longrepr = f"real-host test module skipped in CI, which counts as a failure: {report.longrepr}"
    return report


def pytest_terminal_summary(terminalreporter):
    """One line per run: the host and the outcome of each real-host test (a test's worst phase counts)."""
    outcome_of = {}
    for outcome in ("passed", "skipped", "failed", "error"):  # later ones win
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if nodeid and is_real_host_test(terminalreporter.config.rootpath / nodeid.split("::")[0]):
                outcome_of[nodeid] = outcome
    counts = {k: list(outcome_of.values()).count(k) for k in ("passed", "failed", "error", "skipped")}
    path = comfyui_path()
    host = f"ComfyUI {comfyui_version(path)} ({path})" if path else "no ComfyUI host"
    terminalreporter.write_sep("-", f"real-host tests on {host}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    if comfyui_path() is None:
        pytest.fail(SKIP_REASON.replace("skipped", "cannot run") + "; CI requires a real host")
    server = ComfyServer(comfyui_path(), tmp_path_factory.mktemp("comfyui_base"))
    server.prepare()
    server.start()
    try:
        yield server
    finally:
        server.stop()
