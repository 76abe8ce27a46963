"""The SSL objective: block masks and the masked reconstruction loss."""

import numpy as np
import torch

from nnunetv2_medseqft.method.ssl import (
    SSLSettings,
    block_mask,
    mask_input,
    masked_mse_per_sample,
    patch_at,
    random_patch,
)


def test_block_mask_ratio_blocks_and_seed():
    s = SSLSettings(mask_ratio=0.5, block_size=8)
    m = block_mask((3, 1, 32, 40, 40), s, generator=torch.Generator().manual_seed(0))
    assert m.shape == (3, 1, 32, 40, 40)
    # 4 x 5 x 5 = 100 blocks, 50 hidden, the last row of blocks is full size here
    assert torch.allclose(m.mean(dim=(1, 2, 3, 4)), torch.full((3,), 0.5))
    assert torch.equal(m[0, 0, :8, :8, :8], m[0, 0, :1, :1, :1].expand(8, 8, 8)), "blocks are hidden as a whole"
    assert not torch.equal(m[0], m[1]), "each sample draws its own mask"
    again = block_mask((3, 1, 32, 40, 40), s, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, again)


def test_masked_mse_counts_hidden_voxels_only():
    target = torch.randn(2, 1, 16, 16, 16)
    mask = block_mask(target.shape, SSLSettings(block_size=4), generator=torch.Generator().manual_seed(1))
    perfect_on_hidden = target * mask + 100.0 * (1 - mask)  # wrong everywhere visible
    assert torch.allclose(masked_mse_per_sample(perfect_on_hidden, target, mask), torch.zeros(2))
    zero = masked_mse_per_sample(torch.zeros_like(target), target, mask)
    assert torch.allclose(zero, ((target ** 2 * mask).sum(dim=(1, 2, 3, 4)) / mask.sum(dim=(1, 2, 3, 4))))
    assert torch.equal(mask_input(target, mask)[mask.bool()], torch.zeros(int(mask.sum())))


def test_random_patch_pads_small_cases():
    data = np.ones((1, 10, 50, 50), dtype=np.float32)
    p = random_patch(data, (16, 32, 32), np.random.default_rng(0))
    assert p.shape == (1, 16, 32, 32)
    assert p[0, 0].sum() == 0 and p[0, 3:13].min() == 1  # 6 voxels padded, centred: 3 before, 3 after


def test_patch_at_places_patches_by_relative_position():
    """MDS's common draws: one relative position is the same place in cases of different sizes; its corners are
    the first and the last valid start; a small case is padded as random_patch pads it."""
    small = np.arange(40 * 40 * 40, dtype=np.float32).reshape(1, 40, 40, 40)
    large = np.arange(72 * 72 * 72, dtype=np.float32).reshape(1, 72, 72, 72)
    for data in (small, large):
        s = data.shape[1]
        assert np.array_equal(patch_at(data, (32, 32, 32), (0.0, 0.0, 0.0)), data[:, :32, :32, :32])
        assert np.array_equal(patch_at(data, (32, 32, 32), (0.999, 0.999, 0.999)), data[:, s - 32:, s - 32:, s - 32:])
        half = (s - 32 + 1) // 2
        assert np.array_equal(patch_at(data, (32, 32, 32), (0.5, 0.5, 0.5)), data[:, half:half + 32, half:half + 32,
                                                                              half:half + 32])
    padded = patch_at(np.ones((1, 10, 50, 50), dtype=np.float32), (16, 32, 32), (0.3, 0.3, 0.3))
    assert padded.shape == (1, 16, 32, 32) and padded[0, 0].sum() == 0 and padded[0, 3:13].min() == 1
