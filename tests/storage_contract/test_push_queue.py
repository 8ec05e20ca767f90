"""PushQueue: one job per device and conversation, claimed when due, pushed at most once."""

from __future__ import annotations

from mqchat.config import StorageConfig
from storage import open_storage
from storage.base import PushStore
from storage.records import Pending


def pending(seq: int, device: str = "b1", preview: str = "hi") -> Pending:
    return Pending(user="bob", device=device, conv="dm:alice:bob", seq=seq, sender="alice", preview=preview)


async def test_a_burst_is_one_job_claimed_once_when_due(push: PushStore) -> None:
    assert await push.enqueue([pending(1), pending(2), pending(3, preview="last")], due_at=100) == 3
    assert await push.enqueue([pending(1, device="b2")], due_at=150) == 1
    assert (await push.depth(), await push.next_due()) == (2, 100)
    assert await push.claim_due(99, limit=10) == []
    (job,) = await push.claim_due(100, limit=10)
    assert (job.first_seq, job.last_seq, job.count, job.preview, job.due_at) == (1, 3, 3, "last", 100)
    (other,) = await push.claim_due(200, limit=10)  # a claimed job is not claimed again
    assert other.device == "b2"
    await push.finish(job, sent=True, next_due_at=300)
    assert await push.enqueue([pending(3)], due_at=400) == 0  # already pushed
    assert await push.depth() == 1


async def test_messages_during_a_send_open_a_new_window(push: PushStore) -> None:
    await push.enqueue([pending(1)], due_at=100)
    (job,) = await push.claim_due(100, limit=10)
    await push.enqueue([pending(2), pending(3)], due_at=100)
    await push.finish(job, sent=True, next_due_at=500)
    assert await push.next_due() == 500
    (again,) = await push.claim_due(500, limit=10)
    assert (again.first_seq, again.last_seq, again.count) == (2, 3, 2)


async def test_jobs_interrupted_mid_send_are_dropped_at_restart(storage_config: StorageConfig) -> None:
    async with open_storage(storage_config) as storage:
        await storage.push.enqueue([pending(1), pending(1, device="b2")], due_at=100)
        await storage.push.claim_due(100, limit=1)
    async with open_storage(storage_config) as storage:
        assert await storage.push.drop_interrupted() == 1
        assert await storage.push.depth() == 1
        assert await storage.push.next_due() == 100
