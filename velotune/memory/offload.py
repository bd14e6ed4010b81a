"""Where a checkpointed layer's input waits for its backward: on the device, or in pinned host memory.

With offload, `ActivationStore.save` copies the tensor to a pinned host buffer on a side CUDA stream
while the compute stream runs on (the layer's own forward is queued right behind the copy), and
`load` brings it back. Loads come in the reverse order of saves (the backward walks the layers
backwards), so each load also starts copying the previous save back on a second side stream: that
copy runs while the current layer recomputes and differentiates, and is normally done before it is
needed. Pinned buffers go back to a pool when their tensor is loaded and are reused by later saves
(the next step's forward), so a training run allocates its pinned memory once.

Ordering, all through CUDA events (the host never waits):
  save:  d2h waits for the compute stream (the tensor is ready), and for the buffer's last reader
         (the h2d copy of its previous tenant); the tensor is marked used by d2h so the caching
         allocator does not hand its memory out before the copy has read it.
  fetch: the device tensor is allocated on the compute stream; h2d waits for the compute stream
         (that memory may still be read by queued kernels) and for the d2h copy into the buffer.
  load:  the compute stream waits for the fetch; the buffer is free once that copy has finished.

CPU tensors (and `offload=False`) stay where they are: the same code path, the same numbers.
"""

from __future__ import annotations

import weakref

import torch

from velotune.errors import KernelError

# Pinned allocations are rounded up so that a sequence a little longer than the last one reuses buffers.
_ROUND_BYTES = 2 * 1024 * 1024


class _PinnedBuffer:
    __slots__ = ("host", "free_after")

    def __init__(self, nbytes: int):
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.free_after: torch.cuda.Event | None = None  # the last copy that reads it

    @property
    def nbytes(self) -> int:
        return self.host.numel()


class SavedTensor:
    """One saved tensor: resident (`tensor`) or offloaded (`buffer` + the events of its copies)."""

    __slots__ = (
        "tensor",
        "buffer",
        "shape",
        "dtype",
        "device",
        "copied",
        "fetched",
        "fetch_done",
        "prev",
        "used",
        "__weakref__",
    )

    def __init__(self, prev: SavedTensor | None):
        self.tensor: torch.Tensor | None = None
        self.buffer: _PinnedBuffer | None = None
        self.shape: torch.Size | None = None
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.copied: torch.cuda.Event | None = None
        self.fetched: torch.Tensor | None = None
        self.fetch_done: torch.cuda.Event | None = None
        self.prev = prev  # saved just before this one in the forward, loaded just after it
        self.used = False

    @property
    def offloaded(self) -> bool:
        return self.buffer is not None


class ActivationStore:
    """Saves checkpoint inputs for one model; keeps the pinned-buffer pool and side streams across steps."""

    def __init__(self) -> None:
        self._pool: list[_PinnedBuffer] = []
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._last: weakref.ref | None = None
        self.pinned_bytes = 0  # total pinned memory this store holds or has handed out

    def begin_forward(self) -> None:
        """A new forward starts: its first save has no predecessor to prefetch."""
        self._last = None

    def save(self, x: torch.Tensor, offload: bool) -> SavedTensor:
        prev = self._last() if self._last is not None else None
        saved = SavedTensor(prev)
        self._last = weakref.ref(saved)
        x = x.detach()
        if not (offload and x.is_cuda):
            saved.tensor = x
            return saved
        d2h, _ = self._side_streams(x.device)
        buf = self._take(x.numel() * x.element_size())
        saved.buffer, saved.shape, saved.dtype, saved.device = buf, x.shape, x.dtype, x.device
        d2h.wait_stream(torch.cuda.current_stream(x.device))
        if buf.free_after is not None:
            d2h.wait_event(buf.free_after)
        with torch.cuda.stream(d2h):
            self._host_view(saved).copy_(x, non_blocking=True)
            saved.copied = torch.cuda.Event()
            saved.copied.record(d2h)
        x.record_stream(d2h)
        return saved

    def load(self, saved: SavedTensor) -> torch.Tensor:
        """The saved tensor on its device (once), and the previous save starts coming back."""
        if saved.used:
            raise KernelError(
                "a checkpointed layer's backward ran twice (retain_graph=True); its saved input is freed "
                "by the first backward. Recompute the forward, or turn gradient checkpointing off."
            )
        saved.used = True
        if saved.offloaded:
            if saved.fetched is None:
                self._fetch(saved)
            torch.cuda.current_stream(saved.device).wait_event(saved.fetch_done)
            x = saved.fetched
            saved.buffer.free_after = saved.fetch_done
            self._pool.append(saved.buffer)
            saved.buffer = saved.fetched = None
        else:
            x, saved.tensor = saved.tensor, None
        prev = saved.prev
        saved.prev = None
        if prev is not None and prev.offloaded and prev.fetched is None and not prev.used:
            self._fetch(prev)
        return x

    def release(self) -> None:
        """Drops the pooled pinned buffers (the ones handed out are freed with their graph)."""
        self.pinned_bytes -= sum(b.nbytes for b in self._pool)
        self._pool.clear()

    def _fetch(self, saved: SavedTensor) -> None:
        _, h2d = self._side_streams(saved.device)
        compute = torch.cuda.current_stream(saved.device)
        saved.fetched = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
        h2d.wait_stream(compute)
        h2d.wait_event(saved.copied)
        with torch.cuda.stream(h2d):
            saved.fetched.copy_(self._host_view(saved), non_blocking=True)
            saved.fetch_done = torch.cuda.Event()
            saved.fetch_done.record(h2d)

    @staticmethod
    def _host_view(saved: SavedTensor) -> torch.Tensor:
        nbytes = saved.shape.numel() * saved.dtype.itemsize
        return saved.buffer.host[:nbytes].view(saved.dtype).view(saved.shape)

    def _take(self, nbytes: int) -> _PinnedBuffer:
        fits = [b for b in self._pool if b.nbytes >= nbytes]
        if fits:
            buf = min(fits, key=lambda b: b.nbytes)
            self._pool.remove(buf)
            return buf
        if self._pool:
            # Sequences grew: replace the largest buffer that is too small rather than keep it forever.
            small = max(self._pool, key=lambda b: b.nbytes)
            self._pool.remove(small)
            self.pinned_bytes -= small.nbytes
        size = -(-nbytes // _ROUND_BYTES) * _ROUND_BYTES
        self.pinned_bytes += size
        return _PinnedBuffer(size)

    def _side_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]
