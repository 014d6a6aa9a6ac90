import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gdistill.data.sources import (
    open_unlabelled,
    unlabelled_from_coco,
    unlabelled_from_folder,
)
from gdistill.errors import GdistillError


def save_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(path)


def make_coco(tmp_path: Path, with_files: bool = True) -> Path:
    images = [
        {"id": 7, "file_name": "b.png", "height": 2, "width": 2},
        {"id": 3, "file_name": "sub/a.png", "height": 2, "width": 2},
    ]
    # The annotation is invalid on purpose: unlabelled sources must not read annotations.
    data = {"images": images, "annotations": [{"id": 1, "image_id": 99, "category_id": 5}]}
    path = tmp_path / "unlab.json"
    path.write_text(json.dumps(data))
    if with_files:
        for img in images:
            save_image(tmp_path / "imgs" / img["file_name"])
    return path


def test_from_coco_keeps_json_order_and_ignores_annotations(tmp_path):
    images = unlabelled_from_coco(make_coco(tmp_path), tmp_path / "imgs")
    assert [(u.key, u.image_id) for u in images] == [("b.png", 7), ("sub/a.png", 3)]
    assert images[1].path == tmp_path / "imgs" / "sub" / "a.png"


def test_from_coco_missing_image_file(tmp_path):
    path = make_coco(tmp_path, with_files=False)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(GdistillError, match=r"unlab.json: image 7 file not found: .*b.png"):
        unlabelled_from_coco(path, tmp_path / "imgs")
    assert len(unlabelled_from_coco(path, tmp_path / "imgs", check_files=False)) == 2


def test_from_coco_missing_images_dir(tmp_path):
    with pytest.raises(GdistillError, match="nodir: images directory not found"):
        unlabelled_from_coco(make_coco(tmp_path), tmp_path / "nodir")


def test_from_coco_needs_images_key(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "x.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(GdistillError, match="x.json: missing top-level key 'images'"):
        unlabelled_from_coco(tmp_path / "x.json", tmp_path / "imgs")


def test_folder_recursive_sorted_filtered(tmp_path):
    root = tmp_path / "pool"
    for name in ["z.png", "a.JPG", "m/b.jpeg", "m/n/c.webp", "d.bmp", "e.tif", "f.tiff"]:
        save_image(root / name)
    (root / "notes.txt").write_text("x")
    save_image(root / ".hidden.png")
    save_image(root / ".cache" / "g.png")
    images = unlabelled_from_folder(root)
    keys = [u.key for u in images]
    assert keys == ["a.JPG", "d.bmp", "e.tif", "f.tiff", "m/b.jpeg", "m/n/c.webp", "z.png"]
    assert all(u.image_id is None for u in images)
    assert images[4].path == root / "m" / "b.jpeg"
    assert [u.key for u in unlabelled_from_folder(root)] == keys


def test_folder_reads_gif_and_netpbm_and_names_the_picture_types_it_leaves_out(tmp_path):
    root = tmp_path / "pool"
    for name in ["a.gif", "b.ppm", "c.pgm", "d.JFIF", "e.tga", "f.ico"]:
        save_image(root / name)
    (root / "scan.pdf").write_text("x")  # a document, not a photo: no word about it
    (root / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")  # a phone's photo: Pillow cannot read it
    (root / "raw").mkdir()
    (root / "raw" / "DSC_2.nef").write_bytes(b"II*\0")
    with pytest.warns(UserWarning, match=r"pool: 4 image files of other types \(.heic, .ico, .nef, .tga\) "
                      r"left out"):
        images = unlabelled_from_folder(root)
    assert [u.key for u in images] == ["a.gif", "b.ppm", "c.pgm", "d.JFIF"]


def test_folder_follows_linked_folders_once(tmp_path):
    save_image(tmp_path / "elsewhere" / "b.png")
    root = tmp_path / "pool"
    save_image(root / "a.png")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "loop").symlink_to(root)  # a link back up must not recurse forever
    assert [u.key for u in unlabelled_from_folder(root)] == ["a.png", "linked/b.png"]


def test_folder_empty(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(GdistillError, match="empty: no images found"):
        unlabelled_from_folder(tmp_path / "empty")


def test_folder_empty_files_and_broken_links_fail_upfront(tmp_path):
    root = tmp_path / "pool"
    save_image(root / "a.png")
    (root / "b.jpg").write_bytes(b"")
    with pytest.raises(GdistillError, match=r"pool/b.jpg: empty image file \(0 bytes\)$"):
        unlabelled_from_folder(root)
    (root / "b.jpg").unlink()
    (root / "c.jpg").symlink_to(root / "gone.jpg")
    with pytest.raises(GdistillError, match="pool/c.jpg: broken link"):
        unlabelled_from_folder(root)


def test_non_images_fail_upfront_in_both_sources(tmp_path):
    root = tmp_path / "pool"
    save_image(root / "a.png")
    (root / "sub").mkdir()
    (root / "sub" / "b.jpg").write_text("an HTML error page saved as .jpg")
    with pytest.raises(GdistillError, match=r"pool/sub/b.jpg: cannot read image"):
        unlabelled_from_folder(root)
    path = make_coco(tmp_path)
    (tmp_path / "imgs" / "sub" / "a.png").write_text("not a picture")
    with pytest.raises(GdistillError, match=r"imgs/sub/a.png: cannot read image"):
        unlabelled_from_coco(path, tmp_path / "imgs")


def test_from_coco_empty_image_file(tmp_path):
    path = make_coco(tmp_path)
    (tmp_path / "imgs" / "b.png").write_bytes(b"")
    with pytest.raises(GdistillError, match=r"unlab.json: image 7 file is empty \(0 bytes\): .*b.png"):
        unlabelled_from_coco(path, tmp_path / "imgs")


def test_folder_missing(tmp_path):
    with pytest.raises(GdistillError, match="nope: image folder does not exist"):
        unlabelled_from_folder(tmp_path / "nope")


def test_folder_is_a_file(tmp_path):
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(GdistillError, match="f.png: not a folder"):
        unlabelled_from_folder(tmp_path / "f.png")


def test_open_unlabelled_dispatch(tmp_path):
    json_path = make_coco(tmp_path)
    assert [u.image_id for u in open_unlabelled(json_path, tmp_path / "imgs")] == [7, 3]
    assert [u.key for u in open_unlabelled(tmp_path / "imgs", None)] == ["b.png", "sub/a.png"]
    assert [u.key for u in open_unlabelled(str(tmp_path / "imgs"), tmp_path)] == [
        "b.png",
        "sub/a.png",
    ]


def test_open_unlabelled_errors(tmp_path):
    json_path = make_coco(tmp_path)
    with pytest.raises(GdistillError, match="unlab.json: a COCO JSON unlabelled source needs"):
        open_unlabelled(json_path, None)
    with pytest.raises(GdistillError, match="missing.json: unlabelled annotation file not found"):
        open_unlabelled(tmp_path / "missing.json", tmp_path)
    with pytest.raises(GdistillError, match="ghost: unlabelled source does not exist"):
        open_unlabelled(tmp_path / "ghost", None)
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(GdistillError, match="list.txt: unlabelled source must be"):
        open_unlabelled(tmp_path / "list.txt", None)
