"""What the endpoints share: the servicer create_server built (its registry, budget, compute
slots and batchers), the explorer's workers, its jobs and its images."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from vitscope import Client
from vitscope_server.core.model.image_folders import allowed_folder
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.intra_op import host_thread
from vitscope_server.transport.progress import StreamPolicy
from vitscope_server.ui.images import ImageStore
from vitscope_server.ui.jobs import Jobs
from vitscope_server.ui.local import local_client

T = TypeVar("T")


@dataclass
class Explorer:
    inspector: Any
    health: Any
    policy: StreamPolicy
    image_roots: Sequence[Path]
    images: ImageStore
    workers: ThreadPoolExecutor
    jobs: Jobs

    @classmethod
    def create(
        cls,
        inspector: Any,
        health: Any,
        policy: StreamPolicy,
        image_roots: Sequence[Path],
        max_upload_bytes: int,
        workers: int,
    ) -> Explorer:
        """`workers` bounds the explorer's calls in flight; each waits in the server's own
        queue for a compute slot like any RPC."""
        pool = ThreadPoolExecutor(workers, thread_name_prefix="ui", initializer=host_thread)
        return cls(
            inspector,
            health,
            policy,
            tuple(image_roots),
            ImageStore(max_upload_bytes),
            pool,
            Jobs(pool),
        )

    def client(self, cancel: CancelToken | None = None) -> Client:
        """The typed client over the in-process servicer; `cancel` stops its calls."""
        return local_client(self.inspector, self.health, cancel or CancelToken(), self.policy)

    async def call(self, work: Callable[[Client], T]) -> T:
        """A quick call on a worker thread (never on the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.workers, lambda: work(self.client()))

    def read_folder_image(self, folder: str, relative: str) -> Image.Image:
        """An image of an allowed folder, by the path TopActivatingImages reported."""
        root = allowed_folder(folder, self.image_roots)
        return Image.open(root / relative).convert("RGB")

    def close(self) -> None:
        self.workers.shutdown(wait=False, cancel_futures=True)
