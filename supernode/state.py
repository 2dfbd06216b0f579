"""The typed application state shared by the handlers (aiohttp AppKey)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from common.netpolicy import AddressPolicy

if TYPE_CHECKING:
    from .api.peerauth import PeerSecrets
    from .auth import KeyRing
    from .cdn.cache import PieceCache
    from .cdn.fetch import Cdn
    from .cdn.seed import Seed
    from .config import Settings
    from .metrics import Metrics
    from .scheduling.dispatch import Dispatcher
    from .store.connection import Store
    from .store.events import EventHub
    from .store.repo import Repo


@dataclass
class SupernodeState:
    settings: Settings
    sn_id: str
    policy: AddressPolicy
    store: Store
    repo: Repo
    hub: EventHub
    cache: PieceCache
    cdn: Cdn
    seed: Seed
    dispatcher: Dispatcher
    metrics: Metrics
    download_port: int = 0
    keyring: KeyRing | None = None
    peer_policy: AddressPolicy | None = None
    require_peer_tls: bool = False
    peer_secrets: PeerSecrets | None = None


STATE: web.AppKey[SupernodeState] = web.AppKey("supernode_state", SupernodeState)
