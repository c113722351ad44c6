"""Host tensors onto a device through one copy from page-locked memory: how a slot write
(slots.DeviceSlots) gets an adapter's hundreds of tensors to the GPU in a fixed few ops."""

from __future__ import annotations

import torch


def upload(tensors: list[torch.Tensor], dtypes: list[torch.dtype], device: torch.device,
           widths: list[int | None] | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Host tensors on `device`, each cast to its dtype in `dtypes` on the host (as
    `Tensor.to`), through one copy from page-locked memory (asynchronous: torch keeps the
    page-locked block from reuse until the copy is done). A fixed few ops on the host, as a
    write's hundreds of tensors make each op count. `widths[i]`, for a 2-D tensor: the columns
    it arrives with, zeros past its own (a slot's B columns past its rank): a destination that
    wide is contiguous, and a foreach copy into contiguous tensors is a few launches on a GPU
    where strided ones take one each."""
    # (dtype, the tensors' columns, the columns they arrive with); (dtype, 0, 0): as they are
    groups: dict[tuple[torch.dtype, int, int], list[int]] = {}
    for i, d in enumerate(dtypes):
        w = widths[i] if widths is not None else None
        padded = w is not None and w != tensors[i].shape[1]
        key = (d, tensors[i].shape[1], w) if padded else (d, 0, 0)
        groups.setdefault(key, []).append(i)  # type: ignore[arg-type]
    numels = {key: [tensors[i].shape[0] * key[2] if key[2] else tensors[i].numel()
                    for i in idx] for key, idx in groups.items()}  # fmt: skip
    starts, nbytes = {}, 0
    for key in groups:  # one region per group, each 16-byte aligned
        starts[key] = nbytes
        nbytes += -(-sum(numels[key]) * key[0].itemsize // 16) * 16
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")

    def region(flat: torch.Tensor, key: tuple[torch.dtype, int, int]) -> torch.Tensor:
        d = key[0]
        return flat[starts[key] : starts[key] + sum(numels[key]) * d.itemsize].view(d)

    for key, idx in groups.items():  # cat and copy_ cast to the region's dtype
        if key[2]:  # the group's rows stacked into the first columns, zeros past them
            rows = region(host, key).view(-1, key[2])
            rows[:, key[1] :].zero_()
            rows[:, : key[1]].copy_(torch.cat([tensors[i] for i in idx]))
        else:
            torch.cat([tensors[i].flatten() for i in idx], out=region(host, key))
    on_device = host.to(device, non_blocking=True)
    out: list[torch.Tensor] = [host] * len(tensors)
    for key, idx in groups.items():
        parts = torch.split(region(on_device, key), numels[key])
        for i, part in zip(idx, parts, strict=True):
            out[i] = part.view(tensors[i].shape[0], key[2]) if key[2] else part.view(
                tensors[i].shape)  # fmt: skip
    return out
