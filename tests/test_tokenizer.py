from transformers import AutoTokenizer

from chemlit.data.prompts import render
from chemlit.data.rationale import write_rationale
from chemlit.data.tokenizer import smiles_pieces, train_smiles_tokenizer

MOLECULES = ["CC(=O)Oc1ccccc1C(=O)O", "C[C@@H](N)C(=O)O", "Clc1ccc(Br)cc1", "c1ccc2[nH]ccc2c1",
             "O=[N+]([O-])c1ccccc1", "C1CC2CCC1C2", "FC(F)(F)C(F)(F)F", "CCCCCCCCCCCCCCCC(=O)O"]


def corpus():
    return [render(s, write_rationale(s), 100 + 7 * i) for i, s in enumerate(MOLECULES)] * 5


def test_every_smiles_atom_is_its_own_piece():
    assert smiles_pieces("C[C@@H](Cl)c1ccc2[nH]ccc2c1Br%12") == [
        "C", "[C@@H]", "(", "Cl", ")", "c", "1", "c", "c", "c", "2", "[nH]", "c", "c", "c", "2", "c", "1",
        "Br", "%12"]


def test_round_trip_is_exact_and_atoms_are_never_merged(tmp_path):
    tok = train_smiles_tokenizer(corpus(), vocab_size=400)
    for text in corpus()[:8] + ["Unseen words: zwitterion ÅÄ 123.5 °C", "C#N.[Na+]"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    # No token ever spans two SMILES atoms: every token's span lies inside one pre-token piece.
    for smiles in MOLECULES + ["Clc1ccc(Br)cc1"]:
        bounds, start = [], 0
        for piece in smiles_pieces(smiles):
            bounds.append((start, start + len(piece)))
            start += len(piece)
        offsets = tok(smiles, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert all(any(a <= s and e <= b for a, b in bounds) for s, e in offsets), smiles
    # Saved in Hugging Face format, it comes back identical through AutoTokenizer.
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = corpus()[3]
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


def test_training_is_deterministic_and_words_become_tokens():
    a, b = train_smiles_tokenizer(corpus(), 400), train_smiles_tokenizer(corpus(), 400)
    assert a.get_vocab() == b.get_vocab()
    assert "Ġdispersion" in a.get_vocab()  # frequent rationale words are one token
