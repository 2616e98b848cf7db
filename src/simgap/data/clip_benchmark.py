"""CLIP_benchmark's local webdataset layout for zero-shot classification benchmarks.

The layout (what ``clip_benchmark_export_wds`` writes and ``build_wds_dataset`` reads)::

    <root>/classnames.txt                            one class name per line; line index = label
    <root>/zeroshot_classification_templates.txt     one prompt per line, each with "{c}"
    <root>/<split>/nshards.txt                       the shard count n
    <root>/<split>/{0..n-1}.tar                      samples: <key>.cls (int label) + <key>.webp
                                                     (or .png / .jpg / .jpeg)

CLIP_benchmark picks the image member in the order webp, png, jpg, jpeg; so does this module.
Shards are read with :func:`simgap.data.tars.iter_samples` (unsafe members skipped and counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from simgap.data.tars import image_key, iter_samples
from simgap.data.tarwrite import write_tar

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
NSHARDS_FILE = "nshards.txt"
# CLIP_benchmark's order of preference among image members of one sample.
IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")

WdsSample = tuple[str, bytes, int]  # key, image bytes, label


def is_wds_benchmark(path: str | Path) -> bool:
    """A folder with ``classnames.txt`` and at least one ``<split>/nshards.txt``."""
    root = Path(path)
    if not root.is_dir() or not (root / CLASSNAMES_FILE).is_file():
        return False
    return any((sub / NSHARDS_FILE).is_file() for sub in root.iterdir() if sub.is_dir())


def wds_shards(root: str | Path, split: str = "test") -> list[str]:
    """The shard paths ``<root>/<split>/0.tar ... (n-1).tar`` named by ``nshards.txt``."""
    folder = Path(root) / split
    count_file = folder / NSHARDS_FILE
    if not count_file.is_file():
        raise FileNotFoundError(f"{count_file}: not found (not a CLIP_benchmark wds split)")
    text = count_file.read_text().strip()
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{count_file}: expected a shard count, found {text[:40]!r}") from None
    if n < 1:
        raise ValueError(f"{count_file}: shard count must be at least 1, found {n}")
    shards = [folder / f"{i}.tar" for i in range(n)]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]}: shard missing ({len(missing)} of {n} named by {count_file})"
        )
    return [str(p) for p in shards]


def read_wds_classnames(root: str | Path) -> list[str]:
    """Class names, one per line, stripped; label i is line i. Blank or repeated names fail."""
    path = Path(root) / CLASSNAMES_FILE
    names = [line.strip() for line in _read_lines(path)]
    if not names:
        raise ValueError(f"{path}: no class names")
    if "" in names:
        raise ValueError(f"{path}: line {names.index('') + 1} is blank (labels follow line order)")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: a class name is repeated")
    return names


def read_wds_templates(root: str | Path) -> list[str]:
    """Prompt templates, one per line, stripped, blank lines dropped; each must hold "{c}"."""
    path = Path(root) / TEMPLATES_FILE
    templates = [line.strip() for line in _read_lines(path) if line.strip()]
    if not templates:
        raise ValueError(f"{path}: no templates")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f'{path}: template without "{{c}}": {bad[0]!r}')
    return templates


def iter_wds(
    root: str | Path, split: str = "test", skipped: Counter[str] | None = None
) -> Iterator[WdsSample]:
    """(key, image bytes, label) over the split's shards in order.

    A sample without an image member or without a readable integer ``.cls`` is skipped and
    counted in ``skipped`` (``missing_image``, ``missing_label``, ``bad_label``).
    """
    skipped = skipped if skipped is not None else Counter()
    for shard in wds_shards(root, split):
        for key, members in iter_samples(shard, skipped):
            image = next((members[e] for e in IMAGE_MEMBERS if e in members), None)
            if image is None:
                skipped["missing_image"] += 1
                continue
            if "cls" not in members:
                skipped["missing_label"] += 1
                continue
            try:
                label = int(members["cls"].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                skipped["bad_label"] += 1
                continue
            yield key, image, label


def write_wds(
    root: str | Path,
    classnames: list[str],
    templates: list[str],
    samples: list[tuple[str, str, bytes, int]],
    n_shards: int = 1,
    split: str = "test",
) -> list[str]:
    """Write a benchmark in this layout from (key, image extension, image bytes, label) samples.

    Samples are dealt to shards in contiguous runs, in the order given. Returns the shard paths.
    """
    root = Path(root)
    if n_shards < 1:
        raise ValueError("n_shards must be at least 1")
    if any(ext not in IMAGE_MEMBERS for _, ext, _, _ in samples):
        raise ValueError(f"image extensions must be one of {IMAGE_MEMBERS}")
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    (root / CLASSNAMES_FILE).write_text("".join(f"{c}\n" for c in classnames))
    (root / TEMPLATES_FILE).write_text("".join(f"{t}\n" for t in templates))
    per_shard = -(-len(samples) // n_shards) if samples else 0
    paths = []
    for i in range(n_shards):
        chunk = samples[i * per_shard : (i + 1) * per_shard]
        members = [
            (key, {ext: data, "cls": str(label).encode()}) for key, ext, data, label in chunk
        ]
        write_tar(folder / f"{i}.tar", members)
        paths.append(str(folder / f"{i}.tar"))
    (folder / NSHARDS_FILE).write_text(f"{n_shards}\n")
    return paths


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    return path.read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------- benchmark layouts
#
# Besides the wds layout, the folder layouts CLIP_benchmark reads its ImageNet-family
# benchmarks from. Keys of folder layouts are file stems (as simgap.data.sources keys them).

LAYOUTS = ("folder", "wds", "imagenet", "imagenet-v2", "imagenet-r", "imagenet-a", "objectnet")
IMAGENET_DATA = Path(__file__).parent / "imagenet"
OPENAI_TEMPLATES_FILE = IMAGENET_DATA / "openai_templates.txt"
V2_FOLDER = "ImageNetV2-matched-frequency"  # what CLIP_benchmark's "imagenetv2" reads
OBJECTNET_FOLDER_MAP = "folder_to_objectnet_label.json"
OBJECTNET_TO_IMAGENET = "objectnet_to_imagenet_1k.json"
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Benchmark:
    """A zero-shot classification benchmark: its classes (= the class mask) and its samples.

    ``templates`` is the layout's own prompt set (the wds file; OpenAI's 80 ImageNet templates
    for the ImageNet family) or None for simgap's folder layout. ``items`` lists
    (key, path, label) for folder layouts; wds samples are streamed from the shards.
    """

    root: Path
    layout: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...] | None
    items: tuple[tuple[str, str, int], ...] = ()
    split: str = "test"

    def samples(self, skipped: Counter[str] | None = None) -> Iterator[WdsSample]:
        """(key, image bytes, label) in the benchmark's order; unreadable files are counted."""
        skipped = skipped if skipped is not None else Counter()
        if self.layout == "wds":
            yield from iter_wds(self.root, self.split, skipped)
            return
        for key, path, label in self.items:
            try:
                data = Path(path).read_bytes()
            except OSError:
                skipped["unreadable_file"] += 1
                continue
            yield key, data, label


def openai_imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates (CLIP paper), as "{c}" strings."""
    return OPENAI_TEMPLATES_FILE.read_text().splitlines()


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names in label order (OpenAI's names, as open_clip ships them)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_wnids(mask: str = "imagenet") -> list[str]:
    """WordNet ids in label order: all 1000 (``imagenet``) or a 200-class mask (``imagenet-r``,
    ``imagenet-a``), sorted, which is the ImageNet label order."""
    files = {"imagenet": "wnids.txt", "imagenet-r": "imagenet_r_wnids.txt"}
    files["imagenet-a"] = "imagenet_a_wnids.txt"
    return (IMAGENET_DATA / files[mask]).read_text().split()


def open_benchmark(root: str | Path, layout: str = "auto", split: str = "test") -> Benchmark:
    """Read a benchmark in any of :data:`LAYOUTS`; ``auto`` detects it (see detect_layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: benchmark folder not found")
    if layout == "auto":
        layout = detect_layout(root)
    readers = {
        "folder": _folder,
        "imagenet": _wnid_folders,
        "imagenet-r": _wnid_folders,
        "imagenet-a": _wnid_folders,
        "imagenet-v2": _imagenet_v2,
        "objectnet": _objectnet,
    }
    if layout == "wds":
        return Benchmark(
            root,
            "wds",
            tuple(read_wds_classnames(root)),
            tuple(read_wds_templates(root)),
            split=split,
        )
    if layout not in readers:
        raise ValueError(f"unknown benchmark layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    return readers[layout](root, layout)


def detect_layout(root: Path) -> str:
    """The layout of a benchmark folder, from what it holds.

    ImageNet / -R / -A (WordNet-id folders) are only recognised when the folders are exactly
    that benchmark's class set; a partial download must name its layout, because the class
    mask cannot be told from a subset of folders.
    """
    root = Path(root)
    if is_wds_benchmark(root):
        return "wds"
    if _objectnet_mappings(root) is not None:
        return "objectnet"
    if (root / "classnames.txt").is_file():
        return "folder"
    if (root / V2_FOLDER).is_dir():
        return "imagenet-v2"
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    if folders and all(f.isdigit() for f in folders):
        return "imagenet-v2"
    for mask in ("imagenet", "imagenet-r", "imagenet-a"):
        if folders == set(imagenet_wnids(mask)):
            return mask
    raise ValueError(
        f"{root}: cannot tell the benchmark layout (no classnames.txt, test/nshards.txt, "
        f"ObjectNet mappings, or a complete set of class folders); pass one of {LAYOUTS}"
    )


def _folder(root: Path, layout: str) -> Benchmark:
    """simgap's layout: classnames.txt (the benchmark's classes) + <classname>/<key>.jpg."""
    classnames = [c.strip() for c in (root / "classnames.txt").read_text().splitlines()]
    classnames = [c for c in classnames if c]
    if len(set(classnames)) != len(classnames):
        raise ValueError(f"{root}/classnames.txt repeats a class name")
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    unknown = folders - set(classnames)
    if unknown:
        raise ValueError(f"{root} has folders not in classnames.txt: {sorted(unknown)[:5]}")
    labels = {name: i for i, name in enumerate(classnames)}
    return Benchmark(root, layout, tuple(classnames), None, _items(root, labels))


def _wnid_folders(root: Path, layout: str) -> Benchmark:
    """ImageNet val / Sketch (1000 WordNet-id folders) or ImageNet-R / -A (200 of them).

    As CLIP_benchmark: the classes are the 1000 ImageNet names masked to the benchmark's
    WordNet ids, in ImageNet order. Labels come from the folder's id, never from its position
    among the folders present, so a missing class folder does not shift the others.
    """
    mask = imagenet_wnids(layout)
    position = {w: i for i, w in enumerate(imagenet_wnids("imagenet"))}
    names = imagenet_classnames()
    classnames = tuple(names[position[w]] for w in mask)
    unknown = {p.name for p in root.iterdir() if p.is_dir()} - set(mask)
    if unknown:
        raise ValueError(f"{root}: folders not in the {layout} class mask: {sorted(unknown)[:5]}")
    labels = {w: i for i, w in enumerate(mask)}
    return Benchmark(
        root, layout, classnames, tuple(openai_imagenet_templates()), _items(root, labels)
    )


def _imagenet_v2(root: Path, layout: str) -> Benchmark:
    """ImageNet-V2 matched-frequency: ``<label>/<hash>.jpeg`` with label 0..999 (the folder
    CLIP_benchmark extracts, or its parent, CLIP_benchmark's ``--dataset_root``)."""
    folder = root / V2_FOLDER if (root / V2_FOLDER).is_dir() else root
    names = imagenet_classnames()
    present = [p.name for p in folder.iterdir() if p.is_dir()]
    bad = [f for f in present if not f.isdigit() or not 0 <= int(f) < len(names)]
    if bad:
        raise ValueError(f"{folder}: ImageNet-V2 class folders must be 0..999, found {bad[:5]}")
    labels = {str(i): i for i in range(len(names))}
    return Benchmark(
        root, layout, tuple(names), tuple(openai_imagenet_templates()), _items(folder, labels)
    )


def _objectnet(root: Path, layout: str) -> Benchmark:
    """ObjectNet as CLIP_benchmark reads it: the 113 classes that map to ImageNet classes.

    ``folder_to_objectnet_label.json`` (folder -> ObjectNet name) and
    ``objectnet_to_imagenet_1k.json`` (ObjectNet name -> ImageNet names) from ObjectNet's
    ``mappings/`` (in the root, where CLIP_benchmark copies them, or in
    ``objectnet-1.0/mappings``); images in ``objectnet-1.0/images/<folder>/``. Labels index the
    sorted folder names; class names are the lower-cased ObjectNet names.
    """
    import json

    mappings = _objectnet_mappings(root)
    if mappings is None:
        raise FileNotFoundError(f"{root}: {OBJECTNET_FOLDER_MAP} not found (ObjectNet mappings)")
    folder_to_name = json.loads((mappings / OBJECTNET_FOLDER_MAP).read_text())
    to_imagenet_path = mappings / OBJECTNET_TO_IMAGENET
    if not to_imagenet_path.is_file():
        raise FileNotFoundError(f"{to_imagenet_path}: not found (ObjectNet mappings)")
    mapped = set(json.loads(to_imagenet_path.read_text()))
    name_to_folder = {name: folder for folder, name in folder_to_name.items()}
    missing = sorted(mapped - set(name_to_folder))
    if missing:
        raise ValueError(f"{mappings / OBJECTNET_FOLDER_MAP}: no folder for classes {missing[:5]}")
    folders = sorted(name_to_folder[name] for name in mapped)
    classnames = tuple(folder_to_name[f].lower() for f in folders)
    images = root / "objectnet-1.0" / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: ObjectNet image folder not found")
    labels = {f: i for i, f in enumerate(folders)}
    # Folders of the ObjectNet classes without an ImageNet counterpart are not part of it.
    items = _items(images, labels, ignore_unknown=True)
    return Benchmark(root, layout, classnames, tuple(openai_imagenet_templates()), items)


def _objectnet_mappings(root: Path) -> Path | None:
    for folder in (root, root / "objectnet-1.0" / "mappings"):
        if (folder / OBJECTNET_FOLDER_MAP).is_file():
            return folder
    return None


def _items(
    root: Path, labels: dict[str, int], ignore_unknown: bool = False
) -> tuple[tuple[str, str, int], ...]:
    """(key, path, label) of the images in ``root/<folder>/``, sorted by key; keys unique."""
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in labels:
            if ignore_unknown:
                continue
            raise ValueError(f"{folder}: not a class folder of this benchmark")
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue  # .DS_Store and the like
            if not path.is_file() or path.suffix.lower() not in FOLDER_IMAGE_SUFFIXES:
                raise ValueError(f"{path}: not an image file ({', '.join(FOLDER_IMAGE_SUFFIXES)})")
            items.append((image_key(path), str(path), labels[folder.name]))
    items.sort(key=lambda item: item[0])
    keys = [k for k, _, _ in items]
    duplicate = next((a for a, b in zip(keys, keys[1:], strict=False) if a == b), None)
    if duplicate is not None:
        raise ValueError(f"{root}: image key {duplicate!r} appears in two class folders")
    return tuple(items)
