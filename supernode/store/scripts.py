"""Lua scripts: every multi-key update of a task runs atomically in Redis.

KEYS[1] is always the task's meta key (`df:t:{T}:meta`); the other keys of the task are
derived from it inside the script by swapping its suffix for another (same hash tag, so
same Cluster slot). No key name is spelt here: the suffixes and the event channel's head
come from keys.py, written into the Lua source as constants at import time. Only the
portable subset of Lua is used (no bit ops, no unpack) so fakeredis runs them too.
"""

from __future__ import annotations

import re

from . import keys


def _lua_constants() -> str:
    """`local NAME = 'value'` for every key suffix of keys.SCRIPT_SUFFIXES and the head of
    the event channels."""
    consts = {**keys.SCRIPT_SUFFIXES, "EVENTS_HEAD": keys.EVENTS_HEAD}
    lines = []
    for name, value in consts.items():
        # plain names only: nothing that would need quoting inside a Lua string
        if not re.fullmatch(r"[A-Za-z0-9_:.-]+", value):
            raise ValueError(f"key part {name}={value!r} cannot go into a Lua string as is")
        lines.append(f"local {name} = '{value}'")
    return "\n".join(lines) + "\n"


# Shared prelude: key helpers and the routines several scripts need.
_PRELUDE = _lua_constants() + r"""
local meta = KEYS[1]
local base = string.sub(meta, 1, #meta - #META)
local function k(s) return base .. s end
local function chan() return EVENTS_HEAD .. string.match(meta, '%b{}') end
local function touch(key, ttl) redis.call('PEXPIRE', key, ttl) end
-- Every change is also logged as an op ('H cid n', ...: supernode/scheduling/view.py) and, at the
-- end of the script, published with the task's next sequence number and returned to
-- the caller, so that every supernode's in-process view of the task replays exactly the
-- changes Redis made, in order (a gap in the numbers means a lost message: reload).
local ops = {}
local function emit(s) ops[#ops + 1] = s end
local function flush()
  if #ops == 0 then return '' end
  local seq = redis.call('INCR', k(SEQ))
  redis.call('PEXPIRE', k(SEQ), SEQ_TTL)
  local ev = seq .. '\n' .. table.concat(ops, '\n')
  redis.call('PUBLISH', chan(), ev)
  return ev
end
local function release_upload(src, member)
  if src and src ~= '' then redis.call('ZREM', k(UPLOADS .. src), member) end
end
local function release_fly(cid, n, entry)
  -- assignment n of cid (its fly entry `entry`) is over: free its upload slot
  redis.call('HDEL', k(INFLIGHT .. cid), n)
  local src = string.match(entry, '^[^|]*')
  release_upload(src, cid .. ':' .. n)
  emit('R ' .. cid .. ' ' .. n)
end
local function split2(s)
  local i = string.find(s, '|', 1, true)
  if not i then return s, '0' end
  return string.sub(s, 1, i - 1), string.sub(s, i + 1)
end
local function put_cdn_pieces(first, ttl)
  -- ARGV[first..] are piece/digest pairs the CDN verified: record them, mark them held
  for i = first, #ARGV, 2 do
    redis.call('HSET', k(DIGESTS), ARGV[i], ARGV[i + 1])
    redis.call('SETBIT', k(CDNMAP), tonumber(ARGV[i]), 1)
    emit('G ' .. ARGV[i] .. ' ' .. ARGV[i + 1])
  end
  touch(k(DIGESTS), ttl); touch(k(CDNMAP), ttl); touch(meta, ttl)
end
local function add_holder(cid, n, ttl)
  if redis.call('SETBIT', k(HAVE .. cid), n, 1) == 0 then
    redis.call('SADD', k(HOLDERS .. n), cid)
    touch(k(HOLDERS .. n), ttl)
    redis.call('BITFIELD', k(COUNTS), 'OVERFLOW', 'SAT', 'INCRBY', 'u16', '#' .. n, 1)
    touch(k(COUNTS), ttl)
    emit('H ' .. cid .. ' ' .. n)
  end
  touch(k(HAVE .. cid), ttl)
end
local function remove_client(cid)
  local count = tonumber(redis.call('HGET', meta, 'piece_count') or '-1') or -1
  local hv = k(HAVE .. cid)
  if count < 0 then count = redis.call('STRLEN', hv) * 8 end
  for n = 0, count - 1 do
    if redis.call('GETBIT', hv, n) == 1 then
      redis.call('SREM', k(HOLDERS .. n), cid)
      redis.call('BITFIELD', k(COUNTS), 'OVERFLOW', 'SAT', 'INCRBY', 'u16', '#' .. n, -1)
    end
  end
  local fly = redis.call('HGETALL', k(INFLIGHT .. cid))
  for i = 1, #fly, 2 do
    local src = split2(fly[i + 1])
    release_upload(src, cid .. ':' .. fly[i])
  end
  redis.call('DEL', hv, k(INFLIGHT .. cid), k(BLACKLIST .. cid), k(UPLOADS .. cid))
  redis.call('HDEL', k(PEERS), cid)
  emit('D ' .. cid)
end
local function delete_task()
  local count = tonumber(redis.call('HGET', meta, 'piece_count') or '-1') or -1
  if count < 0 then count = redis.call('STRLEN', k(CDNMAP)) * 8 end
  for n = 0, count - 1 do redis.call('DEL', k(HOLDERS .. n)) end
  local cids = redis.call('HKEYS', k(PEERS))
  for _, cid in ipairs(cids) do
    redis.call('DEL', k(HAVE .. cid), k(INFLIGHT .. cid), k(BLACKLIST .. cid), k(UPLOADS .. cid))
  end
  local cdn = redis.call('HGET', meta, 'cdn')
  if cdn then redis.call('DEL', k(UPLOADS .. cdn)) end
  redis.call('DEL', meta, k(CDNMAP), k(DIGESTS), k(COUNTS), k(PEERS), k(FAILS),
             k(CLIENT_FAILS), k(BAD), k(POP_FAILS))
  emit('Z')
end
""".replace("SEQ_TTL", str(keys.TASK_KEY_TTL_MS))

# Applies piece reports of client `cid`: ARGV[first..] are piece, result, source, reason
# quadruples. Validates every report first; applies all or nothing. A report on a piece
# the client already holds and no longer has in flight is a repeat (a client re-sends the
# reports of a request it gave up on, not knowing they were applied): it changes nothing.
# -> "ok", done | "not_assigned", piece | "unknown_client" | "unknown_task" | "bad_piece", piece
_APPLY_REPORTS = r"""
local function apply_reports(cid, ttl, limit, first, last)
  if redis.call('EXISTS', meta) == 0 then return 'unknown_task', '' end
  if redis.call('HEXISTS', k(PEERS), cid) == 0 then return 'unknown_client', '' end
  local count = tonumber(redis.call('HGET', meta, 'piece_count') or '-1') or -1
  local fly = k(INFLIGHT .. cid)
  for i = first, last, 4 do
    local n, res, src = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if count >= 0 and tonumber(n) >= count then return 'out_of_range', n end
    if res == 'have' then
      if redis.call('HEXISTS', k(DIGESTS), n) == 0 then return 'bad_piece', n end
    else
      local entry = redis.call('HGET', fly, n)
      if not entry then
        if redis.call('GETBIT', k(HAVE .. cid), tonumber(n)) == 0 then return 'not_assigned', n end
      else
        local esrc = split2(entry)
        if src ~= '' and src ~= esrc then return 'not_assigned', n end
      end
    end
  end
  for i = first, last, 4 do
    local n, res = ARGV[i], ARGV[i + 1]
    local entry = redis.call('HGET', fly, n)
    if res == 'have' then
      -- a piece held already may also be assigned (given again after a failover):
      -- the assignment is void, its slots free now rather than at its deadline
      if entry then release_fly(cid, n, entry) end
      add_holder(cid, tonumber(n), ttl)
    elseif entry then
      local src = split2(entry)
      release_fly(cid, n, entry)
      if res == 'ok' then
        add_holder(cid, tonumber(n), ttl)
      elseif src == redis.call('HGET', meta, 'cdn') and ARGV[i + 3] ~= 'refused'
          and ARGV[i + 3] ~= 'timeout' then
        -- bad bytes from the CDN copy: its supernode checks and mends it (repair.py); it
        -- stays the source of last resort, also for this client. (Unreachable, it is
        -- avoided like any source: a dead seed is replaced under another id.)
        redis.call('HINCRBY', k(FAILS), src, 1)
        touch(k(FAILS), ttl)
        emit('F ' .. src)
      else
        if redis.call('SADD', k(BLACKLIST .. cid), src) == 1 then emit('B ' .. cid .. ' ' .. src) end
        touch(k(BLACKLIST .. cid), ttl)
        emit('F ' .. src)
        if redis.call('HINCRBY', k(FAILS), src, 1) >= limit then
          if redis.call('SADD', k(BAD), src) == 1 then emit('X ' .. src) end
          touch(k(BAD), ttl)
        end
        redis.call('HINCRBY', k(CLIENT_FAILS), cid, 1)
        emit('C ' .. cid)
        touch(k(FAILS), ttl); touch(k(CLIENT_FAILS), ttl)
      end
    end
  end
  touch(meta, ttl)
  return 'ok', redis.call('BITCOUNT', k(HAVE .. cid))
end
"""


def _eventful(body: str) -> str:
    """A script whose changes are logged: it returns {event, result}, where event is the
    published "seq\\nop\\n..." text ('' when it changed nothing); Store.run hands the
    event to the views and returns the result."""
    return _PRELUDE + "local function body()\n" + body + "\nend\nlocal r = body()\nreturn {flush(), r}\n"


# ARGV: url, url_key, md5, identifier, range, headers_json, now_ms, ttl_ms, fail_interval_ms, digest_algo
# -> {"new"|"exists"|"conflict", status}
REGISTER_TASK = _eventful(r"""
local now = tonumber(ARGV[7])
if redis.call('EXISTS', meta) == 1 then
  local f = redis.call('HMGET', meta, 'url_key', 'md5', 'identifier', 'range', 'status', 'failed_ms')
  if f[1] ~= ARGV[2] or f[2] ~= ARGV[3] or f[3] ~= ARGV[4] or f[4] ~= ARGV[5] then
    return {'conflict', f[5] or ''}
  end
  if f[5] == 'failed' and now - tonumber(f[6] or '0') >= tonumber(ARGV[9]) then
    delete_task()
  else
    touch(meta, tonumber(ARGV[8]))
    return {'exists', f[5] or ''}
  end
end
redis.call('HSET', meta, 'url', ARGV[1], 'url_key', ARGV[2], 'md5', ARGV[3],
  'identifier', ARGV[4], 'range', ARGV[5], 'headers', ARGV[6], 'status', 'pending',
  'length', '-1', 'piece_size', '0', 'piece_count', '-1', 'created_ms', ARGV[7],
  'digest_algo', ARGV[10])
touch(meta, tonumber(ARGV[8]))
emit('M')
return {'new', 'pending'}
""")

# ARGV: cid, info ("peer_id|ip|port|kind"), ttl_ms  -> 1
ADD_PEER = _eventful(r"""
if redis.call('EXISTS', meta) == 0 then return 0 end
redis.call('HSET', k(PEERS), ARGV[1], ARGV[2])
touch(k(PEERS), tonumber(ARGV[3]))
emit('P ' .. ARGV[1] .. ' ' .. ARGV[2])
return 1
""")

# ARGV: ttl_ms, then field/value pairs to set on meta.
SET_META = _eventful(r"""
if redis.call('EXISTS', meta) == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', meta, ARGV[i], ARGV[i + 1]) end
touch(meta, tonumber(ARGV[1]))
emit('M')
return 1
""")

# ARGV: ttl_ms, cdn_id, then piece/digest pairs. The CDN has verified these pieces.
PUBLISH_PIECES = _eventful(r"""
if redis.call('EXISTS', meta) == 0 then return 0 end
local ttl = tonumber(ARGV[1])
put_cdn_pieces(3, ttl)
return 1
""")

# Pieces of the CDN copy found bad on its disk: nobody is sent to them until they are
# published again (their digests stay: they are what the origin sent). ARGV: ttl_ms,
# pieces... (none: every piece)
UNPUBLISH_PIECES = _eventful(r"""
if redis.call('EXISTS', meta) == 0 then return 0 end
if #ARGV == 1 then
  redis.call('DEL', k(CDNMAP))
  emit('U')
else
  for i = 2, #ARGV do
    redis.call('SETBIT', k(CDNMAP), tonumber(ARGV[i]), 0)
    emit('U ' .. ARGV[i])
  end
  touch(k(CDNMAP), tonumber(ARGV[1]))
end
return 1
""")

# The CDN has the whole file: every piece digest and the final meta fields in one step,
# so a store that lost its state meanwhile (a restart without persistence) and got the
# task registered again never ends up "success" without the digests.
# ARGV: ttl_ms, cdn_id, n (meta field/value pairs that follow), pairs..., piece/digest pairs
FINISH_TASK = _eventful(r"""
if redis.call('EXISTS', meta) == 0 then return 0 end
local ttl, nf = tonumber(ARGV[1]), tonumber(ARGV[3])
local first = 4 + 2 * nf
for i = 4, first - 1, 2 do redis.call('HSET', meta, ARGV[i], ARGV[i + 1]) end
emit('M')
put_cdn_pieces(first, ttl)
return 1
""")

# A takeover: ARGV[2] becomes the task's CDN, holding exactly the listed pieces (the old
# CDN's bitmap is dropped: those pieces are on a dead supernode's disk). A finished task
# stays finished (a re-seed after its CDN died). ARGV: ttl_ms, cdn_id, then piece/digest
# pairs. 0 if the task is gone or failed.
ADOPT_CDN = _eventful(r"""
local st = redis.call('HGET', meta, 'status')
if not st or st == 'failed' then return 0 end
local ttl = tonumber(ARGV[1])
redis.call('HSET', meta, 'cdn', ARGV[2])
if st ~= 'success' then redis.call('HSET', meta, 'status', 'fetching') end
redis.call('DEL', k(CDNMAP))
put_cdn_pieces(3, ttl)
ops = {'A'}  -- views reload the whole task
return 1
""")

# Everything a supernode's view of the task holds, read at one instant (read-only).
# -> {seq, meta, cdnmap, digests, peers, clients, fails, bad, cfails} where clients is
# flat: have bitmap, fly hash, blacklist, for each entry of peers in order.
LOAD_VIEW = _PRELUDE + r"""
local peers = redis.call('HGETALL', k(PEERS))
local clients = {}
for i = 1, #peers, 2 do
  local cid = peers[i]
  clients[#clients + 1] = redis.call('GET', k(HAVE .. cid)) or ''
  clients[#clients + 1] = redis.call('HGETALL', k(INFLIGHT .. cid))
  clients[#clients + 1] = redis.call('SMEMBERS', k(BLACKLIST .. cid))
end
return {
  redis.call('GET', k(SEQ)) or '0',
  redis.call('HGETALL', meta),
  redis.call('GET', k(CDNMAP)) or '',
  redis.call('HGETALL', k(DIGESTS)),
  peers,
  clients,
  redis.call('HGETALL', k(FAILS)),
  redis.call('SMEMBERS', k(BAD)),
  redis.call('HGETALL', k(CLIENT_FAILS)),
}
"""

# Holders, digests and source state for candidate pieces, packed into three strings
# (a reply of hundreds of elements costs more to parse in Python than to compute).
# Sources at their upload cap are left out of `sources`. Used by a takeover (read-only
# but for dropping expired uploads).
# ARGV: now_ms, sample, cdn_id ('' if none), peer_cap, cdn_cap, pieces...
# -> {holders: "a,b;c;;..." (one group per piece), digests: "d0,d1,..." ('' if none),
#     sources: "sid|peers-entry|uploads|failures" joined by ';'}
DETAIL = _PRELUDE + r"""
local now = ARGV[1]
local sample = tonumber(ARGV[2])
local peer_cap, cdn_cap = tonumber(ARGV[4]), tonumber(ARGV[5])
local holders, digs, seen, srcs = {}, {}, {}, {}
local function see(s)
  if not seen[s] then seen[s] = true; srcs[#srcs + 1] = s end
end
if ARGV[3] ~= '' then see(ARGV[3]) end
for i = 6, #ARGV do
  local n = ARGV[i]
  local hs = redis.call('SRANDMEMBER', k(HOLDERS .. n), sample)
  holders[#holders + 1] = table.concat(hs, ',')
  for _, h in ipairs(hs) do see(h) end
  digs[#digs + 1] = redis.call('HGET', k(DIGESTS), n) or ''
end
local info = {}
for _, s in ipairs(srcs) do
  local up = k(UPLOADS .. s)
  redis.call('ZREMRANGEBYSCORE', up, '-inf', now)
  local load = redis.call('ZCARD', up)
  local cap = peer_cap
  if s == ARGV[3] then cap = cdn_cap end
  if load < cap then
    info[#info + 1] = s .. '|' .. (redis.call('HGET', k(PEERS), s) or '') .. '|' ..
      load .. '|' .. (redis.call('HGET', k(FAILS), s) or '0')
  end
end
return {table.concat(holders, ';'), table.concat(digs, ','), table.concat(info, ';')}
"""

# Pulls, batched: the pulls of one task that a supernode decided together are claimed in
# one call (one round trip, one sequence number, one PUBLISH for all of them), each in
# turn as if alone. A pull applies its client's reports (all or nothing), then claims the
# assignments the scheduler decided, each only if every invariant still holds (the
# decision was made on a view that may be a moment old): the client neither holds nor has
# the piece in flight and has room; the source is not dropped, not on the client's
# blacklist, holds the piece (a peer: its bitmap; the CDN: it is the task's CDN and has
# the piece) and is below its upload cap; a CDN assignment with max_copies > 0 only while
# the piece has fewer copies (holders plus the CDN's transfers of it in flight: two pulls
# deciding from the same view must not both super-seed one piece). Expired assignments
# of the client are released first. A pull refused for its reports changes nothing and
# does not stop the others.
# ARGV: now_ms, ttl_ms, max_inflight, peer_cap, cdn_cap, source_fail_limit, then per
# pull: cid, n_reports, n_items, report quadruples (piece, result, source, reason), then
# item quintuples (piece, source, kind, deadline_ms, max_copies).
# -> one string per pull: "ok" followed by the claimed pieces ("ok 3 17"), or
#    "refused <status> <value>"
PULL = _eventful(_APPLY_REPORTS + r"""
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_inflight, peer_cap, cdn_cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local fail_limit = tonumber(ARGV[6])
local cdn = redis.call('HGET', meta, 'cdn') or ''
local function claim(cid, first, last)
  local out = {'ok'}
  if first > last then return out end
  if redis.call('HEXISTS', k(PEERS), cid) == 0 then return out end
  local fly = k(INFLIGHT .. cid)
  local cur = redis.call('HGETALL', fly)
  for i = 1, #cur, 2 do
    local src, dl = split2(cur[i + 1])
    if tonumber(dl) < now then release_fly(cid, cur[i], cur[i + 1]) end
  end
  local room = max_inflight - redis.call('HLEN', fly)
  local have = k(HAVE .. cid)
  for i = first, last, 5 do
    if room <= 0 then break end
    local n, src, kind, dl = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local max_copies = tonumber(ARGV[i + 4])
    local up = k(UPLOADS .. src)
    local cap = peer_cap
    if kind == 'cdn' then cap = cdn_cap end
    local ok = src ~= cid and redis.call('GETBIT', have, tonumber(n)) == 0
      and redis.call('HEXISTS', fly, n) == 0
      and redis.call('SISMEMBER', k(BAD), src) == 0
      and redis.call('SISMEMBER', k(BLACKLIST .. cid), src) == 0
    if ok then
      if kind == 'cdn' then
        ok = src == cdn and redis.call('GETBIT', k(CDNMAP), tonumber(n)) == 1
      else
        ok = redis.call('HEXISTS', k(PEERS), src) == 1
          and redis.call('GETBIT', k(HAVE .. src), tonumber(n)) == 1
      end
    end
    if ok then
      redis.call('ZREMRANGEBYSCORE', up, '-inf', now)
      ok = redis.call('ZCARD', up) < cap
    end
    if ok and kind == 'cdn' and max_copies > 0 then
      local copies = redis.call('BITFIELD', k(COUNTS), 'GET', 'u16', '#' .. n)[1] or 0
      local suffix = ':' .. n
      for _, m in ipairs(redis.call('ZRANGE', up, 0, -1)) do
        if string.sub(m, -#suffix) == suffix then copies = copies + 1 end
      end
      ok = copies < max_copies
    end
    if ok then
      redis.call('ZADD', up, dl, cid .. ':' .. n)
      touch(up, ttl)
      redis.call('HSET', fly, n, src .. '|' .. dl)
      emit('T ' .. cid .. ' ' .. n .. ' ' .. src .. ' ' .. dl)
      room = room - 1
      out[#out + 1] = n
    end
  end
  touch(fly, ttl)
  return out
end
local results = {}
local i = 7
while i <= #ARGV do
  local cid, nrep, nitems = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local rfirst = i + 3
  local ifirst = rfirst + 4 * nrep
  local inext = ifirst + 5 * nitems
  local st, v = 'ok', ''
  if nrep > 0 then st, v = apply_reports(cid, ttl, fail_limit, rfirst, ifirst - 1) end
  if st ~= 'ok' then
    results[#results + 1] = 'refused ' .. st .. ' ' .. v
  else
    results[#results + 1] = table.concat(claim(cid, ifirst, inext - 1), ' ')
  end
  i = inext
end
return results
""")

# ARGV: cid, ttl_ms, source_fail_limit, then piece, result, source, reason quadruples.
# -> {status, value} as apply_reports
REPORT = _eventful(_APPLY_REPORTS + r"""
local st, v = apply_reports(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), 4, #ARGV)
return {st, v}
""")

# A client aborts: release its in-flight assignments. ARGV: cid
RELEASE = _eventful(r"""
local cid = ARGV[1]
local cur = redis.call('HGETALL', k(INFLIGHT .. cid))
for i = 1, #cur, 2 do release_fly(cid, cur[i], cur[i + 1]) end
return #cur / 2
""")

# Remove clients (a peer server going away, or expired). ARGV: cid...
REMOVE_CLIENTS = _eventful(r"""
for i = 1, #ARGV do remove_client(ARGV[i]) end
return #ARGV
""")

DELETE_TASK = _eventful(r"""
delete_task()
return 1
""")

# A client failed a proof-of-possession challenge for piece n (supernode/pop/): it is
# no holder of n any more (nobody is sent to it for n), and once it has failed
# `max_failures` challenges of this task it holds nothing and is dropped as a source
# for everyone (BAD).
# ARGV: cid, n, ttl_ms, max_failures -> {status, failures}: "ok" | "unknown_task" |
# "unknown_client"
POP_FAILED = _eventful(r"""
if redis.call('EXISTS', meta) == 0 then return {'unknown_task', 0} end
local cid, n, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HEXISTS', k(PEERS), cid) == 0 then return {'unknown_client', 0} end
local function lose(p)
  if redis.call('SETBIT', k(HAVE .. cid), p, 0) == 1 then
    redis.call('SREM', k(HOLDERS .. p), cid)
    redis.call('BITFIELD', k(COUNTS), 'OVERFLOW', 'SAT', 'INCRBY', 'u16', '#' .. p, -1)
    emit('L ' .. cid .. ' ' .. p)
  end
end
lose(n)
local fails = redis.call('HINCRBY', k(POP_FAILS), cid, 1)
touch(k(POP_FAILS), ttl)
if fails >= tonumber(ARGV[4]) then
  -- no holder of anything any more (rarity counts stay true), and no source for anyone
  local count = tonumber(redis.call('HGET', meta, 'piece_count') or '-1') or -1
  if count < 0 then count = redis.call('STRLEN', k(HAVE .. cid)) * 8 end
  for p = 0, count - 1 do lose(p) end
  if redis.call('SADD', k(BAD), cid) == 1 then emit('X ' .. cid) end
  touch(k(BAD), ttl)
end
return {'ok', fails}
""")

# Renew or release a lease only if we own it. ARGV: owner, ttl_ms (0 = release)
LEASE_KEEP = r"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) == 0 then redis.call('DEL', KEYS[1]) return 1 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

ALL = {
    "register_task": REGISTER_TASK,
    "add_peer": ADD_PEER,
    "set_meta": SET_META,
    "publish_pieces": PUBLISH_PIECES,
    "finish_task": FINISH_TASK,
    "unpublish_pieces": UNPUBLISH_PIECES,
    "adopt_cdn": ADOPT_CDN,
    "load_view": LOAD_VIEW,
    "detail": DETAIL,
    "pull": PULL,
    "report": REPORT,
    "release": RELEASE,
    "remove_clients": REMOVE_CLIENTS,
    "delete_task": DELETE_TASK,
    "pop_failed": POP_FAILED,
    "lease_keep": LEASE_KEEP,
}
# Scripts that return {event, result} (see _eventful).
EVENTFUL = frozenset(name for name, src in ALL.items() if src.endswith("return {flush(), r}\n"))
