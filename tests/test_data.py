"""Tests of the caption data: synthetic generator, TFDS builders (no TensorFlow).

All datasets here are tiny and written to tmp_path; the whole file runs in seconds.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from fastvlm_jax.data import synthetic
from fastvlm_jax.data import tfds_builders as tb

# ----------------------------------------------------------------------------------
# synthetic.py
# ----------------------------------------------------------------------------------


def test_make_example_is_deterministic():
    a_img, a_caps, a_scene = synthetic.make_example("train", 123)
    b_img, b_caps, b_scene = synthetic.make_example("train", 123)
    assert a_img.size == (64, 64) and a_img.mode == "RGB"
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert a_caps == b_caps and a_scene == b_scene
    c_img, c_caps, _ = synthetic.make_example("train", 124)
    assert not np.array_equal(np.asarray(a_img), np.asarray(c_img)) or a_caps != c_caps
    # Other resolutions draw the same scene.
    big, big_caps, big_scene = synthetic.make_example("train", 123, image_size=96)
    assert big.size == (96, 96) and big_caps == a_caps and big_scene == a_scene


def test_splits_are_disjoint_scenes():
    keys = {split: {synthetic.make_scene(split, i).key() for i in range(300)} for split in synthetic.SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    with pytest.raises(ValueError):
        synthetic.make_scene("dev", 0)


def _near(rgb, target, tol=40):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(rgb, target))


def test_captions_describe_the_scene():
    vocab = set(synthetic.vocabulary())
    for index in range(60):
        scene = synthetic.make_scene("validation", index)
        image = np.asarray(synthetic.render_scene(scene, 64))
        captions = synthetic.scene_captions(scene)
        assert len(captions) == synthetic.NUM_CAPTIONS == len(set(captions))
        for caption in captions:
            words = caption.replace(".", " ").replace(",", " ").split()
            assert set(words) <= vocab, set(words) - vocab
            assert scene.background in words
            # Every object's colour and shape, in reading order.
            pos = 0
            for o in scene.objects:
                pos = caption.index(f"{o.colour} {o.shape}", pos) + 1
        for o in scene.objects:
            # Sizes are in all templates except the shortest one.
            assert all(f"{o.size} {o.colour} {o.shape}" in c for i, c in enumerate(captions) if i != 3)
            assert o.position in captions[1]
            # The pixel at the object's (jittered) centre has the object's colour.
            cell = 64 / 3
            x = int((o.col + 0.5 + o.dx) * cell)
            y = int((o.row + 0.5 + o.dy) * cell)
            assert _near(image[y, x], synthetic.COLOURS[o.colour]), (index, o)
        assert f"{synthetic.COUNT_WORDS[len(scene.objects)]} object" in captions[1]
        assert scene.background not in {o.colour for o in scene.objects}


def test_caption_corpus_and_lengths():
    corpus = synthetic.caption_corpus(501)
    assert len(corpus) == 501 and corpus == synthetic.caption_corpus(501)
    assert corpus[:5] == synthetic.make_example("train", 0)[1]
    lengths = [len(c.split()) for c in corpus]
    assert min(lengths) >= 5 and max(lengths) <= 70
    assert max(lengths) >= 40  # long multi-sentence descriptions are there
    words = {w.strip(".,") for c in corpus for w in c.split()}
    assert len(words) <= len(synthetic.vocabulary()) <= 80


def test_write_example_images(tmp_path):
    paths = synthetic.write_example_images(str(tmp_path), n=3)
    assert [os.path.basename(p) for p in paths] == [f"test_{i:04d}.png" for i in range(3)]
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert lines[1]["captions"] == synthetic.make_example("test", 1)[1]
    with Image.open(paths[2]) as im:
        assert np.array_equal(np.asarray(im), np.asarray(synthetic.make_example("test", 2)[0]))


# ----------------------------------------------------------------------------------
# TFDS builders (array_record + data_source, no TensorFlow)
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = tb.build_dataset("synthetic_captions", data_dir, num_train=16, num_validation=8, num_test=8)
    return data_dir, builder


def test_synthetic_builder_writes_array_record_and_reads_back(synth_dir):
    data_dir, builder = synth_dir
    name = f"synthetic_captions/{builder.builder_config.name}"
    assert builder.builder_config.name == "n16-8-8-s64"
    files = sorted(os.listdir(builder.data_dir))
    assert any(f.startswith("synthetic_captions-train.array_record") for f in files)
    assert not any("tfrecord" in f for f in files)

    train = tb.open_split(name, "train", data_dir)
    assert len(train) == 16
    for index in (0, 7, 15):
        record = train[index]
        image, captions, _ = synthetic.make_example("train", index)
        assert record["image_id"] == f"train_{index:06d}"
        assert record["captions"] == captions and all(isinstance(c, str) for c in captions)
        assert np.array_equal(np.asarray(record["image"]), np.asarray(image))  # PNG: lossless

    raw = tb.open_split(name, "test", data_dir, decode=False)
    assert len(raw) == 8 and raw[0]["image"][:8] == b"\x89PNG\r\n\x1a\n"
    assert len(tb.open_split(name, "validation[:3]", data_dir)) == 3
    # Reading needed no TensorFlow (and TFDS did not pull it in).
    assert "tensorflow" not in sys.modules

    items = list(tb.iter_tfds_images(f"tfds:{name}:test[2:4]", data_dir))
    assert [i for i, _, _ in items] == ["test_000002", "test_000003"]
    assert isinstance(items[0][1], Image.Image) and items[0][2] == synthetic.make_example("test", 2)[1]

    # Building again reuses the data.
    again = tb.build_dataset(name, data_dir, num_train=16, num_validation=8, num_test=8)
    assert again.data_dir == builder.data_dir


def test_missing_dataset_is_reported_or_built(tmp_path):
    with pytest.raises(FileNotFoundError):
        tb.open_split("local_captions", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        tb.open_split("synthetic_captions/tiny", "test", str(tmp_path))
    # A tfds: spec of synthetic data builds it on first use (no inputs needed).
    items = list(tb.iter_tfds_images("tfds:synthetic_captions/tiny:test[:2]", str(tmp_path), decode=False))
    assert [i for i, _, _ in items] == ["test_000000", "test_000001"]
    assert len(tb.open_split("synthetic_captions/tiny", "train", str(tmp_path))) == 64


def test_parse_tfds_spec():
    assert tb.parse_tfds_spec("tfds:synthetic_captions") == ("synthetic_captions", "test")
    assert tb.parse_tfds_spec("tfds:synthetic_captions/tiny:train") == ("synthetic_captions/tiny", "train")
    assert tb.parse_tfds_spec("tfds:coco_captions/karpathy:test[:100]") == ("coco_captions/karpathy", "test[:100]")
    assert tb.parse_tfds_spec("tfds:x/y:1.0.0:validation") == ("x/y:1.0.0", "validation")
    assert tb.parse_dataset_name("x/y:1.0.0") == ("x", "y", "1.0.0")
    assert tb.is_tfds_spec("tfds:x") and not tb.is_tfds_spec("images/")


def _save(path, mode, colour, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (10, 8), colour).save(path, format=fmt)


def test_local_captions_builder(tmp_path):
    images = tmp_path / "pics"
    _save(images / "a.jpg", "RGB", (200, 10, 10), "JPEG")
    _save(images / "sub" / "b.png", "L", 128, "PNG")  # grayscale: stored as RGB
    _save(images / "c.png", "RGBA", (0, 0, 255, 255), "PNG")
    (tmp_path / "train.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"image": "a.jpg", "caption": "a red picture."},
                {"image": "sub/b.png", "captions": ["grey one.", "grey two."]},
                {"image": "a.jpg", "caption": "  all red.  "},
                {"image": "c.png", "caption": "blue.", "split": "test", "image_id": "c-id"},
            ]
        )
    )
    (tmp_path / "val.json").write_text(json.dumps([{"image": "sub/b.png", "captions": ["grey."]}]))
    data_dir = str(tmp_path / "tfds")
    tb.build_dataset(
        "local_captions/mine",
        data_dir,
        image_dir=str(images),
        annotations={"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.json")},
    )
    train = tb.open_split("local_captions/mine", "train", data_dir)
    records = [train[i] for i in range(len(train))]
    assert [r["image_id"] for r in records] == ["a.jpg", "sub/b.png"]
    assert records[0]["captions"] == ["a red picture.", "all red."]
    assert records[1]["captions"] == ["grey one.", "grey two."]
    assert records[1]["image"].mode == "RGB" and records[1]["image"].size == (10, 8)
    assert np.asarray(records[1]["image"])[0, 0].tolist() == [128, 128, 128]
    # The original JPEG bytes are kept as they are.
    raw = tb.open_split("local_captions/mine", "train", data_dir, decode=False)
    assert raw[0]["image"] == (images / "a.jpg").read_bytes()
    test = tb.open_split("local_captions/mine", "test", data_dir)
    assert len(test) == 1 and test[0]["image_id"] == "c-id" and test[0]["captions"] == ["blue."]
    assert len(tb.open_split("local_captions/mine", "validation", data_dir)) == 1


def _fake_coco(root):
    """A tiny COCO layout: 2017 caption files + images, and a Karpathy json for 2014."""
    for part, ids in (("train", [9, 3, 5]), ("val", [7])):
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
        anns = []
        for i in ids:
            for k in range(5 + (i == 3)):  # one image with 6 captions
                anns.append({"id": 100 * i + (5 - k), "image_id": i, "caption": f"photo {i} caption {k} "})
            _save(root / f"{part}2017" / f"{i:012d}.jpg", "L" if i == 5 else "RGB", 90, "JPEG")
        ann_dir = root / "annotations"
        ann_dir.mkdir(parents=True, exist_ok=True)
        (ann_dir / f"captions_{part}2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    karpathy = []
    for n, split in enumerate(["train", "restval", "val", "test", "test"]):
        folder = "val2014" if split != "train" else "train2014"
        name = f"COCO_{folder}_{n:012d}.jpg"
        _save(root / folder / name, "RGB", (n * 40, 0, 0), "JPEG")
        karpathy.append(
            {
                "filepath": folder,
                "filename": name,
                "cocoid": 1000 + n,
                "split": split,
                "sentences": [{"raw": f"karpathy {n} {j}", "tokens": []} for j in range(5)],
            }
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))


def test_coco_captions_builder(tmp_path):
    manual = tmp_path / "coco"
    _fake_coco(manual)
    data_dir = str(tmp_path / "tfds")
    tb.build_dataset("coco_captions/2017", data_dir, manual_dir=str(manual))
    train = tb.open_split("coco_captions", "train", data_dir)  # 2017 is the default config
    assert [train[i]["image_id"] for i in range(len(train))] == ["3", "5", "9"]  # sorted by id
    assert len(train[0]["captions"]) == 6
    assert train[0]["captions"][0] == "photo 3 caption 5"  # ordered by annotation id, stripped
    assert train[1]["image"].mode == "RGB"  # the grayscale JPEG was converted
    assert len(tb.open_split("coco_captions/2017", "validation", data_dir)) == 1

    tb.build_dataset("coco_captions/karpathy", data_dir, manual_dir=str(manual))
    sizes = {s: len(tb.open_split("coco_captions/karpathy", s, data_dir)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 2, "validation": 1, "test": 2}
    test = tb.open_split("coco_captions/karpathy", "test", data_dir)
    assert test[1]["image_id"] == "1004" and test[1]["captions"][4] == "karpathy 4 4"

    with pytest.raises(FileNotFoundError, match="captions_train2014.json"):
        tb.build_dataset("coco_captions/2014", data_dir, manual_dir=str(manual))


def test_encoded_rgb_image_passthrough_and_conversion(tmp_path):
    _save(tmp_path / "rgb.jpg", "RGB", (1, 2, 3), "JPEG")
    _save(tmp_path / "gray.jpg", "L", 7, "JPEG")
    assert tb.encoded_rgb_image(tmp_path / "rgb.jpg") == (tmp_path / "rgb.jpg").read_bytes()
    converted = tb.encoded_rgb_image(tmp_path / "gray.jpg")
    with Image.open(io.BytesIO(converted)) as im:
        assert im.mode == "RGB" and im.format == "JPEG"
