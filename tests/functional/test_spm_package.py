"""
The SPM package is a formula an operator can use: ``spm build`` of the
checkout, ``spm local install`` into a formula path, that path served as
``file_roots``, ``saltutil.sync_all``, and the relay role applied in a
namespace. SPM strips the package's name from every member path (all
occurrences, ``salt/spm/pkgfiles/local.py``), so a module directory named like
the package would land flat in ``_modules/`` and shadow Salt's own modules.
"""

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import salt
import yaml

from tests.conftest import ROOT

pytestmark = [pytest.mark.root, pytest.mark.slow]

SPM = ROOT / ".venv" / "bin" / "spm"
SALT_CALL = ROOT / ".venv" / "bin" / "salt-call"
NETNS_ETC = Path("/etc/netns")
SALT_DIR = Path(salt.__file__).parent


def salt_names(kind):
    """Names of Salt's own modules of a kind (``modules``, ``states``)."""
    return {
        path.stem if path.suffix == ".py" else path.name
        for path in (SALT_DIR / kind).iterdir()
        if path.suffix == ".py" or (path / "__init__.py").exists()
    } - {"__init__"}


def extension_names(directory):
    return {path.stem if path.suffix == ".py" else path.name for path in directory.iterdir()}


@pytest.fixture
def spm(tmp_path):
    """Run spm with a configuration whose every path lies in ``tmp_path``."""
    conf = tmp_path / "spm-conf"
    conf.mkdir()
    settings = {
        "root_dir": str(tmp_path / "root"),
        "formula_path": str(tmp_path / "formulas"),
        "pillar_path": str(tmp_path / "pillar"),
        "reactor_path": str(tmp_path / "reactor"),
        "spm_build_dir": str(tmp_path / "build"),
        "spm_cache_dir": str(tmp_path / "cache"),
        "spm_db": str(tmp_path / "cache" / "packages.db"),
        "spm_logfile": str(tmp_path / "spm.log"),
        "cachedir": str(tmp_path / "cache"),
    }
    (conf / "spm").write_text(json.dumps(settings))

    def run(*args, cwd=ROOT):
        proc = subprocess.run(
            [str(SPM), "-c", str(conf), "-y", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    run.settings = settings
    return run


def test_package_installs_a_tree_that_loads_and_applies(spm, relay_ns, tmp_path):
    spm("build", ".")
    package = Path(spm.settings["spm_build_dir"]) / "relayroute-0.1.0-1.spm"
    with tarfile.open(package) as tar:
        members = tar.getnames()
    assert "relayroute/_modules/relayroute_core/__init__.py" in members
    assert not [m for m in members if m.startswith(("relayroute/tests", "relayroute/.venv"))]
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]

    spm("local", "install", str(package))
    formulas = Path(spm.settings["formula_path"])
    installed = formulas / "_modules" / "relayroute_core"
    assert (installed / "__init__.py").is_file()
    assert (installed / "engine.py").is_file()
    assert (formulas / "_states" / "relayroute.py").is_file()
    assert (formulas / "_beacons" / "relayroute.py").is_file()
    assert (formulas / "relayroute" / "reactor" / "follow-mac.sls").is_file()
    assert (formulas / "relayroute" / "relay" / "init.sls").is_file()
    # Nothing of Salt's own is shadowed: every extension module has a name of its own.
    assert extension_names(formulas / "_modules") == {"relayroute_core"}
    assert extension_names(formulas / "_states") == {"relayroute"}
    assert not extension_names(formulas / "_modules") & salt_names("modules")
    assert not extension_names(formulas / "_states") & salt_names("states")
    assert extension_names(formulas / "_beacons") == {"relayroute"}
    assert not extension_names(formulas / "_beacons") & salt_names("beacons")

    # The operator's pillar: the installed example, with the boot files kept in
    # this test's directory.
    pillar_dir = tmp_path / "pillar-roots"
    pillar_dir.mkdir()
    example = yaml.safe_load(
        (Path(spm.settings["pillar_path"]) / "relayroute.sls.orig").read_text()
    )
    # This namespace's master-relay has its own MAC: the relays find it by ARP.
    example["relayroute"]["proxies"]["master-relay"].pop("mac")
    (pillar_dir / "relayroute.sls").write_text(yaml.safe_dump(example))
    persist = tmp_path / "persist"
    (pillar_dir / "local.sls").write_text(
        yaml.safe_dump(
            {
                "relayroute": {
                    "persist": {
                        "dir": str(persist / "relayroute"),
                        "systemd_dir": str(persist / "systemd"),
                    },
                }
            }
        )
    )
    (pillar_dir / "top.sls").write_text("base:\n  '*':\n    - relayroute\n    - local\n")

    minion = tmp_path / "minion"
    (minion / "conf").mkdir(parents=True)
    (minion / "conf" / "minion").write_text(
        json.dumps(
            {
                "id": "relay1",
                "root_dir": str(minion),
                "file_client": "local",
                "file_roots": {"base": [str(formulas)]},
                "pillar_roots": {"base": [str(pillar_dir)]},
                "grains": {"roles": ["relay"]},
                "enable_fqdns_grains": False,
                "cachedir": str(minion / "cache"),
                "extension_modules": str(minion / "cache" / "extmods"),
                "pki_dir": str(minion / "pki"),
                "sock_dir": str(minion / "sock"),
                "log_file": str(minion / "log"),
            }
        )
    )
    # An empty resolv.conf for the namespace: no wait on an unreachable resolver.
    overlay = NETNS_ETC / relay_ns.name
    overlay.mkdir(parents=True, exist_ok=True)
    try:
        (overlay / "resolv.conf").write_text("")

        def salt_call(*args):
            proc = relay_ns.exec(
                [str(SALT_CALL), "--local", "-c", str(minion / "conf"), "--out=json", *args],
                check=False,
                timeout=180,
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            return json.loads(proc.stdout)["local"]

        synced = salt_call("saltutil.sync_all")
        assert any(entry.startswith("modules.relayroute_core") for entry in synced["modules"]), (
            synced
        )
        extmods = minion / "cache" / "extmods"
        assert extension_names(extmods / "modules") == {"relayroute_core"}
        assert salt_call("sys.list_functions", "relayroute")
        # Salt's own sysctl module is still Salt's.
        assert "sysctl.persist" in salt_call("sys.list_functions", "sysctl")

        applied = salt_call("state.apply", "relayroute", "--retcode-passthrough")
        assert applied, applied
        assert all(state["result"] is True for state in applied.values()), applied
        rules = relay_ns.ip("rule show").stdout
        assert "fwmark 0xfe/0xff lookup 1000254" in rules, rules
        # The example pillar names no backend: Debian's default (parameters/) is nftables.
        table = relay_ns.exec("nft list table inet relayroute_relay").stdout
        assert "ct mark & 0x000000ff == 0x000000fe" in table, table
        assert "RELAYROUTE" not in relay_ns.exec("iptables-save -t mangle").stdout
    finally:
        shutil.rmtree(overlay, ignore_errors=True)
