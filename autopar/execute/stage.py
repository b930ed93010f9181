"""One pipeline chunk of a transformers causal LM as an nn.Module.

A :class:`StageModule` owns (as registered submodules, shared with the model
object the user holds) the embedding if it is the first chunk, its blocks, and
the final norm and LM head if it is the last. Its forward is the model's own
forward restricted to those parts, so one chunk, or all chunks in a row, give
the single-device result (the rotary tables stay on the model, recomputed per
stage from the positions):

* first chunk:  ``(input_ids, mask) -> (hidden, mask)``
* middle chunk: ``(hidden, mask) -> (hidden, mask)``
* last chunk:   ``(hidden, mask) -> logits``; a chunk that is both takes
  ``input_ids`` and returns logits.

The padding mask travels between stages as an extra activation (float, no
gradient) so every stage can build transformers' attention mask itself.
"""

from __future__ import annotations

import torch
from torch import nn

from autopar.execute.families import Family


class StageModule(nn.Module):
    def __init__(self, family: Family, model: nn.Module, index: int, num_chunks: int,
                 blocks: dict[str, nn.Module]):
        super().__init__()
        self.index = index
        self.is_first = index == 0
        self.is_last = index == num_chunks - 1
        object.__setattr__(self, "_family", family)
        object.__setattr__(self, "_model", model)  # not registered: it owns more than this chunk
        base = getattr(model, family.base)
        if self.is_first:
            self.embed_parts = nn.ModuleList([getattr(base, a) for a in family.first_attrs()])
        self.blocks = nn.ModuleDict(blocks)
        self._indices = [int(k) for k in blocks]
        if self.is_last:
            self.norm = family.final_norm(model)
            self.lm_head = family.head(model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        family: Family = self._family
        config = self._model.config
        hidden = family.embed(self._model, x) if self.is_first else x
        keep = mask.to(torch.long)  # the dtype a user passes: transformers builds the same mask
        if len(self.blocks):
            ctx = family.block_context(self._model, hidden, keep, self._indices)
            for index, block in zip(self._indices, self.blocks.values()):
                hidden = family.run_block(block, index, hidden, ctx, config)
        if not self.is_last:
            return hidden, mask.to(hidden.dtype)
        return family.logits(self._model, hidden)


def inner_stage(module: nn.Module) -> nn.Module:
    """The :class:`StageModule` (or whole-model stage) inside a stage the step runs: DDP wraps it in another
    module (``.module``); FSDP2 and replicate wrap in place."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module
