"""Weight streaming: the planner's streamed units go through two fixed device slots.

A unit (one layer's matmul weights, or the output matrix) is packed once at load into its span of
one host buffer, its tensors at 256-byte aligned offsets, pinned on CUDA (exactly: see
`pinned_host_buffer`) so that a single asynchronous copy moves it. Two device slots, each the size of the largest streamed unit, are allocated once; unit
k of the streamed order uses slot k % 2. Per forward pass:

    acquire(u)   wait (on the compute stream) for u's copy; its QTensors now view the slot
    prefetch(u') issue the copy of the next streamed unit on the side stream, after waiting for its
                 slot's previous user to be released, so it overlaps with u's compute
    release(u)   u's slot may be refilled: the next copy into it is ordered after the compute
                 issued up to that copy, which includes u's

Nothing is allocated per token. On a CPU device the same bookkeeping runs with synchronous copies
into CPU slots (the "simulated device" the tests compare against unpaged runs: any slot or offset
mistake changes the logits).

CUDA-graph capture (runtime/cuda_graph.py): each unit always uses the same slot, so a captured
decode step replays the same copies into the same addresses. The side stream forks from the
compute stream at each prefetch (`wait_stream`, which also orders the copy after the slot's
previous user, released before that point), `begin_capture` forgets events recorded before the
capture, and `join` makes the compute stream wait for the copy still in flight at the end of a
step (the next step's first unit), so the graph has no unjoined work; `end_capture` forgets the
events recorded in the capture (waiting on one outside the graph is an invalid argument, as the
2026-12-04 H200 run showed when an eager prompt followed the capture).
"""

from __future__ import annotations

import torch

from .planner import Plan, packed


class Streamer:
    def __init__(self, units: dict[int, list], order: list[int], device: torch.device):
        """units: unit -> its QTensors (raw on the host); order: streamed units in execution order."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.order = order
        self.tensors = units
        self.layout: dict[int, list[tuple[object, int]]] = {}
        self.host: dict[int, torch.Tensor] = {}
        size, spans, total = 0, {}, 0
        for u in order:
            offsets, n = packed(t.n_bytes for t in units[u])
            self.layout[u], spans[u] = list(zip(units[u], offsets)), (total, n)
            total += n
            size = max(size, n)
        self.host_buffer = pinned_host_buffer(total) if self.cuda else torch.empty(total, dtype=torch.uint8)
        for u in order:
            start, n = spans[u]
            buf = self.host_buffer[start:start + n]
            for t, off in self.layout[u]:
                buf[off:off + t.n_bytes].copy_(t.raw.reshape(-1))
            self.host[u] = buf
        self.slot_bytes = size
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2 if order else 0)]
        self.slot_of = {u: k % 2 for k, u in enumerate(order)}
        self.in_slot: list = [None, None]
        self.busy: list = [None, None]  # the unit acquired and not yet released, per slot
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready: dict[int, object] = {}
        self.bytes_copied = 0

    @property
    def n_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    def prefetch(self, u: int) -> None:
        s = self.slot_of[u]
        if self.in_slot[s] == u or (self.busy[s] is not None and self.busy[s] != u):
            return  # there already, or its slot is still in use (acquire copies it then)
        n = self.host[u].numel()
        if self.cuda:
            # after everything issued on the compute stream so far, which includes the release of
            # the slot's previous user (the free event) and, when capturing, forks the side stream
            # from the capture
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.slots[s][:n].copy_(self.host[u], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                self.ready[u] = ev
        else:
            self.slots[s][:n].copy_(self.host[u])
        self.in_slot[s] = u
        self.bytes_copied += n

    def acquire(self, u: int) -> None:
        """Make unit u's QTensors view its slot, ready for compute on the current stream."""
        s = self.slot_of[u]
        self.busy[s] = None if self.busy[s] == u else self.busy[s]
        self.prefetch(u)
        self.busy[s] = u
        if self.cuda and self.ready.get(u) is not None:  # None: copied before a capture began
            torch.cuda.current_stream(self.device).wait_event(self.ready[u])
        slot = self.slots[self.slot_of[u]]
        for t, off in self.layout[u]:
            t.raw = slot[off:off + t.n_bytes].view(t.raw.shape)
        k = self.order.index(u)
        self.prefetch(self.order[(k + 1) % len(self.order)])  # overlaps with u's compute

    def release(self, u: int) -> None:
        s = self.slot_of[u]
        self.busy[s] = None

    def reset(self) -> None:
        """Forget what the slots hold (every unit is copied again on its next acquire)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.in_slot, self.busy, self.ready = [None, None], [None, None], {}

    def begin_capture(self) -> None:
        """Before a CUDA-graph capture: let every copy finish and forget the events recorded so far
        (a capture may not wait on work recorded outside it)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.ready = {u: None for u in self.ready}

    def end_capture(self) -> None:
        """After a capture: the events recorded in it belong to the graph and cannot be waited on
        outside it. Every copy the graph issues completes before the graph does (`join`), and later
        work on the compute stream is ordered after the graph, so nothing is left to wait for."""
        self.ready = {u: None for u in self.ready}

    def join(self) -> None:
        """The compute stream waits for every copy issued so far (the end of a captured step)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


PIN_METHOD = None  # how the last pinned_host_buffer was pinned (reported by the GPU suite)


def pinned_host_buffer(n: int) -> torch.Tensor:
    """n bytes of page-locked host memory, pinned exactly.

    `torch.empty(pin_memory=True)` goes through torch's caching host allocator, which rounds each
    request up to a power of two and keeps it: 2.2 GiB of streamed layers would pin 4 GiB of host
    RAM. So we allocate ordinary memory and register exactly those pages with the driver
    (cudaHostRegister), unregistering when the buffer is freed; torch's allocator is the fallback
    where registration is unavailable or not recognised as pinned.
    """
    import weakref

    global PIN_METHOD
    buf = torch.empty(n, dtype=torch.uint8)
    if n == 0:
        return buf
    try:
        cudart = torch.cuda.cudart()
        ptr = buf.data_ptr()
        if int(cudart.cudaHostRegister(ptr, n, 0)) == 0:
            if buf.is_pinned():
                weakref.finalize(buf, cudart.cudaHostUnregister, ptr)
                PIN_METHOD = "cudaHostRegister"
                return buf
            cudart.cudaHostUnregister(ptr)
    except Exception:  # no such binding in this torch build, or the driver refused: use torch's pinning
        pass
    PIN_METHOD = "torch pin_memory"
    return torch.empty(n, dtype=torch.uint8, pin_memory=True)


def streamed_order(plan: Plan) -> list[int]:
    """Streamed units in the order a forward pass uses them: layers ascending, then the output."""
    return sorted(plan.streamed_units, key=lambda u: (u < 0, u))
