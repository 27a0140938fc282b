"""Device names taken from users (CLI, flows, library): checked once, saying what is wrong,
before torch's own error from deep inside a run."""

from __future__ import annotations

import re


def device_problem(device: str, auto: bool = False) -> str | None:
    """What is wrong with a device name, or None: not cpu, cuda or cuda:N (or auto, where
    `auto`), or a CUDA device this torch cannot see."""
    names = "auto, cpu, cuda or cuda:N" if auto else "cpu, cuda or cuda:N"
    if not re.fullmatch(r"cpu|cuda(:\d+)?" + ("|auto" if auto else ""), device):
        return f"device {device!r} is not {names}"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return (f"device {device!r}: this torch sees no CUDA device (a CPU build, or no "
                    "GPU); use --device cpu")
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            return (f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to "
                    f"cuda:{count - 1}")
    return None
