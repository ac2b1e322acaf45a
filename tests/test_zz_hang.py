import asyncio
from corral import QueueService, QueueMessage, JobState
from conftest import SettingsFactory

async def test_hang(make_settings: SettingsFactory) -> None:
    service = QueueService(make_settings())
    fail = {"on": True}
    @service.handler("sometimes")
    async def sometimes(message: QueueMessage) -> str:
        if fail["on"]:
            raise RuntimeError("down")
        return "up"
    ids = [await service.enqueue("sometimes", i, attempts=1) for i in range(3)]
    await service.start_worker(burst=True)
    fail["on"] = False
    assert await service.retry_failed() == 3
    t = asyncio.create_task(service.start_worker(burst=True))
    done, _ = await asyncio.wait({t}, timeout=10)
    if not done:
        for task in asyncio.all_tasks():
            print("TASK", task.get_name()); task.print_stack(limit=12)
        print(await service.counts())
        raise AssertionError("hang")
    await service.close()
