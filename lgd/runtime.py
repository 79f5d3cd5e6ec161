"""Process-level plumbing for runs on one or many processes (Accelerate).

One `Runtime` per process: rank and world size from Accelerate's PartialState (a single
process when not launched by `accelerate launch`), barriers, gathering Python objects onto
every rank, the device each process uses, and the clean shutdown that keeps multi-process CPU runs
from aborting at exit. `run_on_local_processes` starts such a group of CPU processes from a plain
command (what `accelerate launch --num_processes N` would).

The process group is created with the run's `distributed_timeout`: the main process trains
theta* and IGD's surrogate alone while the other ranks wait at a barrier, which takes longer
than NCCL's default 10 minutes at ImageNette scale and hours at ImageNet scale.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import socket
import sys

import torch

from lgd.errors import ConfigError, LgdError, first_line

log = logging.getLogger(__name__)
# `accelerate launch` flags that configure Accelerator objects, which lgd does not use: its
# precision and compilation are per-section config fields.
IGNORED_LAUNCH_FLAGS = {
    "ACCELERATE_MIXED_PRECISION": ("--mixed_precision", "sampling.precision and each training section's precision"),
    "ACCELERATE_DYNAMO_BACKEND": ("--dynamo_backend", "sampling.compile and each training section's compile"),
}


class Runtime:
    def __init__(self, timeout_minutes: float | None = None):
        """timeout_minutes: the process group's timeout (None: the config's distributed_timeout default)."""
        from accelerate import PartialState

        from lgd.config import Config


        # PartialState reads ACCELERATE_USE_CPU only when told: without cpu=True, a multi-process
        # CPU launch would start independent single processes that each think they are rank 0.
        force_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        self.timeout_minutes = Config.distributed_timeout if timeout_minutes is None else timeout_minutes
        self.state = PartialState(cpu=force_cpu or not torch.cuda.is_available(),
                                  timeout=datetime.timedelta(minutes=self.timeout_minutes))
        self.rank = self.state.process_index
        self.world = self.state.num_processes
        if self.is_main:
            warn_ignored_launch_flags()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        device = self.state.device
        return torch.device("cpu") if device.type == "cpu" else device

    def device_for(self, name: str) -> torch.device:
        """The device this process computes on for a config's `device`: under a multi-process
        launch, "auto" is this rank's own device (one GPU per process)."""
        return self.device if name == "auto" and self.world > 1 else resolve_device(name)

    def barrier(self) -> None:
        if self.world > 1:
            with self._waiting("a barrier"):
                self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Concatenate every rank's list, in rank order, on every rank."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        with self._waiting("gathering results"):
            return gather_object(items)

    def share(self, value):
        """The main process's value, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        with self._waiting("receiving the main process's value"):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def _waiting(self, what: str):
        """A collective that timed out (or whose peer died) ends in one line, not a gloo/NCCL trace."""
        try:
            yield
        except (RuntimeError, torch.distributed.DistError) as exc:
            text = str(exc)
            if "timed out" in text.lower() or "timeout" in text.lower():
                raise LgdError(
                    f"process {self.rank} of {self.world} waited more than distributed_timeout="
                    f"{self.timeout_minutes:g} minutes at {what}; if the main process's training takes longer, "
                    "raise it (e.g. distributed_timeout=600)") from None
            raise LgdError(f"process {self.rank} of {self.world} lost the other processes at {what}: "
                           f"{first_line(exc)}") from None

    def shutdown(self) -> None:
        """Finish together and tear the process group down before the interpreter exits."""
        self.barrier()
        gc.collect()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launched() -> bool:
    """Whether this process is one of a group that a launcher (accelerate, torchrun) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_on_local_processes(function, processes: int, threads: int, *args) -> None:
    """function(*args) on `processes` spawned CPU processes of `threads` intra-op threads that
    form one process group (each makes its own `Runtime`). An LgdError in one ends the group
    with that error, as one line."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes),
             "LOCAL_WORLD_SIZE": str(processes), "ACCELERATE_USE_CPU": "true",
             "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}  # else Accelerate sets 1, with a warning
    errors = mp.get_context("spawn").SimpleQueue()
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # not "terminating process N" when one failed: its error says why
    try:
        mp.start_processes(_local_process, args=(function, args, group, threads, errors), nprocs=processes,
                           start_method="spawn")
    except mp.ProcessExitedException:
        if not errors.empty():  # the failed process's own message; start_processes stopped the others
            raise LgdError(errors.get()) from None
        raise
    finally:
        spawn_log.setLevel(level)


def _local_process(rank: int, function, args: tuple, group: dict, threads: int, errors) -> None:
    os.environ.update(group, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        function(*args)
    except LgdError as exc:
        errors.put(str(exc))
        sys.exit(2)


def compute_environment(device: torch.device, world: int) -> dict:
    """What, besides the config, changes the bits a run computes."""
    import lgd

    import diffusers

    return {**machine(), "diffusers": diffusers.__version__, "lgd": lgd.__version__,
            "lgd_revision": source_revision(), "device": device.type, "processes": world,
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def machine() -> dict:
    """The CPU and how torch computes on it. Two CPUs of one instruction set can still compute
    other bits (likely oneDNN's and MKL's kernel choice by CPU model and cache size): the demo's images
    and trainings differ in their last bits between an AMD EPYC and an Intel Xeon, both AVX-512."""
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def cpu_model() -> str:
    """The processor: its model name with vendor, family and model number from /proc/cpuinfo
    (virtual machines often give a generic name), else what the platform reports."""
    import platform

    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    ids = [fields.get("vendor_id"), *(f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model") if k in fields)]
    return f"{fields['model name']} ({' '.join(filter(None, ids))})"


def source_revision() -> str | None:
    """The git commit of the lgd source in use, if it runs from a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextlib.contextmanager
def computing_threads(threads: int | None):
    """Compute with `threads` intra-op threads inside (None: as many as now), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pin_threads(threads: int) -> None:
    """Compute with `threads` intra-op threads (a run's, so a resume reduces in the same order)."""
    if torch.get_num_threads() != threads:
        log.info("computing with the run's %d intra-op thread(s) (this process started with %d), so that the "
                 "images still to be made match an uninterrupted run", threads, torch.get_num_threads())
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when there is one), cpu, cuda or cuda:N, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available")
    return device


def warn_ignored_launch_flags() -> None:
    """One warning line per `accelerate launch` flag that lgd does not honour."""
    for variable, (flag, instead) in IGNORED_LAUNCH_FLAGS.items():
        value = os.environ.get(variable, "").strip()
        if value and value.lower() != "no":
            log.warning("accelerate launch %s=%s is ignored: lgd sets this with %s in the config", flag, value, instead)
