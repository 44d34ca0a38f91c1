"""The WordNet tree over the ImageNet-1k classes: which concepts a user class owns.

ImageNet's 1000 classes are WordNet synsets, and WordNet's hypernym tree groups them: the 118 dog
breeds fall under "dog" (n02084071), the five domestic cats under "domestic cat" (n02121808). The tree
ships as ``imagenet_hierarchy.tsv`` (every class and all its hypernyms; ``scripts/imagenet_hierarchy.py``
derives it from WordNet 3.0). A user class *owns* the smallest node under which most of its TRAINING
photos' top-1 concepts fall (:func:`owned_node`), learnt for any classes, never listed for cats and dogs.
Its *kin* are the ImageNet concepts of the same kind that no class owns (:func:`kin_mask`): WordNet files
every synset under one lexicographer file ("noun.animal" for "dog" and "domestic cat", "noun.artifact"
for "printer"), so a raccoon's badgers and a hamster are kin of cats and dogs, a printer is not.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import torch

from catsdogs.models.imagenet import imagenet_synsets

HIERARCHY_FILE = "imagenet_hierarchy.tsv"
"""``synset<TAB>lemma<TAB>direct hypernyms<TAB>lexicographer file`` per line, next to this module
(package data)."""


@cache
def _tree() -> tuple[tuple[str, ...], dict[str, str], dict[str, tuple[str, ...]], dict[str, str]]:
    """The class synsets in head order, and every node's lemma, direct hypernyms and kind.

    The kind is the node's WordNet lexicographer file ("noun.animal"). One pass over the hierarchy file.
    """
    text = resources.files("catsdogs.models").joinpath(HIERARCHY_FILE).read_text(encoding="utf-8")
    names: dict[str, str] = {}
    parents: dict[str, tuple[str, ...]] = {}
    kinds: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):  # the licence header
            continue
        synset, lemma, ups, kind = line.split("\t")
        names[synset], parents[synset], kinds[synset] = lemma, tuple(ups.split()), kind
    return imagenet_synsets(), names, parents, kinds


@cache
def node_leaves() -> tuple[tuple[str, ...], torch.Tensor]:
    """Every node's synset and a bool ``(nodes, 1000)`` matrix: which ImageNet classes lie under it.

    A class lies under itself and under each of its hypernyms (WordNet is a DAG: some classes have two
    parents, and then lie under both).
    """
    classes, names, parents, _kinds = _tree()
    nodes = tuple(sorted(names))
    row = {n: i for i, n in enumerate(nodes)}
    leaves = torch.zeros(len(nodes), len(classes), dtype=torch.bool)
    for j, synset in enumerate(classes):
        todo, seen = [synset], set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            leaves[row[node], j] = True
            todo.extend(parents[node])
    return nodes, leaves


def node_name(synset: str) -> str:
    """The first lemma of a WordNet node ("domestic cat")."""
    return _tree()[1][synset]


def owned_node(top1: torch.Tensor, share: float) -> str:
    """The smallest node under which at least ``share`` of a class's photos' top-1 concepts fall.

    ``top1`` holds the ImageNet class index (0..999) of each TRAINING photo of one user class. Smallest
    means fewest ImageNet classes under it (ties: the larger share, then the synset id), so PetImages'
    dogs own "dog" (the breeds), not "animal", and its cats own "domestic cat", not "feline".
    """
    nodes, leaves = node_leaves()
    counts = torch.bincount(top1.long(), minlength=leaves.shape[1]).float()
    covered = (leaves.float() @ counts) / max(1, len(top1))
    size = leaves.sum(dim=1)
    ok = (covered >= share).nonzero().flatten().tolist()
    best = min(ok, key=lambda i: (int(size[i]), -float(covered[i]), nodes[i]))
    return nodes[best]


def node_mask(synset: str) -> torch.Tensor:
    """Bool ``(1000,)``: the ImageNet classes under ``synset``."""
    nodes, leaves = node_leaves()
    return leaves[nodes.index(synset)]


def node_kind(synset: str) -> str:
    """The WordNet lexicographer file of a node: the kind of thing it is ("noun.animal")."""
    return _tree()[3][synset]


def kin_mask(nodes: tuple[str, ...]) -> torch.Tensor:
    """Bool ``(1000,)``: the ImageNet classes of the same kind as any of ``nodes`` that none of them owns.

    For PetImages' "domestic cat" and "dog": every other ImageNet animal (badger, hamster, lion, ...).
    """
    classes = imagenet_synsets()
    kinds = {node_kind(n) for n in nodes}
    same = torch.tensor([node_kind(c) in kinds for c in classes], dtype=torch.bool)
    owned = torch.stack([node_mask(n) for n in nodes]).any(dim=0) if nodes else torch.zeros_like(same)
    return same & ~owned
