"""Process-level plumbing for runs on one or many processes (Accelerate).

One `Runtime` per process: rank and world size from Accelerate's PartialState (a single
process when not launched by `accelerate launch`), barriers, gathering Python objects onto
every rank, the run-directory lock, and the clean shutdown that keeps multi-process CPU runs
from aborting at exit.
"""
from __future__ import annotations

import fcntl
import gc
import os
from pathlib import Path

import torch

from lgd.errors import ConfigError, LgdError


class Runtime:
    def __init__(self):
        from accelerate import PartialState

        # PartialState reads ACCELERATE_USE_CPU only when told: without cpu=True, a multi-process
        # CPU launch would start independent single processes that each think they are rank 0.
        force_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        self.state = PartialState(cpu=force_cpu or not torch.cuda.is_available())
        self.rank = self.state.process_index
        self.world = self.state.num_processes
        self._lock = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        device = self.state.device
        return torch.device("cpu") if device.type == "cpu" else device

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Concatenate every rank's list, in rank order, on every rank."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def share(self, value):
        """The main process's value, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def lock(self, run: Path) -> None:
        """Refuse a second run on a run directory that is in use (the main process holds the lock;
        the OS drops it when the process dies, so a killed run can be resumed)."""
        if not self.is_main:
            return
        run.mkdir(parents=True, exist_ok=True)
        handle = open(run / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(f"{run} is in use by another lgd run; wait for it or use another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def check_writable(self, run: Path) -> None:
        try:
            run.mkdir(parents=True, exist_ok=True)
            probe = run / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise LgdError(f"cannot write to the run directory {run}: {exc.strerror}") from None

    def shutdown(self) -> None:
        """Finish together and tear the process group down before the interpreter exits."""
        self.barrier()
        gc.collect()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
