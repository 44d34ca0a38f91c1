"""Derive ``src/catsdogs/models/imagenet_hierarchy.tsv`` from WordNet 3.0's noun database.

The ImageNet-1k classes are WordNet synsets; their hypernym tree groups them (the 118 dog breeds under
"dog", n02084071; the domestic cats under "domestic cat", n02121808). The concepts detector learns, per
user class, the smallest node of that tree that owns most of its training photos' concepts
(:mod:`catsdogs.models.taxonomy`), so it needs each class's ancestors, and the kind of thing each node is
(its WordNet lexicographer file: ``noun.animal``, ``noun.artifact``, ...), so that a class's kin (the
concepts of its kind it does not own) can be found. This writes every node on the way from the 1000
classes to the root: ``synset<TAB>first lemma<TAB>direct hypernyms (space-separated)<TAB>lexicographer
file``.

WordNet 3.0 comes from Debian's ``wordnet-base`` package (``/usr/share/wordnet/data.noun``, under
WordNet's BSD-style licence, which the output's header carries). Run::

    apt-get install wordnet-base
    python scripts/imagenet_hierarchy.py [--wordnet /usr/share/wordnet/data.noun]
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ROOT / "src/catsdogs/models/imagenet_classes.tsv"
OUTPUT = ROOT / "src/catsdogs/models/imagenet_hierarchy.tsv"
HYPERNYM_POINTERS = ("@", "@i")
"""WordNet pointer symbols for a hypernym and an instance hypernym."""
NOUN_FILES = ("noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
              "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
              "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
              "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape",
              "noun.state", "noun.substance", "noun.time")
"""WordNet 3.0's noun lexicographer files, numbered 03 to 28 in ``data.noun`` (lexnames(5WN): 00-02 are
the adjective and adverb files): the kind of thing a synset is."""
FIRST_NOUN_FILE = 3


def read_nouns(path: Path) -> dict[str, tuple[str, list[str], str]]:
    """Map each noun synset ``n<offset>`` to its first lemma, direct hypernyms and lexicographer file."""
    nouns: dict[str, tuple[str, list[str], str]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        fields = line.split(" | ", 1)[0].split()
        offset, lexfile, words = fields[0], NOUN_FILES[int(fields[1]) - FIRST_NOUN_FILE], int(fields[3], 16)
        lemma = fields[4].replace("_", " ")
        k = 4 + 2 * words
        pointers = int(fields[k])
        parents = [f"n{fields[k + 1 + 4 * i + 1]}" for i in range(pointers)
                   if fields[k + 1 + 4 * i] in HYPERNYM_POINTERS and fields[k + 1 + 4 * i + 2] == "n"]
        nouns[f"n{offset}"] = (lemma, parents, lexfile)
    return nouns


def wordnet_licence(path: Path) -> list[str]:
    """The WordNet 3.0 licence text, which must travel with every copy of the data."""
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("License: WordNet"):
            inside = True
            continue
        if inside and not line.startswith(" "):
            break
        if inside:
            lines.append("" if line.strip() == "." else line.strip())
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet/data.noun"))
    parser.add_argument("--copyright", type=Path, default=Path("/usr/share/doc/wordnet-base/copyright"))
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    nouns = read_nouns(args.wordnet)
    classes = [line.split("\t")[0] for line in CLASSES.read_text(encoding="utf-8").splitlines()
               if line and not line.startswith("#")]
    keep: dict[str, None] = {}
    todo = list(classes)
    while todo:
        node = todo.pop()
        if node in keep:
            continue
        keep[node] = None
        todo.extend(nouns[node][1])
    rows = sorted(keep)
    header = ("# ImageNet-1k classes and all their WordNet 3.0 hypernyms: synset<TAB>first lemma<TAB>direct "
              "hypernyms<TAB>lexicographer file.\n"
              "# Written by scripts/imagenet_hierarchy.py from Debian's wordnet-base (data.noun).\n"
              + "".join(f"# {line}\n" for line in wordnet_licence(args.copyright)))
    body = "".join(f"{n}\t{nouns[n][0]}\t{' '.join(nouns[n][1])}\t{nouns[n][2]}\n" for n in rows)
    args.output.write_text(header + body, encoding="utf-8")
    print(f"{args.output}: {len(rows)} synsets ({len(classes)} classes and their hypernyms)")


if __name__ == "__main__":
    main()
