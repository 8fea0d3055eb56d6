"""The job store's Redis layout: every key it writes, in one place (every key starts with STYLEQUEUE_KEY_PREFIX).

    {p}job:{id}             hash   one field per Job attribute, each value JSON; TTL once finished
    {p}idem:{key}           string job id; TTL = the job TTL from the submit that set it
    {p}running              zset   job id -> lease expiry: jobs a worker holds (what the reaper scans)
    {p}due                  zset   job id -> when its message must be sent: the outbox of job messages.
                                   Every move to `queued` adds the job here in the same script.
    {p}sent                 zset   job id -> when its message was sent, until a worker claims it: a message the
                                   broker lost (a worker killed as it took it) is sent again from here
    {p}queued               zset   job id -> when it last entered `queued`: for the sweep
    {p}callbacks:due        zset   job id -> when its webhook delivery is due: the outbox of callbacks
    {p}finished             pub/sub channel: ids of jobs that just reached a final state (long polls)
    {p}stats                hash   counters the job store keeps (e.g. jobs the sweep found unscheduled)
    {p}sweep:lock           string the worker sweeping now; expires
    {p}outages              hash   dependency -> JSON {since, by}: dependencies a worker found down
    {p}runtimes             hash   "{style}|{worker}" -> JSON runtime choice a worker published at load
    {p}workers              hash   worker id -> JSON heartbeat
    {p}tenant:{t}:jobs      zset   job id -> created (ms): one tenant's jobs, newest last (HTTP listing)
    {p}tenant:{t}:active    zset   job id (or a submit's reservation `r:...`) -> when added (ms): a tenant's
                                   jobs that may be in flight; finished ones are dropped when counted
    {p}tenant:{t}:quota     hash   window, requests, bytes: the tenant's current rate-limit window
    {p}bulk:{run}           hash   a `stylequeue bulk` run: src_prefix, style, dst_prefix, created_at; job TTL
    {p}bulk:{run}:jobs      hash   source key (relative to SRC_PREFIX) -> id of its latest job; job TTL
    {p}bulk:{run}:lock      string token of the live process of that run; expires unless renewed

Times in sorted sets and in `lease_until`/`deadline_ms` are Redis `TIME` in unix milliseconds (integers, so a
score read back compares equal to the one written), never a worker's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

JOB = "job:"
IDEMPOTENCY = "idem:"
RUNNING = "running"
DUE = "due"
SENT = "sent"
QUEUED = "queued"
CALLBACKS_DUE = "callbacks:due"
FINISHED_CHANNEL = "finished"
STATS = "stats"
SWEEP_LOCK = "sweep:lock"
OUTAGES = "outages"
RUNTIMES = "runtimes"
WORKERS = "workers"
TENANT = "tenant:"
BULK = "bulk:"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "sq:"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}{JOB}{job_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}{IDEMPOTENCY}{key}"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}{TENANT}{tenant}:jobs"

    def tenant_active(self, tenant: str) -> str:
        return f"{self.prefix}{TENANT}{tenant}:active"

    def tenant_quota(self, tenant: str) -> str:
        return f"{self.prefix}{TENANT}{tenant}:quota"

    def bulk_run(self, run: str) -> str:
        return f"{self.prefix}{BULK}{run}"

    def name(self, name: str) -> str:
        """A fixed key: `keys.name(RUNNING)`."""
        return f"{self.prefix}{name}"

    @property
    def running(self) -> str:
        return self.name(RUNNING)

    @property
    def due(self) -> str:
        return self.name(DUE)

    @property
    def sent(self) -> str:
        return self.name(SENT)

    @property
    def queued(self) -> str:
        return self.name(QUEUED)

    @property
    def callbacks_due(self) -> str:
        return self.name(CALLBACKS_DUE)

    @property
    def finished_channel(self) -> str:
        return self.name(FINISHED_CHANNEL)

    @property
    def stats(self) -> str:
        return self.name(STATS)
