"""The README's queue-worker example (SPEC §8.4), run as written: taskiq, two worker processes, one send."""

from __future__ import annotations

import asyncio
import importlib
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.servers import stop_process_group

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The ``reminders.py`` code block of the README."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    [example] = [block for block in blocks if block.startswith("# reminders.py")]
    return str(example)


@pytest.fixture
def reminders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Iterator[ModuleType]:
    """The example as module ``reminders`` in ``tmp_path``, on its own queue, imported here too."""
    queue = f"reminders-{uuid.uuid4().hex[:12]}"
    code = readme_example()
    assert 'QUEUE = "reminders"' in code
    (tmp_path / "reminders.py").write_text(code.replace('QUEUE = "reminders"', f'QUEUE = "{queue}"'))
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("reminders", None)
    yield importlib.import_module("reminders")
    sys.modules.pop("reminders", None)


@pytest.fixture
def worker(reminders: ModuleType, tmp_path: Path) -> Iterator[None]:
    """``taskiq worker reminders:broker --workers 2``, as the README runs it (jobs wait in the queue till it is up)."""
    process = subprocess.Popen(
        [Path(sys.executable).with_name("taskiq"), "worker", "reminders:broker", "--workers", "2"],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        stop_process_group(process)


@pytest.mark.usefixtures("worker")
async def test_the_same_reminder_queued_20_times_is_sent_once(reminders: ModuleType) -> None:
    broker = reminders.broker
    try:
        await broker.startup()
        appointment = uuid.uuid4().int % 10**12  # records outlive the test (ttl 1 day): a fresh key each run
        job = {"appointment_id": appointment, "to": "+5511999998888"}
        tasks = [await reminders.send_reminder.kiq(job) for _ in range(20)]
        other = await reminders.send_reminder.kiq({"appointment_id": appointment + 1, "to": "+5511988887777"})
        results = await asyncio.gather(*(task.wait_result(timeout=60) for task in [*tasks, other]))
        values = [result.return_value for result in results]
        assert not any(result.is_err for result in results), [result.error for result in results]
        assert values[:20] == [values[0]] * 20
        assert (values[0]["appointment_id"], values[20]["appointment_id"]) == (appointment, appointment + 1)
        sent = await reminders.outbox.lrange(f"{reminders.QUEUE}:sent", 0, -1)
        assert sorted(sent) == [b"+5511988887777", b"+5511999998888"]  # one message per appointment
    finally:
        await broker.shutdown()
        await reminders.outbox.delete(f"{reminders.QUEUE}:sent")
        await reminders.outbox.aclose()
        await reminders.store.close()
