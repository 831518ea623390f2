"""Which keys each query may see (causal + padding + documents), built once per forward and shared by all
layers, and the per-layer dynamic mask of DMA: the per-key bias where allowed, the keep-window
top-k when there are more keys than ``keep_window_size``."""
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class AttentionLayout:
    """Positions of the queries and validity of the keys for one forward.

    ``query_positions`` [T] absolute positions of this call's tokens; ``key_valid`` [B, S] bool
    (False for padding) or None. The causal rule is always applied: key j is visible to query i
    only if j <= position(i) (the reference's sdpa path dropped it: known defect 1).
    ``documents`` [B, T] (a forward without cache, so keys are the queries) numbers the documents
    packed into each row: a query sees only keys of its own document (Megatron's
    ``reset_attention_mask``); None lets attention cross document boundaries, as published.
    """

    query_positions: torch.Tensor
    num_keys: int
    key_valid: Optional[torch.Tensor] = None
    documents: Optional[torch.Tensor] = None
    _allowed: Optional[torch.Tensor] = field(default=None, repr=False)
    _block_mask: Optional[object] = field(default=None, repr=False)
    _additive_masks: dict = field(default_factory=dict, repr=False)
    _bias_weights: dict = field(default_factory=dict, repr=False)
    _blind_queries: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def allowed(self) -> torch.Tensor:
        """Bool [B or 1, 1, T, S]: True where query i may attend key j."""
        if self._allowed is None:
            keys = torch.arange(self.num_keys, device=self.query_positions.device)
            allowed = keys[None, :] <= self.query_positions[:, None]
            allowed = allowed[None, None]
            if self.key_valid is not None:
                allowed = allowed & self.key_valid[:, None, None, :].bool()
            if self.documents is not None:
                allowed = allowed & (self.documents[:, None, :, None] == self.documents[:, None, None, :])
            self._allowed = allowed
        return self._allowed

    def sdpa_mask(self, dtype: torch.dtype) -> tuple[Optional[torch.Tensor], bool]:
        """(additive mask [B or 1, 1, T, S] or None, is_causal) for SDPA, built once per forward.

        Without padding or documents no mask is needed: a full sequence is ``is_causal`` and a single new
        query sees every cached key. Otherwise blocked keys get the dtype's minimum (finite, as in
        the reference, so a row with no visible key stays finite).
        """
        T = len(self.query_positions)
        if self.key_valid is None and self.documents is None:
            if T == self.num_keys:
                return None, True
            if T == 1:
                return None, False
        return self.additive_mask(dtype), False

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[B or 1, 1, T, S]: 0 where allowed, the dtype's minimum elsewhere; once per dtype."""
        if dtype not in self._additive_masks:
            device = self.query_positions.device
            blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
            self._additive_masks[dtype] = torch.zeros((), dtype=dtype, device=device).where(self.allowed, blocked)
        return self._additive_masks[dtype]

    def bias_weight(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """[B, 1, T, 1]: 1 for a query that may attend some key, 0 for one that may attend none (a
        left-padding position); None when every query sees one. The weight of the bias folded into the
        scores (``scale * q.k_j + weight * bias_j``): a row without a visible key is the dtype's minimum
        everywhere either way, but with weight 1 autograd would pass its gradient on to every key's
        bias, which the reference's masked_fill blocks."""
        blind = self.blind_queries
        if blind is None:
            return None
        if dtype not in self._bias_weights:
            self._bias_weights[dtype] = (~blind)[:, None, :, None].to(dtype)
        return self._bias_weights[dtype]

    @property
    def blind_queries(self) -> Optional[torch.Tensor]:
        """[B, T] bool: the queries that may attend no key (left padding; padding that opens a packed
        document); None without key padding (causal alone, documents too, every query sees its own key).
        The reference gives such a row the mean of all values (every score the dtype's minimum: a uniform
        softmax), which FlexAttention, with no visible key, would make 0. Found from each query's first
        visible key, without the [B, T, S] grid."""
        if self.key_valid is None:
            return None
        if self._blind_queries is None:
            valid = self.key_valid.bool()
            keys = torch.arange(self.num_keys, device=valid.device)
            first_valid = torch.where(valid, keys, self.num_keys)  # [B, S]
            if self.documents is None:
                first = first_valid.min(-1, keepdim=True).values  # [B, 1]
            else:  # keys are this call's queries: the first valid key of each query's own document
                ids, document = torch.unique(self.documents, return_inverse=True)
                first = first_valid.new_full((len(valid), len(ids)), self.num_keys)
                first = first.scatter_reduce(1, document, first_valid, "amin").gather(1, document)  # [B, T]
            self._blind_queries = first > self.query_positions[None]
        return self._blind_queries


def dynamic_mask(bias: torch.Tensor, allowed: torch.Tensor, keep_window_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive DMA mask [B, nb, T, S] from the per-key bias [B, nb, S].

    Allowed keys get their bias, others the dtype's minimum (as the reference does, so fully
    masked rows stay finite). With more than ``keep_window_size`` keys, each query row keeps only
    the ``keep_window_size`` keys with the largest mask value.
    """
    min_value = torch.finfo(dtype).min
    T = allowed.shape[-2]
    mask = bias[:, :, None, :].to(dtype).expand(-1, -1, T, -1)
    mask = mask.masked_fill(~allowed, min_value)
    if mask.shape[-1] > keep_window_size:
        top = torch.topk(mask, keep_window_size, dim=-1, sorted=False).indices
        keep = torch.zeros_like(mask, dtype=torch.bool).scatter(-1, top, True)
        mask = mask.masked_fill(~keep, min_value)
    return mask


@torch.compiler.disable
def keep_window_threshold(
    bias: torch.Tensor, allowed: torch.Tensor, keep_window_size: int, chunk: int = 256
) -> torch.Tensor:
    """Per query row, the ``keep_window_size``-th largest allowed bias [B, nb, T] (-inf if fewer keys).

    Used by the flex path, which expresses the keep window as ``bias >= threshold`` instead of a
    [B, nb, T, S] tensor; computed in query chunks so peak memory is chunk x S per head. Not
    compiled (``train.compile`` compiles around it): the number of chunks follows T, and a graph
    that loops over them is specialised to one T, compiled again at every new length.
    """
    B, nb, S = bias.shape
    T = allowed.shape[-2]
    thresholds = []
    for start in range(0, T, chunk):
        rows = allowed[..., start : start + chunk, :]
        values = bias[:, :, None, :].float().masked_fill(~rows, float("-inf"))
        values = values.expand(B, nb, rows.shape[-2], S)
        thresholds.append(torch.topk(values, keep_window_size, dim=-1, sorted=True).values[..., -1])
    return torch.cat(thresholds, dim=-1)
