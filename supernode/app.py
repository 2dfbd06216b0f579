"""App factory and process runner of the supernode.

Every resource (store, origin client, piece cache, seed server, background loops) is
opened in one cleanup context and closed in reverse order. Shutdown sequence: stop
accepting, wake long-polls so they answer at once, drain seed uploads with a deadline,
stop CDN fetches (their leases are released for another supernode to take over), then
close Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from common import errors
from common.hostport import hostport
from common.listen import BACKLOG, listen_socket
from common.taskid import is_short_id, new_id
from common.tls import ServerTls
from common.tokens import Signer

from .api import guard, imports, preheat, ui, uploads
from .api import handlers as api
from .api.peerauth import PeerSecrets
from .auth import KeyRing, PieceGate, load_or_create_key
from .cdn.cache import PieceCache
from .cdn.fetch import Cdn, CdnSettings
from .cdn.origin import OriginClient, OriginSettings
from .cdn.seed import Seed
from .cdn.throttle import Throttle
from .config import Settings
from .gc import announce_loop, gc_loop, heap_trim_loop
from .metrics import Metrics
from .pop.challenger import Challenger, PopSettings
from .scheduling.dispatch import Dispatcher
from .scheduling.policy import Limits
from .scheduling.views import Views
from .state import STATE, SupernodeState
from .store.connection import Store, connect
from .store.events import EventHub
from .store.repo import Repo
from .tasks import TaskOwner

log = logging.getLogger("supernode")


def _supernode_id(home: Path) -> str:
    """Stable across restarts with the same home, so Redis still names us as the holder
    of the pieces in our cache."""
    path = home / "supernode.id"
    try:
        value = path.read_text().strip()
        if is_short_id(value):
            return value
    except OSError:
        pass
    value = new_id()
    path.write_text(value + "\n")
    return value


def _load_cache(cache: PieceCache) -> None:
    for _atime, tid, _size in cache.on_disk():
        entry = cache.load(tid)
        if entry is not None and entry.complete:
            cache.adopt(entry)


async def _state_ctx(app: web.Application) -> AsyncIterator[None]:
    settings: Settings = app[SETTINGS]
    settings.home.mkdir(parents=True, exist_ok=True)
    signer = Signer(await asyncio.to_thread(load_or_create_key, settings.home))  # before opening anything
    store = Store(connect(settings.redis_url), embedded=not settings.redis_url)
    client_tls = settings.client_tls()
    origin = OriginClient(settings.origin_policy(), OriginSettings(read_timeout=settings.origin_read_timeout,
                                                                 retries=settings.origin_retries),
                          tls=client_tls.context() if client_tls.cacert or client_tls.cert else None)
    await origin.start()
    cache = PieceCache(settings.home)
    await asyncio.to_thread(_load_cache, cache)
    sn_id = _supernode_id(settings.home)
    keyring = KeyRing(store.client, signer, token_ttl=settings.piece_token_ttl)
    metrics = Metrics()
    store.on_op = metrics.store_op.observe
    repo = Repo(store)
    hub = EventHub(store.client, wake_batch=settings.wake_batch)
    cdn = Cdn(repo, origin, cache, sn_id, Throttle(settings.max_bandwidth),
              CdnSettings(max_file_size=settings.max_file_size, min_rate=settings.origin_min_rate,
                          max_fetches=settings.max_fetches, lease_ttl_ms=int(settings.lease_ttl * 1000),
                          origin_parallel=settings.origin_parallel))
    if settings.piece_auth:
        cdn.copier.use_tokens(signer, sn_id)  # a takeover copies pieces from peer servers
    gate = PieceGate(keyring, sn_id, lambda reason: metrics.auth_refused.labels("piece", reason).inc())
    seed = Seed(cache, slots=settings.seed_slots, throttle=Throttle(settings.upload_limit),
                gate=gate if settings.piece_auth else None)
    seed_runner = web.AppRunner(seed.app(), handle_signals=False, access_log=None,
                                **guard.runner_kwargs(settings.header_timeout))
    await seed_runner.setup()
    try:
        await _listen(seed_runner, "--download-port", settings.listen, settings.download_port, settings.server_tls())
    except BaseException:  # nothing after this point started yet: close what did
        await seed_runner.cleanup()
        await origin.close()
        await store.close()
        raise
    download_port = seed_runner.addresses[0][1]
    ip = settings.public_ip()
    limits = Limits(max_inflight=settings.down_limit, peer_uploads=settings.up_limit,
                    cdn_uploads=settings.cdn_limit, cdn_copies=settings.cdn_copies)
    views = Views(repo, hub, peer_cap=limits.peer_uploads)
    hub.on_event = store.on_event = views.on_event
    hub.on_gap = views.invalidate_all
    dispatcher = Dispatcher(repo, hub, cdn, views=views, sn_id=sn_id, address=(ip, download_port), limits=limits,
                            min_rate=settings.origin_min_rate,
                            signer=signer if settings.piece_auth else None, token_ttl=settings.piece_token_ttl,
                            tls=settings.server_tls() is not None)
    st = SupernodeState(settings=settings, sn_id=sn_id, policy=settings.origin_policy(), store=store,
                        repo=repo, hub=hub, cache=cache, cdn=cdn, seed=seed, dispatcher=dispatcher,
                        metrics=metrics, download_port=download_port, keyring=keyring,
                        peer_policy=settings.peer_policy(), require_peer_tls=settings.require_peer_tls,
                        peer_secrets=PeerSecrets(store))
    app[STATE] = st
    dispatcher.on_schedule = st.metrics.schedule.observe
    st.metrics.view_loads.set_function(lambda: views.loads)
    st.metrics.pull_rounds.set_function(lambda: dispatcher.round_sizes[0])
    st.metrics.pull_round_pulls.set_function(lambda: dispatcher.round_sizes[1])
    dispatcher.on_reports = st.metrics.observe_applied
    background = TaskOwner(log)
    background.start("events", hub.run_local() if store.embedded else hub.run(), name="events")
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(hub.connected.wait(), 5.0)
    background.start("gc", gc_loop(st), name="gc")
    background.start("heap-trim", heap_trim_loop(), name="heap-trim")
    background.start("lag", metrics.probe_loop_lag(), name="loop-lag")
    try:
        await keyring.publish()  # before the first registration hands out the key list
    except errors.StoreError as exc:
        log.warning("cannot publish the piece-token key yet: %s", exc.message)
    background.start("keys", keyring.run(), name="keys")
    if settings.pop_interval > 0 and not settings.piece_auth:
        log.warning("proof of possession is off: its challenges are signed with the piece-token key, "
                    "which peers do not get with --no-piece-auth")
    if settings.pop_interval > 0 and settings.piece_auth:
        challenger = Challenger(repo, cache, signer, metrics, sn_id,
                                PopSettings(settings.pop_interval, settings.pop_timeout, settings.pop_max_failures,
                                            settings.origin_min_rate),
                                tls=client_tls.context() if client_tls.cacert or client_tls.cert else None)
        background.start("pop", challenger.run(), name="pop")
    api_port = app.get(API_PORT, settings.port)
    background.start("announce", announce_loop(st, ip, api_port, download_port, settings.server_tls() is not None),
                     name="announce")
    try:
        yield
    finally:
        await seed.drain(settings.shutdown_timeout / 2)
        await dispatcher.close()
        await cdn.close()
        await background.close()
        await seed_runner.cleanup()
        await origin.close()
        await store.close()


async def _on_shutdown(app: web.Application) -> None:
    if STATE in app:
        app[STATE].dispatcher.draining = True
        app[STATE].hub.wake_all()


SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
API_PORT: web.AppKey[int] = web.AppKey("api_port", int)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[api.error_middleware, guard.guard_middleware],
                          client_max_size=api.MAX_BODY)
    app[SETTINGS] = settings
    app[guard.GUARD] = guard.Guard(guard.Limits(
        max_body=api.MAX_BODY, body_timeout=settings.body_timeout, max_requests=settings.max_requests,
        register_rate=settings.register_rate, pull_rate=settings.pull_rate))
    app.cleanup_ctx.append(_state_ctx)
    app.on_shutdown.append(_on_shutdown)
    api.routes(app)
    ui.routes(app)
    preheat.routes(app)
    uploads.setup(app)
    imports.routes(app)
    return app


class ListenError(errors.StartupError):
    """A port this supernode was told to listen on cannot be had."""

    code = "listen_failed"


async def _listen(runner: web.AppRunner, flag: str, host: str, port: int, tls: ServerTls | None = None) -> None:
    """`--listen ::` is dual stack (common/listen.py). With `tls` the port speaks only
    HTTPS: a plain HTTP request gets its connection closed (the handshake fails)."""
    try:
        site = web.SockSite(runner, listen_socket(host, port), ssl_context=tls.context() if tls else None,
                            backlog=BACKLOG)
        await site.start()
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {hostport(host, port)} ({flag}): {why}") from None


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    if settings.port:
        app[API_PORT] = settings.port
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=settings.shutdown_timeout,
                           **guard.runner_kwargs(settings.header_timeout))
    try:
        await runner.setup()
        await _listen(runner, "--port", settings.listen, settings.port, settings.server_tls())
    except BaseException:
        await runner.cleanup()  # the store, the seed and their tasks, already started
        raise
    st = app[STATE]
    port = runner.addresses[0][1]
    scheme = "https" if settings.server_tls() else "http"
    log.info("supernode %s ready: api %s://%s download port %d store %s%s", st.sn_id[:8], scheme,
             hostport(settings.public_ip(), port), st.download_port, "redis" if settings.redis_url else "embedded",
             " (client certificates required)" if settings.client_ca else "")
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("supernode shutting down")
        await runner.cleanup()


# Python's collector at its defaults took 7.6 % of the supernode's time in the soak and
# stopped the loop for up to 142 ms (gen 2) and 55 ms (gen 1), with 4 ms gen-0 passes
# 12 times a second: most of a pull's p99. Objects built at start (modules, the app) go
# to the permanent generation, and gen 0 runs after 50,000 new containers, not 700. The
# code makes few cycles (the views are trees of dicts and lists), so memory still comes
# back; the soak measures RSS.
GC_THRESHOLD = (50_000, 20, 10)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def run(settings: Settings) -> None:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(settings))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (Linux, macOS): the same asyncio API
    with its transports and scheduling in C, about a quarter less CPU per API request
    (bench/results/scheduler.md); the standard loop otherwise (or with DF_NO_UVLOOP=1)."""
    if os.environ.get("DF_NO_UVLOOP"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
