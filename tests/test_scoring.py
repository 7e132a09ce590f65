"""scoring.score: per-source sums from per-position codes, a rank's spare batch run and discarded,
and the same numbers as a plain full-logits cross-entropy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sft_cli.data.collate import Collator
from sft_cli.model import SFTModel
from sft_cli.scoring import Scores, score
from tests.test_train import packed_rows


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_dir("chatml"))).eval()


def _reference(model, batch) -> tuple[np.ndarray, np.ndarray]:
    """Per trained position: CE and argmax-is-target from the model's own full logits."""
    with torch.no_grad():
        # use_cache=False: with a cache transformers builds no packed (block) mask from position_ids.
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        logits = logits.flatten(0, 1)
    picked = logits.index_select(0, batch["target_index"]).float()
    return (F.cross_entropy(picked, batch["targets"], reduction="none").double().numpy(),
            (picked.argmax(-1) == batch["targets"]).numpy())


def test_sums_per_source_equal_a_full_logits_reference(model):
    collate = Collator(pad_id=0)
    rows = packed_rows(6, model.config.vocab_size, seed=3)
    batches = [collate(rows[i:i + 2]) for i in range(0, 6, 2)]
    rng = np.random.default_rng(0)
    expected = Scores(np.zeros(3), np.zeros(3, np.int64), np.zeros(3, np.int64))
    for batch in batches:
        batch["target_sources"] = rng.integers(0, 3, size=int(batch["num_targets"]))
        losses, hits = _reference(model, batch)
        np.add.at(expected.loss_sum, batch["target_sources"], losses)
        np.add.at(expected.correct, batch["target_sources"], hits)
        np.add.at(expected.tokens, batch["target_sources"], 1)
    got = score(SFTModel(model), batches, num_sources=3)
    assert got.tokens.tolist() == expected.tokens.tolist() and got.correct.tolist() == expected.correct.tolist()
    assert got.loss_sum == pytest.approx(expected.loss_sum, rel=1e-5)
    for source in (None, 0, 1, 2):
        assert got.summary(source)["loss"] == pytest.approx(expected.summary(source)["loss"], rel=1e-5)
    assert got.summary()["tokens"] == sum(int(b["num_targets"]) for b in batches)


def test_a_rank_with_no_batches_scores_nothing_and_restores_train_mode(model):
    batch = Collator(pad_id=0)(packed_rows(1, model.config.vocab_size))
    wrapped = SFTModel(model).train()
    got = score(wrapped, [], spare=batch)  # one process: no forward is owed to anyone, nothing counted
    assert got.summary() == {"loss": 0.0, "ppl": 1.0, "token_accuracy": 0.0, "tokens": 0}
    assert wrapped.training
