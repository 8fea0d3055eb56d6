"""Every Lua script of the project, each headed by the KEYS and ARGV it takes and what it returns.

A script is a compare-and-set: it reads what it decides on and writes in one step, so two workers racing on
a job cannot both win. Scripts are assembled by `_script` from the body and the named Lua helpers it
uses, nothing else: no text replacement inside a script.

Shared conventions:
- Times are Redis `TIME` in unix milliseconds (`now_ms()`), never a caller's clock.
- A script that can end a job (claim, reap, transition) takes the "finishing" KEYS first
  (running, queued, due, sent, callbacks:due) and the "finishing" ARGV first (job TTL s, callback lease ms,
  finished channel, pending callback JSON), so `finish()` can do everything a final state implies:
  leave every schedule, expire the record, owe its callback, announce it on the channel.
- Every move to `queued` puts the job on the `due` set (its message is owed) and on `queued` in the same
  script (`requeue()`), so a message that is never sent or is lost delays a job but never loses it.
- Hash values are JSON (see record.py): the state `queued` is stored as `"queued"`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# --- helpers (Lua functions a script may include) ----------------------------------------------

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# JSON string of a time in ISO 8601 UTC with milliseconds (civil-from-days, valid for any date after 1970).
# A script calls it with the same time for every job it touches: the last answer is kept.
_ISO = """
local iso_ms, iso_text
local function iso(ms)
  if ms == iso_ms then return iso_text end
  local s = math.floor(ms / 1000)
  local z = math.floor(s / 86400)
  local secs = s - z * 86400
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400
  if month <= 2 then year = year + 1 end
  iso_ms = ms
  iso_text = string.format('"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ"', year, month, day,
    math.floor(secs / 3600), math.floor(secs % 3600 / 60), secs % 60, ms % 1000)
  return iso_text
end
"""

# The finishing KEYS and ARGV (see the module docstring), named once per script.
_FINISHING = """
local K_RUNNING, K_QUEUED, K_DUE, K_SENT, K_CALLBACKS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local TTL, CALLBACK_LEASE, CHANNEL, PENDING = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
"""

# Everything a final state implies, written in one HSET: the caller's `fields` (flat field/value pairs, may be
# empty; the table is appended to, so pass one made for the call), then `state` and the fields every final
# state clears. `was` is the state the job had: a running job is on none of queued, due and sent (CLAIM took
# it off them), so only `running` needs leaving then. `cb_url` and `cb` are the job's callback_url and
# callback fields as the caller read them (with `fields` applied).
# Returns the callback's delivery token (its score on callbacks:due) when the job owes one, else 0: the
# finisher sends the delivery message with that token, and if it never does, the entry comes due when the
# lease ends.
_FINISH = """
local function finish(key, id, t, was, state, fields, cb_url, cb)
  local owes = cb_url and cb_url ~= 'null'
  local n = #fields
  fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4], fields[n + 5] = 'state', state, 'owner', 'null',
    'lease_until'
  fields[n + 6], fields[n + 7], fields[n + 8], fields[n + 9], fields[n + 10] = 'null', 'staged_uri', 'null',
    'finished_at', iso(t)
  if owes and ((not cb) or cb == 'null') then
    fields[n + 11], fields[n + 12] = 'callback', PENDING
  end
  redis.call('HSET', key, unpack(fields))
  redis.call('ZREM', K_RUNNING, id)
  if was ~= '"running"' then
    redis.call('ZREM', K_QUEUED, id)
    redis.call('ZREM', K_DUE, id)
    redis.call('ZREM', K_SENT, id)
  end
  redis.call('EXPIRE', key, TTL)
  local token = 0
  if owes then
    token = t + CALLBACK_LEASE
    redis.call('ZADD', K_CALLBACKS, token, id)
  end
  redis.call('PUBLISH', CHANNEL, id)
  return token
end
"""

# Back to `queued`, with the caller's `fields` (flat field/value pairs; appended to, as in `finish`) written in
# the same HSET: off `running`,
# onto `queued` (now) and `due` (now + delay): its message is owed.
_REQUEUE = """
local function requeue(key, id, t, delay, fields)
  local n = #fields
  fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4], fields[n + 5], fields[n + 6] =
    'state', '"queued"', 'owner', 'null', 'lease_until', 'null'
  redis.call('HSET', key, unpack(fields))
  redis.call('ZREM', K_RUNNING, id)
  redis.call('ZADD', K_QUEUED, t, id)
  redis.call('ZREM', K_SENT, id)
  redis.call('ZADD', K_DUE, t + delay, id)
end
"""

# An ended lease (the worker lost) charges its attempt only if the worker had reported that it began the job
# (`begun`, written by RENEW and FENCE): jobs a killed worker had merely claimed are the infrastructure's fault,
# not theirs. A job lost unbegun UNBEGUN_LOSSES times is charged anyway, so a job that kills its worker before
# the first renewal cannot come back for ever. Returns the attempts the job has used after settling.
_SETTLE_LOST = """
local UNBEGUN_LOSSES = 5
local function settle_lost(key, attempts)
  local now = redis.call('HMGET', key, 'begun', 'unbegun_losses')
  if tonumber(now[1]) == attempts or attempts == 0 then return attempts end
  local losses = (tonumber(now[2]) or 0) + 1
  if losses >= UNBEGUN_LOSSES then return attempts end
  redis.call('HSET', key, 'unbegun_losses', losses, 'attempts', attempts - 1)
  redis.call('HINCRBY', key, 'given_back', 1)
  return attempts - 1
end
"""

# KEYS[1] due, KEYS[2] sent. A job's message went out: its `due` entry moves to `sent` (at time t), but only if
# its score is still `token`, the one whoever sent the message saw (an entry rescheduled meanwhile stays owed).
# Returns 1 if it moved, else 0.
_TO_SENT = """
local function to_sent(id, token, t)
  if tonumber(redis.call('ZSCORE', KEYS[1], id)) ~= tonumber(token) then return 0 end
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], t, id)
  return 1
end
"""

_HELPERS = {"now": _NOW, "iso": _ISO, "finishing": _FINISHING, "finish": _FINISH, "requeue": _REQUEUE,
            "settle_lost": _SETTLE_LOST, "to_sent": _TO_SENT}


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA-1 (what EVALSHA names it by)."""

    name: str
    source: str
    # Hashed once: every job-store call names its script by it, and hashing the longer scripts costs 2-6 us.
    sha: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


def _script(name: str, body: str, *, uses: tuple[str, ...] = (), lists: dict[str, tuple[str, ...]] | None = None,
            indexes: dict[str, int] | None = None) -> Script:
    """The script `name`: Lua tables of constant strings (`lists`) and integer constants (`indexes`, such as a
    field's 1-based place in a list), the helpers it uses, then its body."""
    constants = "".join(f"local {table} = {{{', '.join(repr(item) for item in items)}}}\n"
                        for table, items in (lists or {}).items())
    constants += "".join(f"local {name} = {int(value)}\n" for name, value in (indexes or {}).items())
    return Script(name, constants + "".join(_HELPERS[helper] for helper in uses) + body)


# --- creating jobs -----------------------------------------------------------------------------

# KEYS: job, idempotency key or '', queued, due, tenant index or ''
# ARGV: job id, idempotency TTL (s), dispatch grace (ms), deadline (ms after now) or '', field/value pairs...
# Returns {existing job id or '', created_at (JSON), dispatch token}. The job is on `due` at now + grace:
# the producer sends its message and then removes the entry (DISPATCHED); a producer that dies in between
# leaves it due, and a worker sends it.
CREATE = _script("create", """
local t = now_ms()
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {existing, '', 0} end
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
end
local created = iso(t)
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HSET', KEYS[1], 'created_at', created)
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'deadline_ms', t + tonumber(ARGV[4])) end
redis.call('ZADD', KEYS[3], t, ARGV[1])
local token = t + tonumber(ARGV[3])
redis.call('ZADD', KEYS[4], token, ARGV[1])
if KEYS[5] ~= '' then redis.call('ZADD', KEYS[5], t, ARGV[1]) end
return {'', created, token}
""", uses=("now", "iso"))

# KEYS: queued, due, tenant index or '', then one job key per job
# ARGV: dispatch grace (ms), deadline (ms after now) or '', then per job: job id, n, n field/value items
# Returns {created_at (JSON), dispatch token}: one token for the whole call.
CREATE_MANY = _script("create_many", """
local t = now_ms()
local created = iso(t)
local token = t + tonumber(ARGV[1])
local deadline = ARGV[2] ~= '' and t + tonumber(ARGV[2]) or nil
local at = 3
for i = 4, #KEYS do
  local id, n = ARGV[at], tonumber(ARGV[at + 1])
  redis.call('HSET', KEYS[i], 'created_at', created, unpack(ARGV, at + 2, at + 1 + n))
  if deadline then redis.call('HSET', KEYS[i], 'deadline_ms', deadline) end
  redis.call('ZADD', KEYS[1], t, id)
  redis.call('ZADD', KEYS[2], token, id)
  if KEYS[3] ~= '' then redis.call('ZADD', KEYS[3], t, id) end
  at = at + 2 + n
end
return {created, token}
""", uses=("now", "iso"))

# KEYS: due, sent.  ARGV: dispatch token, job ids...
# The producer sent these jobs' messages: each entry whose score is still the token it was given moves from
# `due` (message owed) to `sent` (message sent at this time). Returns how many moved.
DISPATCHED = _script("dispatched", """
local t = now_ms()
local moved = 0
for i = 2, #ARGV do moved = moved + to_sent(ARGV[i], ARGV[1], t) end
return moved
""", uses=("now", "to_sent"))

# KEYS: queued, due, sent, tenant index or '', then per job: job key, idempotency key or ''
# ARGV: job ids...
# A submit whose message could not be sent is undone: each job still `queued` that no worker ever began is
# deleted with its entries and its idempotency key (if that still names it). Returns how many were deleted.
DISCARD_UNSENT = _script("discard_unsent", """
local deleted = 0
for i = 1, #ARGV do
  local key, idem, id = KEYS[3 + 2 * i], KEYS[4 + 2 * i], ARGV[i]
  local now = redis.call('HMGET', key, 'state', 'attempts')
  if now[1] == '"queued"' and (tonumber(now[2]) or 0) == 0 then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    if KEYS[4] ~= '' then redis.call('ZREM', KEYS[4], id) end
    if idem ~= '' and redis.call('GET', idem) == id then redis.call('DEL', idem) end
    deleted = deleted + 1
  end
end
return deleted
""")

# --- running jobs ------------------------------------------------------------------------------

# What a claim returns of a job besides its id and attempt: what a worker needs to run it and report it.
CLAIM_FIELDS = ("style", "input_uri", "output_uri", "priority", "callback_url", "created_at", "given_back")

# KEYS: running, queued, due, sent, callbacks:due, then one job key per job
# ARGV: (finishing ARGV 1-4), worker (JSON), lease (ms), max attempts, lost-worker error (JSON),
#       expired error (JSON), then one job id per job key
# Per job, start an attempt: queued -> running, or take over a running job whose lease ended. Returns per job:
#   {'claimed', attempts, lease_until, started_at (JSON), CLAIM_FIELDS values...}
#   {'promote', attempts, lease_until, started_at (JSON), CLAIM_FIELDS values..., staged_uri (JSON)}: a lost
#       attempt had fenced its output; the claimer finishes the promotion instead of running the job again
#   {'busy'} (a live lease), {'done', state}, {'missing'},
#   {'failed', callback token} (it used every attempt), {'expired', callback token} (its deadline passed)
CLAIM = _script("claim", """
local WORKER, LEASE, MAX, LOST, EXPIRED = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], ARGV[9]
-- One read per job: the fields a claim decides on, then CLAIM_FIELDS, then the owed callback.
local READ = {'state', 'lease_until', 'attempts', 'deadline_ms', 'staged_uri', unpack(CLAIM_FIELDS)}
READ[#READ + 1] = 'callback'
local N = #CLAIM_FIELDS
local function claim(key, id, t)
  local now = redis.call('HMGET', key, unpack(READ))
  local state = now[1]
  if not state then return {'missing'} end
  if state == '"running"' then
    if (tonumber(now[2]) or 0) > t then return {'busy'} end
  elseif state ~= '"queued"' then
    return {'done', state}
  end
  local attempts = tonumber(now[3]) or 0
  local staged = now[5]
  local values = {unpack(now, 6, 5 + N)}
  local outcome = 'claimed'
  if state == '"running"' and not (staged and staged ~= 'null') then
    local before = attempts
    attempts = settle_lost(key, attempts)  -- taking over from a lost worker
    if attempts < before then values[GIVEN_BACK] = redis.call('HGET', key, 'given_back') end
  end
  if staged and staged ~= 'null' then
    outcome = 'promote'  -- the work was done: finishing it is no new attempt
  else
    local deadline = tonumber(now[4])
    if attempts == 0 and deadline and deadline < t then
      return {'expired', finish(key, id, t, state, '"cancelled"', {'error', EXPIRED}, values[CALLBACK_URL],
                                now[6 + N])}
    end
    if attempts >= MAX then
      return {'failed', finish(key, id, t, state, '"failed"', {'error', LOST}, values[CALLBACK_URL], now[6 + N])}
    end
    attempts = attempts + 1
  end
  local lease, started = t + LEASE, iso(t)
  redis.call('HSET', key, 'state', '"running"', 'owner', WORKER, 'lease_until', lease, 'started_at', started,
             'attempts', attempts, 'error', 'null')
  redis.call('ZADD', K_RUNNING, lease, id)
  if state ~= '"running"' then  -- a queued job is on `queued` and on `due` or `sent`; a running one on none
    redis.call('ZREM', K_QUEUED, id)
    redis.call('ZREM', K_DUE, id)
    redis.call('ZREM', K_SENT, id)
  end
  local result = {outcome, attempts, lease, started}
  for i = 1, N do result[4 + i] = values[i] end
  if outcome == 'promote' then result[5 + N] = staged end
  return result
end
local t = now_ms()
local results = {}
for i = 6, #KEYS do results[i - 5] = claim(KEYS[i], ARGV[i + 4], t) end
return results
""", uses=("now", "iso", "finishing", "finish", "settle_lost"), lists={"CLAIM_FIELDS": CLAIM_FIELDS},
                indexes={"GIVEN_BACK": CLAIM_FIELDS.index("given_back") + 1,
                         "CALLBACK_URL": CLAIM_FIELDS.index("callback_url") + 1})

# KEYS: running, then one job key per job
# ARGV: owner (JSON), lease (ms), then per job: job id, attempt number, begun ('1' once a job thread started it)
# Push the leases of jobs this owner holds in that attempt `lease` ahead, and record which attempts began.
# Returns the ids it no longer holds.
RENEW = _script("renew", """
local t = now_ms()
local lost = {}
for i = 2, #KEYS do
  local id, attempt, begun = ARGV[3 * i - 3], ARGV[3 * i - 2], ARGV[3 * i - 1]
  local now = redis.call('HMGET', KEYS[i], 'state', 'owner', 'attempts', 'begun')
  if now[1] == '"running"' and now[2] == ARGV[1] and now[3] == attempt then
    local lease = t + tonumber(ARGV[2])
    redis.call('HSET', KEYS[i], 'lease_until', lease)
    if begun == '1' and now[4] ~= attempt then redis.call('HSET', KEYS[i], 'begun', attempt) end
    redis.call('ZADD', KEYS[1], lease, id)
  else
    table.insert(lost, id)
  end
end
return lost
""", uses=("now",))

# KEYS: running.  ARGV: limit.  Returns the ids whose lease ended (by Redis time).
EXPIRED_LEASES = _script("expired_leases", """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
""", uses=("now",))

# KEYS: running, queued, due, sent, callbacks:due, then one job key per job
# ARGV: (finishing ARGV 1-4), max attempts, lost-worker error (JSON), then one job id per job key
# Per job whose lease ended: back to `queued` and due now (its message owed in this same step), or failed
# `internal` after its last attempt. Returns per job {outcome, previous owner (JSON), callback token}:
# outcome 'requeued', 'failed' or 'skip' (its lease is alive again, or it is no longer running).
REAP = _script("reap", """
local MAX, LOST = tonumber(ARGV[5]), ARGV[6]
local t = now_ms()
local results = {}
for i = 6, #KEYS do
  local key, id = KEYS[i], ARGV[i + 1]
  local now = redis.call('HMGET', key, 'state', 'lease_until', 'attempts', 'owner', 'staged_uri', 'callback_url',
                         'callback')
  if now[1] ~= '"running"' then
    redis.call('ZREM', K_RUNNING, id)
    results[i - 5] = {'skip', '', 0}
  elseif (tonumber(now[2]) or 0) > t then
    results[i - 5] = {'skip', '', 0}
  elseif not (now[5] and now[5] ~= 'null') and settle_lost(key, tonumber(now[3]) or 0) >= MAX then
    results[i - 5] = {'failed', now[4] or '', finish(key, id, t, now[1], '"failed"', {'error', LOST}, now[6], now[7])}
  else
    requeue(key, id, t, 0, {})
    results[i - 5] = {'requeued', now[4] or '', 0}
  end
end
return results
""", uses=("now", "iso", "finishing", "finish", "requeue", "settle_lost"))

# KEYS: running, queued, due, sent, callbacks:due, then one job key per job
# ARGV: (finishing ARGV 1-4), then per job: n, then n items: job id, allowed from-states (JSON list of
#       JSON states), to-state (JSON), owner (JSON) or '', attempt or '', delay (ms) or '', give back ('1'
#       or ''), then field/value pairs
# Per job, compare-and-set its state (and owner and attempt, when given) and write the pairs. A move to
# `queued` makes its message due after `delay`; `give back` also returns the attempt it used. A final state
# gets everything `finish` does. Returns per job {result, callback token}: result 1 moved, 0 wrong state,
# -1 no such job, -2 another owner or attempt.
TRANSITION = _script("transition", """
local decoded = {}  -- allowed-state lists, decoded once per call
-- One job's n items start at ARGV[at + 1].
local function transition(key, at, n, t)
  local id, sources, target, owner, attempt, delay, give_back = unpack(ARGV, at + 1, at + 7)
  local now = redis.call('HMGET', key, 'state', 'owner', 'attempts', 'callback_url', 'callback')
  local state = now[1]
  if not state then return {-1, 0} end
  local allowed = decoded[sources]
  if not allowed then
    allowed = {}
    for _, s in ipairs(cjson.decode(sources)) do allowed[s] = true end
    decoded[sources] = allowed
  end
  if not allowed[state] then return {0, 0} end
  if owner ~= '' and now[2] ~= owner then return {-2, 0} end
  if attempt ~= '' and now[3] ~= attempt then return {-2, 0} end
  local fields = {unpack(ARGV, at + 8, at + n)}
  if target == '"queued"' then
    if give_back == '1' and (tonumber(now[3]) or 0) > 0 then
      fields[#fields + 1] = 'attempts'
      fields[#fields + 1] = tonumber(now[3]) - 1
      redis.call('HINCRBY', key, 'given_back', 1)
    end
    requeue(key, id, t, tonumber(delay) or 0, fields)
    return {1, 0}
  end
  if target == '"succeeded"' or target == '"failed"' or target == '"cancelled"' then
    local cb_url, cb = now[4], now[5]
    for j = 1, #fields - 1, 2 do  -- the written values win over what was read
      if fields[j] == 'callback_url' then cb_url = fields[j + 1] end
      if fields[j] == 'callback' then cb = fields[j + 1] end
    end
    return {1, finish(key, id, t, state, target, fields, cb_url, cb)}
  end
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = target
  redis.call('HSET', key, unpack(fields))
  return {1, 0}
end
local t = now_ms()
local results, at = {}, 5
for i = 6, #KEYS do
  local n = tonumber(ARGV[at])
  results[i - 5] = transition(KEYS[i], at, n, t)
  at = at + n + 1
end
return results
""", uses=("now", "iso", "finishing", "finish", "requeue"))

# KEYS: running, then one job key per job
# ARGV: owner (JSON), lease (ms), then per job: n, then n items: job id, attempt, staged URI (JSON), then
#       field/value pairs (the results the job will have)
# Per job, the owner check before an output is promoted: only a running job held by this owner in this
# attempt, with no other output fenced yet, records its staged output and results and gets a fresh lease. From then
# on no other attempt can begin the job; if this one is lost, whoever claims it finishes the promotion.
# Returns per job 1 (fenced) or 0.
FENCE = _script("fence", """
local t = now_ms()
local results, at = {}, 3
for i = 2, #KEYS do
  local n = tonumber(ARGV[at])
  local id, attempt, staged = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local now = redis.call('HMGET', KEYS[i], 'state', 'owner', 'attempts', 'staged_uri')
  local free = (not now[4]) or now[4] == 'null' or now[4] == staged  -- the same again: a retry after a lost reply
  if now[1] == '"running"' and now[2] == ARGV[1] and now[3] == attempt and free then
    local lease = t + tonumber(ARGV[2])
    redis.call('HSET', KEYS[i], 'staged_uri', staged, 'lease_until', lease, 'begun', attempt,
               unpack(ARGV, at + 4, at + n))
    redis.call('ZADD', KEYS[1], lease, id)
    results[i - 1] = 1
  else
    results[i - 1] = 0
  end
  at = at + n + 1
end
return results
""", uses=("now",))

# KEYS: due, then one job key per job.  ARGV: delay (ms), then one job id per job key.
# Make each `queued` job's message due after `delay` unless it is due sooner already: a worker received a
# message for a job it still holds from an earlier attempt (it must come back, not be dropped), or a resumed
# bulk run asks for its queued jobs to be sent again. Returns how many were queued.
RESCHEDULE = _script("reschedule", """
local at = now_ms() + tonumber(ARGV[1])
local queued = 0
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'state') == '"queued"' then
    local due = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
    if (not due) or due > at then redis.call('ZADD', KEYS[1], at, ARGV[i]) end
    queued = queued + 1
  end
end
return queued
""", uses=("now",))

# KEYS: one job key per job.  ARGV: error code (JSON, e.g. '"storage_error"').
# Give back the attempt of each job still `queued` whose last error has that code: its failure turned out to be
# an outage, not its own fault. Returns how many were refunded.
REFUND_ATTEMPT = _script("refund_attempt", """
local refunded = 0
for i = 1, #KEYS do
  local now = redis.call('HMGET', KEYS[i], 'state', 'attempts', 'error')
  local attempts = tonumber(now[2]) or 0
  if now[1] == '"queued"' and attempts > 0 and now[3] and now[3] ~= 'null'
      and cjson.decode(now[3])['code'] == cjson.decode(ARGV[1]) then
    redis.call('HSET', KEYS[i], 'attempts', attempts - 1)
    redis.call('HINCRBY', KEYS[i], 'given_back', 1)
    refunded = refunded + 1
  end
end
return refunded
""")

# --- schedules (due sets) ------------------------------------------------------------------------

# KEYS: a schedule zset.  ARGV: limit, hold (ms).
# Take members that are due, pushing each `hold` ahead so a taker that dies leaves them due again.
# Returns a flat list {member, token, member, token, ...}: token = the score this taker set.
TAKE_DUE = _script("take_due", """
local t = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[1]))
local token = t + tonumber(ARGV[2])
local out = {}
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], token, member)
  table.insert(out, member)
  table.insert(out, token)
end
return out
""", uses=("now",))

# KEYS: a schedule zset.  ARGV: member, token, member, token, ...
# Remove each member only if its score is still the token its taker set: an entry rescheduled meanwhile
# (a retry, a new delivery time) stays. Returns how many were removed.
DONE_DUE = _script("done_due", """
local removed = 0
for i = 1, #ARGV, 2 do
  if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i])) == tonumber(ARGV[i + 1]) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
""")

# KEYS: due, sent.  ARGV: job id, token, job id, token, ...
# A taker of due job messages sent them: each entry still the one it took moves from `due` to `sent` (message
# sent at this time). Returns how many moved.
SENT_DUE = _script("sent_due", """
local t = now_ms()
local moved = 0
for i = 1, #ARGV, 2 do moved = moved + to_sent(ARGV[i], ARGV[i + 1], t) end
return moved
""", uses=("now", "to_sent"))

# KEYS: sent.  ARGV: age (ms), limit.
# Jobs whose message was sent more than `age` ago and that are still on `sent` (not claimed, not finished):
# their message may have been lost by the broker (a worker killed between taking it and recording it).
LOST_CANDIDATES = _script("lost_candidates", """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
""", uses=("now",))

# KEYS: due, sent, stats, then one job key per job.  ARGV: age (ms), then one job id per job key.
# Each job still `queued` whose message was sent more than `age` ago goes back to `due` (its message owed
# again, now; counted in stats `resent`); an entry of a job no longer queued is dropped. Returns how many.
RESEND_LOST = _script("resend_lost", """
local t = now_ms()
local resent = 0
for i = 4, #KEYS do
  local id = ARGV[i - 2]
  local sent = tonumber(redis.call('ZSCORE', KEYS[2], id))
  if redis.call('HGET', KEYS[i], 'state') ~= '"queued"' then
    redis.call('ZREM', KEYS[2], id)
  elseif sent and sent <= t - tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[1], t, id)
    redis.call('HINCRBY', KEYS[3], 'resent', 1)
    resent = resent + 1
  end
end
return resent
""", uses=("now",))

# --- callbacks (the outbox of webhook deliveries) -------------------------------------------------

# KEYS: callbacks:due.  ARGV: job id, token, lease (ms).
# Begin a delivery: only the holder of the entry's current token may, and it gets a fresh lease for the
# attempt. Returns the new token, or 0 (delivered, given up, or taken by another deliverer).
CALLBACK_BEGIN = _script("callback_begin", """
local held = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if held ~= tonumber(ARGV[2]) then return 0 end
local token = now_ms() + tonumber(ARGV[3])
if token <= held then token = held + 1 end  -- a new token, even within the same millisecond
redis.call('ZADD', KEYS[1], token, ARGV[1])
return token
""", uses=("now",))

# KEYS: callbacks:due, job.  ARGV: job id, token, callback record (JSON, next_attempt_at = "__NEXT__"),
#       retry delay (ms) or '' (delivered or given up)
# Record an attempt's outcome if the deliverer still holds the entry: the job's `callback` field, then the
# entry rescheduled (a retry) or removed. Returns 1 if recorded.
CALLBACK_RECORD = _script("callback_record", """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) ~= tonumber(ARGV[2]) then return 0 end
local record = ARGV[3]
if ARGV[4] ~= '' then
  local at = now_ms() + tonumber(ARGV[4])
  record = string.gsub(record, '"__NEXT__"', iso(at))
  redis.call('ZADD', KEYS[1], at, ARGV[1])
else
  record = string.gsub(record, '"__NEXT__"', 'null')
  redis.call('ZREM', KEYS[1], ARGV[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'callback', record) end
return 1
""", uses=("now", "iso"))

# --- the sweep (belt and braces) --------------------------------------------------------------------

# KEYS: queued, due, sent.  ARGV: age (ms), limit.
# Ids queued for longer than `age` on neither `due` nor `sent`: jobs nothing owes a message (a bug if any).
SWEEP_CANDIDATES = _script("sweep_candidates", """
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - tonumber(ARGV[1]), 'LIMIT', 0,
                       tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(old) do
  if not redis.call('ZSCORE', KEYS[2], id) and not redis.call('ZSCORE', KEYS[3], id) then
    table.insert(out, id)
  end
end
return out
""", uses=("now",))

# KEYS: queued, due, sent, stats, then one job key per job.  ARGV: one job id per job key.
# Schedule each job that is still `queued` on neither `due` nor `sent` (and count it in stats `sweep_found`);
# drop index entries of jobs no longer queued. Returns how many were scheduled.
SWEEP = _script("sweep", """
local t = now_ms()
local found = 0
for i = 5, #KEYS do
  local id = ARGV[i - 4]
  if redis.call('HGET', KEYS[i], 'state') == '"queued"' then
    if not redis.call('ZSCORE', KEYS[2], id) and not redis.call('ZSCORE', KEYS[3], id) then
      redis.call('ZADD', KEYS[2], t, id)
      redis.call('ZADD', KEYS[1], t, id)
      redis.call('HINCRBY', KEYS[4], 'sweep_found', 1)
      found = found + 1
    end
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return found
""", uses=("now",))

# --- bulk runs ------------------------------------------------------------------------------------

# KEYS: the run's lock.  ARGV: this process's token, TTL (s).
# Keep (or take, if free) the lock; never a lock another process holds. Returns 1 if held.
RENEW_LOCK = _script("renew_lock", """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) and 1 or 0
""")

# KEYS: the run's lock.  ARGV: this process's token.  Free the lock if this process holds it.
RELEASE_LOCK = _script("release_lock", """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


# --- the HTTP gateway's tenants (added by the gateway branch for jobs/tenants.py) -------------------

# KEYS: the tenant's active set.  ARGV: max in flight, n, reservation id.
# Admit a submit of n jobs if the set has room: add n members `{reservation}:{i}` (replaced by the job ids
# once created, or removed if the submit fails). Returns 1 if admitted, 0 if the set is full.
TENANT_ADMIT = _script("tenant_admit", """
local n = tonumber(ARGV[2])
if redis.call('ZCARD', KEYS[1]) + n > tonumber(ARGV[1]) then return 0 end
local t = now_ms()
for i = 1, n do redis.call('ZADD', KEYS[1], t, ARGV[3] .. ':' .. i) end
return 1
""", uses=("now",))

# KEYS: the tenant's quota hash.  ARGV: window (ms), max requests, max bytes, requests, bytes, force ('1' or '')
# Charge a request (and its body's bytes) to the tenant's fixed window, unless that would pass a limit (force:
# charge anyway, for bytes already read). Returns {1, 0} if charged, else {0, ms until the window ends}.
TENANT_CHARGE = _script("tenant_charge", """
local W = tonumber(ARGV[1])
local t = now_ms()
local window = math.floor(t / W)
local now = redis.call('HMGET', KEYS[1], 'window', 'requests', 'bytes')
local requests, bytes = 0, 0
if tonumber(now[1]) == window then
  requests, bytes = tonumber(now[2]) or 0, tonumber(now[3]) or 0
end
requests, bytes = requests + tonumber(ARGV[4]), bytes + tonumber(ARGV[5])
if ARGV[6] ~= '1' and (requests > tonumber(ARGV[2]) or bytes > tonumber(ARGV[3])) then
  return {0, (window + 1) * W - t}
end
redis.call('HSET', KEYS[1], 'window', window, 'requests', requests, 'bytes', bytes)
redis.call('PEXPIRE', KEYS[1], 2 * W)
return {1, 0}
""", uses=("now",))
