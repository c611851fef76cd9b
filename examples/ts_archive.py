"""Real recordings from the UCR/UEA time-series archive, read from the sktime 1.2.0 wheel.

sktime's wheel (8 MB on PyPI, ``pip download sktime==1.2.0 --no-deps``) ships
a few archive data sets as plain ``.ts`` text files under
``sktime/datasets/data/<Name>/<Name>_TRAIN.ts`` and ``..._TEST.ts``:
JapaneseVowels, BasicMotions, ACSF1, PLAID, ArrowHead, GunPoint, OSULeaf,
ItalyPowerDemand and more. This module reads them straight from the wheel
(a zip file) or from an unpacked or installed copy, without importing sktime
(or pandas, or anything beyond numpy).

Where the data are looked for, in order:

1. the path given to :func:`load` (``--data`` in the examples): the wheel
   itself, a folder holding it, or a folder holding ``<Name>/<Name>_TRAIN.ts``;
2. the folder ``$FLASHSEMICRF_DATA_DIR`` (default ``~/.cache/flashsemicrf``,
   under ``$XDG_CACHE_HOME`` when set), where :func:`download` puts the wheel;
3. the data folder of an installed sktime package (found without importing it).

A wheel found there must be the sktime 1.2.0 wheel from PyPI: its SHA-256
is checked, so the data are the ones the examples' numbers were measured on.

Licences: sktime's code is BSD-3-Clause; the data sets are the archive's and
keep their own terms. The UCR/UEA archive gives no licence of its own and
asks users to cite it (Dau et al., "The UCR Time Series Archive", 2019;
Bagnall et al., "The UEA multivariate time series classification archive,
2018"). JapaneseVowels comes from the UCI Machine Learning Repository (Kudo,
Toyama and Shimbo, 1999; doi:10.24432/C5NS47), which distributes its data sets
under CC BY 4.0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SKTIME_VERSION = "1.2.0"
WHEEL_NAME = f"sktime-{SKTIME_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "dbffc6731d2d683b668dceb5e2bbc5804bebc8446b4c580803a281684d90e4ae"
DATA_IN_WHEEL = "sktime/datasets/data"
DOWNLOAD_COMMAND = f"python -m pip download sktime=={SKTIME_VERSION} --no-deps -d {{dir}}"


class DataNotFound(FileNotFoundError):
    """The data set is in none of the places looked at; the message says how to get it."""


@dataclass
class Recordings:
    """One split of a classification data set: variable-length multivariate series.

    series: list of float32 arrays (L_i, D), one per recording.
    labels: int64 array (N,), indices into ``classes``.
    classes: the class names, in the order the file declares them.
    source: where they were read from.
    """

    name: str
    split: str
    series: list
    labels: np.ndarray
    classes: tuple
    source: str

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.series])

    @property
    def dims(self) -> int:
        return self.series[0].shape[1]


def parse_ts(text: str, name: str = "<string>") -> tuple[list, list, tuple]:
    """Parse the archive's ``.ts`` format: series (L, D) float32, raw labels, declared classes.

    Header lines start with ``@`` (``@classLabel true a b c`` declares the
    classes), comments with ``#``; after ``@data`` each line is one recording:
    its D dimensions separated by ``:``, values within a dimension by ``,``,
    and the class label last. Only what the classification files of the wheel
    use is supported (no timestamps, no missing values).

    Raises:
        ValueError: a malformed line, a dimension count that changes between
            recordings, or a label that ``@classLabel`` does not declare.
    """
    series, labels, classes, in_data = [], [], None, False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        if not in_data:
            key, _, rest = line.partition(" ")
            key = key.lower()
            if key == "@classlabel":
                words = rest.split()
                if not words or words[0].lower() != "true":
                    raise ValueError(f"{name}:{number}: not a classification file ({line!r})")
                classes = tuple(words[1:])
            elif key in ("@timestamps", "@missing") and rest.strip().lower() == "true":
                raise ValueError(f"{name}:{number}: {key} true is not supported")
            elif key == "@data":
                in_data = True
            continue
        *dims, label = line.split(":")
        try:
            values = [np.array(d.split(","), dtype=np.float32) for d in dims]
        except ValueError as err:
            raise ValueError(f"{name}:{number}: cannot read the values ({err})") from None
        if not values or len({len(v) for v in values}) != 1:
            raise ValueError(f"{name}:{number}: dimensions of different lengths or none")
        if series and len(values) != series[0].shape[1]:
            raise ValueError(f"{name}:{number}: {len(values)} dimensions, the first recording "
                             f"had {series[0].shape[1]}")
        if classes is not None and label not in classes:
            raise ValueError(f"{name}:{number}: label {label!r} is not among the declared "
                             f"classes {classes}")
        series.append(np.stack(values, 1))
        labels.append(label)
    if not in_data or not series:
        raise ValueError(f"{name}: no @data section with recordings")
    return series, labels, classes if classes is not None else tuple(sorted(set(labels)))


def data_dir() -> Path:
    """``$FLASHSEMICRF_DATA_DIR``, else ``flashsemicrf`` under the user's cache folder."""
    env = os.environ.get("FLASHSEMICRF_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "flashsemicrf"


def _installed_sktime_data() -> Path | None:
    # find_spec of a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _candidates(path: str | os.PathLike | None) -> list[Path]:
    """Wheels or data folders to try, most specific first."""
    places = []
    if path is not None:
        places.append(Path(path).expanduser())
    places.append(data_dir())
    found = []
    for p in places:
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += [p / WHEEL_NAME] if (p / WHEEL_NAME).is_file() else []
            found += [p / DATA_IN_WHEEL, p]
    installed = _installed_sktime_data()
    if installed is not None:
        found.append(installed)
    return found


def _read(place: Path, name: str, split: str) -> str | None:
    member = f"{name}/{name}_{split}.ts"
    if place.is_file():
        if not zipfile.is_zipfile(place):
            raise ValueError(f"{place} is not a wheel (zip file); expected {WHEEL_NAME}")
        if place.name == WHEEL_NAME and _sha256(place) != WHEEL_SHA256:
            raise ValueError(f"{place} does not have the SHA-256 of sktime {SKTIME_VERSION}'s "
                             f"wheel on PyPI ({WHEEL_SHA256}); delete it and download it again")
        with zipfile.ZipFile(place) as z:
            try:
                return z.read(f"{DATA_IN_WHEEL}/{member}").decode("utf-8")
            except KeyError:
                return None
    file = place / member
    return file.read_text(encoding="utf-8") if file.is_file() else None


def missing_message(name: str, path=None) -> str:
    where = [str(Path(path).expanduser())] if path is not None else []
    where.append(f"{data_dir()} ($FLASHSEMICRF_DATA_DIR)")
    where.append("an installed sktime package")
    return (f"the {name} data set was not found (looked in: {'; '.join(where)}). It ships in "
            f"the sktime {SKTIME_VERSION} wheel on PyPI (8 MB; the data are read from it "
            f"without installing sktime). Get it with\n    "
            f"{DOWNLOAD_COMMAND.format(dir=data_dir())}\nor pass --download to the example, "
            f"or point --data at the wheel or the folder holding it.")


def load(name: str, split: str, path: str | os.PathLike | None = None) -> Recordings:
    """One split ("TRAIN" or "TEST") of an archive data set from the sktime wheel.

    Args:
        name: the data set, e.g. "JapaneseVowels", "BasicMotions", "ACSF1".
        split: "TRAIN" or "TEST".
        path: optional wheel, folder holding the wheel, or data folder.

    Returns:
        The recordings, their integer labels and the class names.

    Raises:
        DataNotFound: in none of the places (the message gives the command
            that downloads the wheel).
        ValueError: a bad split, a file that is not the expected wheel, or a
            malformed ``.ts`` file.
    """
    if split not in ("TRAIN", "TEST"):
        raise ValueError(f"split must be 'TRAIN' or 'TEST', got {split!r}")
    for place in _candidates(path):
        text = _read(place, name, split)
        if text is None:
            continue
        series, raw, classes = parse_ts(text, f"{place}:{name}_{split}.ts")
        index = {c: i for i, c in enumerate(classes)}
        return Recordings(name, split, series, np.array([index[r] for r in raw]), classes,
                          str(place))
    raise DataNotFound(missing_message(name, path))


def download(directory: str | os.PathLike | None = None, timeout: float = 300) -> Path:
    """Download sktime's wheel (no dependencies, nothing installed) into ``directory``.

    Runs ``python -m pip download sktime==1.2.0 --no-deps`` with this
    interpreter's pip; default directory :func:`data_dir`.

    Returns:
        The wheel's path.

    Raises:
        RuntimeError: pip failed (no network, no PyPI); its output is in the message.
    """
    target = Path(directory).expanduser() if directory is not None else data_dir()
    target.mkdir(parents=True, exist_ok=True)
    wheel = target / WHEEL_NAME
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", f"sktime=={SKTIME_VERSION}", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(target)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} took longer than {timeout} s") from None
    if run.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {run.returncode}):\n"
                           f"{(run.stdout + run.stderr).strip()[-2000:]}")
    if _sha256(wheel) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} does not have the expected SHA-256 {WHEEL_SHA256}")
    return wheel
