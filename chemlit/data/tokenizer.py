"""A SMILES-aware tokenizer for models trained from scratch.

Pre-tokenisation splits text so that every SMILES atom is one piece (bracket atoms such as
``[C@@H]`` or ``[nH]``, two-letter ``Cl``/``Br``, ring-closure digits, bonds, branches), while an
English word -- any run of letters holding a lowercase vowel, which no SMILES outside brackets can
contain -- stays whole with its leading space. Digits are single pieces, so numbers are written digit
by digit. A byte-level BPE is then trained on those pieces: it can merge frequent words into one
token but never glue two SMILES atoms together, and byte-level means no unknown tokens and an
exact round trip ``decode(encode(text)) == text``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]

SMILES_AWARE_PATTERN = (
    r"\[[^\]\s]+\]"                    # bracket atom: [C@@H], [nH], [O-], [13C]
    r"| ?[A-Za-z]*[adefghijkmqtuvwxyz][A-Za-z]*"  # a word with its leading space (no SMILES has these)
    r"|Br|Cl"                          # two-letter organic-subset atoms
    r"|%\d\d"                          # two-digit ring closure
    r"| ?\d"                           # one digit (a space may lead): ring closures, numbers digit by digit
    r"|[A-Za-z]"                       # any other single letter (aromatic c, n, o, s; C, N, O ...)
    r"| ?[^\sA-Za-z\d]"                # bonds, branches, punctuation, ° (a space may lead)
    r"|\s"                             # any other whitespace, one piece each
)


def _backend(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SMILES_AWARE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def train_smiles_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the SMILES-aware byte-level BPE on ``texts``; deterministic for the same texts."""
    backend, trainer = _backend(vocab_size)
    backend.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers`` backend as a Hugging Face tokenizer (saves with ``save_pretrained``)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def smiles_pieces(smiles: str) -> list[str]:
    """How the pre-tokeniser cuts a SMILES string (for tests and for people reading tokens)."""
    backend, _ = _backend(16)
    split = pre_tokenizers.Split(Regex(SMILES_AWARE_PATTERN), behavior="isolated")
    return [piece for piece, _ in split.pre_tokenize_str(smiles)]
