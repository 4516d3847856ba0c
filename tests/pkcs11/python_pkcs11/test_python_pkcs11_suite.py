"""python-pkcs11's own test suite, from the sdist of the installed python-pkcs11 version, run
against libhsmsim-pkcs11.so and a throw-away cluster (issue 11, "How conformance is kept").

The sdist is fetched with pip once and cached under the venv; its tests/ folder is copied,
adapted by cloudhsm.patch (only differences CloudHSM documents, each hunk naming its reason),
and run by pytest in a child process. The assertion is 0 failures; every skip carries a reason,
and the counts are printed in the terminal summary for the issue's closing note."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p11helpers import require_module

HERE = Path(__file__).resolve().parent
PATCH = HERE / "cloudhsm.patch"
CACHE = Path(sys.prefix) / "hsmsim-test-cache" / "python-pkcs11"

# Tests of python-pkcs11's suite that fail today because of a known hsmsim defect, keyed by
# junit name ("tests.test_aes.AESTests::test_x") -> "issue N defect M: ...". They are expected
# failures: one that passes is reported (strict), so the entry is removed when the fix lands.
# Empty: every issue 11 defect python-pkcs11's suite reaches (1, 2, 4, 5, 7) is fixed on main.
EXPECTED_FAILURES: dict[str, str] = {}


@dataclass
class SuiteResult:
    version: str
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[str]:
        lines = [f"python-pkcs11 {self.version} suite against libhsmsim-pkcs11.so: "
                 f"{len(self.passed)} passed, {len(self.failed)} failed, "
                 f"{len(self.skipped)} skipped"]
        for reason, n in sorted(Counter(self.skipped.values()).items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n:3d}: {reason}")
        for test, msg in self.failed.items():
            lines.append(f"  FAILED {test}: {msg}")
        return lines


def _hunks(text: str) -> list[list[str]]:
    hunks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@@"):
            current = []
            hunks.append(current)
        elif line.startswith(("diff ", "--- ", "+++ ")):
            current = None
        elif current is not None:
            current.append(line)
    return hunks


def test_every_hunk_of_the_patch_names_its_reason() -> None:
    hunks = _hunks(PATCH.read_text())
    assert hunks
    unexplained = [i for i, h in enumerate(hunks)
                   if not any(ln.startswith("+") and "cloudhsm.patch:" in ln for ln in h)]
    assert unexplained == [], f"hunks without a `cloudhsm.patch:` reason: {unexplained}"


def _sdist(version: str) -> Path:
    """The cached sdist of python-pkcs11 `version`, downloaded with pip on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"python_pkcs11-{version}.tar.gz"))
    if found:
        return found[0]
    # `--no-binary python-pkcs11` rather than `:all:`: pip prepares the sdist's metadata in an
    # isolated build environment, and `:all:` would build Cython from source for it (minutes).
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            "python-pkcs11", "--disable-pip-version-check", "-q",
                            f"python-pkcs11=={version}", "-d", str(CACHE)],
                           capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip could not fetch the python-pkcs11 {version} sdist in 300 s (network?)")
    found = sorted(CACHE.glob(f"python_pkcs11-{version}.tar.gz"))
    if r.returncode != 0 or not found:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"pip could not fetch the python-pkcs11 {version} sdist (network?): {tail}")
    return found[0]


def _extract_tests(sdist: Path, dest: Path) -> Path:
    """Copies the sdist's tests/ folder to dest/tests (the package itself stays the installed one)."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if len(Path(m.name).parts) > 1 and Path(m.name).parts[1] == "tests"]
        if not members:
            pytest.fail(f"{sdist.name} has no tests/ folder")
        tar.extractall(dest / "sdist", members=members, filter="data")
    root = next((dest / "sdist").iterdir())
    shutil.move(str(root / "tests"), str(dest / "tests"))
    return dest / "tests"


def _apply_patch(suite: Path) -> None:
    tool = shutil.which("patch")
    if tool is None:
        pytest.skip("the `patch` program is missing (Debian package patch; `make deps`)")
    r = subprocess.run([tool, "-p1", "--batch", "--forward", "-d", str(suite), "-i", str(PATCH)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       start_new_session=True)
    assert r.returncode == 0, f"cloudhsm.patch does not apply to this sdist:\n{r.stdout}{r.stderr}"


def _mechanism_names(reason: str) -> str:
    """python-pkcs11 skips with 'Requires 4357, 4356': name the mechanisms CloudHSM lacks."""
    from pkcs11 import Mechanism
    try:
        numbers = [int(part) for part in reason.removeprefix("Requires ").split(",")]
    except ValueError:
        return reason
    names = []
    for n in numbers:
        try:
            names.append("CKM_" + Mechanism(n).name)
        except ValueError:
            names.append(hex(n))
    return "not on CloudHSM's mechanism list (reference §1.4): " + ", ".join(names)


def _parse(junit: Path, version: str) -> SuiteResult:
    result = SuiteResult(version)
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            result.failed[name] = ((failure.get("message") or "").splitlines() or [""])[0][:200]
        elif skipped is not None:
            reason = skipped.get("message") or ""
            result.skipped[name] = _mechanism_names(reason.removeprefix("Skipped: "))
        else:
            result.passed.append(name)
    return result


@pytest.fixture(scope="module")
def suite_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from hsmsim.testing.cluster import ClusterStartError, start_cluster
    require_module()
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("pp11") / "state", azs=2)
    except ClusterStartError as exc:
        pytest.fail(f"the cluster did not start:\n{exc}", pytrace=False)
    yield cluster
    cluster.down()


@pytest.mark.timeout(900)
def test_python_pkcs11_suite_passes(suite_cluster, tmp_path: Path,  # type: ignore[no-untyped-def]
                                    request: pytest.FixtureRequest) -> None:
    try:
        import parameterized  # noqa: F401  (python-pkcs11's tests import it)
    except ImportError:
        pytest.fail("python-pkcs11's tests need `parameterized`: install the test extras "
                    "(`make build`)", pytrace=False)
    version = importlib.metadata.version("python-pkcs11")
    suite = _extract_tests(_sdist(version), tmp_path)
    _apply_patch(tmp_path)
    env = dict(os.environ, **suite_cluster.env)
    env.update(PKCS11_MODULE=str(require_module()), PKCS11_TOKEN_LABEL="hsm1",
               PKCS11_TOKEN_PIN=suite_cluster.pin,
               PKCS11_TOKEN_SO_PIN=f"admin:{suite_cluster.admin_password}")
    env.pop("PYTHONPATH", None)  # the installed python-pkcs11, not a source tree
    junit = tmp_path / "junit.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hsmsim",
                        "-q", "-rs", "--timeout=300", f"--junitxml={junit}", "tests"],
                       cwd=suite.parent, env=env, capture_output=True, text=True, timeout=840,
                       stdin=subprocess.DEVNULL, start_new_session=True)
    assert junit.exists(), f"python-pkcs11's suite did not run ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-2000:]}"
    result = _parse(junit, version)
    # The counts go to the terminal whatever the capture mode, for the closing note.
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in result.summary():
                reporter.write_line(line)

    unexpected = {t: m for t, m in result.failed.items() if t not in EXPECTED_FAILURES}
    fixed = [t for t in EXPECTED_FAILURES if t in result.passed]
    assert not unexpected, "python-pkcs11's tests failed:\n" + "\n".join(
        f"{t}: {m}" for t, m in unexpected.items()) + "\n" + r.stdout[-4000:]
    assert not fixed, f"expected failures now pass (remove them from EXPECTED_FAILURES): {fixed}"
    assert all(result.skipped.values()), "a skip without a reason"
    assert len(result.passed) > 50, f"too little ran: {result.summary()}"
