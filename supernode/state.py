"""The typed application state shared by the handlers (aiohttp AppKey)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from common.netpolicy import AddressPolicy

if TYPE_CHECKING:
    from .auth import KeyRing
    from .cache import PieceCache
    from .cdn import Cdn
    from .config import Settings
    from .dispatch import Dispatcher
    from .events import EventHub
    from .metrics import Metrics
    from .peerauth import PeerSecrets
    from .repo import Repo
    from .seed import Seed
    from .store import Store


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
    peer_secrets: PeerSecrets | None = None


STATE: web.AppKey[SupernodeState] = web.AppKey("supernode_state", SupernodeState)
