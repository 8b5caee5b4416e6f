"""Supervised (instruction/chat) data: record shapes, response-only loss, length policy, packing, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lora_lightning.app.data.batches import model_inputs
from lora_lightning.app.data.chat import IGNORE, PLAIN_CHAT_TEMPLATE, encode, ensure_chat_template
from lora_lightning.app.data.packing import check_packing_isolates, pack_rows
from lora_lightning.app.data.record_sources import HFRecords, RecordFiles, StdlibDocstrings, functions_with_docstrings
from lora_lightning.app.data.records import Example, make_reader
from lora_lightning.app.data.sft_datamodule import SupervisedDataModule, collate, fit_length
from lora_lightning.app.errors import UsageError
from lora_lightning.app.models.lightning_module import CausalLMModule, evaluate_perplexity
from lora_lightning.app.models.tiny_base import train_tokenizer

# The LightningModule's steps run here without a Trainer: self.log() has nowhere to log, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

CORPUS = ["def add(x, y):\n    return x + y\n", "What is the sum of two numbers? It is their total. " * 30]


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(CORPUS, vocab_size=320)
    ensure_chat_template(tok)
    return tok


def _llama(tokenizer, positions: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        initializer_range=0.5,  # far from uniform logits, so what a token attends to shows in them
    )
    return LlamaForCausalLM(config).eval()


def _gpt2(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.5
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # training steps are compared exactly
    return GPT2LMHeadModel(config).eval()


def _records(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _qa(count: int, long_every: int = 0) -> list[dict[str, str]]:
    out = []
    for i in range(count):
        answer = f"The sum is {i + 1}." + (
            " And more words follow here." * 12 if long_every and i % long_every == 0 else ""
        )
        out.append({"prompt": f"What is {i} + 1?", "response": answer})
    return out


def _module(source, tokenizer, **kwargs) -> SupervisedDataModule:
    data = SupervisedDataModule(source, tokenizer=tokenizer, **{"batch_size": 2, "answers": 2, **kwargs})
    data.source.check()
    data.setup("fit")
    return data


# -- record shapes ---------------------------------------------------------------------------------


def test_both_record_shapes_from_files_and_the_alpaca_preset(tmp_path: Path, tokenizer) -> None:
    pairs = _records(tmp_path / "pairs.jsonl", [{"question": "Why?", "answer": "Because.", "sys": "Be terse."}])
    source = RecordFiles(
        train=[str(pairs)],
        format="prompt_response",
        fields={"prompt": "question", "response": "answer", "system": "sys"},
    )
    (example,) = source.examples("train")
    assert example.messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
    ]
    assert example.where == f"data file {str(pairs)!r} line 1"

    chats = tmp_path / "chats.json"  # a .json list of records
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Sum 2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    chats.write_text(json.dumps([{"messages": chat}]))
    (example,) = RecordFiles(train=[str(chats)], format="messages").examples("train")
    assert example.messages == chat and example.reference == "4" and example.where.endswith("record 1")

    alpaca = _records(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add.", "input": "2, 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
        ],
    )
    first, second = RecordFiles(train=[str(alpaca)], format="alpaca").examples("train")
    assert first.messages[0] == {"role": "user", "content": "Add.\n\n2, 3"}
    assert second.messages[0]["content"] == "Say hi." and second.reference == "hi"


def test_the_example_files_of_the_readme(tokenizer) -> None:
    examples = Path(__file__).resolve().parents[3] / "examples"
    pairs = list(RecordFiles(train=[str(examples / "sft_records.jsonl")]).examples("train"))
    chats = list(RecordFiles(train=[str(examples / "sft_chats.jsonl")], format="messages").examples("train"))
    assert len(pairs) + len(list(RecordFiles(train=[str(examples / "sft_records.jsonl")]).examples("val"))) == 20
    assert {m["role"] for e in chats for m in e.messages} == {"system", "user", "assistant"}
    for example, encoded in zip(chats, encode(tokenizer, chats), strict=True):
        learnt = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
        answers = [m["content"] + tokenizer.eos_token for m in example.messages if m["role"] == "assistant"]
        assert tokenizer.decode(learnt) == "".join(answers)


def test_records_split_by_file_name_and_position_when_no_val_files(tmp_path: Path) -> None:
    path = _records(tmp_path / "qa.jsonl", _qa(60))
    source = RecordFiles(train=[str(path)], val_fraction=0.2)
    train, val = list(source.examples("train")), list(source.examples("val"))
    assert len(train) + len(val) == 60 and 0 < len(val) < 30
    assert not {e.where for e in train} & {e.where for e in val}
    assert [e.where for e in val] == [e.where for e in RecordFiles(train=[str(path)], val_fraction=0.2).examples("val")]


def test_hf_records_with_a_column_mapping(tmp_path: Path, tokenizer, monkeypatch) -> None:
    pytest.importorskip("datasets", reason="the datasets extra is installed by the test extra in CI")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows = [{"q": f"What is {i} + 1?", "a": f"It is {i + 1}."} for i in range(40)]
    path = _records(tmp_path / "rows.jsonl", rows)
    source = HFRecords(
        path="json", data_files=str(path), val_split=None, val_fraction=0.25, fields={"prompt": "q", "response": "a"}
    )
    source.check()
    train, val = list(source.examples("train")), list(source.examples("val"))
    assert len(train) + len(val) == 40 and val and train[0].messages[1]["role"] == "assistant"
    assert {e.messages[0]["content"] for e in train}.isdisjoint(e.messages[0]["content"] for e in val)
    data = _module(source, tokenizer, max_length=64)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(UsageError, match=r"\(columns\): the record matches no record format \('q', 'a'\)"):
        next(HFRecords(path="json", data_files=str(path), val_split=None).examples("train"))
    with pytest.raises(UsageError, match=r"row 0: no 'prompt' field \(fields found: 'q', 'a'\)"):
        next(HFRecords(path="json", data_files=str(path), val_split=None, format="prompt_response").examples("train"))


def test_stdlib_docstring_pairs(tmp_path: Path) -> None:
    code = (
        'def f(x):\n    """Add one to x.\n\n    Really."""\n    return x + 1\n\ndef g():\n    """Only a docstring."""\n'
    )
    assert list(functions_with_docstrings(code)) == [("f", "def f(x):\n    return x + 1", "Add one to x.\n\nReally.")]
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(code.replace("Add one", "Add exactly one"))
    forward = list(StdlibDocstrings(root=str(tmp_path), val_fraction=0.0).examples("train"))
    assert [e.where for e in forward] == ["pkg/mod.py:f"]
    assert (
        forward[0].messages[0]["content"]
        == "Write the docstring summary of this Python function.\n\ndef f(x):\n    return x + 1"
    )
    assert forward[0].reference == "Add exactly one to x."  # the first paragraph
    (whole,) = StdlibDocstrings(root=str(tmp_path), val_fraction=0.0, docstring="whole").examples("train")
    assert whole.reference == "Add exactly one to x.\n\nReally."
    (reverse,) = StdlibDocstrings(root=str(tmp_path), val_fraction=0.0, direction="doc_to_code").examples("train")
    assert reverse.reference == "def f(x):\n    return x + 1"
    assert reverse.messages[0]["content"] == "Write a Python function `f` that does this:\n\nAdd exactly one to x."
    real = StdlibDocstrings()  # the interpreter's own stdlib: held-out files give pairs too
    assert len(list(real.examples("val"))) > 50
    with pytest.raises(UsageError, match="data.source.direction must be one of code_to_doc, doc_to_code"):
        StdlibDocstrings(direction="both")


# -- formatting and the response-only loss ---------------------------------------------------------


def test_labels_are_the_responses_and_the_end_of_text(tokenizer) -> None:
    chat = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"},
    ]
    (encoded,) = encode(tokenizer, [Example("here", chat)])
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == (
        "Be terse.\n\n### User:\nWhat is 2 + 2?\n\n### Assistant:\n4<|endoftext|>"
        "\n\n### User:\nAnd 3 + 3?\n\n### Assistant:\n6<|endoftext|>"
    )
    assert tokenizer.decode(encoded.input_ids) == text
    learnt = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(learnt) == "4<|endoftext|>6<|endoftext|>"
    prompt = tokenizer.decode(encoded.input_ids[: encoded.answer_start])
    assert prompt == tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    (everything,) = encode(tokenizer, [Example("here", chat)], train_on_prompt=True)
    assert everything.labels[1:] == everything.input_ids[1:] and everything.labels[0] == IGNORE


def _logit_grads(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """d loss / d logits (B, T, V) of one training step of the app's LightningModule."""
    grads: list[torch.Tensor] = []

    def keep_grad(_module, _inputs, logits: torch.Tensor) -> None:
        logits.register_hook(grads.append)

    model.lm_head.register_forward_hook(keep_grad)
    CausalLMModule(model).training_step(batch, 0).backward()
    return grads[0]


def test_prompt_tokens_carry_no_loss_in_training(tmp_path: Path, tokenizer) -> None:
    """The training step's gradient reaches the logits of response positions only (and, switched, all)."""
    path = _records(tmp_path / "qa.jsonl", _qa(8))
    for train_on_prompt in (False, True):
        source = RecordFiles(train=[str(path)], val=[str(path)])
        data = _module(source, tokenizer, max_length=64, train_on_prompt=train_on_prompt, batch_size=8)
        batch = next(iter(data.train_dataloader()))
        touched = _logit_grads(_llama(tokenizer), batch).abs().sum(-1)[:, :-1] > 0  # (B, T-1): t predicts t+1
        labelled = batch["labels"][:, 1:] != IGNORE
        assert torch.equal(touched, labelled)
        # The response of each row: from its answer_start to its end (the same examples, any order).
        responses = {tuple(row.input_ids): (row.answer_start, len(row.input_ids)) for row in data.val_rows}
        response = torch.zeros_like(labelled)
        for index, ids in enumerate(batch["input_ids"].tolist()):
            start, end = responses[tuple(ids[: batch["attention_mask"][index].sum()])]
            response[index, start - 1 : end - 1] = True
        if train_on_prompt:
            assert labelled.sum() > response.sum() and torch.equal(labelled, batch["attention_mask"][:, 1:].bool())
            val = next(iter(data.val_dataloader()))  # held-out scores stay response-only
            assert all(row.labels[row.answer_start - 1] == IGNORE for row in data.val_rows)
            assert (val["labels"] != IGNORE).sum() < val["attention_mask"].sum() - len(val["labels"])
        else:
            assert torch.equal(labelled, response)  # exactly the response tokens (and the end-of-text)


def test_val_loss_and_merged_style_evaluation_score_the_same_tokens(tmp_path: Path, tokenizer) -> None:
    path = _records(tmp_path / "qa.jsonl", _qa(10))
    data = _module(RecordFiles(train=[str(path)], val=[str(path)]), tokenizer, max_length=64)
    model = _llama(tokenizer)
    total = count = 0.0
    for batch in data.val_dataloader():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        count += (target != IGNORE).sum().item()
    loss, _ = evaluate_perplexity(model, data.val_dataloader())
    assert loss == pytest.approx(total / count, rel=1e-5)


# -- max_length --------------------------------------------------------------------------------------


def test_truncation_counts(tmp_path: Path, tokenizer) -> None:
    records = _qa(24, long_every=3)  # 8 long responses
    records += [{"prompt": "Explain, slowly: " + "why and how " * 40, "response": "No."} for _ in range(4)]
    path = _records(tmp_path / "qa.jsonl", records)
    lengths = [len(e.input_ids) for e in encode(tokenizer, list(RecordFiles(train=[str(path)]).examples("train")))]
    max_length = 60  # short examples are about 42 tokens, long responses 350, long prompts 520
    assert sum(n > max_length for n in lengths) == 12  # the long responses and the long prompts
    dropped = _module(RecordFiles(train=[str(path)], val=[str(path)]), tokenizer, max_length=max_length)
    counts = {"read": 28, "used": 16, "truncated": 0, "dropped": 8, "prompt_too_long": 4}
    assert dropped.counts == {"train": counts, "val": counts}
    assert all(len(row.input_ids) <= max_length for row in dropped.train_rows)
    cut = _module(
        RecordFiles(train=[str(path)], val=[str(path)]), tokenizer, max_length=max_length, truncation="truncate"
    )
    assert cut.counts["train"] == {"read": 28, "used": 24, "truncated": 8, "dropped": 0, "prompt_too_long": 4}
    assert max(len(row.input_ids) for row in cut.train_rows) == max_length
    assert cut.summary()["counts"] == cut.counts and cut.summary()["max_length"] == max_length
    with pytest.raises(UsageError, match=r"data.max_length=30: no train example fits \(28 prompts alone reach it"):
        _module(RecordFiles(train=[str(path)], val=[str(path)]), tokenizer, max_length=30)
    (long,) = encode(
        tokenizer,
        [Example("x", [{"role": "user", "content": "a b c " * 9}, {"role": "assistant", "content": "z " * 30}])],
    )
    assert fit_length(long, long.prompt_length, "truncate") == (None, "prompt_too_long")
    assert fit_length(long, long.prompt_length + 1, "truncate")[0].labels[-1] != IGNORE  # one response token left


# -- padding and packing -----------------------------------------------------------------------------


def test_padding_to_the_longest_of_the_batch(tmp_path: Path, tokenizer) -> None:
    path = _records(tmp_path / "qa.jsonl", _qa(6, long_every=2))
    data = _module(RecordFiles(train=[str(path)], val=[str(path)]), tokenizer, max_length=400, batch_size=3)
    rows = [data.val_rows[0], data.val_rows[-1], data.val_rows[1]]  # short, long, short
    batch = collate(rows, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (3, max(len(r.input_ids) for r in rows))
    for index, row in enumerate(rows):
        size = len(row.input_ids)
        assert batch["attention_mask"][index].tolist() == [1] * size + [0] * (batch["input_ids"].shape[1] - size)
        assert (batch["labels"][index, size:] == IGNORE).all()


def test_packing_keeps_every_example_once_and_apart(tmp_path: Path, tokenizer) -> None:
    path = _records(tmp_path / "qa.jsonl", _qa(30, long_every=4))
    encoded = encode(tokenizer, list(RecordFiles(train=[str(path)]).examples("train")))
    rows = [row for row in encoded if len(row.input_ids) <= 120]  # what the module packs: examples that fit
    packed = pack_rows(rows, max_length=120, seed=0)
    assert len(packed) < len(rows) and all(len(row.input_ids) <= 120 for row in packed)
    assert sum(row.examples for row in packed) == len(rows)
    pieces = sorted(tuple(ids) for row in packed for ids in _split(row))
    assert pieces == sorted(tuple(row.input_ids) for row in rows)  # every example once, whole
    assert pack_rows(rows, 120, seed=0) == packed != pack_rows(rows, 120, seed=1)


def _split(row) -> list[list[int]]:
    starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
    return [row.input_ids[a:b] for a, b in itertools.pairwise(starts)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_packed_batch_scores_what_its_examples_score_apart(tmp_path: Path, tokenizer, family: str) -> None:
    """Packing on and off give the same loss: no example of a packed row sees another."""
    path = _records(tmp_path / "qa.jsonl", _qa(12))
    model = {"llama": _llama, "gpt2": _gpt2}[family](tokenizer)
    source = RecordFiles(train=[str(path)], val=[str(path)])
    apart = _module(source, tokenizer, max_length=200, batch_size=12)
    packed = _module(source, tokenizer, max_length=200, batch_size=2, packing=True)
    packed.check_model(model)
    assert len(packed.train_rows) < 12 and sum(row.examples for row in packed.train_rows) == 12
    batch = collate(packed.train_rows, tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    loss_packed = CausalLMModule(model).training_step(batch, 0)
    loss_apart = CausalLMModule(model).training_step(collate(apart.train_rows, tokenizer.pad_token_id), 0)
    assert loss_packed.item() == pytest.approx(loss_apart.item(), rel=1e-5)
    # Token by token: each example's logits in its packed row are its logits alone.
    with torch.no_grad():
        together = model(**model_inputs(batch)).logits
        leaky = model(input_ids=batch["input_ids"]).logits  # the same rows without position ids
    row, ids = 0, packed.train_rows[0].input_ids
    starts = [i for i, p in enumerate(packed.train_rows[0].position_ids) if p == 0] + [len(ids)]
    for start, end in itertools.pairwise(starts):
        alone = model(input_ids=torch.tensor([ids[start:end]])).logits[0]
        torch.testing.assert_close(together[row, start:end], alone, atol=1e-4, rtol=1e-4)
    second = slice(starts[1], starts[2])  # seeing the first example changes the second one's logits
    assert (leaky[row, second] - together[row, second]).abs().max() > 1e-2


def test_packing_is_refused_for_a_model_whose_attention_ignores_the_boundaries(tokenizer) -> None:
    """OPT builds its mask from the attention mask alone: packed examples would see each other."""
    from transformers import OPTConfig, OPTForCausalLM

    check_packing_isolates(_llama(tokenizer))  # llama (sdpa) keeps them apart
    torch.manual_seed(0)
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            word_embed_proj_dim=32,
        )
    ).eval()
    with pytest.raises(UsageError, match=r"data.packing=true: .*OPTForCausalLM.* packed examples attend to each other"):
        check_packing_isolates(opt)


# -- bad input: one line, naming where ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "fmt", "message"),
    [
        (
            [{"prompt": "a", "response": "b"}, {"prompt": "a"}],
            "prompt_response",
            r"qa.jsonl' line 2: no 'response' field \(fields found: 'prompt'\)",
        ),
        (
            [{"prompt": "a", "response": "  "}],
            "prompt_response",
            r"qa.jsonl' line 1: empty response in field 'response'",
        ),
        ([{"instruction": "a", "output": 3}], "alpaca", r"line 1: field 'output' must be a string, got int"),
        (
            [{"messages": [{"role": "user", "content": "a"}]}],
            "messages",
            r"line 1: the last message must be the assistant's",
        ),
        (
            [{"messages": [{"role": "assistant", "content": "a"}]}],
            "messages",
            r"line 1: the first message is the assistant's",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}],
            "messages",
            r"line 1 message 2: empty response",
        ),
        ([[1, 2]], "prompt_response", r"line 1: expected a JSON object, got list"),
    ],
)
def test_bad_records_name_their_file_and_line(tmp_path: Path, records, fmt: str, message: str) -> None:
    path = _records(tmp_path / "qa.jsonl", records)
    with pytest.raises(UsageError, match=message):
        RecordFiles(train=[str(path)], format=fmt).check()


def test_bad_options_and_files(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(UsageError, match=r"broken.jsonl' line 2 column 12: not valid JSON: expected a JSON value"):
        RecordFiles(train=[str(tmp_path / "broken.jsonl")], format="prompt_response").check()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"only .jsonl and .json record files"):
        RecordFiles(train=[str(tmp_path / "notes.txt")]).check()
    with pytest.raises(
        UsageError, match=r"data.source.format must be one of auto, prompt_response, alpaca, messages, got 'sharegpt'"
    ):
        make_reader("sharegpt")
    with pytest.raises(
        UsageError,
        match=r"fields.question is not a field of format 'prompt_response'; it has prompt, response, system",
    ):
        make_reader("prompt_response", {"question": "q"})
    with pytest.raises(UsageError, match=r"data.truncation must be one of drop, truncate, got 'cut'"):
        SupervisedDataModule(None, truncation="cut")
    with pytest.raises(UsageError, match=r"data.max_length must be an integer >= 2, got 0"):
        SupervisedDataModule(None, max_length=0)
    path = _records(tmp_path / "qa.jsonl", _qa(4))
    data = _module(RecordFiles(train=[str(path)], val=[str(path)]), tokenizer, max_length=64)
    with pytest.raises(UsageError, match=r"data.max_length=64 exceeds the model's 32 positions"):
        data.check_model(_llama(tokenizer, positions=32))


def test_a_role_the_template_does_not_know(tmp_path: Path, tokenizer) -> None:
    chat = [
        {"role": "user", "content": "a"},
        {"role": "tool", "content": "tool output"},
        {"role": "assistant", "content": "c"},
    ]
    path = _records(tmp_path / "chat.jsonl", [{"messages": chat}])
    source = RecordFiles(train=[str(path)], val=[str(path)], format="messages")
    source.check()  # a valid record; which roles exist is the template's business
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    with pytest.raises(
        UsageError,
        match=r"chat.jsonl' line 1: role 'tool' is not one the chat template knows \(system, user, assistant\)",
    ):
        _module(source, tokenizer)
    silent = train_tokenizer(CORPUS, vocab_size=300)  # a template that drops roles it does not know
    silent.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'tool' %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(UsageError, match=r"line 1: the chat template leaves out the 'tool' message"):
        _module(source, silent)


# -- the record format, detected -------------------------------------------------------------------

_CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
_SHAPES = {
    "messages": {"messages": _CHAT},
    "alpaca": {"instruction": "2+2?", "input": "", "output": "4"},
    "prompt_response": {"prompt": "2+2?", "response": "4"},
}


@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_the_record_format_is_detected_from_the_records(tmp_path: Path, shape: str, caplog) -> None:
    path = _records(tmp_path / "data.jsonl", [_SHAPES[shape]] * 3)
    source = RecordFiles(train=[str(path)], val=[str(path)])
    with caplog.at_level("INFO"):
        source.check()
    assert source.format == shape and source.detected
    assert f"detected {shape} from the records" in caplog.text
    assert repr(source).startswith(f"{shape} (detected) records")
    (example, *_) = source.examples("train")
    assert example.messages == _CHAT  # every shape reads as the same chat
    explicit = RecordFiles(train=[str(path)], val=[str(path)], format=shape)
    assert [e.messages for e in explicit.examples("train")] == [e.messages for e in source.examples("train")]
    assert not explicit.detected and repr(explicit).startswith(f"{shape} records")


def test_the_format_is_in_the_data_summary(tmp_path: Path, tokenizer) -> None:
    path = _records(tmp_path / "chats.jsonl", [_SHAPES["messages"]] * 4)
    data = _module(RecordFiles(train=[str(path)], val=[str(path)]), tokenizer, max_length=64)
    assert (data.summary()["format"], data.summary()["format_detected"]) == ("messages", True)


def test_mixed_or_unknown_record_shapes_name_the_formats_and_the_option(tmp_path: Path) -> None:
    mixed = _records(tmp_path / "mixed.jsonl", [_SHAPES["messages"], _SHAPES["messages"], _SHAPES["alpaca"]])
    with pytest.raises(
        UsageError,
        match=r"mixed.jsonl' line 3 is a alpaca record but .*mixed.jsonl' line 1 is a messages record: "
        r"the records mix formats; .* set data.source.format",
    ):
        RecordFiles(train=[str(mixed)]).check()
    unknown = _records(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(
        UsageError,
        match=r"qa.jsonl' line 1: the record matches no record format \('question', 'answer'\); the formats are "
        r"prompt_response \(prompt, response\); alpaca \(instruction, output\); messages \(messages\): "
        r"set data.source.format to one of prompt_response, alpaca, messages \(and data.source.fields",
    ):
        RecordFiles(train=[str(unknown)]).check()
    with pytest.raises(UsageError, match=r"data.source.fields names 'prompt', 'output', fields of no format: set"):
        RecordFiles(train=[str(unknown)], fields={"prompt": "question", "output": "answer"})
    mapped = RecordFiles(train=[str(unknown)], fields={"prompt": "question", "response": "answer"})
    mapped.check()  # the fields' names are prompt_response's
    assert mapped.format == "prompt_response" and not mapped.detected
    both = _records(tmp_path / "both.jsonl", [{**_SHAPES["alpaca"], **_SHAPES["prompt_response"]}])
    with pytest.raises(
        UsageError, match=r"both.jsonl' line 1: the record has the fields of prompt_response and alpaca"
    ):
        RecordFiles(train=[str(both)]).check()
    explicit = RecordFiles(train=[str(both)], format="alpaca")
    (example,) = explicit.examples("train")  # an explicit format wins
    assert example.messages == _CHAT


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"prompt": "a, "response": "b"}',
            r"line 2 column 17: not valid JSON: expected ',' delimiter \(near '\"prompt\": \"a, \"re",
        ),
        ('{"prompt": "a", "response": "b}', r"line 2 column 29: not valid JSON: a string opened here is never closed"),
        ("{'prompt': 'a'}", r"line 2 column 2: not valid JSON: expected property name enclosed in double quotes"),
        ('{"prompt": "a", "response": "b"} x', r"line 2 column 34: not valid JSON: more after the end of the JSON"),
    ],
)
def test_a_malformed_json_line_names_line_column_and_what_was_expected(tmp_path: Path, line: str, message) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(UsageError, match=message):
        RecordFiles(train=[str(path)], format="prompt_response").check()
    whole = tmp_path / "broken.json"
    whole.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a" "response": "b"}\n]\n')
    with pytest.raises(UsageError, match=r"broken.json' line 3 column 18: not valid JSON: expected ',' delimiter"):
        RecordFiles(train=[str(whole)], format="prompt_response").check()
