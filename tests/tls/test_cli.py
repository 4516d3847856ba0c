"""`hsmsim tls` at its boundary: bad flags and bad targets get one clear message and exit code,
change nothing (no key left on the token, no files written); a cluster that refuses read-only
sessions gets a warning naming the fix (in test_tutorial.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hsmsim.testing.cluster import run_cli

from .conftest import Backend


def _inproc(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    """`hsmsim ARGS` in this process, for checks that fail before any PKCS#11 module loads
    (a subprocess costs a second of start-up each)."""
    from hsmsim.cli import main
    saved = dict(os.environ)
    try:
        rc = main(args)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out, err = capsys.readouterr()
    return rc, out, err


def _private_keys(backend: Backend) -> int:
    env = {**os.environ, **backend.module_env}
    r = subprocess.run(["pkcs11-tool", "--module", str(backend.module), "--token-label",
                        backend.token, "--login", "--pin", backend.pin, "--list-objects",
                        "--type", "privkey"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.count("Private Key Object")


@pytest.mark.parametrize("args, message", [
    (["--cn", 'bad"name'], "--cn must be"),
    (["--cn", ""], "--cn must be"),
    (["--cn", "ok.test", "--days", "0"], "--days must be"),
    (["--cn", "ok.test", "--port", "70000"], "--port must be"),
])
def test_bad_values_change_nothing(softhsm_backend: Backend, tmp_path: Path, args: list[str],
                                   message: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = _private_keys(softhsm_backend)
    out = tmp_path / "kit"
    rc, _out, err = _inproc(capsys, ["tls", "init", "--out", str(out),
                                     *softhsm_backend.init_args, *args])
    assert rc == 1 and message in err, err
    assert err.startswith("hsmsim: error: ") and "Traceback" not in err
    assert not out.exists()
    assert _private_keys(softhsm_backend) == before


@pytest.mark.parametrize("args", [["--key", "rsa1024"], ["--issuer", "ca2"], []])
def test_bad_flags_are_usage_errors(tmp_path: Path, args: list[str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    cn = [] if not args else ["--cn", "x.test"]
    rc, _out, err = _inproc(capsys, ["tls", "init", "--state", str(tmp_path), *cn, *args])
    assert rc == 2 and "usage:" in err


def test_wrong_pin_is_reported_and_writes_nothing(softhsm_backend: Backend,
                                                  tmp_path: Path) -> None:
    pin_file = tmp_path / "wrong.pin"
    pin_file.write_text("not-the-pin")
    args = list(softhsm_backend.init_args)
    args[args.index("--pin-file") + 1] = str(pin_file)
    out = tmp_path / "kit"
    r = run_cli(["tls", "init", "--cn", "x.test", "--out", str(out), *args])
    assert r.returncode == 1
    assert "logging in to token 'hsm1' failed: PinIncorrect" in r.stderr
    assert "not-the-pin" not in r.stderr and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--module", "/nonexistent/lib.so", "--token", "t", "--pin-file", "/etc/hostname"],
     "PKCS#11 module /nonexistent/lib.so does not exist"),
    (["--module", "/etc/hostname"], "--module needs --token and --pin-file"),
    (["--token", "t"], "need --module"),
    (["--module-env", "NOEQUALS", "--module", "/etc/hostname", "--token", "t", "--pin-file",
      "/etc/hostname"], "must look like NAME=VALUE"),
])
def test_bad_module_target(tmp_path: Path, args: list[str], message: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, _out, err = _inproc(capsys, ["tls", "init", "--cn", "x.test", "--state", str(tmp_path),
                                     *args])
    assert rc == 1 and message in err, err


def test_no_daemon_for_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hsmsim.resources import pkcs11_module
    try:
        pkcs11_module()
    except FileNotFoundError as exc:
        pytest.skip(f"hsmsim module not built: {exc}")
    rc, _out, err = _inproc(capsys, ["tls", "init", "--cn", "x.test", "--state",
                                     str(tmp_path / "none")])
    assert rc == 1
    assert "no hsmsim daemon for" in err and "hsmsim up --detach --state" in err
    assert not (tmp_path / "none").exists()


def test_out_must_be_a_directory(softhsm_backend: Backend, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    rc, _out, err = _inproc(capsys, ["tls", "init", "--cn", "x.test", "--out", str(not_dir),
                                     *softhsm_backend.init_args])
    assert rc == 1 and "exists and is not a directory" in err
    assert not_dir.read_text() == "x"


def test_existing_kit_is_not_overwritten(softhsm_backend: Backend, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kit"
    softhsm_backend.init(out, "--cn", "first.test", "--key", "ec-p256")
    before = (out / "kit.json").read_text()
    keys = _private_keys(softhsm_backend)
    rc, _out, err = _inproc(capsys, ["tls", "init", "--cn", "second.test", "--out", str(out),
                                     *softhsm_backend.init_args])
    assert rc == 1 and "already holds a TLS kit" in err
    assert (out / "kit.json").read_text() == before
    assert _private_keys(softhsm_backend) == keys


@pytest.mark.parametrize("args, message", [
    (["--seconds", "0"], "--seconds must be"),
    (["--latency-ms", "-1"], "--latency-ms values must be"),
])
def test_bench_flags(args: list[str], message: str,
                     capsys: pytest.CaptureFixture[str]) -> None:
    rc, _out, err = _inproc(capsys, ["tls", "bench", *args])
    assert rc == 1 and message in err


def test_another_crypto_user_owns_the_key(hsmsim_backend: Backend, tmp_path: Path) -> None:
    state = str(hsmsim_backend.state)
    password = "TlsUser-Pass-1234"
    r = run_cli(["user", "create", "--username", "tls_user", "--role", "crypto-user",
                 "--password", password, "--state", state])
    assert r.returncode == 0, r.stderr
    # No password known for that user: a clear error, nothing made.
    r = run_cli(["tls", "init", "--cn", "u.test", "--user", "tls_user", "--state", state,
                 "--out", str(tmp_path / "none")])
    assert r.returncode == 1 and "no password for crypto user 'tls_user'" in r.stderr
    assert "HSMSIM_TLS_PASSWORD" in r.stderr and not (tmp_path / "none").exists()
    # A wrong password: the login fails (one failed login, far from the lockout), no PIN file.
    wrong = {**os.environ, "HSMSIM_TLS_PASSWORD": "Wrong-Pass-0000"}
    r = run_cli(["tls", "init", "--cn", "u.test", "--user", "tls_user", "--state", state,
                 "--out", str(tmp_path / "wrong")], env=wrong)
    assert r.returncode == 1 and "failed: PinIncorrect" in r.stderr, r.stderr
    assert "Wrong-Pass-0000" not in r.stderr and not (tmp_path / "wrong").exists()
    assert not (hsmsim_backend.state / "tls" / "tls_user.pin").exists()
    env = {**os.environ, "HSMSIM_TLS_PASSWORD": password}
    r = run_cli(["tls", "init", "--cn", "u.test", "--user", "tls_user", "--state", state,
                 "--key", "ec-p256", "--out", str(tmp_path / "kit"), "--json"], env=env)
    assert r.returncode == 0, r.stderr
    kit = json.loads(r.stdout)
    pin_file = Path(kit["pin_file"])
    assert pin_file.name == "tls_user.pin" and pin_file.read_text() == f"tls_user:{password}"
    # The key belongs to tls_user: crypto_user does not see it.
    user_backend = Backend("tls_user", hsmsim_backend.state, [], hsmsim_backend.module,
                           "hsm1", f"tls_user:{password}", hsmsim_backend.module_env)
    mine = _list_private(user_backend)
    theirs = _list_private(hsmsim_backend)
    assert kit["label"] in mine and kit["label"] not in theirs
    r = run_cli(["tls", "init", "--cn", "u.test", "--user", "bad name!", "--state", state])
    assert r.returncode == 1 and "not a valid CloudHSM user name" in r.stderr


def _list_private(backend: Backend) -> str:
    env = {**os.environ, **backend.module_env}
    r = subprocess.run(["pkcs11-tool", "--module", str(backend.module), "--token-label",
                        backend.token, "--login", "--pin", backend.pin, "--list-objects",
                        "--type", "privkey"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_default_out_dir_is_under_the_state_dir(softhsm_backend: Backend) -> None:
    r = run_cli(["tls", "init", "--cn", "Default Out.test", "--key", "ec-p256",
                 *softhsm_backend.init_args])
    assert r.returncode == 0, r.stderr
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in r.stdout.splitlines()
             if line.strip()}
    assert lines["uri"].startswith("pkcs11:token=hsm1;object=tls-default-out.test-")
    cert = Path(lines["certificate"].split()[0])
    assert cert.parent.parent == softhsm_backend.state / "tls"
    assert cert.parent.name.startswith("default-out.test-") and cert.is_file()
