"""`hsmsim hsm remove` takes a backup, as CloudHSM does when an HSM leaves an active cluster; a
backup that fails is reported to the caller, never swallowed."""

from __future__ import annotations

import json
from pathlib import Path

from hsmsim.testing.cluster import start_cluster


def test_hsm_remove_reports_a_failed_backup(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "state", azs=2)
    try:
        backups = c.state_dir / "backups"
        # A regular file where the backups directory goes: writing a backup fails (even as
        # root, for whom a mode-0500 directory would still be writable).
        if backups.is_dir():
            for p in backups.iterdir():
                p.unlink()
            backups.rmdir()
        backups.write_text("not a directory\n")
        victim = c.hsm_ids[1]
        r = c.cli("hsm", "remove", victim)
        assert r.returncode == 1, r.stdout + r.stderr
        assert victim in r.stderr and "was removed" in r.stderr
        assert "backup" in r.stderr and "hsmsim backup create" in r.stderr
        # the state the user is told: the HSM is gone, the other one serves
        st = c.status()
        assert [h["hsm_id"] for h in st["hsms"]] == [c.hsm_ids[0]]
        spec = json.loads((c.state_dir / "cluster.json").read_text())
        assert [h["hsm_id"] for h in spec["hsms"]] == [c.hsm_ids[0]]
        # once the directory is back, the backup the error asks for is taken
        backups.unlink()
        backups.mkdir(mode=0o700)
        r = c.cli("backup", "create", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["backup_id"].startswith("backup-")
    finally:
        c.down()
