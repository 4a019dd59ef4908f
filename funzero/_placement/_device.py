"""``device``: the compute device's memory (the default). Updates run on the device's stream."""

from __future__ import annotations

import torch

from funzero._placement._kind import Kind

__all__ = ["Device"]


class Device(Kind):
    name = "device"
    tier = "gpu"
    offloaded = False

    @classmethod
    def parse(cls, text: str) -> str | None:
        # "cuda" asks for the GPU explicitly: an error on a mesh that computes elsewhere.
        return text if text in ("device", "cuda") else None

    def check(self, key: str) -> None:
        if self.arg == "cuda" and self.compute.type != "cuda":
            raise ValueError(f"placement {key}='cuda' but the mesh computes on {self.compute}")

    def same(self, other: Kind) -> bool:
        return True

    def holds(self, key: str, t: torch.Tensor) -> bool:
        from funzero._placement._nvme import is_file_backed

        on = t.device == self.compute or t.device.type == self.compute.type == "cpu"
        return on and not is_file_backed(t)
