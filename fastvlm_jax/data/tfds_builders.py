"""TFDS builders for image-caption data, written as array_record, read without TensorFlow.

TensorFlow is not a dependency of this project. Without it, TFDS can still *write*
datasets in the `array_record` format (`GeneratorBasedBuilder` + `download_and_prepare`)
and *read* them by random access (`builder_from_directory(...).as_data_source(split)`);
`as_dataset`, the `tfrecord` format, `ImageFolder` and numpy-array image inputs need
TensorFlow and are not used here. Images are therefore always handed to TFDS as encoded
bytes (PNG or JPEG), and read back as bytes that we decode with PIL.

Record format (every builder): a `FeaturesDict` with

    image_id: Text                  e.g. "test_000012", "391895", "cats/0001.jpg"
    image:    Image(shape=(None, None, 3))   stored as the encoded file bytes (RGB)
    captions: Sequence(Text)        one or more reference captions

Builders (none registered in the global TFDS registry: TFDS ships its own
`coco_captions`, and re-registering a name raises; we keep our own table, `BUILDERS`):

- `synthetic_captions`: the deterministic shapes data of `synthetic.py`
  (configs `default`: 20000/500/500, `tiny`: 64/16/16; or any sizes via kwargs).
- `local_captions`: a folder of images plus JSON/JSONL annotations.
- `coco_captions`: MS-COCO 2014/2017 captions or the Karpathy split, from files the user
  already has on disk (`manual_dir`); nothing is ever downloaded.

Reading: `open_split(name, split, data_dir)` gives a random-access `CaptionSource`
(`len`, `[i]`) of plain dicts, which a grain DataLoader reads directly (training's loader,
with its own host-independent sampler, is `train.input.make_loader`).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, cast

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import constants as tfds_constants

from fastvlm_jax.data import synthetic
from fastvlm_jax.image.processing import raise_pil_pixel_limit

# ----------------------------------------------------------------------------------
# Shared features and helpers
# ----------------------------------------------------------------------------------

_VERSION = tfds.core.Version("1.0.0")
_RELEASE_NOTES = {"1.0.0": "Initial release."}


def _caption_features(encoding_format: str | None) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image_id": tfds.features.Text(),
            # encoding_format=None: bytes are stored as given (JPEG stays JPEG).
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }
    )


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encoded_rgb_image(path: str | os.PathLike) -> bytes:
    """The file's bytes if it is an RGB JPEG/PNG; otherwise re-encoded as RGB.

    TFDS decodes `Image(shape=(None, None, 3))` features assuming 3 channels, and a few
    real datasets (COCO has ~250) contain grayscale or CMYK JPEGs. Opening with PIL only
    reads the header, so checking costs little; only odd images are re-encoded.
    """
    data = epath.Path(path).read_bytes()
    raise_pil_pixel_limit()
    with Image.open(io.BytesIO(data)) as image:
        if image.format in ("JPEG", "PNG") and image.mode == "RGB":
            return data
        rgb = image.convert("RGB")
        fmt = "PNG" if image.format == "PNG" else "JPEG"
    buffer = io.BytesIO()
    rgb.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _info(
    builder: tfds.core.DatasetBuilder,
    description: str,
    encoding: str | None,
    homepage: str | None = None,
    citation: str | None = None,
) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, not `dataset_info_from_configs`: that one reads metadata
    # files (README, CITATIONS.bib) from the builder's package folder.
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=_caption_features(encoding),
        homepage=homepage,
        citation=citation,
        # Keep generation order: record i of a synthetic split is make_example(split, i).
        # Shuffling is grain's job at training time.
        disable_shuffling=True,
    )


class _CaptionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common base: pins `code_path` (see below); subclasses add data specifics."""

    # TFDS derives `code_path` from the package with a check that imports the optional
    # `importlib_resources` package, which fails (ModuleNotFoundError) for any builder
    # defined inside a package when that module is absent. Our code path is this file.
    code_path = epath.Path(__file__)

    # Each builder's default config (the first of its BUILDER_CONFIGS); our name, read by
    # build_dataset and find_dataset_dir. `builder_config` is always one of BUILDER_CONFIGS.
    DEFAULT_CONFIG_NAME: ClassVar[str]


# ----------------------------------------------------------------------------------
# synthetic_captions
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SyntheticCaptionsConfig(tfds.core.BuilderConfig):
    """Split sizes and resolution of a synthetic_captions build.

    (Not frozen: TFDS's BuilderConfig base dataclass is mutable, and a frozen dataclass
    cannot inherit from a mutable one. Treat it as read-only.)
    """

    num_train: int = 20000
    num_validation: int = 500
    num_test: int = 500
    image_size: int = synthetic.DEFAULT_IMAGE_SIZE


class SyntheticCaptions(_CaptionBuilder, skip_registration=True):
    """Coloured shapes with five template captions each (see `synthetic.py`)."""

    name = "synthetic_captions"
    VERSION = _VERSION
    RELEASE_NOTES = _RELEASE_NOTES
    BUILDER_CONFIGS = [
        SyntheticCaptionsConfig(name="default", description="20000/500/500 at 64x64."),
        SyntheticCaptionsConfig(
            name="tiny",
            num_train=64,
            num_validation=16,
            num_test=16,
            description="64/16/16 at 64x64, for smoke tests.",
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(
            self,
            "Synthetic scenes of 1-4 coloured shapes on plain/striped/dotted "
            f"backgrounds, 5 captions each (generator {synthetic.GENERATOR_VERSION}).",
            encoding="png",  # lossless: stored pixels equal make_example's exactly
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = cast(SyntheticCaptionsConfig, self.builder_config)
        sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, num_examples: int):
        size = cast(SyntheticCaptionsConfig, self.builder_config).image_size
        for index in range(num_examples):
            image, captions, _ = synthetic.make_example(split, index, size)
            yield (
                index,
                {
                    "image_id": f"{split}_{index:06d}",
                    "image": _png_bytes(image),
                    "captions": captions,
                },
            )


# ----------------------------------------------------------------------------------
# local_captions
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LocalCaptionsConfig(tfds.core.BuilderConfig):
    """Where the local data lives.

    annotations: split name -> annotation file. A file may be
      - JSONL, one object per line: {"image": path, "captions": [...]} or
        {"image": path, "caption": "..."} (several lines per image are grouped);
      - JSON: a list of such objects, or a COCO-style {"images": [...],
        "annotations": [...]} file.
      Optional keys: "image_id" (default: the image path), "split" (overrides the
      file's split). "file_name" is accepted for "image".
    image_dir: image paths are relative to this folder (default: the folder of the
      annotation file). Absolute paths are used as they are.
    """

    image_dir: str = ""
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)


def _caption_list(record: Mapping[str, Any]) -> list[str]:
    if "captions" in record:
        value = record["captions"]
    elif "caption" in record:
        value = record["caption"]
    else:
        raise KeyError(f"annotation without 'caption(s)': {record!r}")
    captions = [value] if isinstance(value, str) else list(value)
    return [str(c).strip() for c in captions]


def _coco_style_records(data: Mapping[str, Any]) -> list[dict]:
    """COCO captions json -> [{"image", "image_id", "captions"}], sorted by image id."""
    captions: dict[Any, list[tuple[int, str]]] = collections.defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append((ann.get("id", 0), ann["caption"]))
    records = []
    for image in sorted(data["images"], key=lambda im: im["id"]):
        if image["id"] not in captions:
            continue  # images without captions (none in COCO train/val) are skipped
        caps = [c.strip() for _, c in sorted(captions[image["id"]], key=lambda x: x[0])]
        records.append({"image": image["file_name"], "image_id": str(image["id"]), "captions": caps})
    return records


def read_annotation_file(path: str | os.PathLike) -> list[dict]:
    """Reads one annotation file into a list of raw records (see LocalCaptionsConfig)."""
    path = epath.Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _coco_style_records(data)
    if isinstance(data, list):
        return data
    raise ValueError(f"{path}: expected a JSON list, JSONL or COCO-style captions json")


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """One image with all its captions, ready to be written."""

    path: str
    image_id: str
    captions: tuple[str, ...]


def group_records(records: Sequence[Mapping[str, Any]], image_dir: str) -> list[CaptionedImage]:
    """Groups records by image (first-appearance order), resolving paths."""
    captions: dict[str, list[str]] = {}
    ids: dict[str, str] = {}
    for record in records:
        rel = record.get("image", record.get("file_name"))
        if rel is None:
            raise KeyError(f"annotation without 'image': {record!r}")
        path = rel if os.path.isabs(rel) else os.path.join(image_dir, rel)
        captions.setdefault(path, []).extend(_caption_list(record))
        ids.setdefault(path, str(record.get("image_id", rel)))
    return [CaptionedImage(p, ids[p], tuple(c)) for p, c in captions.items()]


def _generate_captioned(items: Sequence[CaptionedImage]):
    for item in items:
        if not os.path.exists(item.path):
            raise FileNotFoundError(f"image listed in the annotations is missing: {item.path}")
        # Key by path: unique within a split even if two files share an image_id.
        yield (
            item.path,
            {
                "image_id": item.image_id,
                "image": encoded_rgb_image(item.path),
                "captions": list(item.captions),
            },
        )


class LocalCaptions(_CaptionBuilder, skip_registration=True):
    """Your own images + captions (see LocalCaptionsConfig for the file formats)."""

    name = "local_captions"
    VERSION = _VERSION
    RELEASE_NOTES = _RELEASE_NOTES
    # Configs are made by the user (build_dataset); this one only names the default.
    BUILDER_CONFIGS = [LocalCaptionsConfig(name="default")]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self, "Local images with caption annotations.", encoding=None)

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = cast(LocalCaptionsConfig, self.builder_config)
        if not cfg.annotations:
            raise ValueError("local_captions needs annotations={split: file} (see build_dataset)")
        by_split: dict[str, list[dict]] = collections.defaultdict(list)
        for split, ann_path in cfg.annotations.items():
            image_dir = cfg.image_dir or os.path.dirname(os.path.abspath(ann_path))
            for record in read_annotation_file(ann_path):
                rel = record.get("image", record.get("file_name"))
                if rel is None:
                    raise KeyError(f"{ann_path}: annotation without 'image': {record!r}")
                # Resolve paths per file now, so that one split can gather records from
                # several files and still group all captions of an image together.
                by_split[record.get("split", split)].append(
                    {**record, "image": os.path.join(image_dir, rel), "image_id": record.get("image_id", rel)}
                )
        return {split: _generate_captioned(group_records(records, image_dir="")) for split, records in by_split.items()}

    def _generate_examples(self, items):  # required by the base class
        yield from _generate_captioned(items)


# ----------------------------------------------------------------------------------
# coco_captions
# ----------------------------------------------------------------------------------


_COCO_INSTRUCTIONS = """\
Put the MS-COCO files you have into one folder and pass it as `manual_dir`:

  MANUAL_DIR/annotations/captions_train2017.json, captions_val2017.json   (config 2017)
  MANUAL_DIR/train2017/*.jpg, MANUAL_DIR/val2017/*.jpg
  MANUAL_DIR/annotations/captions_train2014.json, captions_val2014.json   (config 2014)
  MANUAL_DIR/train2014/*.jpg, MANUAL_DIR/val2014/*.jpg
  MANUAL_DIR/dataset_coco.json (Karpathy split) + train2014/, val2014/   (config karpathy)

Nothing is downloaded. Splits: 2014/2017 -> train, validation;
karpathy -> train (train + restval), validation, test.
"""


@dataclasses.dataclass(eq=False)
class CocoCaptionsConfig(tfds.core.BuilderConfig):
    """Which COCO release; `year` is "2014" or "2017", or "karpathy" for that split."""

    year: str = "2017"


def _karpathy_items(manual_dir: epath.Path) -> dict[str, list[CaptionedImage]]:
    candidates = [manual_dir / "dataset_coco.json", manual_dir / "annotations" / "dataset_coco.json"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise FileNotFoundError(f"dataset_coco.json not found in {manual_dir}.\n{_COCO_INSTRUCTIONS}")
    data = json.loads(path.read_text())
    split_map = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
    items: dict[str, list[CaptionedImage]] = collections.defaultdict(list)
    for image in data["images"]:
        image_path = os.fspath(manual_dir / image.get("filepath", "") / image["filename"])
        captions = tuple(s["raw"].strip() for s in image["sentences"])
        image_id = str(image.get("cocoid", image.get("imgid", image["filename"])))
        items[split_map[image["split"]]].append(CaptionedImage(image_path, image_id, captions))
    return items


def _coco_year_items(manual_dir: epath.Path, year: str) -> dict[str, list[CaptionedImage]]:
    items = {}
    for split, part in (("train", "train"), ("validation", "val")):
        ann = manual_dir / "annotations" / f"captions_{part}{year}.json"
        if not ann.exists():
            raise FileNotFoundError(f"{ann} not found.\n{_COCO_INSTRUCTIONS}")
        records = _coco_style_records(json.loads(ann.read_text()))
        items[split] = group_records(records, os.fspath(manual_dir / f"{part}{year}"))
    return items


class CocoCaptions(_CaptionBuilder, skip_registration=True):
    """MS-COCO captions from files on disk (see MANUAL_DOWNLOAD_INSTRUCTIONS)."""

    name = "coco_captions"
    VERSION = _VERSION
    RELEASE_NOTES = _RELEASE_NOTES
    MANUAL_DOWNLOAD_INSTRUCTIONS = _COCO_INSTRUCTIONS
    BUILDER_CONFIGS = [
        CocoCaptionsConfig(name="2017", year="2017", description="COCO 2017 train/val."),
        CocoCaptionsConfig(name="2014", year="2014", description="COCO 2014 train/val."),
        CocoCaptionsConfig(
            name="karpathy",
            year="karpathy",
            description="COCO 2014 images, Karpathy & Fei-Fei splits (train includes restval).",
        ),
    ]
    DEFAULT_CONFIG_NAME = "2017"

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(
            self,
            "MS-COCO images with their 5+ reference captions.",
            encoding=None,  # the original JPEG bytes are kept
            homepage="https://cocodataset.org",
        )

    def _split_generators(self, dl_manager):
        manual_dir = epath.Path(dl_manager.manual_dir)
        year = cast(CocoCaptionsConfig, self.builder_config).year
        items = _karpathy_items(manual_dir) if year == "karpathy" else _coco_year_items(manual_dir, year)
        return {split: _generate_captioned(split_items) for split, split_items in items.items()}

    def _generate_examples(self, items):  # required by the base class
        yield from _generate_captioned(items)


BUILDERS: dict[str, type[_CaptionBuilder]] = {
    "synthetic_captions": SyntheticCaptions,
    "local_captions": LocalCaptions,
    "coco_captions": CocoCaptions,
}


# ----------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------


def default_data_dir() -> str:
    """TFDS's default ($TFDS_DATA_DIR, else ~/tensorflow_datasets)."""
    return os.fspath(tfds_constants.DATA_DIR)


_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def parse_dataset_name(name: str) -> tuple[str, str | None, str | None]:
    """ "name[/config][:version]" -> (name, config or None, version or None)."""
    version = None
    if ":" in name:
        name, version = name.split(":", 1)
        if not _VERSION_RE.match(version):
            raise ValueError(f"bad version {version!r} in dataset name")
    base, _, config = name.partition("/")
    return base, (config or None), version


def build_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    manual_dir: str | None = None,
    overwrite: bool = False,
    **config_kwargs: Any,
) -> tfds.core.DatasetBuilder:
    """Generates dataset `name[/config]` as array_record under `data_dir`; returns the builder.

    config_kwargs fill in a config:
      synthetic_captions: num_train, num_validation, num_test, image_size (a config with
        custom sizes is named after them unless a config name is given);
      local_captions: image_dir, annotations ({split: file}, or one file -> "train");
      coco_captions: none (configs 2017, 2014, karpathy); needs `manual_dir`.
    Existing data is reused unless `overwrite`.
    """
    base, config_name, _ = parse_dataset_name(name)
    if base not in BUILDERS:
        raise ValueError(f"unknown dataset {base!r}; ours are {sorted(BUILDERS)}")
    cls = BUILDERS[base]
    config: tfds.core.BuilderConfig | str = config_name or cls.DEFAULT_CONFIG_NAME
    if base == "synthetic_captions" and config_kwargs:
        presets = {c.name: c for c in cls.BUILDER_CONFIGS}
        start = presets.get(config_name or cls.DEFAULT_CONFIG_NAME) or presets[cls.DEFAULT_CONFIG_NAME]
        keys = ("num_train", "num_validation", "num_test", "image_size")
        fields = {k: config_kwargs.pop(k, getattr(start, k)) for k in keys}
        changed = any(getattr(start, k) != v for k, v in fields.items())
        if config_name is None or (config_name in presets and changed):
            # Name custom sizes after themselves: never write them under a preset's name.
            config_name = "n{num_train}-{num_validation}-{num_test}-s{image_size}".format(**fields)
        config = SyntheticCaptionsConfig(name=config_name, **fields)
    elif base == "local_captions":
        annotations = config_kwargs.pop("annotations", None)
        if isinstance(annotations, (str, os.PathLike)):
            annotations = {"train": os.fspath(annotations)}
        config = LocalCaptionsConfig(
            name=config_name or "default",
            image_dir=os.fspath(config_kwargs.pop("image_dir", "")),
            annotations={k: os.fspath(v) for k, v in (annotations or {}).items()},
        )
    if config_kwargs:
        raise TypeError(f"unexpected arguments for {base}: {sorted(config_kwargs)}")

    builder = cls(data_dir=data_dir or default_data_dir(), config=config, file_format="array_record")
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    download_config = tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        download_mode=mode,
        try_download_gcs=False,  # never reach for the network
    )
    builder.download_and_prepare(download_config=download_config)
    return builder


# ----------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------


def _latest_version_dir(folder: epath.Path) -> epath.Path | None:
    if not folder.is_dir():
        return None
    versions = [p for p in folder.iterdir() if _VERSION_RE.match(p.name) and (p / "dataset_info.json").exists()]
    if not versions:
        return None
    return max(versions, key=lambda p: tuple(int(x) for x in p.name.split(".")))


def find_dataset_dir(name: str, data_dir: str | None = None) -> epath.Path:
    """The generated folder of `name[/config][:version]` (latest version by default).

    Resolved by path, with no TFDS registry lookup: TFDS ships its own (different)
    `coco_captions` builder, and our builders are not registered. (In TFDS 4.9.10
    `tfds.data_source(name, data_dir=...)` also finds generated files first, but that
    order is an implementation detail we do not rely on.)
    """
    base, config, version = parse_dataset_name(name)
    root = epath.Path(data_dir or default_data_dir()) / base
    if config is None and base in BUILDERS:
        config = BUILDERS[base].DEFAULT_CONFIG_NAME
    folder = root / config if config else root
    if version:
        found = folder / version if (folder / version / "dataset_info.json").exists() else None
    else:
        found = _latest_version_dir(folder)
        if found is None and config is None and root.is_dir():
            # A foreign dataset with configs: accept it if there is only one.
            configs = [p for p in root.iterdir() if _latest_version_dir(p) is not None]
            if len(configs) == 1:
                found = _latest_version_dir(configs[0])
    if found is None:
        raise FileNotFoundError(
            f"dataset {name!r} is not generated under {root.parent} "
            f"(build it with fastvlm_jax.data.tfds_builders.build_dataset)"
        )
    return found


class CaptionSource:
    """Random access to one split: `len(src)`, `src[i]` -> dict (a grain data source).

    Each record is {"image_id": str, "image": PIL RGB image (decode=True: the image bytes
    are decoded here) or the encoded bytes (decode=False), "captions": list[str]}. TFDS's own image decoding is skipped:
    it would return a numpy array via PIL anyway, and the bytes are useful as they are.
    Picklable (reopens the files), so grain worker processes can use it.
    """

    def __init__(self, dataset_dir: str | os.PathLike, split: str, decode: bool = True):
        self.dataset_dir = os.fspath(dataset_dir)
        self.split = split
        self.decode = decode
        self._open()

    def _open(self) -> None:
        builder = tfds.builder_from_directory(self.dataset_dir)
        self.info = builder.info
        self._source = builder.as_data_source(
            split=self.split,  # pyright: ignore[reportCallIssue] tfds's logging decorator hides this parameter
            decoders={"image": tfds.decode.SkipDecoding()},
        )

    def __getstate__(self) -> dict:
        return {"dataset_dir": self.dataset_dir, "split": self.split, "decode": self.decode}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._source)

    def _convert(self, raw: Mapping[str, Any]) -> dict:
        image = raw["image"]
        if self.decode:
            raise_pil_pixel_limit()
            with Image.open(io.BytesIO(image)) as im:
                image = im.convert("RGB")
        return {
            "image_id": _to_str(raw["image_id"]),
            "image": image,
            "captions": [_to_str(c) for c in raw["captions"]],
        }

    def __getitem__(self, index: int) -> dict:
        return self._convert(self._source[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self._convert(r) for r in self._source.__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        # Stable across processes: grain compares repr(source) when restoring state.
        return f"CaptionSource(dataset_dir={self.dataset_dir!r}, split={self.split!r}, decode={self.decode})"


def _to_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def open_split(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    decode: bool = True,
    build_if_missing: bool = False,
) -> CaptionSource:
    """Random-access source for `split` (TFDS slicing works: "test[:100]").

    decode: decode each record's image bytes into a PIL RGB image (False: keep the encoded
    bytes, for a loader that decodes them itself, e.g. `load_image` in worker threads).
    build_if_missing: generate `name` first if it is not on disk (only for
    synthetic_captions, which needs no inputs).
    """
    try:
        dataset_dir = find_dataset_dir(name, data_dir)
    except FileNotFoundError:
        if not (build_if_missing and parse_dataset_name(name)[0] == "synthetic_captions"):
            raise
        dataset_dir = epath.Path(build_dataset(name, data_dir).data_dir)
    return CaptionSource(dataset_dir, split, decode=decode)


def parse_tfds_spec(spec: str, default_split: str = "test") -> tuple[str, str]:
    """ "tfds:NAME[/CONFIG][:SPLIT]" -> (name, split); the "tfds:" prefix is optional.

    A version may be given as NAME[/CONFIG]:X.Y.Z[:SPLIT]. SPLIT may use TFDS slicing
    ("test[:64]").
    """
    rest = spec[len("tfds:") :] if spec.startswith("tfds:") else spec
    # Split only at the first colon (and a version's): slices contain colons too.
    name, _, split = rest.partition(":")
    version = re.match(r"^(\d+\.\d+\.\d+)(?::|$)", split)
    if version:
        name = f"{name}:{version.group(1)}"
        split = split[version.end() :]
    if not name or "[" in name:
        raise ValueError(f"bad tfds spec {spec!r}; expected tfds:NAME[/CONFIG][:SPLIT]")
    return name, split or default_split


def is_tfds_spec(spec: str) -> bool:
    return spec.startswith("tfds:")


def iter_tfds_images(
    spec: str,
    data_dir: str | None = None,
    *,
    decode: bool = True,
    build_if_missing: bool = True,
) -> Iterator[tuple[str, Image.Image | bytes, list[str]]]:
    """Yields (image_id, PIL image or encoded bytes, captions) of a `tfds:` spec, in order."""
    name, split = parse_tfds_spec(spec)
    source = open_split(name, split, data_dir, decode=decode, build_if_missing=build_if_missing)
    for index in range(len(source)):
        record = source[index]
        yield record["image_id"], record["image"], record["captions"]
