"""Public-domain prose these machines can install offline, as one paragraph per line.

- ``austen``: Jane Austen's six novels, stored as R data by the Debian package
  ``r-cran-janeaustenr``; ``Rscript`` (``r-base-core``) dumps them to text.
- ``kjv``: the King James Bible of ``bible-kjv-text``, read through its ``bible`` program.

Run as root, the missing packages are installed with ``apt-get``; otherwise the error
names the command to run. Paragraphs (blank-line separated in the sources) are the
documents ``taperfx data prepare`` splits into train and held-out text.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
PACKAGES = {"austen": ("r-cran-janeaustenr", "r-base-core"), "kjv": ("bible-kjv-text", "bible-kjv")}

_DUMP_AUSTEN = """
e <- new.env()
for (name in commandArgs(trailingOnly = TRUE)[-1]) {
  data(list = name, package = "janeaustenr", envir = e)
  writeLines(get(name, envir = e), file.path(commandArgs(trailingOnly = TRUE)[1], paste0(name, ".txt")))
}
"""


class CorpusUnavailable(RuntimeError):
    """The corpus's Debian packages are missing and cannot be installed from here."""


def _installed(corpus: str) -> bool:
    if corpus == "austen":
        if shutil.which("Rscript") is None:
            return False
        probe = subprocess.run(["Rscript", "-e", "library(janeaustenr)"], capture_output=True)
        return probe.returncode == 0
    return shutil.which("bible") is not None


def ensure_packages(corpus: str) -> None:
    """Install ``corpus``'s packages with apt-get when running as root; refuse with the command otherwise."""
    if _installed(corpus):
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES[corpus]]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise CorpusUnavailable(
            f"the {corpus} corpus needs the Debian packages {' '.join(PACKAGES[corpus])}; "
            f"this process cannot install them (not root or no apt-get): run `sudo {' '.join(command)}`"
        )
    print(f"installing {' '.join(PACKAGES[corpus])} with apt-get (running as root)", flush=True)
    subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    )


def paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated blocks of ``lines``, each joined into one line of single spaces."""
    out, block = [], []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line.strip())
        elif block:
            out.append(" ".join(block))
            block = []
    return out


def _austen_lines(scratch: Path) -> list[str]:
    scratch.mkdir(parents=True, exist_ok=True)
    subprocess.run(["Rscript", "-e", _DUMP_AUSTEN, str(scratch), *AUSTEN_NOVELS], check=True, capture_output=True)
    lines: list[str] = []
    for name in AUSTEN_NOVELS:
        lines += [*(scratch / f"{name}.txt").read_text(encoding="utf-8").splitlines(), ""]
    return lines


def _kjv_lines() -> list[str]:
    """Every verse without its number, a blank line between chapters (``bible -l`` prints a heading line per
    chapter, then one indented, numbered verse per line)."""
    text = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    lines: list[str] = []
    for line in text.splitlines():
        if line[:1].isspace():
            lines.append(line.strip().partition(" ")[2])
        elif line.strip():
            lines.append("")
    return lines


def write_corpus(corpus: str, out: Path) -> Path:
    """``out``: the corpus as one paragraph per line (kept if it already exists: reruns reuse it)."""
    if out.is_file():
        return out
    names = ("austen", "kjv") if corpus == "both" else (corpus,)
    docs: list[str] = []
    for name in names:
        ensure_packages(name)
        docs += paragraphs(_austen_lines(out.parent / "austen-r") if name == "austen" else _kjv_lines())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(docs) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out
