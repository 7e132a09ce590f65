"""NEFTune noise: per-example magnitude inside packed rows, and never outside training."""

import torch

from sft_cli.neftune import neftune, noise_scale


def test_scale_uses_each_examples_length_not_the_rows():
    scale = noise_scale([[4, 16], [9]], (2, 20), alpha=5.0, dim=64)
    assert torch.allclose(scale[0, :4], torch.full((4,), 5.0 / (4 * 64) ** 0.5))
    assert torch.allclose(scale[0, 4:], torch.full((16,), 5.0 / (16 * 64) ** 0.5))
    assert torch.allclose(scale[1, :9], torch.full((9,), 5.0 / (9 * 64) ** 0.5))
    assert (scale[1, 9:] == 0).all()  # padding gets none


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 64)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        return self.embed(ids)


def test_packed_example_gets_the_noise_it_gets_alone():
    torch.manual_seed(0)
    model = Tiny().train()
    ids = torch.randint(0, 100, (1, 40))
    with neftune(model, alpha=5.0) as set_lengths:
        set_lengths([[8, 32]], (1, 40))
        packed_noise = model(ids) - model.embed.weight[ids]
        set_lengths([[8]], (1, 8))
        alone_noise = model(ids[:, :8]) - model.embed.weight[ids[:, :8]]
    bound = 5.0 / (8 * 64) ** 0.5
    for noise in (packed_noise[0, :8], alone_noise[0]):
        assert noise.abs().max() <= bound + 1e-6 and noise.abs().max() > 0.9 * bound
    # the same example, packed or alone, gets noise of the same magnitude (not sqrt(40/8) less)
    assert abs(packed_noise[0, :8].abs().mean() / alone_noise[0].abs().mean() - 1) < 0.1


def test_no_noise_in_eval_or_when_off():
    model = Tiny()
    ids = torch.randint(0, 100, (1, 10))
    with neftune(model, alpha=5.0) as set_lengths:
        set_lengths([[10]], (1, 10))
        model.eval()
        assert torch.equal(model(ids), model.embed.weight[ids])
    model.train()
    with neftune(model, alpha=0.0) as set_lengths:
        set_lengths([[10]], (1, 10))
        assert torch.equal(model(ids), model.embed.weight[ids])
    assert torch.equal(model(ids), model.embed.weight[ids])  # hook removed afterwards


def test_noise_differs_across_ranks_and_is_drawn_again_after_a_resume():
    """train.seed_step seeds each (step, rank): ranks get their own noise (one seed everywhere
    would give every rank the same), and a resumed process, whatever its generator did before,
    draws exactly the noise of the uninterrupted run."""
    from sft_cli.train import seed_step

    model = Tiny().train()
    ids = torch.arange(20)[None]

    def noise(step, rank):
        seed_step(seed=0, step=step, rank=rank)
        with neftune(model, alpha=5.0) as set_lengths:
            set_lengths([[20]], (1, 20))
            return model(ids) - model.embed.weight[ids]

    rank0, rank1 = noise(3, 0), noise(3, 1)
    assert not torch.equal(rank0, rank1) and not torch.equal(rank0, noise(4, 0))
    torch.rand(1000)  # a fresh process after a resume: its generator is somewhere else entirely
    assert torch.equal(noise(3, 1), rank1)
