"""make_shards from packed corpora: webdataset tars (img2dataset layout included), parquet files and
`datasets` folders, each written here from a CIFAR-10 subset; every sample must come back byte-identical
with its label, the order must be one permutation fixed by the seed, and a build must resume."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import require
from picstream.shards import ShardSet, make_shards
from picstream.shards.hygiene import Hygiene
from picstream.shards.sources import SourceOptions, detect_kind
from test_shards_http import RangeHandler, serve

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "bird", "cat")
PER_CLASS = 12


@pytest.fixture(scope="module")
def samples(cifar10_dir) -> list[tuple[str, bytes, int]]:
    """(name, JPEG bytes, label index) of 3 classes x 12 CIFAR-10 images, interleaved by class."""
    files = {c: sorted((cifar10_dir / "train" / c).iterdir())[:PER_CLASS] for c in CLASSES}
    return [(f"{c}-{files[c][i].stem}", files[c][i].read_bytes(), k)
            for i in range(PER_CLASS) for k, c in enumerate(CLASSES)]


def packed(out: Path) -> dict[str, tuple[bytes, str | None, dict]]:
    """{src name: (image bytes, label name, metadata)} read back through ShardSet (+ tarfile for metadata)."""
    ss = ShardSet.open(out)
    meta = {}
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta[int(m.name.split(".")[0])] = json.loads(tar.extractfile(m).read())
    labels = ss.labels(range(len(ss)))
    return {meta[i]["src"]: (ss.read(i), ss.label_names[labels[i]] if labels[i] >= 0 else None, meta[i])
            for i in range(len(ss))}


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*")) if p.suffix in (".tar", ".idx")}


# webdataset ----------------------------------------------------------------------------------------

def write_tars(root: Path, samples, per_tar: int) -> list[str]:
    """webdataset.TarWriter tars of (jpg, cls, txt, json) samples; returns the sample keys in order."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for t in range(0, len(samples), per_tar):
        with wds.TarWriter(str(root / f"{t // per_tar:05d}.tar")) as w:
            for name, data, label in samples[t:t + per_tar]:
                w.write({"__key__": name, "jpg": data, "cls": label, "txt": f"a photo of {name}",
                         "json": {"name": name, "label": CLASSES[label]}})
                keys.append(f"{t // per_tar:05d}.tar/{name}")
    return keys


def test_webdataset_round_trip(samples, tmp_path):
    keys = write_tars(tmp_path / "wds", samples, per_tar=10)
    expected = {k: (data, str(label)) for k, (_, data, label) in zip(keys, samples)}
    summary = make_shards(tmp_path / "wds", tmp_path / "out", shard_size=8, seed=3, progress=False)
    assert (summary.inputs, summary.packed, summary.skipped, summary.converted) == (36, 36, 0, 0)
    got = packed(tmp_path / "out")
    assert {k: v[:2] for k, v in got.items()} == expected
    name = samples[5][0]
    assert got[f"00000.tar/{name}"][2]["txt"] == f"a photo of {name}"
    assert got[f"00000.tar/{name}"][2]["json"] == {"name": name, "label": CLASSES[samples[5][2]]}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "webdataset" and manifest["label_names"] == ["0", "1", "2"]
    # one permutation: the class-interleaved, tar-ordered input does not come back in tar order
    assert list(got) != keys

    # the same tars as a single-tar pattern, a brace pattern, and with labels from the .json
    make_shards(str(tmp_path / "wds" / "{00000..00003}.tar"), tmp_path / "brace", shard_size=8, seed=3,
                progress=False)
    assert shard_files(tmp_path / "brace") == shard_files(tmp_path / "out")
    make_shards(tmp_path / "wds" / "00001.tar", tmp_path / "one", shard_size=8, progress=False,
                source=SourceOptions(label_key="label"))
    one = packed(tmp_path / "one")
    assert {k: v[:2] for k, v in one.items()} == {
        k: (d, CLASSES[int(lab)])
        for k, (d, lab) in expected.items() if k.startswith("00001.tar/")}
    assert {k.split("/")[0] for k in one} == {"00001.tar"}


def test_webdataset_over_http_and_resume(samples, tmp_path):
    write_tars(tmp_path / "wds", samples, per_tar=16)
    make_shards(tmp_path / "wds", tmp_path / "local", shard_size=8, seed=1, workers=2, progress=False)
    server, url = serve(tmp_path / "wds", RangeHandler)
    try:
        make_shards(url + "/{00000..00002}.tar", tmp_path / "remote", shard_size=8, seed=1, progress=False)
    finally:
        server.shutdown()
    assert shard_files(tmp_path / "remote") == shard_files(tmp_path / "local")

    # resume: a build killed after 2 shards continues with the same bytes
    out = tmp_path / "local"
    for p in [out / "manifest.json", *out.glob("shard-00000[2-9].*")]:
        p.unlink()
    summary = make_shards(tmp_path / "wds", out, shard_size=8, seed=1, progress=False)
    assert summary.resumed_shards == 2 and summary.processed == 36 - 16
    assert shard_files(out) == shard_files(tmp_path / "remote")
    make_shards(tmp_path / "wds", tmp_path / "seed2", shard_size=8, seed=2, progress=False)
    assert list(packed(tmp_path / "seed2")) != list(packed(out))


def test_img2dataset_layout(samples, tmp_path):
    """Keys with gaps, tars of different sizes, a .parquet of each tar's downloads (failures included)."""
    import webdataset as wds
    pa = require("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "laion"
    root.mkdir()
    expected, failed, key = {}, {}, 0
    for shard, count in enumerate((20, 16)):
        rows = []
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as w:
            for name, data, label in samples[shard * 20:][:count]:
                k = f"{key:09d}"
                if key % 7 == 3:  # img2dataset leaves a gap where a download failed
                    rows.append(dict(key=k, status="failed_to_download", error_message="HTTP 404"))
                    failed[f"{shard:05d}.tar/{k}"] = "failed_to_download: HTTP 404"
                else:
                    w.write({"__key__": k, "jpg": data, "txt": name,
                             "json": {"key": k, "caption": name, "class": CLASSES[label]}})
                    rows.append(dict(key=k, status="success", error_message=None))
                    expected[f"{shard:05d}.tar/{k}"] = (data, CLASSES[label])
                key += 1
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": count}))
    assert detect_kind(str(root), {}) == "webdataset"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(root),
                          str(tmp_path / "out"), "--label-key", "class", "--shard-size", "8", "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert {k: v[:2] for k, v in packed(tmp_path / "out").items()} == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["label_names"] == sorted(CLASSES)
    assert {s["input"]: s["detail"] for s in manifest["skipped"]} == failed
    assert {s["reason"] for s in manifest["skipped"]} == {"not_downloaded"}
    assert manifest["num_samples"] + len(failed) == manifest["source"]["inputs"] == 36


def test_tar_sample_without_image(samples, tmp_path):
    import webdataset as wds

    (tmp_path / "src").mkdir()
    with wds.TarWriter(str(tmp_path / "src" / "a.tar")) as w:
        w.write({"__key__": "good", "jpg": samples[0][1]})
        w.write({"__key__": "textonly", "txt": "no picture"})
    make_shards(tmp_path / "src", tmp_path / "out", progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 1
    assert manifest["skipped"] == [dict(input="a.tar/textonly", reason="no_image",
                                        detail="no jpg/jpeg/png/webp member (has txt)")]


# parquet / datasets ---------------------------------------------------------------------------------

def test_parquet_round_trip(samples, tmp_path):
    pa = require("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "pq"
    src.mkdir()
    (src / "media").mkdir()
    (src / "media" / "extra.jpg").write_bytes(samples[0][1])  # a file referenced by path only
    rows = [dict(image={"bytes": d, "path": f"{n}.jpg"}, fine=CLASSES[k]) for n, d, k in samples]
    rows[4] = dict(image={"bytes": None, "path": "media/extra.jpg"}, fine="zebra")
    rows[7] = dict(image=None, fine="cat")
    for part in range(2):
        pq.write_table(pa.Table.from_pylist(rows[part * 18:(part + 1) * 18]), src / f"train-{part}.parquet",
                       row_group_size=5)
    out = tmp_path / "out"
    # row 4 repeats row 0's image on purpose (a file referenced by path): kept with --dedup none
    run = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(src), str(out),
                          "--label-column", "fine", "--shard-size", "8", "--quiet", "--dedup", "none"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    expected = {f"train-{i // 18}.parquet/{i % 18}": (samples[i][1], CLASSES[samples[i][2]])
                for i in range(36) if i not in (4, 7)}
    expected["train-0.parquet/4"] = (samples[0][1], "zebra")
    assert {k: v[:2] for k, v in packed(out).items()} == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == [dict(input="train-0.parquet/7", reason="empty", detail="null image")]
    assert manifest["source"]["kind"] == "parquet" and not (out / ".staging").exists()

    # a build killed after one shard resumes to the same bytes; a brace pattern is the same source
    complete = shard_files(out)
    for p in [out / "manifest.json", *out.glob("shard-00000[1-9].*")]:
        p.unlink()
    opts = SourceOptions(label_column="fine")
    keep = Hygiene("none")
    summary = make_shards(src, out, shard_size=8, workers=2, progress=False, source=opts, hygiene=keep)
    assert summary.resumed_shards == 1 and shard_files(out) == complete
    make_shards(str(src / "train-{0..1}.parquet"), tmp_path / "brace", shard_size=8, progress=False,
                source=opts, hygiene=keep)
    assert shard_files(tmp_path / "brace") == complete

    bad = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(src), str(tmp_path / "x"),
                          "--label-column", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("make_shards: error: no label column 'nope'")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_datasets_folder(samples, tmp_path):
    datasets = require("datasets")

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_dict({"img": [{"bytes": d, "path": None} for _, d, _ in samples],
                                     "label": [k for _, _, k in samples]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    assert detect_kind(str(tmp_path / "hf"), {}) == "datasets"
    make_shards(tmp_path / "hf", tmp_path / "out", shard_size=8, progress=False)
    got = packed(tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.arrow"))
    assert {k: v[:2] for k, v in got.items()} == {
        f"{files[0]}/{i}": (d, CLASSES[k]) for i, (_, d, k) in enumerate(samples)}
    assert ShardSet.open(tmp_path / "out").label_names == list(CLASSES)
