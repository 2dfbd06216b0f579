"""The configuration reference (docs/config.md), generated from the click commands.

    python -m tools.configref > docs/config.md     (or: python -m tools.configref docs/config.md)

Every option of `supernode`, `dfget` and `dfget server` with its environment variable,
its `--config` file key, its default and its help, read from the click objects
themselves, so the reference cannot drift from the code (tests/test_configref.py fails
when docs/config.md is stale).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click

REGENERATE = "python -m tools.configref docs/config.md"
SKIPPED = {"version"}  # not a setting (nor is --help)


@dataclass(frozen=True)
class Row:
    flags: str
    value: str
    envvar: str | None
    config_key: str | None
    default: str
    required: bool
    help: str


def _commands() -> list[tuple[str, click.Command, str]]:
    """(program name, command, note) in the order they are documented."""
    from dfget.cli import download_cmd, import_cmd, server_cmd
    from dfget.upload import upload_cmd
    from supernode.cli import main as supernode_cmd

    return [
        ("supernode", supernode_cmd, "The tracker, scheduler and CDN seed (one or more per cluster)."),
        ("dfget server", server_cmd,
         ("The per-host peer server. `dfget` starts one on demand; run it as a service "
          "(systemd unit, Kubernetes DaemonSet) to keep a host serving what it holds. One that "
          "dfget starts leads a session of its own and keeps the nice level of the dfget that "
          "started it, also where the kernel schedules each session as a group (autogroup): "
          "`nice -n 10 dfget ...` leaves a peer server at nice 10.")),
        ("dfget", download_cmd, "The downloader."),
        ("dfget upload", upload_cmd,
         "Resumable upload of a local file into a supernode's CDN cache, named by its digest."),
        ("dfget import", import_cmd,
         "Puts a local file into the swarm with no origin (README \"Content-addressed store\")."),
    ]


def _flags(opt: click.Option) -> str:
    text = ", ".join(f"`{o}`" for o in opt.opts)
    if opt.secondary_opts:
        text += " / " + ", ".join(f"`{o}`" for o in opt.secondary_opts)
    return text


def _value(ctx: click.Context, opt: click.Option) -> str:
    from supernode import cli as sn_cli

    if opt.is_flag:
        return "flag"
    if ctx.command is sn_cli.main and opt.name in sn_cli._SIZES:
        kind = "SIZE"
    elif ctx.command is sn_cli.main and opt.name in sn_cli._DURATIONS:
        kind = "DURATION"
    elif isinstance(opt.type, click.Choice):
        kind = "|".join(str(c) for c in opt.type.choices)
    elif isinstance(opt.type, click.IntRange):
        kind = f"INTEGER {opt.type._describe_range()}"
    else:
        kind = opt.type.name.upper()
    return kind + (", repeatable" if opt.multiple else "")


def _show(value: object) -> str:
    home = str(Path.home())
    if value is None or value == () or value == "" or type(value).__name__ == "Sentinel":
        return ""  # no default (click >= 8.2 says so with its UNSET sentinel)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value)
    text = str(value)
    if text == home or text.startswith(home + "/"):
        text = "~" + text[len(home):]  # the reference must not depend on who generated it
    return text


def _envvar(ctx: click.Context, opt: click.Option) -> str | None:
    if opt.envvar:
        return opt.envvar if isinstance(opt.envvar, str) else " ".join(opt.envvar)
    if opt.allow_from_autoenv and ctx.auto_envvar_prefix and opt.name:
        return f"{ctx.auto_envvar_prefix}_{opt.name.upper()}"
    return None


def _config_file_option(cmd: click.Command) -> click.Option | None:
    """The option that loads a YAML file into the default map (supernode's --config)."""
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name == "config" and p.callback is not None:
            return p
    return None


def rows(name: str, cmd: click.Command) -> list[Row]:
    ctx = click.Context(cmd, info_name=name, **(cmd.context_settings or {}))
    has_file = _config_file_option(cmd)
    out: list[Row] = []
    help_option = cmd.get_help_option(ctx)
    for p in cmd.get_params(ctx):
        if not isinstance(p, click.Option) or p is help_option or p.name in SKIPPED or p.hidden:
            continue
        default = "" if p.required else p.get_default(ctx, call=True)
        key = p.name.replace("_", "-") if has_file is not None and p is not has_file and p.name else None
        out.append(Row(flags=_flags(p), value=_value(ctx, p), envvar=_envvar(ctx, p), config_key=key,
                       default=_show(default), required=p.required,
                       help=" ".join((p.help or "").split())))
    return out


def _cell(text: str | None, code: bool = False) -> str:
    if not text:
        return ""
    text = text.replace("|", "\\|")
    return f"`{text}`" if code else text


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the click commands by `" + REGENERATE + "`; do not edit. -->",
        "",
        "Sizes and rates take `20MB`, `512KB`, `1G`, `1.5MiB` or plain bytes (binary multiples);",
        "durations take `250ms`, `30s`, `3m`, `1h30m` or plain seconds. `~` is the home",
        "directory of the user running the command.",
        "",
    ]
    for name, cmd, note in _commands():
        ctx = click.Context(cmd, info_name=name, **(cmd.context_settings or {}))
        table = rows(name, cmd)
        with_env = any(r.envvar for r in table)
        with_file = any(r.config_key for r in table)
        lines += [f"## `{name}`", "", note, ""]
        if with_env or with_file:
            lines += _precedence(ctx, cmd, with_env, with_file)
        else:
            lines += ["Command-line options only (no environment variables, no config file).", ""]
        head = ["option", "value"]
        head += ["environment"] if with_env else []
        head += ["config key"] if with_file else []
        head += ["default", "description"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in table:
            cells = [r.flags, _cell(r.value)]
            cells += [_cell(r.envvar, code=True)] if with_env else []
            cells += [_cell(r.config_key, code=True)] if with_file else []
            cells += ["required" if r.required else _cell(r.default, code=True), _cell(r.help)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _precedence(ctx: click.Context, cmd: click.Command, with_env: bool, with_file: bool) -> list[str]:
    out: list[str] = []
    sources = ["the command line"]
    if with_env:
        sources.append(f"`{ctx.auto_envvar_prefix}_*` environment variables" if ctx.auto_envvar_prefix
                       else "environment variables")
    if with_file:
        cfg = _config_file_option(cmd)
        assert cfg is not None
        sources.append(f"the YAML file given with `{cfg.opts[-1]}`")
    sources.append("the default")
    out += ["Each setting comes from the first of: " + ", ".join(sources) + ".", ""]
    if with_file:
        out += [
            "The config file is a YAML mapping whose keys are the long option names without",
            "`--` (`redis-url` or `redis_url`); a flag takes `true`/`false`, a repeatable",
            "option a list:",
            "",
            "```yaml",
            "redis-url: redis://redis:6379/0",
            "allow-origin: [10.0.0.0/8, 192.168.0.0/16]",
            "log-json: true",
            "```",
            "",
        ]
    if with_env:
        out += [
            "In an environment variable a repeatable option takes its values separated by",
            "spaces, and a flag takes `1`/`true` or `0`/`false`.",
            "",
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(f"usage: {REGENERATE.rsplit(' ', 1)[0]} [OUTPUT.md]   (stdout without OUTPUT)", file=sys.stderr)
        return 2
    text = render()
    if args:
        Path(args[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
