"""Where a checkpointed layer's input waits for its backward: on the device, or in pinned host memory.

With offload, `ActivationStore.save` copies the tensor to pinned host memory on a side CUDA stream
while the compute stream runs on (the layer's own forward is queued right behind the copy), and
`load` brings it back. Saves come in groups, one per checkpointed layer (its input, and whatever
else the layer keeps: `save(..., join=True)` adds to the latest group). The backward walks the
layers backwards, so the first load of a group copies back every member of that group not yet on
its way, and each load also starts copying the previous group back on a second side stream: that
copy runs while the current layer recomputes and differentiates, and is normally done before it is
needed. Within a group, members may be loaded in any order. Pinned memory comes in fixed-size blocks that go back to a pool when their tensor is loaded
and are reused by later saves (the next step's forward), so a training run allocates it once.

Ordering, all through CUDA events (the host never waits):
  save:  d2h waits for the compute stream (the tensor is ready), and for each block's last reader
         (the h2d copy of its previous tenant); the tensor is marked used by d2h so the caching
         allocator does not hand its memory out before the copy has read it.
  fetch: the device tensor is allocated on the compute stream; h2d waits for the compute stream
         (that memory may still be read by queued kernels) and for the d2h copy into the blocks.
  load:  the compute stream waits for the fetch; the blocks are free once that copy has finished.

CPU tensors (and `offload=False`) stay where they are: the same code path, the same numbers.
"""

from __future__ import annotations

import weakref

import torch

from velotune.errors import KernelError

# PyTorch's pinned-memory allocator rounds every request up to a power of two, so large tensors are
# stored in blocks of this (power-of-two) size: at most one partly used block per tensor.
BLOCK_BYTES = 64 * 1024 * 1024


class _PinnedBlock:
    __slots__ = ("host", "free_after")

    def __init__(self, nbytes: int):
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.free_after: torch.cuda.Event | None = None  # the last copy that reads it

    @property
    def nbytes(self) -> int:
        return self.host.numel()


def _block_size(nbytes: int) -> int:
    return BLOCK_BYTES if nbytes >= BLOCK_BYTES else 1 << max(nbytes - 1, 0).bit_length()


class _Group:
    """The tensors one layer saved, and the group saved before it (loaded after it)."""

    __slots__ = ("members", "prev", "__weakref__")

    def __init__(self, prev: _Group | None):
        # Weak: a member lives as long as the graph that holds it; the group must not keep it alive.
        self.members: list[weakref.ref] = []
        self.prev = prev

    def live(self) -> list[SavedTensor]:
        return [m for m in (ref() for ref in self.members) if m is not None]


class SavedTensor:
    """One saved tensor: resident (`tensor`) or offloaded (`blocks` + the events of its copies)."""

    __slots__ = ("tensor", "blocks", "shape", "dtype", "device", "copied", "fetched", "fetch_done", "group", "used",
                 "home", "forward", "__weakref__")  # fmt: skip

    def __init__(self, group: _Group):
        self.tensor: torch.Tensor | None = None
        self.blocks: list[_PinnedBlock] | None = None
        self.shape: torch.Size | None = None
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.copied: torch.cuda.Event | None = None
        self.fetched: torch.Tensor | None = None
        self.fetch_done: torch.cuda.Event | None = None
        self.group: _Group | None = group
        self.used = False
        self.home: torch.Tensor | None = None  # a static buffer: the copy back lands in it (see `save`)
        self.forward = 0  # the store's forward count when it was saved

    @property
    def offloaded(self) -> bool:
        return self.blocks is not None


class ActivationStore:
    """Saves checkpoint inputs for one model; keeps the pinned-block pool and side streams across steps."""

    def __init__(self) -> None:
        self._pool: dict[int, list[_PinnedBlock]] = {}
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._last: weakref.ref | None = None
        self.pinned_bytes = 0  # total pinned memory this store holds or has handed out
        self._forwards = 0

    def begin_forward(self) -> None:
        """A new forward starts: its first group has no predecessor to prefetch."""
        self._last = None
        self._forwards += 1
        for device, (_, h2d) in self._streams.items():
            # A copy back still in flight (a backward that stopped early) must not land in a static
            # buffer after this forward has written it.
            torch.cuda.current_stream(device).wait_stream(h2d)

    def save(self, x: torch.Tensor, offload: bool, *, join: bool = False, static: bool = False) -> SavedTensor:
        """Keeps x for the backward: a new group (a layer's first save), or the latest one (join).

        static: x is a long-lived buffer that will be overwritten (a CUDA graph's,
        `velotune.memory.layer_graphs`). Offloaded, the copy to host reads x itself, and the caller
        must not write x before `saved.copied` has completed; the load writes the values back into x
        instead of new memory, as long as no other forward has begun since (else into new memory).
        Not offloaded, a copy of x is kept."""
        last = self._last() if self._last is not None else None
        group = last if join and last is not None else _Group(last)
        self._last = weakref.ref(group)
        saved = SavedTensor(group)
        saved.forward = self._forwards
        group.members.append(weakref.ref(saved))
        x = x.detach()
        if not (offload and x.is_cuda and x.numel()):
            saved.tensor = x.clone() if static else x
            return saved
        d2h, _ = self._side_streams(x.device)
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        size = _block_size(nbytes)
        blocks = [self._take(size) for _ in range(-(-nbytes // size))]
        saved.blocks, saved.shape, saved.dtype, saved.device = blocks, x.shape, x.dtype, x.device
        d2h.wait_stream(torch.cuda.current_stream(x.device))
        for block in blocks:
            if block.free_after is not None:
                d2h.wait_event(block.free_after)
        with torch.cuda.stream(d2h):
            for block, (start, end) in zip(blocks, _ranges(nbytes, size)):
                block.host[: end - start].copy_(_bytes(x)[start:end], non_blocking=True)
            saved.copied = torch.cuda.Event()
            saved.copied.record(d2h)
        if static:
            saved.home = x
        else:
            x.record_stream(d2h)
        return saved

    def load(self, saved: SavedTensor) -> torch.Tensor:
        """The saved tensor on its device (once); the rest of its group and the previous group start
        coming back."""
        if saved.used:
            raise KernelError(
                "a checkpointed layer's backward ran twice (retain_graph=True); its saved input is freed "
                "by the first backward. Recompute the forward, or turn gradient checkpointing off."
            )
        saved.used = True
        group, saved.group = saved.group, None
        if saved.offloaded and saved.fetched is None:
            self._fetch(saved)
        self._fetch_group(group)  # the rest of this layer's tensors come right behind
        if saved.offloaded:
            torch.cuda.current_stream(saved.device).wait_event(saved.fetch_done)
            x = saved.fetched
            for block in saved.blocks:
                block.free_after = saved.fetch_done
                self._pool.setdefault(block.nbytes, []).append(block)
            saved.blocks = saved.fetched = None
        else:
            x, saved.tensor = saved.tensor, None
        if group.prev is not None:
            self._fetch_group(group.prev)
        return x

    def release(self) -> None:
        """Drops the pooled pinned blocks (the ones handed out are freed with their graph)."""
        self.pinned_bytes -= sum(b.nbytes for blocks in self._pool.values() for b in blocks)
        self._pool.clear()

    def _fetch_group(self, group: _Group) -> None:
        for member in group.live():
            if member.offloaded and member.fetched is None and not member.used:
                self._fetch(member)

    def _fetch(self, saved: SavedTensor) -> None:
        _, h2d = self._side_streams(saved.device)
        compute = torch.cuda.current_stream(saved.device)
        # A home buffer takes back only what the latest forward saved: once another forward has run,
        # its static buffers hold (or are copying out) that forward's tensors, so the copy back of an
        # older one lands in memory of its own (the caller copies it over when its buffer is free).
        if saved.home is not None and saved.forward == self._forwards:
            saved.fetched, saved.home = saved.home, None
        else:
            saved.home = None
            saved.fetched = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
        h2d.wait_stream(compute)  # also: what the compute stream queued that reads a home buffer
        h2d.wait_event(saved.copied)
        size = saved.blocks[0].nbytes
        with torch.cuda.stream(h2d):
            dst = _bytes(saved.fetched)
            for block, (start, end) in zip(saved.blocks, _ranges(dst.numel(), size)):
                dst[start:end].copy_(block.host[: end - start], non_blocking=True)
            saved.fetch_done = torch.cuda.Event()
            saved.fetch_done.record(h2d)

    def _take(self, size: int) -> _PinnedBlock:
        free = self._pool.get(size)
        if free:
            return free.pop()
        self.pinned_bytes += size
        return _PinnedBlock(size)

    def _side_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _ranges(nbytes: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, nbytes)) for start in range(0, nbytes, size)]
