"""docs/config.md is generated from the click commands and must match them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from dfget.cli import download_cmd, server_cmd
from dfget.upload import upload_cmd
from tools import configref
from supernode.cli import build_settings
from supernode.cli import main as supernode_cmd

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "config.md"
COMMANDS = [("supernode", supernode_cmd), ("dfget server", server_cmd), ("dfget", download_cmd),
            ("dfget upload", upload_cmd)]


def test_docs_config_md_is_up_to_date() -> None:
    assert DOC.read_text() == configref.render(), (
        f"docs/config.md is stale: regenerate it with `{configref.REGENERATE}` and commit it")


def test_module_writes_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "config.md"
    proc = subprocess.run([sys.executable, "-m", "tools.configref", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == configref.render()
    bad = subprocess.run([sys.executable, "-m", "tools.configref", "--nonsense"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "usage:" in bad.stderr


@pytest.mark.parametrize(("name", "cmd"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_is_documented_with_help(name: str, cmd: click.Command) -> None:
    ctx = click.Context(cmd, info_name=name, **(cmd.context_settings or {}))
    documented = {r.flags for r in configref.rows(name, cmd)}
    for p in cmd.get_params(ctx):
        if not isinstance(p, click.Option) or p is cmd.get_help_option(ctx) or p.name == "version":
            continue
        if p.hidden:  # internal: set by dfget when it starts its peer server, not by people
            assert f"`{p.opts[-1]}`" not in DOC.read_text()
            continue
        assert p.help, f"{name} {p.opts[-1]} has no help text: add help= to it"
        assert any(f"`{p.opts[-1]}`" in f for f in documented), f"{name} {p.opts[-1]} missing from the reference"
        assert f"`{p.opts[-1]}`" in DOC.read_text()


def test_documented_env_vars_are_the_ones_click_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = click.Context(supernode_cmd, info_name="supernode", **supernode_cmd.context_settings)
    by_flag = {o: p for p in supernode_cmd.params if isinstance(p, click.Option)
               for o in (*p.opts, *p.secondary_opts)}  # --piece-auth/--no-piece-auth
    rows = configref.rows("supernode", supernode_cmd)
    assert rows and all(r.envvar for r in rows)
    for r in rows:
        flag = r.flags.split("`")[-2]
        monkeypatch.setenv(r.envvar, "sentinel-value")
        assert by_flag[flag].resolve_envvar_value(ctx) == "sentinel-value", (flag, r.envvar)
        monkeypatch.delenv(r.envvar)
    assert not any(r.envvar for r in configref.rows("dfget", download_cmd))


def test_env_vars_and_config_keys_reach_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forms the reference documents (env vars with spaces for repeatable options, a
    YAML file with dashed keys and lists) end up in Settings, with the documented order
    of precedence."""
    example = re.search(r"```yaml\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert example, "docs/config.md lost its config file example"
    cfg = tmp_path / "supernode.yaml"
    cfg.write_text(example.group(1) + "port: 9100\ndownload-port: 9101\nmax_bandwidth: 1MB\n")
    monkeypatch.setenv("SUPERNODE_DOWNLOAD_PORT", "9201")
    monkeypatch.setenv("SUPERNODE_DENY_ORIGIN", "10.9.0.0/16 10.8.0.0/16")
    monkeypatch.setenv("SUPERNODE_CONFIG", str(cfg))
    ctx = supernode_cmd.make_context("supernode", ["--download-port", "9301"])
    s = build_settings(ctx.params)
    assert s.port == 9100  # file
    assert s.download_port == 9301  # command line over env over file
    assert s.max_bandwidth == 1 << 20  # underscore key works too
    assert s.redis_url == "redis://redis:6379/0" and s.log_json is True
    assert s.allow_origin == ("10.0.0.0/8", "192.168.0.0/16")
    assert s.deny_origin == ("10.9.0.0/16", "10.8.0.0/16")
    monkeypatch.delenv("SUPERNODE_CONFIG")
    ctx = supernode_cmd.make_context("supernode", [])
    assert build_settings(ctx.params).download_port == 9201  # env over default


@pytest.mark.parametrize("value", ["1", "true", "1.2.3"])
def test_supernode_version_in_the_environment_is_not_the_version_flag(
        monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """Deployments set SUPERNODE_VERSION for their own purposes; it used to be read as
    --version (print the version and exit, or a usage error for "1.2.3")."""
    monkeypatch.setenv("SUPERNODE_VERSION", value)
    ctx = supernode_cmd.make_context("supernode", ["--port", "9100"])
    assert build_settings(ctx.params).port == 9100
