"""A deterministic, structure-only rationale writer for rows that come without one.

It sees the molecule and nothing else -- never the measured value -- so the same structure always
gets the same text (tests check this). Each sentence names a structural fact that drives melting
points and the direction of its effect, the way a chemist would reason before looking anything up:

* hydrogen-bond donors and acceptors (donors build networks in the crystal: higher),
* aromatic rings (flat, stack well: higher) and aliphatic rings (rigid: higher),
* rotatable bonds (floppy molecules pack badly: lower),
* symmetry (Carnelley's rule: symmetric molecules pack better: higher),
* size (more surface for dispersion forces: higher),
* halogens (heavier ones are polarisable: higher),
* functional groups found with SMARTS (acids, amides, ureas... with their effect).

The words are fixed templates; only counts and names from the structure are filled in.
``written_rationales`` keeps them in the cache (``chemlit.data.cache``): a table's rationales are
written once per style, RDKit version and version of this code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

from rdkit import Chem, rdBase
from rdkit.Chem import Descriptors, Lipinski, rdMolDescriptors

from chemlit.data.cache import cache_path, cached_per_smiles, digest, source_digest

# (name, SMARTS, effect phrase). Order matters only for the order of the sentence.
FUNCTIONAL_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("carboxylic acid", "[CX3](=O)[OX2H1]", "(H-bonded dimers: raises)"),
    ("amide", "[NX3][CX3](=[OX1])[#6]", "(donor and acceptor: raises)"),
    ("urea", "[NX3][CX3](=[OX1])[NX3]", "(H-bond tapes: raises strongly)"),
    ("imide", "[CX3](=O)[NX3][CX3](=O)", "(polar, planar: raises)"),
    ("sulfonamide", "[SX4](=[OX1])(=[OX1])[NX3]", "(polar donor: raises)"),
    ("phenol", "c[OX2H1]", "(donor: raises)"),
    ("alcohol", "[CX4][OX2H1]", "(donor: raises)"),
    ("primary amine", "[NX3;H2][CX4,c]", "(donor: raises)"),
    ("nitro", "[N+](=O)[O-]", "(strongly polar: raises)"),
    ("nitrile", "[CX2]#[NX1]", "(polar: raises slightly)"),
    ("ketone", "[#6][CX3](=O)[#6]", "(polar, no donor: raises slightly)"),
    ("aldehyde", "[CX3H1](=O)[#6]", "(polar, no donor: little effect)"),
    ("ester", "[#6][CX3](=O)[OX2][#6]", "(polar, no donor: little effect)"),
    ("ether", "[OD2;!$(OC=O)]([#6])[#6]", "(flexible, no donor: lowers slightly)"),
    ("thioether", "[SD2]([#6])[#6]", "(soft, polarisable: little effect)"),
)
HALOGENS = ("F", "Cl", "Br", "I")


@lru_cache(maxsize=None)
def _patterns() -> tuple[tuple[str, Chem.Mol, str], ...]:
    return tuple((name, Chem.MolFromSmarts(smarts), effect) for name, smarts, effect in FUNCTIONAL_GROUPS)


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _size_sentence(heavy_atoms: int, weight: float) -> str:
    if heavy_atoms <= 6:
        verdict = "small, weak dispersion forces (lowers)"
    elif heavy_atoms <= 15:
        verdict = "medium, moderate dispersion forces"
    elif heavy_atoms <= 30:
        verdict = "large, strong dispersion forces (raises)"
    else:
        verdict = "very large, strong dispersion forces (raises)"
    return f"Size: {_count(heavy_atoms, 'heavy atom')}, mass {weight:.0f}; {verdict}."


def _hbond_sentence(donors: int, acceptors: int) -> str:
    if donors == 0 and acceptors == 0:
        return "H-bonds: none, only dispersion and dipole forces (lowers)."
    if donors == 0:
        return f"H-bonds: no donor, {_count(acceptors, 'acceptor')}; no network (lowers)."
    effect = "a network (raises strongly)" if donors >= 2 else "H-bonds in the crystal (raises)"
    return f"H-bonds: {_count(donors, 'donor')}, {_count(acceptors, 'acceptor')}; {effect}."


def _ring_sentence(aromatic: int, aliphatic: int) -> str:
    if aromatic == 0 and aliphatic == 0:
        return "Rings: none, an open chain packs loosely (lowers)."
    parts = []
    if aromatic:
        parts.append(f"{aromatic} aromatic (flat, stacks: raises)")
    if aliphatic:
        parts.append(f"{aliphatic} aliphatic (rigid: raises)")
    return "Rings: " + ", ".join(parts) + "."


def _flexibility_sentence(rotatable: int) -> str:
    if rotatable == 0:
        return "Flexibility: rigid, no rotatable bond (raises)."
    if rotatable <= 3:
        return f"Flexibility: {_count(rotatable, 'rotatable bond')}, fairly rigid."
    return f"Flexibility: {_count(rotatable, 'rotatable bond')}, floppy, packs badly (lowers)."


def _symmetry_sentence(mol: Chem.Mol) -> str:
    word = _symmetry_word(mol)
    return "Symmetry: high, packs densely (raises)." if word == "high" else f"Symmetry: {word}."


def _halogen_sentence(mol: Chem.Mol) -> str | None:
    counts = {symbol: 0 for symbol in HALOGENS}
    for atom in mol.GetAtoms():
        if atom.GetSymbol() in counts:
            counts[atom.GetSymbol()] += 1
    present = [f"{n} {symbol}" for symbol, n in counts.items() if n]
    if not present:
        return None
    heavy = counts["Cl"] + counts["Br"] + counts["I"]
    effect = "polarisable (raises)" if heavy else "little effect"
    return f"Halogens: {', '.join(present)}; {effect}."


def _group_sentence(mol: Chem.Mol) -> str | None:
    found = [f"{name} {effect}" for name, pattern, effect in _patterns() if mol.HasSubstructMatch(pattern)]
    return "Groups: " + "; ".join(found) + "." if found else None


RationaleStyle = Literal["full", "compact"]


def _symmetry_word(mol: Chem.Mol) -> str:
    ranks = list(Chem.CanonicalRankAtoms(mol, breakTies=False))
    share_unique = len(set(ranks)) / max(len(ranks), 1)
    return "high" if share_unique <= 0.5 else ("some" if share_unique < 0.85 else "low")


def _compact(mol: Chem.Mol) -> str:
    """The same facts as the full rationale, as counts and names only (about a third of its tokens)."""
    halogens = [f"{symbol} {n}" for symbol in HALOGENS
                if (n := sum(atom.GetSymbol() == symbol for atom in mol.GetAtoms()))]
    groups = [name for name, pattern, _ in _patterns() if mol.HasSubstructMatch(pattern)]
    parts = [
        f"atoms {mol.GetNumHeavyAtoms()}, mass {Descriptors.MolWt(mol):.0f}",
        f"donors {Lipinski.NumHDonors(mol)}, acceptors {Lipinski.NumHAcceptors(mol)}",
        (f"aromatic rings {rdMolDescriptors.CalcNumAromaticRings(mol)}, "
         f"aliphatic rings {rdMolDescriptors.CalcNumAliphaticRings(mol)}"),
        f"rotatable {rdMolDescriptors.CalcNumRotatableBonds(mol)}",
        f"symmetry {_symmetry_word(mol)}",
    ]
    if halogens:
        parts.append(", ".join(halogens))
    if groups:
        parts.append(", ".join(groups))
    return "; ".join(parts) + "."


def write_rationale(smiles: str, style: RationaleStyle = "full") -> str:
    """The rationale for a molecule, from its structure alone. Raises ValueError on a bad SMILES.

    ``full``: sentences naming each fact and the direction of its effect. ``compact``: the same
    facts as counts and names, no effect phrases -- fewer tokens, so SFT sees each molecule more
    often in the same minutes.
    """
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"invalid SMILES {smiles!r}")
    if style == "compact":
        return _compact(mol)
    if style != "full":
        raise ValueError(f"unknown rationale style {style!r} (use 'full' or 'compact')")
    sentences = [
        _size_sentence(mol.GetNumHeavyAtoms(), Descriptors.MolWt(mol)),
        _hbond_sentence(Lipinski.NumHDonors(mol), Lipinski.NumHAcceptors(mol)),
        _ring_sentence(rdMolDescriptors.CalcNumAromaticRings(mol), rdMolDescriptors.CalcNumAliphaticRings(mol)),
        _flexibility_sentence(rdMolDescriptors.CalcNumRotatableBonds(mol)),
        _symmetry_sentence(mol),
        _halogen_sentence(mol),
        _group_sentence(mol),
    ]
    return " ".join(s for s in sentences if s)


def written_rationales(smiles: Sequence[str], style: RationaleStyle = "full") -> list[str]:
    """``write_rationale`` of each molecule, kept per SMILES in the cache: only molecules not seen
    before are written (about 0.6 ms each)."""
    if style not in ("full", "compact"):
        raise ValueError(f"unknown rationale style {style!r} (use 'full' or 'compact')")
    key = digest({"style": style, "rdkit": rdBase.rdkitVersion, "code": source_digest(sys.modules[__name__])})
    return cached_per_smiles(smiles, lambda missing: [write_rationale(s, style) for s in missing],
                             cache_path("rationales", f"{style}-rdkit-{rdBase.rdkitVersion}-{key[:16]}.npz"), key,
                             f"{style} rationales")
