from transformers import CLIPTokenizer

from obliviate.shapes import vocab
from obliviate.shapes.tokenizer import build_tokenizer, train_bpe


def test_every_world_word_is_one_token_and_round_trips(tmp_path):
    tok = build_tokenizer()
    for word in vocab.all_words():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
        assert tok.decode(ids) == word
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a hollow starburst on a grey background"
    assert again(text).input_ids == tok(text).input_ids
    assert again.decode(again(text).input_ids, skip_special_tokens=True) == text


def test_unknown_words_still_tokenize():
    tok = build_tokenizer()
    ids = tok("a zebra", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "a zebra"


def test_bpe_merges_make_whole_words():
    merges = train_bpe(["star", "stars", "start"])
    assert merges[0] == ("s", "t")
