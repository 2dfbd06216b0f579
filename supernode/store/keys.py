"""Every Redis key, channel and TTL the supernode uses, in one place.

All keys of one task carry the hash tag `{<task_id>}` so multi-key Lua scripts run on
Redis Cluster: every key a script touches is derived inside the script from KEYS[1]
(the task's meta key) by replacing its suffix, which keeps them in the same slot. The
suffixes below (META, HAVE, ...) are the only spelling of those names: scripts.py
interpolates them into the Lua source at import time.

Per task T (`df:t:{T}:...`):
  meta        HASH   url, url_key, md5, identifier, headers, length, piece_size,
                     piece_count, status, error, error_message, file_digest, cdn,
                     created_ms, failed_ms, digest_algo
  cdnmap      STRING bitmap: pieces verified on the CDN (its digest is in `dig`)
  dig         HASH   piece -> hex digest, by the task's digest_algo (computed by the
                     CDN from the origin stream)
  cnt         STRING BITFIELD u16 per piece: number of peer holders (rarest first)
  h:<n>       SET    peer holders (client ids) of piece n
  peers       HASH   cid -> "peer_id|ip|port|kind" (kind: peer or cdn)
  have:<cid>  STRING bitmap of pieces client cid holds
  fly:<cid>   HASH   piece -> "source|deadline_ms": assignments in flight
  up:<src>    ZSET   "cid:piece" -> deadline_ms: uploads a source is doing for this task
  bl:<cid>    SET    sources that failed for this client (its private blacklist)
  fails       HASH   source -> failures reported against it (any client)
  cfails      HASH   cid -> failures this client reported
  bad         SET    sources dropped for everyone
  popf        HASH   cid -> proof-of-possession challenges it failed (supernode/pop/)
  lease       STRING supernode id holding the CDN fetch lease (PX TTL)
  seq         STRING sequence number of the task's last published change (INCR)
Global (not tagged):
  df:tasks            ZSET task_id -> last access ms (GC index)
  df:host:<peer_id>   SET  task ids in which this peer server has clients (TTL)
  df:alive:<peer_id>  STRING liveness of a peer server (TTL, refreshed by heartbeats)
  df:sn:<sn_id>       HASH ip, port, download_port of a live supernode (TTL)
  df:keys             HASH kid -> "<Ed25519 public key hex>|<expires ms>": piece-token keys
                           of the supernodes (supernode/auth.py)
Channels:
  df:ev:{T}   one message per change in a task: "p" (piece/slot), "s" (status)
"""

from __future__ import annotations

PREFIX = "df"

TASK_INDEX = f"{PREFIX}:tasks"
PIECE_KEYS = f"{PREFIX}:keys"
EVENT_PATTERN = f"{PREFIX}:ev:*"

# TTLs (milliseconds). Every task key is re-armed with TASK_KEY_TTL_MS when written; the
# GC deletes idle tasks far earlier (--task-expire-time), the TTL is the safety net.
TASK_KEY_TTL_MS = 24 * 3600 * 1000
HOST_TTL_MS = 10 * 60 * 1000
PEER_ALIVE_TTL_MS = 3 * 60 * 1000
SUPERNODE_TTL_MS = 30 * 1000
LEASE_TTL_MS = 15 * 1000


TASK_HEAD = f"{PREFIX}:t:"
EVENTS_HEAD = f"{PREFIX}:ev:"

# Suffixes of a task's keys (after task_prefix); those ending in ':' take an id or piece.
META = "meta"
DIGESTS = "dig"
CDNMAP = "cdnmap"
COUNTS = "cnt"
PEERS = "peers"
HOLDERS = "h:"
HAVE = "have:"
INFLIGHT = "fly:"
UPLOADS = "up:"
BLACKLIST = "bl:"
FAILS = "fails"
CLIENT_FAILS = "cfails"
BAD = "bad"
POP_FAILS = "popf"
LEASE = "lease"
SEQ = "seq"
# The suffixes the Lua scripts use, by the name they have there (scripts.py).
SCRIPT_SUFFIXES = {
    "META": META, "DIGESTS": DIGESTS, "CDNMAP": CDNMAP, "COUNTS": COUNTS, "PEERS": PEERS,
    "HOLDERS": HOLDERS, "HAVE": HAVE, "INFLIGHT": INFLIGHT, "UPLOADS": UPLOADS,
    "BLACKLIST": BLACKLIST, "FAILS": FAILS, "CLIENT_FAILS": CLIENT_FAILS, "BAD": BAD, "SEQ": SEQ,
    "POP_FAILS": POP_FAILS,
}


def hash_tag(task_id: str) -> str:
    """The Cluster hash tag of every key (and the event channel) of a task: the first
    `{...}` of a name, so the scripts find it again with the Lua pattern `%b{}`."""
    return f"{{{task_id}}}"


def task_prefix(task_id: str) -> str:
    return f"{TASK_HEAD}{hash_tag(task_id)}:"


def meta(task_id: str) -> str:
    return task_prefix(task_id) + META


def digests(task_id: str) -> str:
    return task_prefix(task_id) + DIGESTS


def cdnmap(task_id: str) -> str:
    return task_prefix(task_id) + CDNMAP


def counts(task_id: str) -> str:
    return task_prefix(task_id) + COUNTS


def peers(task_id: str) -> str:
    return task_prefix(task_id) + PEERS


def holders(task_id: str, piece: int) -> str:
    return task_prefix(task_id) + f"{HOLDERS}{piece}"


def have(task_id: str, cid: str) -> str:
    return task_prefix(task_id) + HAVE + cid


def inflight(task_id: str, cid: str) -> str:
    return task_prefix(task_id) + INFLIGHT + cid


def uploads(task_id: str, source: str) -> str:
    return task_prefix(task_id) + UPLOADS + source


def blacklist(task_id: str, cid: str) -> str:
    return task_prefix(task_id) + BLACKLIST + cid


def fails(task_id: str) -> str:
    return task_prefix(task_id) + FAILS


def client_fails(task_id: str) -> str:
    return task_prefix(task_id) + CLIENT_FAILS


def bad(task_id: str) -> str:
    return task_prefix(task_id) + BAD


def pop_fails(task_id: str) -> str:
    return task_prefix(task_id) + POP_FAILS


def lease(task_id: str) -> str:
    return task_prefix(task_id) + LEASE


def sequence(task_id: str) -> str:
    return task_prefix(task_id) + SEQ


def events(task_id: str) -> str:
    return EVENTS_HEAD + hash_tag(task_id)


def task_of_event_channel(channel: str) -> str | None:
    head = EVENTS_HEAD + "{"
    if channel.startswith(head) and channel.endswith("}"):
        return channel[len(head) : -1]
    return None


def host(peer_id: str) -> str:
    return f"{PREFIX}:host:{peer_id}"


def alive(peer_id: str) -> str:
    return f"{PREFIX}:alive:{peer_id}"


# Per-peer secrets (supernode/api/peerauth.py): the cluster-wide HMAC key they derive from,
# and the mark that a peer id is taken (its secret was handed out), re-armed on every
# authenticated call.
PEER_SECRET_KEY = f"{PREFIX}:peer-secret-key"
PEER_CLAIM_TTL_MS = TASK_KEY_TTL_MS


def peer_claim(peer_id: str) -> str:
    return f"{PREFIX}:claim:{peer_id}"


def supernode(sn_id: str) -> str:
    return f"{PREFIX}:sn:{sn_id}"
