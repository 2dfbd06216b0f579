"""deploy/ lines up with the code: every command in the compose file, the Kubernetes
manifests, the systemd units and the Dockerfile is parsed by the real click commands
(and the supernode's settings are built from its flags, env and config file as the
process would), and ports, probes, health checks, Services, images and file references
are checked against those values and the apps' real routes. Nothing is started."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml
from aiohttp import web

import bench.origin
import dfget.server.lifecycle
from common import __version__
from supernode.cdn.throttle import Throttle
from dfget import config as dfget_config
from dfget.cli import download_cmd, server_cmd
from dfget.server.app import build_peer_app
from dfget.server.state import ServerConfig, ServerState
from dfdaemon import routes as dfdaemon_routes
from dfdaemon.cli import main as dfdaemon_cmd
from tools import configref
from supernode.app import create_app
from supernode.cdn.cache import PieceCache
from supernode.cli import build_settings
from supernode.cli import main as supernode_cmd
from supernode.config import Settings
from supernode.cdn.seed import Seed

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
IMAGE = "dragonfly-py"
ENV_PREFIX = supernode_cmd.context_settings["auto_envvar_prefix"] + "_"
# What the downward API gives a pod, for expanding manifests.
FIELD_REFS = {"status.podIP": "10.244.1.7", "status.hostIP": "192.0.2.10", "metadata.name": "pod-0",
              "metadata.namespace": "dragonfly", "spec.nodeName": "node-1"}


# ---------------------------------------------------------------- loading deploy/

def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_objects() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` creates (generated ConfigMaps included,
    without kustomize's name hash)."""
    kz = kustomization()
    objs: list[dict[str, Any]] = []
    for res in kz.get("resources", []):
        objs += _yaml_docs(K8S / res)
    for gen in kz.get("configMapGenerator", []):
        data = {}
        for item in gen.get("files", []):
            key, _, path = item.rpartition("=")
            data[key or Path(path).name] = (K8S / path).read_text()
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return objs


def workloads() -> list[dict[str, Any]]:
    return [o for o in k8s_objects() if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _is_ours(image: str) -> bool:
    return image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == IMAGE


def unit(name: str) -> dict[str, list[str]]:
    """A systemd unit as {key: [values]} (all sections; keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
            for ln in (x.strip() for x in text.splitlines()) if ln and not ln.startswith("#")]


# ---------------------------------------------------------------- the apps' routes

def _routes(app: web.Application) -> list[dict[str, Any]]:
    return [r.get_info() for r in app.router.resources()]


def serves(app_routes: list[dict[str, Any]], path: str) -> bool:
    for info in app_routes:
        if info.get("path") == path or ("pattern" in info and info["pattern"].fullmatch(path)):
            return True
    return False


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("apps")
    return {
        "api": _routes(create_app(Settings(home=tmp))),
        "seed": _routes(Seed(PieceCache(tmp), slots=1, throttle=Throttle(0)).app()),
        "peer": _routes(build_peer_app(ServerState(ServerConfig(home=tmp)), None)),
        "origin": _routes(bench.origin.make_app(tmp)),
    }


def supernode_app_on(settings: Settings, port: int) -> str:
    if port == settings.port:
        return "api"
    assert port == settings.download_port, (
        f"port {port} is neither --port ({settings.port}) nor --download-port ({settings.download_port})")
    return "seed"


# ---------------------------------------------------------------- running the commands' parsers

@dataclasses.dataclass
class Invocation:
    where: str
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # path in the container -> text

    @property
    def program(self) -> str:
        if not self.argv:
            return ""
        name = Path(self.argv[0]).name
        if name == "dfget" and self.argv[1:2] == ["server"]:
            return "dfget server"
        return name


def parse_supernode(inv: Invocation, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The supernode's Settings from this command line, environment and config file,
    exactly as `supernode` builds them (click, then build_settings)."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    args = list(inv.argv[1:])
    env = dict(inv.env)

    def local(path: str) -> str:
        assert path in inv.files, f"{inv.where}: config file {path} is not provided (mounted/shipped)"
        target = tmp / f"cfg{len(list(tmp.iterdir()))}.yaml"
        target.write_text(inv.files[path])
        return str(target)

    for i, a in enumerate(args):
        if a == "--config":
            args[i + 1] = local(args[i + 1])
        elif a.startswith("--config="):
            args[i] = "--config=" + local(a.split("=", 1)[1])
    if ENV_PREFIX + "CONFIG" in env:
        env[ENV_PREFIX + "CONFIG"] = local(env[ENV_PREFIX + "CONFIG"])
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        ctx = supernode_cmd.make_context("supernode", args)
        return build_settings(ctx.params)
    except (click.ClickException, ValueError) as exc:
        pytest.fail(f"{inv.where}: supernode {shlex.join(args)}: {exc}")


def parse_dfget_server(inv: Invocation, monkeypatch: pytest.MonkeyPatch) -> ServerConfig:
    """The ServerConfig `dfget server` would run with (its own parsing, not started)."""
    seen: list[ServerConfig] = []
    monkeypatch.setattr(dfget.server.lifecycle, "run_server", lambda cfg: seen.append(cfg) or 0)
    try:
        with pytest.raises(SystemExit) as done:
            server_cmd.main(inv.argv[2:], prog_name="dfget server", standalone_mode=False)
    except click.ClickException as exc:
        pytest.fail(f"{inv.where}: {shlex.join(inv.argv)}: {exc}")
    assert done.value.code == 0 and len(seen) == 1
    return seen[0]


def parse_dfget(inv: Invocation) -> dict[str, Any]:
    try:
        params = download_cmd.make_context("dfget", inv.argv[1:]).params
        params["nodes"] = dfget_config.parse_nodes(params["node"])
        dfget_config.check_url(params["url"])
    except (click.ClickException, dfget_config.ConfigError) as exc:
        pytest.fail(f"{inv.where}: {shlex.join(inv.argv)}: {exc}")
    return params


def parse_dfdaemon(inv: Invocation) -> dict[str, Any]:
    """dfdaemon's flags through its real click command, checked as its main() would."""
    try:
        params = dfdaemon_cmd.make_context("dfdaemon", inv.argv[1:]).params
        params["nodes"] = dfget_config.parse_nodes(params["nodes"])
        dfdaemon_routes.parse_rules(list(params["rules"]))
    except (click.ClickException, dfget_config.ConfigError, ValueError) as exc:
        raise AssertionError(f"{inv.where}: {inv.argv}: {exc}") from None
    assert params["registry"], f"{inv.where}: a mirror needs --registry"
    assert dfdaemon_routes.classify("GET", "/_ping").kind == "ping"
    return params


def parse_origin(inv: Invocation, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`python -m bench.origin ...` through its own argument parser (not started)."""
    seen: list[Any] = []

    async def fake_serve(args: Any) -> None:
        seen.append(args)

    monkeypatch.setattr(bench.origin, "_serve", fake_serve)
    args = inv.argv[3:]
    real_dir = args[args.index("--dir") + 1]
    args[args.index("--dir") + 1] = str(tmp)
    try:
        assert bench.origin.main(args) == 0
    except SystemExit as exc:  # argparse: its message is on stderr
        pytest.fail(f"{inv.where}: python -m bench.origin {shlex.join(args)}: exit {exc.code}")
    seen[0].dir = real_dir
    return seen[0]


# ---------------------------------------------------------------- the invocations in deploy/

def _expand_k8s(text: str, env: dict[str, str], where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"{where}: $({m.group(1)}) is not defined in the container's env"
        return env[m.group(1)]
    return re.sub(r"\$\((\w+)\)", sub, text)


def _k8s_env(container: dict[str, Any], where: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = _expand_k8s(str(e["value"]), env, where)
        else:
            ref = e["valueFrom"].get("fieldRef", {}).get("fieldPath")
            assert ref in FIELD_REFS, f"{where}: env {e['name']} comes from an unknown source"
            env[e["name"]] = FIELD_REFS[ref]
    return env


def _k8s_files(pod: dict[str, Any], container: dict[str, Any], objs: list[dict[str, Any]]) -> dict[str, str]:
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files: dict[str, str] = {}
    for m in container.get("volumeMounts", []):
        cm = volumes[m["name"]].get("configMap")
        if cm is None:
            continue
        assert cm["name"] in maps, f"ConfigMap {cm['name']} is not part of the kustomization"
        for key, text in maps[cm["name"]].items():
            files[f"{m['mountPath'].rstrip('/')}/{key}"] = text
    return files


def k8s_invocations() -> list[tuple[dict[str, Any], dict[str, Any], Invocation]]:
    objs = k8s_objects()
    out = []
    for w in workloads():
        pod = w["spec"]["template"]["spec"]
        for c in _containers(pod):
            if not _is_ours(c["image"]):
                continue
            where = f"kubernetes {w['kind']}/{w['metadata']['name']} container {c['name']}"
            env = _k8s_env(c, where)
            argv = [_expand_k8s(str(a), env, where) for a in c.get("command", []) + c.get("args", [])]
            out.append((w, c, Invocation(where, argv, env, _k8s_files(pod, c, objs))))
    return out


def compose_invocations() -> list[tuple[str, dict[str, Any], Invocation]]:
    out = []
    for name, svc in compose()["services"].items():
        if not _is_ours(svc.get("image", "")):
            continue
        cmd = svc.get("command", docker_cmd())
        argv = shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        assert not any("$" in a for a in argv), f"compose {name}: no variable interpolation in commands"
        out.append((name, svc, Invocation(f"compose service {name}", argv, {k: str(v) for k, v in env.items()})))
    return out


def docker_cmd() -> list[str]:
    cmds = [json.loads(arg) for kw, arg in dockerfile() if kw == "CMD"]
    assert len(cmds) == 1 and isinstance(cmds[0], list), "the Dockerfile needs one exec-form CMD"
    return cmds[0]


def systemd_invocation(name: str) -> Invocation:
    """ExecStart of a unit with ${VAR} from the shipped example EnvironmentFile and the
    shipped example of every /etc file it names."""
    u = unit(name)
    examples = {f"/etc/default/{p.stem}": p for p in SYSTEMD.glob("*.default")}
    examples |= {f"/etc/{p.name}": p for p in SYSTEMD.glob("*.yaml")}
    env: dict[str, str] = {}
    for ef in u.get("EnvironmentFile", []):
        path = ef.lstrip("-")
        if path in examples:
            for line in examples[path].read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    k, _, v = line.partition("=")
                    env[k.strip()] = v.strip().strip('"')
        else:
            assert ef.startswith("-"), f"{name}: required EnvironmentFile {path} has no example in deploy/systemd"
    (exec_start,) = u["ExecStart"]

    def sub(m: re.Match[str]) -> str:
        var = m.group(1) or m.group(2)
        assert var in env, f"{name}: ${var} is set by no shipped example environment file"
        return env[var]

    argv = shlex.split(re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, exec_start.lstrip("-@+!:")))
    files = {p: e.read_text() for p, e in examples.items() if p in argv}
    return Invocation(f"systemd {name}", argv, env, files)


# ---------------------------------------------------------------- every command is real

def _all_invocations() -> list[Invocation]:
    return ([i for _, _, i in compose_invocations()] + [i for _, _, i in k8s_invocations()]
            + [systemd_invocation(u.name) for u in sorted(SYSTEMD.glob("*.service"))]
            + [Invocation("Dockerfile CMD", docker_cmd())])


def test_every_command_parses_with_the_real_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checked: dict[str, list[str]] = {}
    for inv in _all_invocations():
        if inv.program == "supernode":
            s = parse_supernode(inv, tmp_path, monkeypatch)
            assert s.redis_url or inv.where == "Dockerfile CMD", f"{inv.where}: no Redis: state would be lost"
        elif inv.program == "dfget server":
            cfg = parse_dfget_server(inv, monkeypatch)
            assert cfg.port != 0, f"{inv.where}: a long-running peer server needs a fixed --port"
            ipaddress.ip_address(cfg.ip)
            assert not ipaddress.ip_address(cfg.ip).is_loopback, f"{inv.where}: --ip must be reachable by peers"
        elif inv.program == "dfget":
            parse_dfget(inv)
        elif inv.program == "dfdaemon":
            p = parse_dfdaemon(inv)
            assert p["port"] != 0 and str(p["home"]) == "/var/lib/dfget", f"{inv.where}: port, home"
            ipaddress.ip_address(p["ip"])
        elif inv.argv[:3] == ["python", "-m", "bench.origin"]:
            parse_origin(inv, tmp_path, monkeypatch)
        else:
            continue
        checked.setdefault(inv.program, []).append(inv.where)
    where = {w.split(" ")[0] for ws in checked.values() for w in ws}
    assert {"compose", "kubernetes", "systemd", "Dockerfile"} <= where, checked
    assert len(checked["supernode"]) >= 5 and len(checked["dfget server"]) >= 5, checked
    assert {w.split(" ")[0] for w in checked["dfdaemon"]} == {"compose", "kubernetes", "systemd"}, checked


def test_supernode_env_vars_and_config_keys_exist() -> None:
    """click ignores unknown SUPERNODE_* variables and unknown config-file keys, so a
    misspelt one would silently do nothing: check every one against the options."""
    ctx = click.Context(supernode_cmd, info_name="supernode", **supernode_cmd.context_settings)
    options = [p for p in supernode_cmd.get_params(ctx) if isinstance(p, click.Option)
               and p is not supernode_cmd.get_help_option(ctx) and p.name != "version"]
    env_names = {configref._envvar(ctx, p) for p in options}
    keys = {p.name for p in options if p.name != "config"}
    envs: list[tuple[str, str]] = []
    for name, svc in compose()["services"].items():
        envs += [(f"compose {name}", k) for k in svc.get("environment", {})]
    for w, c, _ in k8s_invocations():
        envs += [(w["metadata"]["name"], e["name"]) for e in c.get("env", [])]
    for p in SYSTEMD.glob("*.default"):
        envs += [(p.name, ln.split("=", 1)[0].strip()) for ln in p.read_text().splitlines()
                 if "=" in ln and not ln.lstrip().startswith("#")]
    ours = [(w, e) for w, e in envs if e.startswith(ENV_PREFIX)]
    assert len(ours) >= 5
    for where, e in ours:
        assert e in env_names, f"{where}: {e} is not a supernode setting (see docs/config.md)"
    config_files = [(f"kubernetes ConfigMap {o['metadata']['name']}/{k}", t) for o in k8s_objects()
                    if o["kind"] == "ConfigMap" for k, t in o.get("data", {}).items()]
    config_files += [(p.name, p.read_text()) for p in SYSTEMD.glob("*.yaml")]
    assert config_files
    for where, text in config_files:
        data = yaml.safe_load(text)
        assert isinstance(data, dict) and data, f"{where}: not a mapping"
        for key in data:
            assert str(key).replace("-", "_") in keys, f"{where}: {key!r} is not a supernode option"


# ---------------------------------------------------------------- compose

def _healthcheck_url(where: str, svc: dict[str, Any]) -> tuple[str, int, str]:
    test = svc.get("healthcheck", {}).get("test")
    assert test, f"{where}: no healthcheck"
    m = re.search(r"http://([\w.\-]+):(\d+)(/[\w/]*)", " ".join(test) if isinstance(test, list) else test)
    assert m, f"{where}: healthcheck does not request a URL"
    return m.group(1), int(m.group(2)), m.group(3)


def _compose_ip(name: str, svc: dict[str, Any]) -> str:
    nets = svc.get("networks") or {}
    ips = [n["ipv4_address"] for n in nets.values() if n and "ipv4_address" in n]
    assert len(ips) == 1, f"compose {name}: needs one fixed ipv4_address"
    return ips[0]


def test_compose_lines_up_with_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        routes: dict[str, list[dict[str, Any]]]) -> None:
    doc = compose()
    services = doc["services"]
    subnets = [ipaddress.ip_network(c["subnet"]) for net in doc["networks"].values()
               for c in net["ipam"]["config"]]
    # services in another's network namespace (dfdaemon beside its peer) have its address
    ips = {name: _compose_ip(name, svc) for name, svc in services.items() if "network_mode" not in svc}
    assert len(set(ips.values())) == len(ips), "two services share an address"
    for name, ip in ips.items():
        assert any(ipaddress.ip_address(ip) in n for n in subnets), f"compose {name}: {ip} outside the subnet"
    assert "redis" in services and services["redis"]["image"].startswith("redis:")
    supernodes: dict[str, Settings] = {}
    peers: dict[str, ServerConfig] = {}
    mirrors: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    origin = None
    for name, svc, inv in compose_invocations():
        host, port, path = _healthcheck_url(inv.where, svc)
        if inv.program == "dfdaemon":
            p = parse_dfdaemon(inv)
            assert host == "127.0.0.1" and port == p["port"] and p["listen"] in ("0.0.0.0", "127.0.0.1")
            assert dfdaemon_routes.classify("GET", path).kind == "ping", f"{inv.where}: healthcheck {path}"
            mirrors[name] = (svc, p)
            continue
        if inv.program == "supernode":
            s = supernodes[name] = parse_supernode(inv, tmp_path, monkeypatch)
            assert s.advertise_ip == ips[name], f"{inv.where}: --advertise-ip is not its address"
            assert urlsplit(s.redis_url).hostname in services, f"{inv.where}: Redis host is not a service"
            assert host == "127.0.0.1" and s.listen in ("0.0.0.0", "127.0.0.1")
            assert serves(routes[supernode_app_on(s, port)], path), f"{inv.where}: no route {path} on {port}"
            for p in svc.get("ports", []):
                supernode_app_on(s, int(str(p).rsplit(":", 1)[1]))
            assert [d for d, c in svc["depends_on"].items() if c["condition"] == "service_healthy"] == ["redis"]
        elif inv.program == "dfget server":
            cfg = peers[name] = parse_dfget_server(inv, monkeypatch)
            assert cfg.ip == ips[name] == host, f"{inv.where}: --ip, address and healthcheck differ"
            assert port == cfg.port and serves(routes["peer"], path), f"{inv.where}: healthcheck {path}:{port}"
            vols = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
            assert str(cfg.home) in vols, f"{inv.where}: --home is not on a volume"
        elif inv.argv[:2] == ["sh", "-c"]:
            script = inv.argv[2]
            origin_argv = shlex.split(script.split("exec ", 1)[1])
            origin = parse_origin(Invocation(inv.where, origin_argv), tmp_path, monkeypatch)
            origin.name = name
            assert host == "127.0.0.1" and port == origin.port and serves(routes["origin"], path)
            origin.files = re.findall(re.escape(origin.dir.rstrip("/")) + r"/([\w.\-]+)", script)
    assert len(supernodes) >= 2 and len(peers) >= 3 and origin is not None
    # one dfdaemon per peer host, in its network namespace, on its home, with its --ip
    assert len(mirrors) == len(peers), sorted(mirrors)
    for name, (svc, p) in mirrors.items():
        mode = svc.get("network_mode", "")
        assert mode.startswith("service:") and mode[8:] in peers, f"compose {name}: network_mode {mode}"
        peer = peers[mode[8:]]
        assert p["ip"] == peer.ip and str(p["home"]) == str(peer.home), f"compose {name}: --ip/--home"
        peer_vols = {v.split(":")[1]: v.split(":")[0] for v in services[mode[8:]].get("volumes", [])}
        vols = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
        assert vols.get(str(peer.home)) == peer_vols[str(peer.home)], f"compose {name}: not the peer's home"
        assert [str(x).rsplit(":", 1)[1] for x in services[mode[8:]].get("ports", [])] == [str(p["port"])]
        assert urlsplit(p["registry"]).hostname in services, f"compose {name}: --registry is no service"
        for node in p["nodes"]:
            assert node.host in supernodes and node.port == supernodes[node.host].port
    assert len({s.redis_url for s in supernodes.values()}) == 1, "the supernodes must share one Redis"
    for s in supernodes.values():
        assert s.home != Path.home() / ".supernode"

    # The demo download the header comment tells to run on every peer.
    demo = doc["x-demo"]["download"]
    header = " ".join(ln.lstrip("# ").rstrip("\\ ") for ln in (DEPLOY / "compose.yaml").read_text()
                      .split("\nname:")[0].splitlines())
    assert " ".join(demo) in " ".join(header.split()), "compose.yaml's header shows another command than x-demo"
    params = parse_dfget(Invocation("compose x-demo", demo))
    assert {str(p.home) for p in peers.values()} == {params["home"]}, "dfget must use the peer server's --home"
    for node in params["nodes"]:
        assert node.host in supernodes and node.port == supernodes[node.host].port, f"-n {node}"
    assert {n.host for n in params["nodes"]} == set(supernodes)
    url = urlsplit(params["url"])
    assert (url.hostname, url.port) == (origin.name, origin.port), f"x-demo: {params['url']} is not the origin"
    assert serves(routes["origin"], url.path) and url.path.rsplit("/", 1)[1] in origin.files


# ---------------------------------------------------------------- kubernetes

def _port_number(container: dict[str, Any], port: int | str) -> int:
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']}: no port {port!r}")


def _injected_env(service: dict[str, Any]) -> set[str]:
    """The variables Kubernetes' service links put into every pod of the namespace."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
    for p in service["spec"]["ports"]:
        names |= {f"{prefix}_PORT_{p['port']}_TCP", f"{prefix}_SERVICE_PORT_{p.get('name', '').upper()}"}
    return names


def test_kubernetes_lines_up_with_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           routes: dict[str, list[dict[str, Any]]]) -> None:
    objs = k8s_objects()
    services = [o for o in objs if o["kind"] == "Service"]
    env_names = {configref._envvar(click.Context(supernode_cmd, **supernode_cmd.context_settings), p)
                 for p in supernode_cmd.params if isinstance(p, click.Option)}
    kinds: set[str] = set()
    for w, c, inv in k8s_invocations():
        pod = w["spec"]["template"]["spec"]
        if inv.program == "supernode":
            kinds.add("supernode")
            s = parse_supernode(inv, tmp_path, monkeypatch)
            app_of = {s.port: "api", s.download_port: "seed"}
            assert {p["containerPort"] for p in c["ports"]} == set(app_of), f"{inv.where}: containerPorts"
            assert s.advertise_ip == FIELD_REFS["status.podIP"], f"{inv.where}: advertise the pod IP"
            host = urlsplit(s.redis_url).hostname
            assert host and (host.split(".")[0] in {o["metadata"]["name"] for o in services}
                             or "redis.yaml" not in kustomization()["resources"]), f"{inv.where}: Redis host"
            injected = set().union(*(_injected_env(svc) for svc in services))
            if injected & env_names:
                assert pod.get("enableServiceLinks") is False, (
                    f"{inv.where}: Service links would set {sorted(injected & env_names)}, which the "
                    "supernode reads as settings: set enableServiceLinks: false")
            assert s.home.is_absolute() and any(
                m["mountPath"] == str(s.home) for m in c.get("volumeMounts", [])), f"{inv.where}: --home volume"
        elif inv.program == "dfdaemon":
            kinds.add("dfdaemon")
            p = parse_dfdaemon(inv)
            app_of = {p["port"]: "dfdaemon"}
            assert w["kind"] == "DaemonSet" and pod.get("hostNetwork") is True, f"{inv.where}: per node, host net"
            assert p["ip"] == FIELD_REFS["status.hostIP"], f"{inv.where}: --ip must be status.hostIP"
            assert [(q["containerPort"], q.get("hostPort", q["containerPort"])) for q in c["ports"]] == [
                (p["port"], p["port"])], f"{inv.where}: ports"
            peer = [parse_dfget_server(i, monkeypatch) for ww, _, i in k8s_invocations()
                    if ww["metadata"]["name"] == w["metadata"]["name"] and i.program == "dfget server"]
            assert len(peer) == 1 and peer[0].home == Path(p["home"]), f"{inv.where}: beside its peer server"
            assert any(m["mountPath"] == str(p["home"]) for m in c.get("volumeMounts", []))
            host = p["nodes"][0].host.split(".")[0]
            assert host in {o["metadata"]["name"] for o in services}, f"{inv.where}: -n is no Service"
        elif inv.program == "dfget server":
            kinds.add("dfget server")
            cfg = parse_dfget_server(inv, monkeypatch)
            app_of = {cfg.port: "peer"}
            assert w["kind"] == "DaemonSet" and pod.get("hostNetwork") is True, f"{inv.where}: per node, host net"
            assert cfg.ip == FIELD_REFS["status.hostIP"], f"{inv.where}: --ip must be status.hostIP"
            assert [(p["containerPort"], p.get("hostPort", p["containerPort"])) for p in c["ports"]] == [
                (cfg.port, cfg.port)], f"{inv.where}: ports"
            assert any(m["mountPath"] == str(cfg.home) for m in c.get("volumeMounts", []))
        else:
            continue
        for probe in ("readinessProbe", "livenessProbe"):
            get = c.get(probe, {}).get("httpGet")
            assert get, f"{inv.where}: no {probe} httpGet"
            port = _port_number(c, get["port"])
            assert port in app_of, f"{inv.where}: {probe} on port {port}, which serves nothing"
            if app_of[port] == "dfdaemon":
                assert dfdaemon_routes.classify("GET", get["path"]).kind == "ping", f"{inv.where}: {probe}"
            else:
                assert serves(routes[app_of[port]], get["path"]), f"{inv.where}: {probe} {get['path']} is no route"
    assert kinds == {"supernode", "dfget server", "dfdaemon"}

    # Every Service selects a workload and targets ports it really exposes.
    for svc in services:
        name = svc["metadata"]["name"]
        sel = svc["spec"]["selector"]
        targets = [w for w in workloads()
                   if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} workloads"
        ctrs = targets[0]["spec"]["template"]["spec"]["containers"]
        for p in svc["spec"]["ports"]:
            numbers = [n for n in (_safe_port(ct, p.get("targetPort", p["port"])) for ct in ctrs) if n]
            assert numbers == [p["port"]], f"Service {name} port {p['port']} -> {numbers}"
    for w in workloads():
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        assert any(pdb["spec"]["selector"]["matchLabels"].items()
                   <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads())


def _safe_port(container: dict[str, Any], port: int | str) -> int | None:
    try:
        return _port_number(container, port)
    except AssertionError:
        return None


def test_kustomization_lists_files_that_exist() -> None:
    kz = kustomization()
    listed = kz["resources"] + [f.rpartition("=")[2] for g in kz.get("configMapGenerator", [])
                                for f in g["files"]]
    for f in listed:
        assert (K8S / f).is_file(), f"kustomization.yaml lists {f}, which does not exist"
    on_disk = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(listed), f"not in kustomization.yaml: {sorted(on_disk - set(listed))}"
    namespaces = [o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "Namespace"]
    assert namespaces in ([], [kz["namespace"]])


# ---------------------------------------------------------------- images, Dockerfile, systemd

def test_images_are_the_same_everywhere() -> None:
    refs: list[tuple[str, str]] = []
    for name, svc in compose()["services"].items():
        refs.append((f"compose {name}", svc["image"]))
    for w in workloads():
        refs += [(f"{w['kind']}/{w['metadata']['name']}", c["image"])
                 for c in _containers(w["spec"]["template"]["spec"])]
    ours = {img for _, img in refs if _is_ours(img)}
    assert ours == {f"{IMAGE}:{__version__}"}, f"images {ours} (the tag is the version, {__version__})"
    assert next(i for i in kustomization()["images"] if i["name"] == IMAGE)["newTag"] == __version__
    assert f"-t {IMAGE}:{__version__}" in (DEPLOY / "Dockerfile").read_text()
    others = {img.split(":")[0]: img for _, img in refs if not _is_ours(img)}
    for base in others:
        assert len({img for _, img in refs if img.split(":")[0] == base}) == 1, f"{base} differs"
    assert set(others) == {"redis", "registry"}  # registry: compose's upstream for the dfdaemon mirrors


def test_dockerfile_copies_what_exists_and_exposes_the_ports(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    lines = dockerfile()
    for kw, arg in lines:
        if kw == "COPY":
            *sources, _dest = arg.split()
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile: COPY {src}: no such file"
    exposed = {int(p) for kw, arg in lines if kw == "EXPOSE" for p in arg.split()}
    defaults = parse_supernode(Invocation("defaults", ["supernode"]), tmp_path, monkeypatch)
    peer_ports = {parse_dfget_server(i, monkeypatch).port for _, _, i in compose_invocations()
                  if i.program == "dfget server"}
    mirror_ports = {parse_dfdaemon(i)["port"] for _, _, i in compose_invocations() if i.program == "dfdaemon"}
    assert exposed == {defaults.port, defaults.download_port} | peer_ports | mirror_ports


def test_systemd_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    units = sorted(p.name for p in SYSTEMD.glob("*.service"))
    assert units == ["dfdaemon.service", "dfget-server.service", "supernode.service"]
    for name in units:
        u = unit(name)
        inv = systemd_invocation(name)
        if inv.program == "supernode":
            home = parse_supernode(inv, tmp_path, monkeypatch).home
        elif inv.program == "dfdaemon":
            home = parse_dfdaemon(inv)["home"]
            assert "dfget-server.service" in " ".join(u["After"]), f"{name}: after its peer server"
        else:
            home = parse_dfget_server(inv, monkeypatch).home
        assert [str(home)] == [f"/var/lib/{d}" for d in u["StateDirectory"]], f"{name}: --home is not its state dir"
        assert u["KillSignal"] == ["SIGTERM"]
