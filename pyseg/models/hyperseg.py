"""HyperSeg (Nirkin, Wolf, Hassner, CVPR 2021): a hypernetwork encoder and a dynamic patch-wise decoder.

Pipeline (``HyperSeg.forward``):

1. encoder (:class:`~pyseg.models.backbones.TimmEncoder`): skip features at strides 2..32 (reduced by
   ``out_feat_scale``) and the signal source at stride 32 (EfficientNet's head conv);
2. context head (:mod:`~pyseg.models.context_head`): signal source -> phi (C channels, stride 32);
3. weight mapper (:mod:`~pyseg.models.weight_mapper`): slices of phi -> per-level weights, one weight
   vector per sample and per patch of the (H/32) x (W/32) grid;
4. dynamic decoder, stride 32 first: level input = cat(x-coord, y-coord, skip, bilinearly upsampled
   previous output); kernel-1 levels are patch-wise 1x1 conv -> BN -> ReLU, kernel-3 levels are meta
   blocks (:class:`pyseg.nn.MetaBlock`, v1_0) or three chained patch-wise convs (v0_1, VOC); the last
   level outputs the logits (its BN output);
5. bilinear upsampling (align_corners=False) of the logits to the input size when the decoder ends
   above stride 1.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._memory import empty_for_write
from ..nn import ChainedMetaBlock, MetaBlock
from ..ops.meta_block import weight_memory_format
from ..ops.resize import resize_bilinear
from .backbones import load_model_weights
from .configs import DESCRIPTIONS, HYPERSEG_CONFIGS
from .context_head import ContextHead, ContextHeadV01
from .encoders import build_encoder, signal_only_modules
from .registry import register_model
from .weight_mapper import StaticWeights, WeightMapper

__all__ = ["HyperSeg", "image_coordinates", "hyperseg"]


def image_coordinates(ref: Tensor) -> Tensor:
    """(B, 2, h, w) positional embedding for ``ref`` (B, C, h, w): channel 0 = x = linspace(-1, 1, w)
    along the width, channel 1 = y = linspace(-1, 1, h) along the height."""
    b, _, h, w = ref.shape
    xs = torch.linspace(-1, 1, w, device=ref.device, dtype=ref.dtype)
    ys = torch.linspace(-1, 1, h, device=ref.device, dtype=ref.dtype)
    grid = torch.stack((xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)))
    return grid.unsqueeze(0).expand(b, 2, h, w)


def _level_input(skip: Tensor, prev: Optional[Tensor], coords: bool = True) -> Tensor:
    """A decoder level's input: cat(x, y, skip, previous level's output resized to the skip), NCHW
    contiguous (the layout the dynamic ops read; a channels_last skip is converted here); without the
    x, y channels when ``coords`` is False. Outside autograd the parts are written straight into one
    buffer (no converted skip, no resized copy)."""
    size = tuple(skip.shape[-2:])
    k = 2 if coords else 0
    resize = prev is not None and tuple(prev.shape[-2:]) != size
    if (torch.compiler.is_compiling()  # the compiler plans buffers itself
            or torch.is_grad_enabled() and (skip.requires_grad or (prev is not None and prev.requires_grad))):
        s = skip.contiguous()
        parts = [image_coordinates(s), s] if coords else [s]
        if prev is not None:
            parts.append(F.interpolate(prev, size=size, mode="bilinear", align_corners=False) if resize else prev)
        return torch.cat(parts, 1)
    b, c, h, w = skip.shape
    cp = 0 if prev is None else prev.shape[1]
    dtype = skip.dtype if prev is None else torch.promote_types(skip.dtype, prev.dtype)  # as cat would
    out = empty_for_write(b, k + c + cp, h, w, dtype=dtype, device=skip.device)
    if coords:
        out[:, :2].copy_(image_coordinates(out))
    out[:, k:k + c].copy_(skip)
    if resize:
        torch.ops.aten.upsample_bilinear2d.out(prev, [h, w], False, None, None, out=out[:, k + c:])
    elif prev is not None:
        out[:, k + c:].copy_(prev)
    return out


class HyperSeg(nn.Module):
    """HyperSeg segmentation model (see the module docstring for the pipeline).

    Args:
        num_classes: output classes.
        backbone: timm model name (``efficientnet_b1``/``efficientnet_b3`` in the paper;
            ``mobilenetv2_100``, ``resnet18``... also work).
        out_feat_scale: per-stride channel scale of the skip features (strides 2..32), or one scale.
        kernel_sizes: per decoder level (stride 32 first): 1 (patch-wise 1x1 level) or 3 (meta block).
            5 levels end at stride 2, 6 at stride 1 (the image itself is the last skip).
        level_channels: per-level output channels (the last level's is ``num_classes``); None = the
            level's skip channels (v0_1).
        weight_groups: groups of each generator's grouped 1x1 conv (list per generator, or one int).
        signal_unit: slice granularity of phi (default max(weight_groups)).
        expand_ratio: meta block expansion (hid = round(expand_ratio * Cin)).
        context_head / context_levels: ``"v1_0"`` or ``"v0_1"`` head and its number of levels.
        decoder: ``"v1_0"`` (fused :class:`pyseg.nn.MetaBlock`) or ``"v0_1"`` (:class:`ChainedMetaBlock`).
        unify_level: 1-based level from which one generator serves all remaining levels (HyperSeg-S).
        round_weight_counts: divide phi by padded generator widths (v0_1).
        signal_slicing: ``"disjoint"`` (default; Algorithm 1: every generator reads its own slice of
            phi) or ``"public"`` (the slice layout of the public implementation of this model:
            ``public_signal_layout``, which is ``"prefix"`` -- every slice starts at channel 0 -- for
            the public v1_0 models HyperSeg-M and the CamVid models).
        public_signal_layout: see ``signal_slicing``.
        signal_slices: explicit (offset, width) of each generator's slice of phi (overrides
            ``signal_unit``, ``signal_slicing`` and ``round_weight_counts``; used for released checkpoints).
        backbone_padding: image size whose TF "same" padding every trunk convolution keeps at any input
            size (:func:`~pyseg.models.backbones.static_same_padding`; the public HyperSeg EfficientNet:
            240 for B1, 300 for B3); None keeps the timm model's padding.
        reducer_bn_eps: BatchNorm eps of the skip reducers (the public EfficientNet's: 1e-3).
        backbone_weights: local ImageNet checkpoint of the timm backbone (never downloaded).
        backbone_drop_path_rate: stochastic depth in the trunk (training).
        backend: backend of the dynamic ops (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``,
            ``"triton"``).
        in_channels: image channels.
        input_size: (H, W) the model is meant to run at (metadata, default of benchmarks).
        name: registry name (metadata, used in messages).
        grid: (gh, gw) weight grid of every decoder level, or None (default: phi's own size, H/32 x
            W/32, i.e. fixed by the encoder stride). With a grid, phi is resampled to (gh, gw) by
            adaptive average pooling before the weight mapper (the mapper is a 1x1 convolution, so
            this equals pooling the weights it would emit; a grid that divides phi's size averages
            whole phi cells, a grid of 1x1 is the global average, i.e. one kernel per image). The grid
            must fit the coarsest decoder level: gh <= H/32 and gw <= W/32 (checked per input);
            patches need not divide the levels evenly (see ``patchwise_conv2d``).
        positional_encoding: feed the x, y coordinate channels to every decoder level (default
            True, the paper's P_i); False drops them (each level then has 2 fewer input channels and
            correspondingly fewer dynamic weights).
        dynamic: False turns every decoder convolution into a learned static convolution of the same
            shape, run by the same decoder blocks with a 1x1 weight grid (the paper's ablation "w/o
            DPWConv"): the weight mapper is replaced by :class:`~pyseg.models.weight_mapper.StaticWeights`
            (one weight vector per level: sum of the levels' ``weight_numel`` parameters). The encoder
            and the context head stay, so that the parameter count is comparable to the dynamic
            model's; nothing reads phi then, so the context head is not run, and it and the encoder's
            signal-only layers (EfficientNet's head conv, which still runs inside the encoder) are
            frozen (``requires_grad=False``: no optimizer or DDP work for them).
        signal_channels: optional width of a 1x1 conv + BN + ReLU head on the encoder's signal source
            (:class:`~pyseg.models.encoders.SignalHead`; e.g. 1280 on ResNet18, as EfficientNet-B1's
            head conv).

    ``backbone`` may also be ``"pspnet18"`` / ``"pspnet50"`` (:class:`~pyseg.models.encoders.PSPEncoder`);
    an unknown name raises ``ValueError``.

    Inputs must have height and width divisible by :attr:`input_multiple` (64 for the v1_0 head with
    2 levels, 128 for VOC's 3-level head).
    """

    def __init__(self, num_classes: int, backbone: str = "efficientnet_b1", out_feat_scale=0.25,
                 kernel_sizes: Sequence[int] = (1, 1, 1, 3, 3), level_channels: Optional[Sequence[int]] = None,
                 weight_groups=1, signal_unit: Optional[int] = None, expand_ratio: float = 2,
                 context_head: str = "v1_0", context_levels: int = 2, decoder: str = "v1_0",
                 unify_level: Optional[int] = None, round_weight_counts: bool = False,
                 signal_slicing: str = "disjoint", public_signal_layout: str = "prefix",
                 signal_slices: Optional[Sequence[Tuple[int, int]]] = None, backbone_padding: Optional[int] = None,
                 reducer_bn_eps: float = 1e-5, backbone_weights: Optional[str] = None, backbone_drop_path_rate: float = 0.0,
                 backend: str = "auto", in_channels: int = 3, input_size: Optional[Tuple[int, int]] = None,
                 name: str = "hyperseg", grid: Optional[Tuple[int, int]] = None, positional_encoding: bool = True,
                 dynamic: bool = True, signal_channels: Optional[int] = None):
        super().__init__()
        if grid is not None:
            if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                    or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
                raise ValueError(f"grid must be None or a pair of positive ints (gh, gw), got {grid!r}")
            grid = (int(grid[0]), int(grid[1]))
        for flag, value in (("positional_encoding", positional_encoding), ("dynamic", dynamic)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        if grid is not None and not dynamic:
            raise ValueError(f"grid has no effect with dynamic=False (a static decoder applies one kernel to the "
                             f"whole image); got grid={grid}")
        if signal_slicing not in ("disjoint", "public"):
            raise ValueError(f"signal_slicing must be 'disjoint' or 'public', got {signal_slicing!r}")
        if public_signal_layout not in ("disjoint", "prefix"):
            raise ValueError(f"public_signal_layout must be 'disjoint' or 'prefix', got {public_signal_layout!r}")
        if context_head not in ("v1_0", "v0_1"):
            raise ValueError(f"context_head must be 'v1_0' or 'v0_1', got {context_head!r}")
        if decoder not in ("v1_0", "v0_1"):
            raise ValueError(f"decoder must be 'v1_0' or 'v0_1', got {decoder!r}")
        levels = len(kernel_sizes)
        if not 1 <= levels <= 6:
            raise ValueError(f"kernel_sizes must have 1..6 entries (decoder levels), got {list(kernel_sizes)}")
        if level_channels is not None and len(level_channels) != levels:
            raise ValueError(f"level_channels must have {levels} entries, got {list(level_channels)}")
        self.name = name
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = tuple(input_size) if input_size is not None else None
        self.backend = backend
        self.signal_slicing = signal_slicing
        self.grid = grid
        self.positional_encoding = positional_encoding
        self.dynamic = dynamic

        self.encoder = build_encoder(backbone, out_feat_scale, weights=backbone_weights,
                                     drop_path_rate=backbone_drop_path_rate, signal_channels=signal_channels,
                                     static_padding=backbone_padding, reducer_bn_eps=reducer_bn_eps)
        C = self.encoder.signal_channels
        if context_head == "v1_0":
            self.context_head = ContextHead(C, context_levels)
        else:
            self.context_head = ContextHeadV01(C, context_levels)

        # decoder: stride 32 first; skips = image (stride 1) + encoder features (strides 2..32)
        skip_channels = ([in_channels] + list(self.encoder.feature_channels))[::-1]
        self.level_strides = [32 // 2 ** i for i in range(levels)]
        blocks = []
        prev = 0
        for level, k in enumerate(kernel_sizes):
            cin = prev + skip_channels[level] + (2 if positional_encoding else 0)
            if level == levels - 1:
                cout = num_classes
            else:
                cout = level_channels[level] if level_channels is not None else skip_channels[level]
            if k == 3 and decoder == "v0_1":
                blocks.append(ChainedMetaBlock(cin, cout, expand_ratio, backend=backend))
            elif k in (1, 3):
                blocks.append(MetaBlock(cin, cout, expand_ratio=expand_ratio, kernel_size=k, backend=backend))
            else:
                raise ValueError(f"kernel_sizes entries must be 1 or 3, got {k} at level {level}")
            prev = cout
        self.decoder = nn.ModuleList(blocks)
        # public v1_0 adds a residual when a meta block keeps the channel count (never in the configs)
        self._residual = [b.kernel_size == 3 and b.in_channels == b.out_channels for b in blocks]

        layout = "disjoint" if signal_slicing == "disjoint" else public_signal_layout
        unify_from = None if unify_level is None else unify_level - 1
        if dynamic:
            self.weight_mapper = WeightMapper(self.context_head.out_channels, [b.weight_numel for b in blocks],
                                              weight_groups, unit=signal_unit, slicing=layout,
                                              unify_from=unify_from, round_counts=round_weight_counts,
                                              slices=signal_slices)
        else:
            self.weight_mapper = StaticWeights([b.weight_numel for b in blocks],
                                               [_static_fan_ins(b) for b in blocks])
            for module in [self.context_head] + signal_only_modules(self.encoder):
                module.requires_grad_(False)
        # per generator, the fused op of the one level it feeds ("meta_block" / "pointwise_block"), else
        # None (a unified generator's split would not be patch-contiguous per level)
        self._generator_ops = [("meta_block" if blocks[span[0]].kernel_size == 3 else "pointwise_block")
                               if len(span) == 1 and isinstance(blocks[span[0]], MetaBlock) else None
                               for span in self.weight_mapper.spans]

    # ------------------------------------------------------------------------------------------
    @property
    def input_multiple(self) -> int:
        """Height and width of inputs must be multiples of this (the context head halves the
        stride-32 map ``context_levels - 1`` times)."""
        return self.context_head.input_multiple

    @property
    def output_stride(self) -> int:
        """Stride of the decoder's last level (2 for 5 levels, 1 for 6)."""
        return self.level_strides[-1]

    @property
    def attn_channels(self) -> int:
        """Channels of the ``attn_features`` of :meth:`forward_features_and_logits`."""
        return self.decoder[self._attn_level()].in_channels

    def _attn_level(self) -> int:
        strides = self.level_strides
        return strides.index(4) if 4 in strides else len(strides) - 1

    def weight_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(gh, gw) of the decoder's weight grid for an input of height x width."""
        if not self.dynamic:
            return (1, 1)
        return self.grid if self.grid is not None else (height // 32, width // 32)

    def check_input(self, x: Tensor):
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: input must be a (B, {self.in_channels}, H, W) tensor, got {shape}")
        H, W = x.shape[-2:]
        m = self.input_multiple
        if H % m or W % m or H == 0 or W == 0:
            raise ValueError(f"{self.name}: input size {H}x{W} (HxW) is not supported: height and width must be "
                             f"multiples of {m} (patch grid H/32 x W/32, and the context head halves it "
                             f"{int(math.log2(m // 32))} time(s)); pad or resize, e.g. to "
                             f"{-(-H // m) * m}x{-(-W // m) * m}")
        if self.grid is not None and self.dynamic and (self.grid[0] > H // 32 or self.grid[1] > W // 32):
            raise ValueError(f"{self.name}: grid {self.grid[0]}x{self.grid[1]} does not fit the decoder at input "
                             f"{H}x{W}: its coarsest level is {H // 32}x{W // 32} (stride 32), and every patch "
                             f"needs at least one pixel there; use a grid of at most {H // 32}x{W // 32} or a "
                             f"larger input")

    # ------------------------------------------------------------------------------------------
    def generate_weights(self, x: Tensor):
        """Encoder + context head + weight mapper: (skip features, per-level weights, phi)."""
        feats, signal = self.encoder(x)
        if not self.dynamic:  # static decoder: nothing reads phi
            return feats, self.weight_mapper(x.shape[0]), None
        phi = self.context_head(signal)
        if self.grid is not None and tuple(phi.shape[-2:]) != self.grid:
            phi = F.adaptive_avg_pool2d(phi, self.grid)
        # phi is tiny; NCHW here makes the weight mapper emit the (B, N, gh, gw) layout the dynamic
        # ops read, even when the trunk runs channels_last -- except for the levels whose kernel reads
        # each patch's weight vector in place from a channels_last tensor (weight_memory_format: the
        # meta block on CPU, CUDA and Triton; the 1x1 level block on CUDA)
        patch_major = [op is not None and weight_memory_format(phi.device, self.backend, op) == torch.channels_last
                       for op in self._generator_ops]
        return feats, self.weight_mapper(phi.contiguous(), patch_major), phi

    def _decode(self, x: Tensor, feats: List[Tensor], weights: List[Tensor], attn_level: int = -1):
        skips = [x] + list(feats)
        p = None
        attn = None
        for level, block in enumerate(self.decoder):
            p = _level_input(skips[-level - 1], p, self.positional_encoding)
            if level == attn_level:
                attn = p
            y = block(p, weights[level])
            p = p + y if self._residual[level] else y
        return p, attn

    def forward_features_and_logits(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """For multi-scale attention (HMSA) wrappers.

        Returns ``(logits, attn_features)``:

        * ``logits``: (B, num_classes, H/s, W/s), the decoder's output *before* the final bilinear
          upsampling, at the model's :attr:`output_stride` s (2 for the 5-level models, 1 -- i.e. full
          resolution -- for the 6-level CamVid-L and VOC models);
        * ``attn_features``: the decoder's level input at stride 4 (B, :attr:`attn_channels`, H/4, W/4):
          cat(x-coord, y-coord, encoder stride-4 skip, upsampled decoder state); a cheap feature map for
          an attention head.
        """
        self.check_input(x)
        feats, weights, _ = self.generate_weights(x)
        return self._decode(x, feats, weights, attn_level=self._attn_level())

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> logits (B, num_classes, H, W)."""
        self.check_input(x)
        feats, weights, _ = self.generate_weights(x)
        logits, _ = self._decode(x, feats, weights)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = self._resize_logits(logits, x.shape[-2:])
        return logits

    def _resize_logits(self, logits: Tensor, size) -> Tensor:
        """The final bilinear upsampling (:func:`pyseg.ops.resize_bilinear`)."""
        return resize_bilinear(logits, tuple(size), backend=self.backend)

    def to_channels_last(self) -> "HyperSeg":
        """channels_last for the convolutional trunk (encoder and context head), where oneDNN / cuDNN
        convolutions are faster in it; the weight mapper stays NCHW so that the per-patch weights come
        out in the layout the dynamic ops read (no transposing copies), and the decoder converts the
        skip features once. Feed a channels_last input as well. Returns self."""
        self.encoder.to(memory_format=torch.channels_last)
        self.context_head.to(memory_format=torch.channels_last)
        return self

    def set_backend(self, backend: str) -> "HyperSeg":
        """Switch the dynamic ops of every decoder block to ``backend`` (same weights). Returns self."""
        self.backend = backend
        for block in self.decoder:
            block.backend = backend
        return self

    # ------------------------------------------------------------------------------------------
    def decoder_macs(self, height: int, width: int, batch: int = 1) -> Dict[str, int]:
        """Multiply-accumulates of the dynamic decoder layers, counted analytically (the custom ops are
        invisible to ``torch.utils.flop_counter``). A v1_0 meta block's expansion 1x1 runs on every patch's
        1-pixel halo as well (gh x gw patches of an h x w level: (h + 2 gh)(w + 2 gw) pixels, whether
        or not the patches divide the level evenly); v0_1 / 1x1 levels run on the pixels once."""
        out = {}
        gh, gw = self.weight_grid(height, width)
        for level, (block, s) in enumerate(zip(self.decoder, self.level_strides)):
            h, w = height // s, width // s
            cin, cout = block.in_channels, block.out_channels
            if block.kernel_size == 1:
                macs = cin * cout * h * w
            else:
                hid = block.hidden_channels
                expand_pixels = (h + 2 * gh) * (w + 2 * gw) if isinstance(block, MetaBlock) else h * w
                macs = hid * cin * expand_pixels + hid * 9 * h * w + cout * hid * h * w
            out[f"decoder.{level}"] = batch * macs
        return out

    @torch.no_grad()
    def fuse(self, example: Optional[Tensor] = None, activations: bool = True,
             squeeze_excitation: bool = True, bands: bool = True, padding: bool = True) -> "HyperSeg":
        """Inference rewrites of the static trunk (encoder, reducers, context head), in place:

        * ``padding``: explicit zero padding before a convolution (the public EfficientNets' asymmetric
          static padding, ``nn.Sequential(nn.ZeroPad2d, nn.Conv2d)``) becomes the convolution's own
          symmetric padding with zero taps added to its kernel
          (:func:`~pyseg.models._fuse.absorb_zero_padding`): no padded copy of the input;
        * every BatchNorm that directly follows a convolution is folded into it (the decoder's
          BatchNorms are folded by the meta blocks themselves in eval mode);
        * ``activations``: a folded BN that carried its activation (timm's ``BatchNormAct2d``) makes
          the pair one :class:`~pyseg.models._fuse.ConvAct2d` (on the CPU in float32 one oneDNN
          convolution with the activation as a post-op; elsewhere conv then activation);
        * ``squeeze_excitation``: EfficientNet's squeeze-excitation gate is folded into the 1x1
          projection after it (:class:`~pyseg.models._fuse.SEGatedConv2d`) instead of scaling the
          largest activations of every block;
        * ``bands`` (with ``activations``): each inverted residual's 1x1 expansion and depthwise
          convolution become one :class:`~pyseg.models._fuse.PwDwConv2d`, which on the CPU runs them
          together in bands of rows when the expanded map would be large (it is then never
          materialised).

        Puts the model in eval mode; each step is verified on ``example`` (or a random input at the
        smallest legal size for the model and its grid) and undone with an error if the output
        changes. Returns self."""
        from ._fuse import absorb_zero_padding, band_expansions, fold_conv_bn, fold_se_gates

        self.eval()
        if example is None:
            m = self.input_multiple
            p = next(self.parameters())
            gh, gw = self.grid if self.grid is not None and self.dynamic else (1, 1)  # the grid must fit
            h, w = max(m, -(-32 * gh // m) * m), max(2 * m, -(-32 * gw // m) * m)
            example = torch.randn(1, self.in_channels, h, w, device=p.device, dtype=p.dtype)
        if padding:
            absorb_zero_padding(self, example)
        fold_conv_bn(self, example, skip=(self.decoder,), fuse_act=activations)
        if squeeze_excitation:
            fold_se_gates(self, example)
        if activations and bands:
            band_expansions(self, example)
        return self


def _static_fan_ins(block) -> List[Tuple[int, int]]:
    """(numel, fan_in) of each part of a block's flat weight vector, for StaticWeights' init."""
    cin, cout = block.in_channels, block.out_channels
    if block.kernel_size == 1:
        return [(cout * cin, cin)]
    hid = block.hidden_channels
    return [(hid * cin, cin), (hid * 9, 9), (cout * hid, hid)]


# ----------------------------------------------------------------------------------------------
def hyperseg(num_classes: Optional[int] = None, in_channels: int = 3, backbone_weights: Optional[str] = None,
             checkpoint: Optional[str] = None, **config) -> HyperSeg:
    """Build a HyperSeg from a config dict (see :mod:`pyseg.models.configs`); the uniform builder
    arguments are described in :mod:`pyseg.models.registry`."""
    config = dict(config)
    for meta in ("dataset", "public_params", "paper_params", "description"):
        config.pop(meta, None)
    if num_classes is None:
        raise ValueError("num_classes is required")
    model = HyperSeg(num_classes=num_classes, in_channels=in_channels, backbone_weights=backbone_weights, **config)
    return load_model_weights(model, checkpoint)


for _name, _cfg in HYPERSEG_CONFIGS.items():
    register_model(_name, hyperseg, dict(_cfg, name=_name), DESCRIPTIONS.get(_name, ""))
