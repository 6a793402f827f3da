"""The Lua scripts that change shared state, each one atomic on the Redis server. Private.

Keys are passed in ``KEYS`` where a script knows them up front; the retention sweep builds
the keys of the records it evicts from the prefix (a single Redis, not a cluster).
"""

from __future__ import annotations

from typing import Final

__all__ = ["ADMIT", "FINISH", "MARK", "RELEASE", "START", "TAKE"]

ADMIT: Final = """
-- KEYS: record, the four level streams (critical, high, normal, low)
-- ARGV: capacity, level (1..4), job JSON, record ttl ms, then the record's field/value pairs
-- level 0: the record alone (a request answered at admission, from the cache)
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local level = tonumber(ARGV[2])
if level > 0 then
  local queued = 0
  for i = 2, 5 do queued = queued + redis.call('XLEN', KEYS[i]) end
  if queued >= tonumber(ARGV[1]) then return 0 end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if level > 0 then redis.call('XADD', KEYS[1 + level], '*', 'job', ARGV[3]) end
return 1
"""
"""Create a request's record and queue its job, or refuse: -1 the id is in use, 0 the
queue (jobs queued or in hand across every worker) is at capacity, 1 admitted."""

START: Final = """
-- KEYS: record; ARGV: worker id
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'pending' and status ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'processing', 'worker', ARGV[1])
return 1
"""
"""Mark a request processing by a worker: 0 when it has finished (do not start it)."""

FINISH: Final = """
-- KEYS: record, token stream, finished zset, sizes hash, bytes counter
-- ARGV: status, result, has result (1/0), error JSON (or ''), tokens JSON (or ''),
--       retention ms, retention max, retention bytes, id, channel, size, prefix
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'pending' and status ~= 'processing' then return 0 end
local now = redis.call('TIME')
local finished_at = tonumber(now[1]) + tonumber(now[2]) / 1e6
local fields = {'status', ARGV[1], 'finished_at', string.format('%.6f', finished_at)}
if ARGV[3] == '1' then fields[#fields + 1] = 'result'; fields[#fields + 1] = ARGV[2] end
if ARGV[4] ~= '' then fields[#fields + 1] = 'error'; fields[#fields + 1] = ARGV[4] end
if ARGV[5] ~= '' then fields[#fields + 1] = 'tokens'; fields[#fields + 1] = ARGV[5] end
redis.call('HSET', KEYS[1], unpack(fields))
local ttl = tonumber(ARGV[6])
redis.call('PEXPIRE', KEYS[1], ttl)
if redis.call('HGET', KEYS[1], 'stream') == '1' or redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('XADD', KEYS[2], '*', 'end', ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
-- Retention: the oldest finished records leave past the age, count or byte bound.
local id, prefix = ARGV[9], ARGV[12]
redis.call('ZADD', KEYS[3], finished_at, id)
redis.call('HSET', KEYS[4], id, ARGV[11])
local total = redis.call('INCRBY', KEYS[5], ARGV[11])
local function evict(old)
  local size = tonumber(redis.call('HGET', KEYS[4], old) or '0')
  redis.call('HDEL', KEYS[4], old)
  redis.call('ZREM', KEYS[3], old)
  total = redis.call('DECRBY', KEYS[5], size)
  redis.call('DEL', prefix .. 'req:' .. old, prefix .. 'tok:' .. old)
end
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', finished_at - ttl / 1000)) do
  evict(old)
end
local max_count, max_bytes = tonumber(ARGV[7]), tonumber(ARGV[8])
while redis.call('ZCARD', KEYS[3]) > max_count or total > max_bytes do
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #oldest == 0 then break end
  evict(oldest[1])
end
-- The notification: the outcome itself when small (no read needed), else just the id.
local note = {id = id, status = ARGV[1], finished_at = finished_at}
if #ARGV[2] + #ARGV[4] + #ARGV[5] <= 4096 then
  note.full = true
  if ARGV[3] == '1' then note.result = ARGV[2] end
  if ARGV[4] ~= '' then note.error = ARGV[4] end
  if ARGV[5] ~= '' then note.tokens = ARGV[5] end
end
redis.call('PUBLISH', ARGV[10], cjson.encode(note))
return 1
"""
"""End a request exactly once: its status, result or error and tokens, the end of its
token stream, retention, and the notification every process hears. -1 unknown, 0 it had
finished already, 1 finished now."""

RELEASE: Final = """
-- KEYS: the entry's stream; ARGV: group, entry id, job JSON
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[1], '*', 'job', ARGV[3])
return 1
"""
"""Hand a job back: its entry goes, a copy comes at the end of its level, where the next
``XREADGROUP`` of any worker takes it at once."""

TAKE: Final = """
-- KEYS: the four level streams, highest first; ARGV: group, consumer, most, prefix
-- Reads up to ``most`` new entries, highest level first (one XREADGROUP per level, as
-- far as needed), counts each delivery in its record, marks the unfinished ones
-- processing by this worker, and returns, per entry: level, entry id, job JSON, attempt,
-- finished (0/1), the token entries it had streamed.
local out, left = {}, tonumber(ARGV[3])
for level = 1, #KEYS do
  if left <= 0 then break end
  local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
                         'STREAMS', KEYS[level], '>')
  if got then
    for _, entry in ipairs(got[1][2]) do
      local fields, job = entry[2], nil
      for i = 1, #fields, 2 do if fields[i] == 'job' then job = fields[i + 1] end end
      local id = cjson.decode(job)['id']
      local record = ARGV[4] .. 'req:' .. id
      local attempt, status, finished = 0, false, 1
      if redis.call('EXISTS', record) == 1 then  -- gone: retained no longer, nothing to run
        attempt = redis.call('HINCRBY', record, 'attempt', 1)
        status = redis.call('HGET', record, 'status')
      end
      if status == 'pending' or status == 'processing' then
        finished = 0
        redis.call('HSET', record, 'status', 'processing', 'worker', ARGV[2])
      end
      local streamed = redis.call('XLEN', ARGV[4] .. 'tok:' .. id)
      for _, v in ipairs({level, entry[1], job, attempt, finished, streamed}) do
        out[#out + 1] = v
      end
      left = left - 1
    end
  end
end
return out
"""
"""Take up to ``most`` jobs in one round trip, CRITICAL first (see the script)."""

MARK: Final = """
-- KEYS: the records and token streams of entries already read, in pairs; ARGV: worker id
-- The same bookkeeping as TAKE, for entries read otherwise (a blocking read, a reclaim).
local out = {}
for i = 1, #KEYS, 2 do
  local attempt, status, finished = 0, false, 1
  if redis.call('EXISTS', KEYS[i]) == 1 then
    attempt = redis.call('HINCRBY', KEYS[i], 'attempt', 1)
    status = redis.call('HGET', KEYS[i], 'status')
  end
  if status == 'pending' or status == 'processing' then
    finished = 0
    redis.call('HSET', KEYS[i], 'status', 'processing', 'worker', ARGV[1])
  end
  out[#out + 1] = attempt
  out[#out + 1] = finished
  out[#out + 1] = redis.call('XLEN', KEYS[i + 1])
end
return out
"""
"""Count the deliveries of entries read by a blocking read or a reclaim (see TAKE)."""
