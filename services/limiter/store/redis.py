"""Redis store: every decision is one EVALSHA of one Lua script, whatever the number of limits.

The scripts are called by SHA (EVALSHA) over redis-py (library.py, one node or a Cluster); a Redis
that does not know a script yet (new, restarted, flushed) answers NOSCRIPT and the script is
loaded (SCRIPT LOAD) and called again, transparently. Time comes from Redis (TIME inside the
script), never from the replicas' clocks. All keys of one call share a {hash tag} (the domain tags by
tenant or Envoy domain), so a call is Redis Cluster-safe. Keys carry the URL's key_prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from services.kit.redisconn import cluster_option, split_key_prefix
from services.limiter.store.base import (
    BudgetRef,
    Charge,
    ChargeKind,
    Kind,
    LimitOp,
    OpResult,
    Outcome,
    Settlement,
    StoreUnavailableError,
)
from services.limiter.store.library import LibraryRedis, RedisReplyError

_COMMON = r"""
local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- How long a budget's hash and its zset live, from `now` on day `day`: to the end of the next
-- day. Both keys always carry the same expiry (set together at the day's first use, and the
-- zset's again whenever it gains an entry), so while the hash counts a reservation in `res`,
-- the sweep can still find its entry in the zset. Reservations last at most a day (the tiers
-- file's limit on reservation_ttl), so every entry expires before its zset does.
local function budget_ttl(day, now)
  return (day + 2) * 86400000 - now
end

-- Appends each row (one op's 6 integers) to `reply`: the flat layout the replica reads
-- natively, no JSON on the hot path.
local function append_rows(reply, rows)
  for _, row in ipairs(rows) do for j = 1, 6 do reply[#reply + 1] = row[j] end end
  return reply
end

-- A daily (UTC) budget: hash {d, used, res, cost, r:<id> = tokens} + zset of reservation expiries.
local function budget_load(h, z, now)
  local day = math.floor(now / 86400000)
  local v = redis.call('HMGET', h, 'd', 'used', 'res', 'cost')
  local used, res, cost = tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0
  if tonumber(v[1]) ~= day then
    used, cost = 0, 0
    redis.call('HSET', h, 'd', day, 'used', 0, 'cost', 0)
    -- Once a day, on the day's first use: the hash outlives the day by a whole day, so today's
    -- reservations and late settlements find it; no call needs to extend it again. The zset
    -- moves with it: it may still hold yesterday's unsettled reservations, which the hash counts.
    local ttl = budget_ttl(day, now)
    redis.call('PEXPIRE', h, ttl)
    redis.call('PEXPIRE', z, ttl)
  end
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #expired > 0 then
    for _, id in ipairs(expired) do
      res = res - (tonumber(redis.call('HGET', h, 'r:' .. id)) or 0)
      redis.call('HDEL', h, 'r:' .. id)
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    if res < 0 then res = 0 end
    redis.call('HSET', h, 'res', res)
  end
  return {day = day, used = used, res = res, cost = cost}
end

local function budget_result(b, z, limit, cost, over, now)
  local reset = (b.day + 1) * 86400000 - now
  local retry = 0
  if over then
    if b.used + cost > limit then
      retry = reset
    else
      retry = reset
      local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
      if #first > 0 then retry = math.min(reset, math.max(1, tonumber(first[2]) - now)) end
    end
  end
  local remaining = -1
  if limit >= 0 then remaining = math.max(0, limit - b.used - b.res) end
  return {over and 1 or 0, remaining, reset, retry, b.used, b.cost}
end
"""

# KEYS[1] idempotency key, then each op's key (a budget also its zset).
# ARGV: now|'' peek idem_ttl_ms reservation_id reservation_ttl_ms delay_ms buckets n
#       ops ("kind,limit,cost,period_ms,shadow;" per op: one argument, cheap to send)
#       force ('1': count whatever the limits say, for charges replayed after an outage)
DECIDE = (
    _COMMON
    + r"""
local now = now_ms(ARGV[1])
local peek = ARGV[2] == '1'
local idem_ttl = tonumber(ARGV[3])
local rid = ARGV[4]
local rttl = tonumber(ARGV[5])
local B = tonumber(ARGV[7])
local n = tonumber(ARGV[8])
local force = ARGV[10] == '1'
if idem_ttl > 0 then
  local prev = redis.call('GET', KEYS[1])
  if prev then
    local r = cjson.decode(prev)
    if r.a == nil then
      -- A flat reply stored as it was (an interim format, read within the key's TTL of an upgrade).
      r[1] = 1
      return r
    end
    return append_rows({1, r.a, r.d, r.id, #r.r}, r.r)
  end
end
local specs = {}
for kind, limit, cost, period, shadow in string.gmatch(ARGV[9], '(%d+),(%-?%d+),(%d+),(%d+),(%d);') do
  specs[#specs + 1] = {tonumber(kind), tonumber(limit), tonumber(cost), tonumber(period), shadow == '1'}
end
local st = {}
local blocked = false
local ki = 2
for i = 1, n do
  local kind, limit, cost, period, shadow = unpack(specs[i])
  local k1, k2 = KEYS[ki], nil
  ki = ki + 1
  if kind == 2 then k2 = KEYS[ki]; ki = ki + 1 end
  local s = {kind = kind, limit = limit, cost = cost, period = period, k1 = k1, k2 = k2}
  if kind == 1 then
    -- sliding window of B sub-buckets, counted over the B+1 newest (conservative)
    local g = math.ceil(period / B)
    local cur = math.floor(now / g)
    local first = cur - B
    local flat = redis.call('HGETALL', k1)
    local used, idx, stale = 0, {}, {}
    for j = 1, #flat, 2 do
      local b, c = tonumber(flat[j]), tonumber(flat[j + 1])
      if b < first then stale[#stale + 1] = flat[j] else used = used + c; idx[#idx + 1] = {b, c} end
    end
    if #stale > 0 then redis.call('HDEL', k1, unpack(stale)) end
    s.over = used + cost > limit
    s.retry = 0
    if s.over then
      if cost > limit then
        s.retry = period
      else
        table.sort(idx, function(x, y) return x[1] < y[1] end)
        local need, acc = used + cost - limit, 0
        for _, e in ipairs(idx) do
          acc = acc + e[2]
          if acc >= need then s.retry = (e[1] + B + 1) * g - now; break end
        end
      end
    end
    local newest = nil
    for _, e in ipairs(idx) do if newest == nil or e[1] > newest then newest = e[1] end end
    s.g, s.cur, s.used, s.newest = g, cur, used, newest
  elseif kind == 4 then
    -- envoyproxy/ratelimit's fixed window, aligned to the epoch: hash {w = window start, n = hits}.
    -- Counted now, over the limit or not, as upstream increments before it compares.
    local start = now - now % period
    local v = redis.call('HMGET', k1, 'w', 'n')
    local w = tonumber(v[1])
    if w ~= nil and w > start then
      -- a charge replayed from a window that has already ended: nothing left to count
      s.over = false
      s.row = {0, math.max(0, limit - cost), 0, 0, cost, 0}
    else
      local after = 0
      if w == start then after = tonumber(v[2]) or 0 end
      if not peek then
        after = after + cost
        if w == start then
          redis.call('HINCRBY', k1, 'n', cost)
        else
          redis.call('HSET', k1, 'w', start, 'n', after)
          redis.call('PEXPIRE', k1, start + period - now)
        end
      end
      local reset = start + period - now
      s.over = after > limit
      local retry = 0
      if s.over then retry = reset end
      s.row = {s.over and 1 or 0, math.max(0, limit - after), reset, retry, after, 0}
    end
  elseif kind == 2 then
    local b = budget_load(k1, k2, now)
    s.b = b
    s.over = limit >= 0 and b.used + b.res + cost > limit
  else
    local v = tonumber(redis.call('GET', k1)) or 0
    local ttl = 0
    if v > 0 then ttl = redis.call('PTTL', k1); if ttl < 0 then ttl = 0 end end
    s.used, s.ttl = v, ttl
    s.over = limit >= 0 and v + cost > limit
    s.retry = 0
    if s.over then if ttl > 0 then s.retry = ttl else s.retry = period end end
  end
  -- A fixed window never blocks the others: upstream decides each descriptor on its own.
  if s.over and not shadow and kind ~= 4 then blocked = true end
  st[i] = s
end
local admitted = (not peek) and (force or not blocked)
local out = {}
for i = 1, n do
  local s = st[i]
  local applied = admitted and (s.cost > 0 or s.kind == 2)
  if s.kind == 1 then
    local total = s.used
    local newest = s.newest
    if applied then
      redis.call('HINCRBY', s.k1, s.cur, s.cost)
      if newest == nil or s.cur > newest then
        -- A new sub-bucket: the key must now live until it leaves the window. While it stays
        -- the newest, that expiry already covers every later increment.
        redis.call('PEXPIRE', s.k1, (B + 2) * s.g)
        newest = s.cur
      end
      total = total + s.cost
    end
    local reset = 0
    if total > 0 and newest ~= nil then reset = (newest + B + 1) * s.g - now end
    out[i] = {s.over and 1 or 0, math.max(0, s.limit - total), reset, s.retry, total, 0}
  elseif s.kind == 2 then
    if applied and s.cost > 0 and rid ~= '' then
      -- Reservation ids are new for every Check (a replay returns above, from the idempotency
      -- key), so the id cannot already hold tokens here.
      s.b.res = s.b.res + s.cost
      redis.call('HSET', s.k1, 'res', s.b.res, 'r:' .. rid, s.cost)
      redis.call('ZADD', s.k2, now + rttl, rid)
      -- The hash's expiry was set when the day began; the zset's matches it (see budget_ttl).
      -- A zset that expired first would leave an unsettled reservation counted for good.
      redis.call('PEXPIRE', s.k2, budget_ttl(s.b.day, now))
    end
    out[i] = budget_result(s.b, s.k2, s.limit, s.cost, s.over, now)
  elseif s.kind == 4 then
    out[i] = s.row
  else
    local total, reset = s.used, s.ttl
    if applied then
      total = redis.call('INCRBY', s.k1, s.cost)
      redis.call('PEXPIRE', s.k1, s.period)
      reset = s.period
    end
    local remaining = -1
    if s.limit >= 0 then remaining = math.max(0, s.limit - total) end
    out[i] = {s.over and 1 or 0, remaining, reset, s.retry, total, 0}
  end
end
local res_id = ''
if admitted then res_id = rid end
-- A flat array: replayed, admitted, delay_ms, reservation id, n, then 6 integers per op.
local reply = append_rows({0, admitted and 1 or 0, tonumber(ARGV[6]), res_id, n}, out)
if admitted and idem_ttl > 0 then
  -- Stored as the JSON object {a, r, d, id} that every version reads, so replicas of this version
  -- and of earlier ones replay each other's records during a rolling upgrade.
  local record = cjson.encode({a = 1, r = out, d = tonumber(ARGV[6]), id = res_id})
  redis.call('SET', KEYS[1], record, 'PX', idem_ttl)
end
return reply
"""
)

# KEYS[1] done marker; KEYS[2i], KEYS[2i+1]: budget i (hash, zset).
# ARGV: now|'' reservation_id actual cost_micros done_ttl_ms n, then per budget: limit
SETTLE = (
    _COMMON
    + r"""
local now = now_ms(ARGV[1])
local rid = ARGV[2]
local actual, cm, done_ttl, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local already = false
if rid ~= '' then
  already = redis.call('SET', KEYS[1], '1', 'NX', 'PX', done_ttl) == false
end
local found = false
local out = {}
for i = 1, n do
  local h, z = KEYS[2 * i], KEYS[2 * i + 1]
  local limit = tonumber(ARGV[6 + i])
  local b = budget_load(h, z, now)
  if not already then
    if rid ~= '' then
      local held = tonumber(redis.call('HGET', h, 'r:' .. rid))
      if held then
        found = true
        b.res = math.max(0, b.res - held)
        redis.call('HDEL', h, 'r:' .. rid)
        redis.call('ZREM', z, rid)
      end
    end
    b.used = b.used + actual
    b.cost = b.cost + cm
    -- No expiry to extend: budget_load gave the hash (and its zset) the rest of today and all
    -- of tomorrow. The done marker has its own TTL; a retry after the hash expired finds the
    -- marker and charges nothing.
    redis.call('HSET', h, 'used', b.used, 'cost', b.cost, 'res', b.res)
  end
  out[i] = budget_result(b, z, limit, 0, false, now)
end
-- A flat array: reservation found, already settled, n, then 6 integers per budget.
return append_rows({found and 1 or 0, already and 1 or 0, n}, out)
"""
)

HEADROOM_KEY = "{limiter}:headroom"
# KEYS[1] the headroom hash. ARGV: field record ttl_ms. Entries carry their own expiry.
PUT_HEADROOM = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[3])) .. '|' .. ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all, 2 do
  local exp = tonumber(string.match(all[j + 1], '^(%d+)|'))
  if exp == nil or exp <= now then redis.call('HDEL', KEYS[1], all[j]) end
end
redis.call('PEXPIRE', KEYS[1], 86400000)
return 1
"""
GET_HEADROOM = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for j = 1, #all, 2 do
  local exp, rec = string.match(all[j + 1], '^(%d+)|(.*)$')
  if exp ~= nil and tonumber(exp) > now then out[#out + 1] = all[j]; out[#out + 1] = rec end
end
return out
"""


class _Script:
    """EVALSHA by the script's SHA1 (computed here); on NOSCRIPT (a restarted or flushed Redis,
    or a promoted cluster replica) SCRIPT LOAD it and call again."""

    def __init__(self, redis: LibraryRedis, source: str) -> None:
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.redis.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        self.sha = await self.redis.script_load(self.source)
        return await self.redis.execute("EVALSHA", self.sha, len(keys), *keys, *args)


def _op_results(reply: list[Any], start: int, n: int) -> tuple[OpResult, ...]:
    """The `n` ops' results in a script's flat reply (append_rows): 6 integers each from `start`."""
    return tuple(
        OpResult(bool(reply[i]), reply[i + 1], reply[i + 2], reply[i + 3], reply[i + 4], reply[i + 5])
        for i in range(start, start + 6 * n, 6)
    )


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        buckets: int = 20,
        timeout: float = 0.25,
        clock_ms: Any = None,
        pool_size: int = 64,
    ) -> None:
        clean, self.prefix = split_key_prefix(url)
        clean, cluster = cluster_option(clean)
        # redis-py bounds each socket read and connect by `timeout`, not a wait for a pooled
        # connection: the resilient store keeps its own timer around every call.
        self.redis = LibraryRedis(clean, timeout=timeout, cluster=cluster, pool_size=pool_size)
        self.buckets = buckets
        # Tests may inject a clock (epoch ms callable); production uses Redis TIME.
        self._clock_ms = clock_ms
        self._decide = _Script(self.redis, DECIDE)
        self._settle = _Script(self.redis, SETTLE)
        self._put_headroom = _Script(self.redis, PUT_HEADROOM)
        self._get_headroom = _Script(self.redis, GET_HEADROOM)

    def _now_arg(self) -> str:
        return "" if self._clock_ms is None else str(int(self._clock_ms()))

    async def _run(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys, args)
        except OSError as exc:
            raise StoreUnavailableError(repr(exc)) from exc

    async def decide(
        self,
        ops: Sequence[LimitOp],
        *,
        peek: bool = False,
        idempotency_key: str = "",
        idempotency_ttl_ms: int = 0,
        reservation_id: str = "",
        reservation_ttl_ms: int = 0,
        delay_ms: int = 0,
    ) -> Outcome:
        return await self._call_decide(
            ops,
            self._now_arg(),
            peek=peek,
            idempotency_key=idempotency_key,
            idempotency_ttl_ms=idempotency_ttl_ms,
            reservation_id=reservation_id,
            reservation_ttl_ms=reservation_ttl_ms,
            delay_ms=delay_ms,
        )

    async def _call_decide(
        self,
        ops: Sequence[LimitOp],
        now: str,
        *,
        peek: bool = False,
        idempotency_key: str = "",
        idempotency_ttl_ms: int = 0,
        reservation_id: str = "",
        reservation_ttl_ms: int = 0,
        delay_ms: int = 0,
        force: bool = False,
    ) -> Outcome:
        p = self.prefix
        first = ops[0].key if ops else "x"
        keys = [p + (idempotency_key or first + ":noidem")]
        args: list[Any] = [
            now,
            "1" if peek else "0",
            idempotency_ttl_ms if idempotency_key else 0,
            reservation_id,
            reservation_ttl_ms,
            delay_ms,
            self.buckets,
            len(ops),
            "".join(
                f"{int(op.kind)},{op.limit},{op.cost},{op.period_ms},{1 if op.shadow else 0};" for op in ops
            ),
            "1" if force else "0",
        ]
        for op in ops:
            keys.append(p + op.key)
            if op.kind == Kind.BUDGET:
                keys.append(p + op.key + ":x")
        reply = await self._run(self._decide, keys, args)
        replayed, admitted, delay_ms, rid, n = reply[:5]
        return Outcome(
            admitted=bool(admitted),
            results=_op_results(reply, 5, n),
            replayed=bool(replayed),
            delay_ms=delay_ms,
            reservation_id=rid.decode() if isinstance(rid, bytes) else str(rid),
        )

    async def settle(
        self,
        budgets: Sequence[BudgetRef],
        *,
        reservation_id: str,
        actual_tokens: int,
        cost_micros: int,
        done_key: str,
        done_ttl_ms: int,
        now: str | None = None,
    ) -> Settlement:
        p = self.prefix
        keys = [p + (done_key or budgets[0].key + ":nodone")]
        args: list[Any] = [
            self._now_arg() if now is None else now,
            reservation_id if done_key else "",
            actual_tokens,
            cost_micros,
            max(1, done_ttl_ms),
            len(budgets),
        ]
        for ref in budgets:
            keys += [p + ref.key, p + ref.key + ":x"]
            args.append(ref.limit)
        reply = await self._run(self._settle, keys, args)
        found, already, n = reply[:3]
        return Settlement(_op_results(reply, 3, n), bool(found), bool(already))

    async def put_headroom(self, field: str, record: str, ttl_ms: int) -> None:
        await self._run(self._put_headroom, [self.prefix + HEADROOM_KEY], [field, record, max(1, ttl_ms)])

    async def get_headroom(self) -> dict[str, str]:
        flat = await self._run(self._get_headroom, [self.prefix + HEADROOM_KEY], [])
        items = [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
        return dict(zip(items[::2], items[1::2], strict=True))

    async def replay(self, charges: Sequence[Charge]) -> int:
        """One script call per charge, in order (a reservation before its settlement); a
        failure stops the replay and reports how far it got."""
        applied = 0
        for c in charges:
            try:
                if c.kind == ChargeKind.DECIDE:
                    await self._call_decide(
                        c.ops,
                        str(c.at_ms),
                        idempotency_key=c.idempotency_key,
                        idempotency_ttl_ms=c.idempotency_ttl_ms,
                        reservation_id=c.reservation_id,
                        reservation_ttl_ms=c.reservation_ttl_ms,
                        delay_ms=c.delay_ms,
                        force=True,
                    )
                elif c.kind == ChargeKind.SETTLE:
                    await self.settle(
                        c.budgets,
                        reservation_id=c.reservation_id,
                        actual_tokens=c.actual_tokens,
                        cost_micros=c.cost_micros,
                        done_key=c.done_key,
                        done_ttl_ms=c.done_ttl_ms,
                        now=str(c.at_ms),
                    )
                elif c.kind == ChargeKind.HEADROOM:
                    await self.put_headroom(c.field, c.record, c.ttl_ms)
            except (StoreUnavailableError, OSError):
                return applied
            applied += 1
        return applied

    async def ping(self) -> None:
        await self.redis.execute("PING")

    async def close(self) -> None:
        await self.redis.close()
