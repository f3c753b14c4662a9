"""HyperSeg's weight mapper: the signal phi -> per-level dynamic decoder weights.

The signal phi (B, C, H/32, W/32) is divided into channel slices (:func:`divide_channels`, Algorithm 1 of
the HyperSeg paper); every generator is a grouped 1x1 convolution (no bias) reading its slice and
emitting the flat per-patch weights of one or more decoder levels.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor, nn

__all__ = ["divide_channels", "signal_slices", "WeightGenerator", "WeightMapper", "StaticWeights"]


def divide_channels(channels: int, weight_counts: Sequence[int], unit: int) -> List[int]:
    """Divide ``channels`` signal channels among layers in proportion to their weight counts.

    Algorithm 1 of the HyperSeg paper: the signal is handed out in units of ``unit`` channels; every
    layer receives at least one unit; layers with equal weight counts form a group that receives equal
    shares; groups are served largest first (by total weight count), each group taking
    ``max(1, floor(share))`` units per member, where ``share`` is its proportional part
    ``units * count / sum(counts)`` (capped by what is left); the last (smallest) group takes all the
    units that remain (the rounding overflow).

    Args:
        channels: signal channels C (a multiple of ``unit``).
        weight_counts: per-layer number of dynamic weights.
        unit: granularity of the division; HyperSeg uses ``max(weight_groups)`` so every slice can
            feed a grouped convolution.

    Returns:
        Channels per layer (multiples of ``unit``), in the order of ``weight_counts``. They sum to
        ``channels`` except when the last group has several members and the remaining units do not
        split evenly among them: the leftover units (fewer than that group's size) stay unassigned,
        as in the public implementation.

    Example (HyperSeg-M): ``divide_channels(1280, [5248, 3008, 704, 2352, 4216], 32)``
    -> ``[416, 224, 128, 192, 320]``.
    """
    counts = [int(c) for c in weight_counts]
    if unit <= 0:
        raise ValueError(f"unit must be positive, got {unit}")
    if channels % unit:
        raise ValueError(f"channels ({channels}) must be a multiple of unit ({unit})")
    if not counts or any(c <= 0 for c in counts):
        raise ValueError(f"weight_counts must be a non-empty list of positive integers, got {list(weight_counts)}")
    units = channels // unit
    if units < len(counts):
        raise ValueError(f"{channels} channels in units of {unit} give {units} units, fewer than the "
                         f"{len(counts)} layers that need one each")
    # groups of equal counts, ordered by total count descending (ties: smaller count first)
    groups: dict = {}
    for i, c in enumerate(counts):
        groups.setdefault(c, []).append(i)
    order = sorted(groups.items(), key=lambda kv: (-kv[0] * len(kv[1]), kv[0]))
    per_unit = units / sum(counts)
    given = {c: len(members) for c, members in order}  # one unit per member up front
    left = units - len(counts)
    for gi, (c, members) in enumerate(order):
        n = len(members)
        if gi == len(order) - 1:
            given[c] += left
            left = 0
            break
        if left == 0:
            break
        share = max(c * n * per_unit, n)
        extra = int(share // n) * n - n  # whole units per member, beyond the guaranteed one
        extra = min(extra, left)
        given[c] += extra
        left -= extra
    out = [0] * len(counts)
    for c, members in order:
        for i in members:
            out[i] = given[c] // len(members) * unit
    return out


def signal_slices(channels: int, weight_counts: Sequence[int], unit: int, slicing: str = "disjoint"):
    """(offset, width) of each generator's slice of phi.

    ``"disjoint"``: consecutive slices from :func:`divide_channels` (Algorithm 1; every channel of phi
    feeds exactly one generator). ``"prefix"``: the same widths, but every slice starts at channel 0
    (what the public HyperSeg v1_0 code does for Cityscapes-M and CamVid; the slices overlap).
    """
    widths = divide_channels(channels, weight_counts, unit)
    if slicing == "disjoint":
        offsets = [sum(widths[:i]) for i in range(len(widths))]
    elif slicing == "prefix":
        offsets = [0] * len(widths)
    else:
        raise ValueError(f"slicing must be 'disjoint' or 'prefix', got {slicing!r}")
    return list(zip(offsets, widths))


class WeightGenerator(nn.Module):
    """Grouped 1x1 conv (no bias) from ``phi[:, offset:offset+in_channels]`` to ``weight_numel`` weights.

    The conv emits ``ceil(weight_numel / groups) * groups`` channels (a grouped conv needs a multiple of
    ``groups``); the surplus channels are dropped.
    """

    def __init__(self, in_channels: int, weight_numel: int, groups: int = 1, offset: int = 0):
        super().__init__()
        if in_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        self.offset = offset
        self.in_channels = in_channels
        self.weight_numel = weight_numel
        self.groups = groups
        out = -(-weight_numel // groups) * groups
        self.conv = nn.Conv2d(in_channels, out, 1, bias=False, groups=groups)

    def forward(self, phi: Tensor) -> Tensor:
        w = self.conv(phi[:, self.offset:self.offset + self.in_channels])
        return w[:, :self.weight_numel] if w.shape[1] != self.weight_numel else w

    def extra_repr(self) -> str:
        return f"phi[{self.offset}:{self.offset + self.in_channels}] -> {self.weight_numel}, groups={self.groups}"


class WeightMapper(nn.Module):
    """All generators of a HyperSeg decoder.

    Args:
        signal_channels: channels C of phi.
        level_weights: dynamic weights per decoder level (``MetaBlock.weight_numel``).
        weight_groups: groups of each generator's conv (int, or a list indexed by generator).
        unit: slice granularity for :func:`divide_channels` (default ``max(weight_groups)``).
        slicing: ``"disjoint"`` or ``"prefix"`` (see :func:`signal_slices`).
        unify_from: if set, levels ``unify_from..L-1`` share one generator (HyperSeg-S "unify"): their
            weights are concatenated into one weight vector, emitted by one conv and split afterwards.
        round_counts: divide the signal by the generators' padded output widths (multiples of their
            groups) instead of the exact weight counts (the public v0_1 head does this).
        slices: explicit (offset, width) of each generator's slice of phi; overrides ``unit``,
            ``slicing`` and ``round_counts`` (e.g. the layout of a released checkpoint).

    ``forward(phi)`` returns a list with one (B, weight_numel_l, h, w) tensor per level.
    """

    def __init__(self, signal_channels: int, level_weights: Sequence[int], weight_groups=1, unit: int = None,
                 slicing: str = "disjoint", unify_from: int = None, round_counts: bool = False, slices=None):
        super().__init__()
        L = len(level_weights)
        self.level_weights = [int(n) for n in level_weights]
        if unify_from is None or unify_from >= L:
            spans = [[i] for i in range(L)]
        else:
            if unify_from < 0:
                raise ValueError(f"unify_from must be in [0, {L}), got {unify_from}")
            spans = [[i] for i in range(unify_from)] + [list(range(unify_from, L))]
        self.spans = spans
        if isinstance(weight_groups, (list, tuple)):
            if len(weight_groups) < len(spans):
                raise ValueError(f"weight_groups has {len(weight_groups)} entries, need {len(spans)}")
            groups = [int(g) for g in weight_groups[:len(spans)]]
            all_groups = [int(g) for g in weight_groups]
        else:
            groups = [int(weight_groups)] * len(spans)
            all_groups = groups
        unit = max(all_groups) if unit is None else int(unit)
        numels = [sum(self.level_weights[i] for i in span) for span in spans]
        counts = [-(-n // g) * g for n, g in zip(numels, groups)] if round_counts else numels
        if slices is None:
            self.slices = signal_slices(signal_channels, counts, unit, slicing)
        else:
            self.slices = [(int(o), int(w)) for o, w in slices]
            if len(self.slices) != len(spans):
                raise ValueError(f"slices must have {len(spans)} (offset, width) entries, one per generator, "
                                 f"got {list(slices)}")
            bad = [(o, w) for o, w in self.slices if o < 0 or w < 1 or o + w > signal_channels]
            if bad:
                raise ValueError(f"slices {bad} do not lie within the {signal_channels} channels of phi")
            slicing = "explicit"
        self.slicing = slicing
        self.unit = unit
        self.signal_channels = signal_channels
        self.generators = nn.ModuleList(
            WeightGenerator(width, n, g, offset) for (offset, width), n, g in zip(self.slices, numels, groups))

    def forward(self, phi: Tensor, patch_major: Sequence[bool] = ()) -> List[Tensor]:
        """phi (B, C, h, w) -> one (B, weight_numel_l, h, w) tensor per level.

        ``patch_major[i]`` (per generator, default False): emit generator i's weights in the
        channels_last memory format, i.e. each patch's weight vector contiguous -- what the CPU meta
        block kernel reads in place; the default layout (one plane per weight) suits the other
        kernels. Values are the same either way."""
        out: List[Tensor] = []
        phi_cl = None
        for i, (span, gen) in enumerate(zip(self.spans, self.generators)):
            if i < len(patch_major) and patch_major[i]:
                if phi_cl is None:
                    phi_cl = phi.contiguous(memory_format=torch.channels_last)
                w = gen(phi_cl)
            else:
                w = gen(phi)
            if len(span) == 1:
                out.append(w)
            else:
                out.extend(torch.split(w, [self.level_weights[i] for i in span], dim=1))
        return out

    def structure(self):
        """(in_channels, out_channels, groups, offset, width) of every generator conv: the layout test hook."""
        return [(g.conv.in_channels, g.conv.out_channels, g.conv.groups, g.offset, g.in_channels)
                for g in self.generators]


class StaticWeights(nn.Module):
    """The weight source of a HyperSeg with ``dynamic=False``: one learned weight vector per decoder
    level, shared by every sample and every patch -- each decoder convolution becomes an ordinary
    (static) convolution of the same shape, still run by the same decoder block.

    Args:
        level_weights: weights per level (``MetaBlock.weight_numel``), as for :class:`WeightMapper`.
        fan_ins: per level, the fan-in of each consecutive segment of the level's flat weight vector,
            as ``[(numel, fan_in), ...]``; each segment is initialised like an ``nn.Conv2d`` weight of
            that fan-in (uniform in +-1/sqrt(fan_in)). Default: one segment per level, fan-in =
            numel (a deliberately small init).

    ``forward(phi_or_batch)`` takes phi (only its batch size is used; nothing reads the signal) or a
    batch size and returns one (B, weight_numel_l, 1, 1) tensor per level (a 1x1 weight grid: the
    dynamic ops then apply one kernel to the whole image). The expansion over the batch is a view.
    """

    def __init__(self, level_weights: Sequence[int], fan_ins=None):
        super().__init__()
        self.level_weights = [int(n) for n in level_weights]
        if not self.level_weights or any(n <= 0 for n in self.level_weights):
            raise ValueError(f"level_weights must be positive integers, got {list(level_weights)}")
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(n)) for n in self.level_weights)
        self.spans = [[i] for i in range(len(self.level_weights))]  # one "generator" per level
        if fan_ins is None:
            fan_ins = [[(n, n)] for n in self.level_weights]
        if len(fan_ins) != len(self.level_weights):
            raise ValueError(f"fan_ins must have {len(self.level_weights)} entries, got {len(fan_ins)}")
        self._fan_ins = [[(int(a), int(b)) for a, b in segs] for segs in fan_ins]
        for n, segs in zip(self.level_weights, self._fan_ins):
            if sum(a for a, _ in segs) != n:
                raise ValueError(f"fan_ins segments {segs} do not add up to the level's {n} weights")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for w, segs in zip(self.weights, self._fan_ins):
            for part, (_, fan_in) in zip(torch.split(w, [a for a, _ in segs]), segs):
                bound = 1.0 / math.sqrt(max(fan_in, 1))
                part.uniform_(-bound, bound)

    def forward(self, phi, patch_major: Sequence[bool] = ()) -> List[Tensor]:
        b = phi if isinstance(phi, int) else phi.shape[0]
        grad = torch.is_grad_enabled()  # (a view made under no_grad would still claim requires_grad)
        return [(w if grad else w.detach()).view(1, -1, 1, 1).expand(b, -1, 1, 1) for w in self.weights]

    def extra_repr(self) -> str:
        return f"levels={self.level_weights}"
