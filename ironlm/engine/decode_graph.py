"""Decode steps replayed from C++ instead of Python.

A decode step of a small model makes hundreds of kernel calls, and the Python around each one (argument
checks, allocations, module calls) costs several times what the kernel itself does for one token of the
135M model. So the first all-decode step of each batch size runs the model from Python while the kernels
record their calls into a KernelGraph (csrc/graph.h), and later steps of that batch size write their inputs
into the same buffers and replay the recorded calls.

What makes a replay compute what the Python run would:
- The step's inputs (embedded tokens, positions, KV slots, block tables, context lengths) live in buffers
  the graph owns; each step overwrites them in place.
- Every tensor the step allocates comes from an arena the graph owns, so the recorded addresses stay valid.
  A block is handed out again only once every tensor viewing it is gone, as an allocator would do, so the
  arena holds the step's peak of live tensors rather than all of them.
- The step may run kernel calls and torch ops that compute nothing (allocations, views, splits). Any other
  torch op would not be recorded, so one makes the capture fail and the model stays on the Python path.
- The kernels check the data they read (positions, slots, block tables) again on every replay.
"""
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ironlm import _kernels
from ironlm.layers.attention import AttentionMetadata

aten = torch.ops.aten

# Ops that only allocate or give another view of memory: the kernels do all the computing.
_ALLOCATING = {aten.empty.memory_format}
_VIEWING = {
    aten.view.default, aten._unsafe_view.default, aten._reshape_alias.default, aten.split_with_sizes.default,
    aten.split.Tensor, aten.slice.Tensor, aten.select.int, aten.as_strided.default, aten.alias.default,
    aten.detach.default, aten.unsqueeze.default, aten.squeeze.dim, aten.unbind.int, aten.t.default,
    aten.transpose.int, aten.expand.default,
}

# Composite ops that return a view when they can and compute a copy when they cannot.
_VIEWING_IF_ALIASED = {aten.reshape.default, aten.flatten.using_ints}


def _aliases(out: torch.Tensor, base: torch.Tensor) -> bool:
    return out.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


class _Arena(TorchDispatchMode):
    """Serves the captured step's allocations from blocks the graph keeps, and refuses ops that compute."""

    def __init__(self):
        super().__init__()
        self.blocks: list[torch.Tensor] = []   # uint8 blocks, alive as long as the graph
        self.free: list[int] = []              # indices into blocks that no live tensor views
        self.live: dict[int, int] = {}         # block index -> live tensors viewing it
        self.by_address: dict[int, int] = {}   # a block's data_ptr -> its index
        self.refused: str | None = None        # the first op that computes

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.blocks)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALLOCATING and torch.device(kwargs.get("device") or "cpu").type == "cpu":
            size, dtype = args[0], kwargs.get("dtype") or torch.get_default_dtype()
            nbytes = max(1, int(np.prod(size, dtype=np.int64)) * dtype.itemsize)
            out = self._take(nbytes)[:nbytes].view(dtype).view(size)
        else:  # memory the arena does not own, or an op that computes: run it, and the graph is not replayed
            out = func(*args, **kwargs)
            if self.refused is None and not (func in _VIEWING or func in _VIEWING_IF_ALIASED and _aliases(out, args[0])):
                self.refused = str(func)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _take(self, nbytes: int) -> torch.Tensor:
        fits = [i for i in self.free if self.blocks[i].numel() >= nbytes]
        if fits:
            index = min(fits, key=lambda i: self.blocks[i].numel())  # the smallest block that fits
            self.free.remove(index)
        else:
            index = len(self.blocks)
            self.blocks.append(torch.empty(nbytes, dtype=torch.uint8))
            self.by_address[self.blocks[index].data_ptr()] = index
        self.live[index] = 0
        return self.blocks[index]

    def _track(self, t: torch.Tensor) -> None:
        index = self.by_address.get(t.untyped_storage().data_ptr())
        if index is not None:
            self.live[index] += 1
            weakref.finalize(t, self._release, index)

    def _release(self, index: int) -> None:
        self.live[index] -= 1
        if self.live[index] == 0:
            self.free.append(index)


class DecodeGraph:
    """One batch size's decode step: input buffers, the recorded kernel calls and the memory they point into."""

    def __init__(self, batch: int, hidden_size: int, dtype: torch.dtype, table_width: int):
        self.batch = batch
        self.input = torch.empty(batch, hidden_size, dtype=dtype)              # (B, hidden) embedded tokens
        self.positions = torch.zeros(batch, dtype=torch.int64)                 # (B,)
        self.slots = torch.zeros(batch, dtype=torch.int64)                     # (B,) flat KV slot of each token
        self.context_lens = torch.zeros(batch, dtype=torch.int32)              # (B,)
        self.block_tables = torch.zeros(batch, table_width, dtype=torch.int32)  # (B, table_width)
        # numpy views of the same memory: filling them from Python lists is cheaper than building tensors
        self.positions_np, self.slots_np = self.positions.numpy(), self.slots.numpy()
        self.context_lens_np, self.block_tables_np = self.context_lens.numpy(), self.block_tables.numpy()
        self.graph = _kernels.KernelGraph()
        self.arena: _Arena | None = None
        self.output: torch.Tensor | None = None  # (B, hidden), rewritten by every replay
        self.refusal: str | None = None          # why the captured step cannot be replayed, if it cannot

    def metadata(self) -> AttentionMetadata:
        lens = [int(n) for n in self.context_lens_np]
        return AttentionMetadata(slot_mapping=self.slots, query_starts=list(range(self.batch)),
                                 query_lens=[1] * self.batch, context_lens=lens, block_tables=self.block_tables,
                                 context_lens_tensor=self.context_lens)

    def capture(self, forward) -> torch.Tensor:
        """Runs forward(input, positions, meta) -> (B, hidden) once from Python, recording its kernel calls, and
        returns its output. The output is right either way; `refusal` says why the graph cannot be replayed when
        the step ran an op that is not a kernel call."""
        arena = _Arena()
        self.graph.begin_capture()
        try:
            with arena:
                out = forward(self.input, self.positions, self.metadata())
        finally:
            self.graph.end_capture()
        if arena.refused is not None:
            self.refusal = f"the decode step runs {arena.refused}, which is not a kernel call"
        elif arena.by_address.get(out.untyped_storage().data_ptr()) is None:
            self.refusal = "the decode step's output is not memory the graph owns"
        self.arena, self.output = arena, out
        return out

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output
