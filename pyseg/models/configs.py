"""HyperSeg model configurations (plain data).

Keys (see :class:`pyseg.models.hyperseg.HyperSeg` for their meaning): ``backbone`` (timm name),
``num_classes``, ``input_size`` (H, W: the evaluation resolution), ``out_feat_scale`` (per-stride skip
reduction, strides 2..32), ``kernel_sizes`` / ``level_channels`` (per decoder level, stride 32 first;
``level_channels=None`` = each level outputs its skip's channels), ``weight_groups`` (per generator),
``signal_unit`` (slice granularity; None = max(weight_groups)), ``expand_ratio``, ``context_head``
(``"v1_0"`` or ``"v0_1"``), ``context_levels``, ``decoder`` (``"v1_0"``: fused meta blocks;
``"v0_1"``: three chained patch-wise convs per block), ``unify_level`` (public HyperSeg-S: 1-based
level from which one generator serves all remaining levels), ``round_weight_counts`` (divide phi by
padded generator widths, v0_1), ``public_signal_layout`` (what ``signal_slicing="public"`` means for
this model: ``"prefix"`` for the public v1_0 code, ``"disjoint"`` for v1_0_unify and v0_1), and the
expected trainable-parameter count of the public implementation (``public_params``; None for configs that
are not from the paper).
"""

# What the v1_0 models share (the public ones and hyperseg-tiny); each config below states the rest.
_V1_0 = dict(signal_unit=None, expand_ratio=2, context_head="v1_0", context_levels=2, decoder="v1_0",
             unify_level=None, round_weight_counts=False)


def _v1_0(**keys) -> dict:
    return dict(_V1_0, **keys)


HYPERSEG_CONFIGS = {
    "hyperseg-m": _v1_0(
        dataset="cityscapes", num_classes=19, input_size=(512, 1024), backbone="efficientnet_b1",
        out_feat_scale=[1.0, 0.25, 0.25, 0.25, 0.25], kernel_sizes=[1, 1, 1, 3, 3],
        level_channels=[64, 32, 16, 16, 16], weight_groups=[32, 16, 8, 16, 4],
        public_signal_layout="prefix", public_params=10_311_214),
    "hyperseg-s": _v1_0(
        dataset="cityscapes", num_classes=19, input_size=(768, 1536), backbone="efficientnet_b1",
        out_feat_scale=[1.0, 0.166, 0.2, 0.25, 0.4], kernel_sizes=[1, 1, 1, 3, 3],
        level_channels=[32, 16, 8, 8, 8], weight_groups=[32, 16, 8, 16, 4], unify_level=4,
        public_signal_layout="disjoint", public_params=10_041_398),
    "hyperseg-s-camvid": _v1_0(
        dataset="camvid", num_classes=12, input_size=(576, 768), backbone="efficientnet_b1",
        out_feat_scale=0.25, kernel_sizes=[1, 1, 1, 3, 3], level_channels=[64, 32, 16, 16, 16],
        weight_groups=[64, 32, 32, 16, 8], public_signal_layout="prefix", public_params=9_949_064),
    "hyperseg-l-camvid": _v1_0(
        dataset="camvid", num_classes=12, input_size=(768, 1024), backbone="efficientnet_b1",
        out_feat_scale=0.25, kernel_sizes=[1, 1, 1, 3, 3, 3], level_channels=[64, 32, 16, 16, 16, 16],
        weight_groups=[64, 32, 32, 16, 8, 8], public_signal_layout="prefix", public_params=9_969_104),
    "hyperseg-l-voc": dict(
        dataset="voc", num_classes=21, input_size=(512, 512), backbone="efficientnet_b3",
        out_feat_scale=0.25, kernel_sizes=[1, 1, 3, 3, 3, 3],
        level_channels=None, weight_groups=16, signal_unit=16,
        expand_ratio=2, context_head="v0_1", context_levels=3, decoder="v0_1", unify_level=None,
        round_weight_counts=True, public_signal_layout="disjoint", public_params=39_680_458,
    ),
    # Not from the paper: a small HyperSeg for CPU training demos and tests (the generated dataset of
    # pyseg.data.synthetic, 4 classes). Same structure as HyperSeg-M (v1_0 head, three 1x1 levels, two meta
    # blocks, output stride 2) on a width-0.5 MobileNetV2 (randomly initialised: no downloaded weights),
    # full-width skips (8, 16, 16, 48, 160 channels) and narrow decoder levels.
    "hyperseg-tiny": _v1_0(
        dataset="synthetic", num_classes=4, input_size=(128, 256), backbone="mobilenetv2_050",
        out_feat_scale=1.0, kernel_sizes=[1, 1, 1, 3, 3], level_channels=[32, 16, 16, 8, 8],
        weight_groups=[16, 8, 4, 8, 4], public_signal_layout="disjoint", public_params=None),
}

DESCRIPTIONS = {
    "hyperseg-m": "HyperSeg-M, Cityscapes (19 classes), EfficientNet-B1, 1024x512",
    "hyperseg-s": "HyperSeg-S, Cityscapes (19 classes), EfficientNet-B1, 1536x768, unified generator for levels 3-4",
    "hyperseg-s-camvid": "HyperSeg-S, CamVid (12 classes), EfficientNet-B1, 768x576",
    "hyperseg-l-camvid": "HyperSeg-L, CamVid (12 classes), EfficientNet-B1, 1024x768, 6 levels to stride 1",
    "hyperseg-l-voc": "HyperSeg-L, PASCAL VOC (21 classes), EfficientNet-B3, 512x512, v0_1 head and decoder",
    "hyperseg-tiny": "small HyperSeg for CPU demos (not from the paper): MobileNetV2-0.5 (random init), 256x128, "
                     "4 classes (pyseg.data.synthetic)",
}

# The HyperSeg paper's CamVid ablation variants (not in the public code; see pyseg.models.encoders and
# the README's "HyperSeg variants" table). Each is hyperseg-s-camvid / hyperseg-l-camvid with one thing
# changed. Extra keys: ``signal_channels`` (a 1x1 conv + BN + ReLU head on the encoder's signal source),
# ``dynamic`` (False: static decoder convolutions, "w/o DPWConv"), ``grid`` / ``positional_encoding``
# (defaults here; the grid-size and positional-encoding ablation is ``create_model(name, grid=(gh, gw),
# positional_encoding=False)``), ``paper_params`` (the paper's parameter count, metadata).
# This project's choices (the paper gives only the encoder names and the counts): ResNet18 gets a
# 1280-channel signal head (EfficientNet-B1's head width, which the ResNet lacks); the PSPNet encoders
# feed their pyramid-pooling output to the decoder and their last ResNet stage to the hypernetwork; the
# -L encoder variants take full-width skips (out_feat_scale 1.0), the -S ones the CamVid models' 0.25.
def _variant(base: str, **changes) -> dict:
    cfg = dict(HYPERSEG_CONFIGS[base], public_params=None)
    cfg.update(changes)
    return cfg


VARIANT_CONFIGS = {
    "hyperseg-s-camvid-resnet18": _variant("hyperseg-s-camvid", backbone="resnet18", signal_channels=1280,
                                           paper_params=16_200_000),
    "hyperseg-l-camvid-resnet18": _variant("hyperseg-l-camvid", backbone="resnet18", signal_channels=1280,
                                           out_feat_scale=1.0, paper_params=16_700_000),
    "hyperseg-s-camvid-psp18": _variant("hyperseg-s-camvid", backbone="pspnet18", paper_params=17_200_000),
    "hyperseg-l-camvid-psp18": _variant("hyperseg-l-camvid", backbone="pspnet18", out_feat_scale=1.0,
                                        paper_params=17_600_000),
    "hyperseg-s-camvid-psp50": _variant("hyperseg-s-camvid", backbone="pspnet50", paper_params=57_600_000),
    "hyperseg-l-camvid-psp50": _variant("hyperseg-l-camvid", backbone="pspnet50", out_feat_scale=1.0,
                                        paper_params=67_900_000),
    "hyperseg-s-camvid-static": _variant("hyperseg-s-camvid", dynamic=False, paper_params=9_900_000),
    "hyperseg-l-camvid-static": _variant("hyperseg-l-camvid", dynamic=False, paper_params=10_300_000),
}
HYPERSEG_CONFIGS.update(VARIANT_CONFIGS)

DESCRIPTIONS.update({
    "hyperseg-s-camvid-resnet18": "HyperSeg-S CamVid on ResNet18 (+1280-ch signal head), 768x576 (paper ablation)",
    "hyperseg-l-camvid-resnet18": "HyperSeg-L CamVid on ResNet18 (+1280-ch signal head), full-width skips, 1024x768 "
                                  "(paper ablation)",
    "hyperseg-s-camvid-psp18": "HyperSeg-S CamVid on PSPNet18 (dilated ResNet18 + pyramid pooling), 768x576 "
                               "(paper ablation)",
    "hyperseg-l-camvid-psp18": "HyperSeg-L CamVid on PSPNet18, full-width skips, 1024x768 (paper ablation)",
    "hyperseg-s-camvid-psp50": "HyperSeg-S CamVid on PSPNet50 (dilated ResNet50 + pyramid pooling), 768x576 "
                               "(paper ablation)",
    "hyperseg-l-camvid-psp50": "HyperSeg-L CamVid on PSPNet50, full-width skips, 1024x768 (paper ablation)",
    "hyperseg-s-camvid-static": "HyperSeg-S CamVid with static decoder convolutions ('w/o DPWConv', paper ablation)",
    "hyperseg-l-camvid-static": "HyperSeg-L CamVid with static decoder convolutions ('w/o DPWConv', paper ablation)",
})
