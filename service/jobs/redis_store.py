"""Jobs in Redis, shared by every replica (``DIFFUSION_JOBS_URL=redis://host:6379/0``).

Why a Stream with a consumer group: it is Redis's own at-least-once queue. ``XREADGROUP`` hands an
entry to one replica and keeps it in the group's pending list until that replica acknowledges it;
``XAUTOCLAIM`` gives entries whose replica stopped touching them (idle longer than the visibility
timeout) to another. An entry is deleted once its job ends, so a stream's length is its jobs waiting
plus running: what KEDA's ``redis-streams`` scaler reads (``streamLength``).
A replica asks for entries only while its engine has free rows, so work spreads by capacity.

Keys (prefix ``diffusion:jobs:``): ``job:{id}`` a hash (the record; JSON fields as strings),
``events:{id}`` a list (event k is sequence number k), ``queue`` and ``queue:short`` the streams of
the two lanes (group ``replicas``; short jobs are claimed first, into rows kept for them), ``queued``
and ``queued:short`` sorted sets in claiming order (positions, the queue limit, the oldest age),
``owner:{owner}`` and ``finished`` sorted sets (listing, purging), ``idem:{owner}:{key}`` → id,
``counts`` a hash of jobs by status. Every state change is one Lua script, so it is atomic with its
event and its counts: a job's terminal result is written once whatever races it.
"""

from __future__ import annotations

import functools
import json
import logging
import time

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.jobs.store import (LANES, STATUSES, TERMINAL, TERMINAL_EVENT, Event, IdempotencyConflict, JobRecord, JobStore,
                                QueueLimit, StoreUnavailable, dumps, loads)

log = logging.getLogger("service.jobs")

PREFIX = "diffusion:jobs:"
STREAMS = {"long": PREFIX + "queue", "short": PREFIX + "queue:short"}  # one per lane (see JobRecord.lane)
SUFFIX = {"long": "", "short": ":short"}
GROUP = "replicas"

_LANE = """
local function lane_of(P, id)
  if redis.call('HGET', P..'job:'..id, 'lane') == 'short' then return ':short' end
  return ''
end
local function position(P, id, sfx)
  local ahead = redis.call('ZRANK', P..'queued'..sfx, id)
  if ahead and sfx == '' then ahead = ahead + redis.call('ZCARD', P..'queued:short') end
  return ahead
end
"""

_CREATE = _LANE + """
local P, id = ARGV[1], ARGV[2]
local queued = redis.call('ZCARD', P..'queued') + redis.call('ZCARD', P..'queued:short')
if queued >= tonumber(ARGV[3]) then return {'full', queued} end
if ARGV[4] ~= '' then
  if not redis.call('SET', ARGV[4], id, 'NX') then return {'retry', 0} end
end
local seq = redis.call('INCR', P..'seq')
local k = P..'job:'..id
redis.call('HSET', k, unpack(ARGV, 6))
local sfx = lane_of(P, id)
local entry = redis.call('XADD', P..'queue'..sfx, '*', 'id', id)
redis.call('HSET', k, 'entry', entry, 'seq', seq)
redis.call('ZADD', P..'queued'..sfx, seq, id)
redis.call('ZADD', P..'owner:'..ARGV[5], seq, id)
redis.call('HINCRBY', P..'counts', 'queued', 1)
local ahead = position(P, id, sfx)
redis.call('RPUSH', P..'events:'..id, cjson.encode({e='queued', d={position=ahead}}))
redis.call('PUBLISH', P..'new', id)
return {'created', ahead}
"""

_CLAIM = _LANE + """
local P, id, worker, entry = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local k = P..'job:'..id
local st = redis.call('HGET', k, 'status')
local stream = P..'queue'..ARGV[6]
local function drop()
  redis.call('XACK', stream, 'replicas', entry)
  redis.call('XDEL', stream, entry)
  return 0
end
if not st or redis.call('HGET', k, 'entry') ~= entry then return drop() end
if st == 'queued' then
  redis.call('HSET', k, 'status', 'running', 'worker', worker)
  redis.call('HINCRBY', k, 'attempts', 1)
  redis.call('HSETNX', k, 'started_at', ARGV[5])
  redis.call('ZREM', P..'queued'..ARGV[6], id)
  redis.call('HINCRBY', P..'counts', 'queued', -1)
  redis.call('HINCRBY', P..'counts', 'running', 1)
  return 1
elseif st == 'running' then
  redis.call('HSET', k, 'worker', worker, 'progress', '')
  redis.call('HINCRBY', k, 'attempts', 1)
  redis.call('RPUSH', P..'events:'..id, cjson.encode({e='requeued', d={reason="the worker's lease lapsed"}}))
  return 2
end
return drop()
"""

_FINISH = _LANE + """
local P, id, status = ARGV[1], ARGV[2], ARGV[3]
local k = P..'job:'..id
local st = redis.call('HGET', k, 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
local sfx = lane_of(P, id)
redis.call('HSET', k, 'status', status, 'result', ARGV[4], 'error', ARGV[5], 'finished_at', ARGV[6], 'worker', '')
redis.call('HINCRBY', P..'counts', st, -1)
redis.call('HINCRBY', P..'counts', status, 1)
redis.call('ZREM', P..'queued'..sfx, id)
local entry = redis.call('HGET', k, 'entry')
if entry then
  redis.call('XACK', P..'queue'..sfx, 'replicas', entry)
  redis.call('XDEL', P..'queue'..sfx, entry)
end
redis.call('RPUSH', P..'events:'..id, ARGV[7])
redis.call('ZADD', P..'finished', ARGV[6], id)
redis.call('PUBLISH', P..'events', id)
return 1
"""

_RELEASE = _LANE + """
local P, id, worker = ARGV[1], ARGV[2], ARGV[3]
local k = P..'job:'..id
if redis.call('HGET', k, 'status') ~= 'running' or redis.call('HGET', k, 'worker') ~= worker then return 0 end
local sfx = lane_of(P, id)
local old = redis.call('HGET', k, 'entry')
redis.call('XACK', P..'queue'..sfx, 'replicas', old)
redis.call('XDEL', P..'queue'..sfx, old)
local entry = redis.call('XADD', P..'queue'..sfx, '*', 'id', id)
redis.call('HSET', k, 'status', 'queued', 'worker', '', 'entry', entry, 'progress', '')
redis.call('ZADD', P..'queued'..sfx, redis.call('INCR', P..'seq'), id)  -- at the stream's end: claimed in that order
redis.call('HINCRBY', P..'counts', 'running', -1)
redis.call('HINCRBY', P..'counts', 'queued', 1)
redis.call('RPUSH', P..'events:'..id, cjson.encode({e='requeued', d={reason=ARGV[4]}}))
redis.call('PUBLISH', P..'new', id)
return 1
"""

_APPEND = """
local P, id = ARGV[1], ARGV[2]
local st = redis.call('HGET', P..'job:'..id, 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
if ARGV[4] ~= '' then redis.call('HSET', P..'job:'..id, 'progress', ARGV[4]) end
local seq = redis.call('RPUSH', P..'events:'..id, ARGV[3])
redis.call('PUBLISH', P..'events', id)
return seq
"""

_CANCEL = """
local P, id = ARGV[1], ARGV[2]
local k = P..'job:'..id
if redis.call('HGET', k, 'status') == 'running' then redis.call('HSET', k, 'cancel', '1') return 1 end
return 0
"""

_PURGE = """
local P, id = ARGV[1], ARGV[2]
local k = P..'job:'..id
local f = redis.call('HMGET', k, 'status', 'owner', 'idem')
redis.call('ZREM', P..'finished', id)
if not f[1] then return 0 end
redis.call('HINCRBY', P..'counts', f[1], -1)
redis.call('ZREM', P..'owner:'..f[2], id)
if f[3] and f[3] ~= '' then
  local ik = P..'idem:'..f[2]..':'..f[3]
  if redis.call('GET', ik) == id then redis.call('DEL', ik) end
end
redis.call('DEL', k, P..'events:'..id)
return 1
"""

_FORGET = """
if redis.call('GET', ARGV[2]) == ARGV[3] then redis.call('DEL', ARGV[2]) end
return 1
"""

_DELIVERED = """
local P, id = ARGV[1], ARGV[2]
local k = P..'job:'..id
if redis.call('EXISTS', k) == 0 then return 0 end
if ARGV[3] == '1' then redis.call('HINCRBY', k, 'deliveries', 1)
else redis.call('HINCRBY', k, 'delivery_failures', 1) redis.call('HSET', k, 'delivery_error', ARGV[4]) end
return 1
"""


def _available(method):
    """Redis down is StoreUnavailable (a 503 at the routes, a retry in the runner)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            log.warning({"event": "job_store_error", "error": str(e)})  # the address stays in the log
            raise StoreUnavailable("the job store (Redis) is unreachable") from None
    return wrapper


def _ev(event: str, data: dict) -> str:
    return json.dumps({"e": event, "d": data}, separators=(",", ":"))


class RedisStore(JobStore):
    _threads = 8  # blocking socket calls: several may wait at once (a slow Redis blocks no one else)

    def __init__(self, url: str, prefix: str = PREFIX):
        super().__init__()
        self.prefix = prefix
        self.streams = {lane: prefix + "queue" + SUFFIX[lane] for lane in LANES}
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, decode_responses=True,
                                      health_check_interval=10)
        self._scripts = {name: self.r.register_script(src) for name, src in [
            ("create", _CREATE), ("claim", _CLAIM), ("finish", _FINISH), ("release", _RELEASE),
            ("append", _APPEND), ("cancel", _CANCEL), ("purge", _PURGE), ("delivered", _DELIVERED),
            ("forget", _FORGET)]}
        self._group_ready = False
        self.recovered = 0

    def _script(self, name: str, *args):
        return self._scripts[name](keys=[], args=[self.prefix, *args])

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        for stream in self.streams.values():
            try:
                self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._group_ready = True

    shared = True  # other replicas claim from the same queue

    def listen(self, on_new, on_event) -> None:
        """Call ``on_new()`` when a job is queued (or given back) by any replica, and ``on_event(id)`` when
        any replica stores one of a job's events (pub/sub on the store's Redis: replicas are woken at
        once instead of at their next poll). A thread of its own, reconnecting after errors."""
        import threading

        def run():
            while not self._closing:
                try:
                    pubsub = self.r.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.prefix + "new", self.prefix + "events")
                    while not self._closing:
                        message = pubsub.get_message(timeout=1.0)
                        if message is None:
                            continue
                        if message["channel"] == self.prefix + "new":
                            on_new()
                        else:
                            on_event(message["data"])
                    pubsub.close()
                except Exception:  # Redis down: the runner's polls go on; try again shortly
                    time.sleep(1.0)

        self._closing = False
        threading.Thread(target=run, name="job-store-listener", daemon=True).start()

    _closing = False

    def close(self) -> None:
        self._closing = True
        super().close()
        self.r.close()

    @_available
    def healthy(self) -> bool:
        return bool(self.r.ping())

    # --- records --------------------------------------------------------------------------------
    @staticmethod
    def _record(h: dict) -> JobRecord:
        def f(name):
            v = h.get(name)
            return float(v) if v not in (None, "") else None
        return JobRecord(
            id=h["id"], owner=h["owner"], status=h["status"], request=loads(h["request"]), model=h.get("model", ""),
            body_hash=h.get("body_hash", ""), idempotency_key=h.get("idem") or None,
            webhook=loads(h.get("webhook") or None), created_at=float(h["created_at"]), started_at=f("started_at"),
            finished_at=f("finished_at"), attempts=int(h.get("attempts", 0)), worker=h.get("worker") or None,
            progress=loads(h.get("progress") or None), result=loads(h.get("result") or None),
            error=loads(h.get("error") or None), cancel_requested=h.get("cancel") == "1",
            deliveries=int(h.get("deliveries", 0)), delivery_failures=int(h.get("delivery_failures", 0)),
            delivery_error=h.get("delivery_error") or None, rows=int(h.get("rows", 1)), lane=h.get("lane", "long"))

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    # --- the contract ---------------------------------------------------------------------------
    @_available
    def create(self, record: JobRecord, max_queued: int) -> tuple[JobRecord, bool]:
        self._ensure_group()
        idem = f"{self.prefix}idem:{record.owner}:{record.idempotency_key}" if record.idempotency_key else ""
        fields = {"id": record.id, "owner": record.owner, "status": "queued", "model": record.model,
                  "request": dumps(record.request), "body_hash": record.body_hash,
                  "idem": record.idempotency_key or "", "webhook": dumps(record.webhook) or "",
                  "rows": record.rows, "lane": record.lane, "created_at": repr(record.created_at), "attempts": 0,
                  "deliveries": 0, "delivery_failures": 0, "last_event": 1}
        flat = [str(x) for kv in fields.items() for x in kv]
        for _ in range(5):
            if idem:
                existing = self.r.get(idem)
                if existing is not None:
                    found = self.get(existing)
                    if found is not None:
                        if found.body_hash != record.body_hash:
                            raise IdempotencyConflict(existing)
                        return found, False
                    self._script("forget", idem, existing)  # its job was purged: the key is free again
            outcome, queued = self._script("create", record.id, max_queued, idem, record.owner, *flat)
            if outcome == "full":
                raise QueueLimit(int(queued))
            if outcome == "created":
                record.position = int(queued)
                return record, True
        raise StoreUnavailable("could not settle an idempotency key race")

    @_available
    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        h = self.r.hgetall(self._key(job_id))
        if not h or (owner is not None and h.get("owner") != owner):
            return None
        record = self._record(h)
        if record.status == "queued":
            ahead = self.r.zrank(self.prefix + "queued" + SUFFIX[record.lane], job_id)
            if ahead is not None and record.lane == "long":
                ahead += self.r.zcard(self.prefix + "queued:short")
            record.position = ahead
        return record

    @_available
    def list(self, owner: str, status: str | None = None, limit: int = 20,
             before: str | None = None) -> tuple[list[JobRecord], str | None]:
        key = f"{self.prefix}owner:{owner}"
        top = "+inf"
        if before is not None:
            score = self.r.zscore(key, before)
            if score is None:
                return [], None
            top = f"({int(score)}"
        page: list[JobRecord] = []
        while len(page) <= limit:
            ids = self.r.zrevrangebyscore(key, top, "-inf", start=0, num=4 * limit + 1, withscores=True)
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for job_id, _ in ids:
                pipe.hget(self._key(job_id), "status")
            wanted = []
            for (job_id, score), st in zip(ids, pipe.execute()):
                top = f"({int(score)}"
                if st is None:
                    self.r.zrem(key, job_id)  # purged
                    continue
                if status is None or st == status:
                    wanted.append(job_id)
                    if len(page) + len(wanted) > limit:
                        break
            pipe = self.r.pipeline(transaction=False)
            for job_id in wanted:  # the whole record (results included) only for the page
                pipe.hgetall(self._key(job_id))
            page += [self._record(h) for h in pipe.execute() if h]
        return page[:limit], (page[limit - 1].id if len(page) > limit else None)

    def _grouped(self, call):
        """``call()``, with the consumer groups made again if Redis lost them (restarted empty)."""
        self._ensure_group()
        try:
            return call()
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning({"event": "job_groups_recreated"})
            self._group_ready = False
            self._ensure_group()
            return call()

    @_available
    def claim(self, worker: str, limit: int, visibility_s: float, lane: str = "long") -> list[JobRecord]:
        got = self._grouped(lambda: self.r.xreadgroup(GROUP, worker, {self.streams[lane]: ">"}, count=limit))
        return self._take(worker, [e for _, entries in got or [] for e in entries], lane)

    def _take(self, worker: str, entries, lane: str) -> list[JobRecord]:
        records = []
        for entry, fields in entries:
            if not fields:  # deleted while pending
                self.r.xack(self.streams[lane], GROUP, entry)
                continue
            job_id = fields["id"]
            taken = self._script("claim", job_id, worker, entry, repr(time.time()), SUFFIX[lane])
            if taken:
                record = self.get(job_id)
                if record is not None:
                    records.append(record)
        return records

    @_available
    def extend(self, worker: str, job_ids: list[str], visibility_s: float) -> dict[str, bool]:
        if not job_ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self._key(job_id), "status", "worker", "entry", "cancel", "lane")
        mine = {}
        entries: dict[str, list[str]] = {lane: [] for lane in LANES}
        for job_id, (status, owner, entry, cancel, lane) in zip(job_ids, pipe.execute()):
            if status == "running" and owner == worker:
                mine[job_id] = cancel == "1"
                entries[lane or "long"].append(entry)
        for lane, ids in entries.items():  # touching the pending entries resets their idle time: no one reclaims them
            if ids:
                self.r.xclaim(self.streams[lane], GROUP, worker, 0, ids, justid=True)
        return mine

    @_available
    def reclaim(self, worker: str, visibility_s: float, limit: int) -> list[JobRecord]:
        self._ensure_group()
        if limit <= 0:
            return []
        records: list[JobRecord] = []
        for lane in LANES:
            cursor = "0-0"
            while len(records) < limit:  # XAUTOCLAIM looks at 10 × count entries per call: follow its cursor
                cursor, entries, *_ = self._grouped(lambda: self.r.xautoclaim(
                    self.streams[lane], GROUP, worker, int(visibility_s * 1000), cursor, count=limit - len(records)))
                records += self._take(worker, entries, lane)
                if cursor in ("0-0", b"0-0"):
                    break
        return records

    @_available
    def release(self, job_id: str, worker: str) -> bool:
        return bool(self._script("release", job_id, worker, "its worker stopped before it finished"))

    @_available
    def append(self, job_id: str, event: str, data: dict, progress: dict | None = None) -> int:
        return int(self._script("append", job_id, _ev(event, data), dumps(progress) or ""))

    @_available
    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[Event]:
        items = self.r.lrange(f"{self.prefix}events:{job_id}", after, after + limit - 1)
        out = []
        for k, text in enumerate(items):
            item = json.loads(text)
            out.append(Event(after + k + 1, item["e"], item["d"]))
        return out

    @_available
    def finish(self, job_id: str, status: str, result: dict | None = None, error: dict | None = None) -> bool:
        assert status in TERMINAL
        return bool(self._script("finish", job_id, status, dumps(result) or "", dumps(error) or "",
                                 repr(time.time()), _ev(TERMINAL_EVENT[status], error or {})))

    @_available
    def request_cancel(self, job_id: str, owner: str | None) -> JobRecord | None:
        record = self.get(job_id, owner)
        if record is None:
            return None
        if record.status == "queued":
            self.finish(job_id, "cancelled", None, {"status": 499, "detail": "cancelled before it ran"})
        elif record.status == "running":
            self._script("cancel", job_id)
        return self.get(job_id, owner)

    @_available
    def delivered(self, job_id: str, ok: bool, detail: str | None) -> None:
        self._script("delivered", job_id, "1" if ok else "0", detail or "")

    @_available
    def purge(self, older_than_s: float, now: float | None = None, limit: int = 500) -> int:
        """At most ``limit`` jobs a call (the runner calls it again a minute later): a day's backlog
        expiring at once does not hold the runner's heartbeats."""
        cutoff = (time.time() if now is None else now) - older_than_s
        ids = self.r.zrangebyscore(self.prefix + "finished", "-inf", cutoff, start=0, num=limit)
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            self._scripts["purge"](keys=[], args=[self.prefix, job_id], client=pipe)
        return sum(int(x) for x in pipe.execute()) if ids else 0

    @_available
    def counts(self) -> tuple[dict[str, int], float]:
        raw = self.r.hgetall(self.prefix + "counts")
        by = {s: max(0, int(raw.get(s, 0))) for s in STATUSES}
        age = 0.0
        for lane in LANES:
            first = self.r.zrange(self.prefix + "queued" + SUFFIX[lane], 0, 0)
            created = self.r.hget(self._key(first[0]), "created_at") if first else None
            if created:
                age = max(age, time.time() - float(created))
        return by, age
