"""tools/visualization: NA window of a pixel (through mmboat's op) and FSLA clusters."""
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from tool_helpers import load_tool, synthetic

na_rf = load_tool('visualization/na_receptive_field.py', 'na_receptive_field')


def _spec_axis(length: int, i: int, k: int, d: int):
    """docs/neighborhood_attention.md#window-rule, written out independently."""
    g, inner = i % d, i // d
    group_len = -(-(length - g) // d)
    start = min(max(inner - k // 2, 0), group_len - k)
    return {(start + t) * d + g for t in range(k)}


@pytest.mark.parametrize('grid,query,k,d', [
    ((7, 7), (0, 0), 3, 1),
    ((10, 10), (7, 9), 3, 3),
    ((9, 12), (4, 11), 5, 2),
    ((16, 16), (1, 15), 7, 2),
])
def test_na_window_mask_matches_spec(grid, query, k, d):
    mask = na_rf.na_window_mask(grid, query, k, d)
    rows = _spec_axis(grid[0], query[0], k, d)
    cols = _spec_axis(grid[1], query[1], k, d)
    expected = np.zeros(grid, bool)
    for r in rows:
        for c in cols:
            expected[r, c] = True
    assert mask.sum() == k * k
    np.testing.assert_array_equal(mask, expected)


def test_na_window_mask_small_map_is_padded():
    # A 4x4 map with k=7 is padded to 7x7 by the layer: keys on padding are dropped.
    mask = na_rf.na_window_mask((4, 4), (3, 3), 7, 1)
    assert mask.shape == (4, 4) and mask.all()
    with pytest.raises(ValueError, match='outside the 4x4 token grid'):
        na_rf.na_window_mask((4, 4), (4, 0), 3, 1)


def test_na_receptive_field_png(tmp_path):
    rng = np.random.default_rng(0)
    image, _, _ = synthetic().render_sample(rng, 64)
    path = str(tmp_path / 'img.png')
    cv2.imwrite(path, image[..., ::-1])
    out = str(tmp_path / 'rf.png')
    mask = na_rf.main([path, '--pixel', '63', '0', '--kernel-size', '3', '--dilation', '2',
                       '--out', out])
    assert mask.shape == (16, 16) and mask.sum() == 9
    assert mask[15, 0] and mask[11, 4] and not mask[14, 0]
    picture = cv2.imread(out)
    assert picture is not None and picture.shape[1] == 512
    with pytest.raises(ValueError, match='outside the 64x64 image'):
        na_rf.main([path, '--pixel', '64', '0', '--out', out])
    with pytest.raises(FileNotFoundError, match='could not read image'):
        na_rf.main([str(tmp_path / 'none.png'), '--pixel', '0', '0'])


def test_na_receptive_field_from_config(tmp_path):
    cfg = tmp_path / 'dinat.py'
    cfg.write_text("model = dict(type='mmboat.DiNAT', arch=dict(embed_dims=16, depths=[2, 2, 2, 2],"
                   " num_heads=[1, 2, 2, 4], mlp_ratio=2.0), dilations=[[1, 4], [1, 2], [1, 1],"
                   " [1, 1]], out_indices=(0, 1, 2, 3))\n")
    k, d = na_rf.backbone_window(str(cfg), None, 0, 1)
    assert (k, d) == (7, 4)
    with pytest.raises(ValueError, match='no block 5 in stage 0'):
        na_rf.backbone_window(str(cfg), None, 0, 5)


def test_fsla_clusters(tmp_path):
    fsla = load_tool('visualization/fsla_clusters.py', 'fsla_clusters')
    from mmboat.models.layers.feature_space_attention import FeatureSpaceLocalAttention
    from mmboat.ops import cluster_layout

    torch.manual_seed(0)
    module = FeatureSpaceLocalAttention(16, 2, cluster_size=8).eval()
    tokens = torch.randn(1, 30, 16)
    ids = fsla.cluster_ids(module, tokens, (5, 6))
    assert ids.shape == (2, 5, 6)
    _, sizes = cluster_layout(30, 8)
    for head in range(2):
        counts = np.bincount(ids[head].flatten().numpy(), minlength=len(sizes))
        np.testing.assert_array_equal(counts, sizes)
    # Independent check: the leaf of each token follows the module's own permutation.
    q = module.qkv(tokens).reshape(1, 30, 3, 2, 8).permute(2, 0, 3, 1, 4)[0]
    perm, _ = module.cluster(q)
    starts = np.cumsum([0] + sizes)
    for leaf in range(len(sizes)):
        members = perm[0, 0, starts[leaf]:starts[leaf + 1]]
        assert (ids[0].flatten()[members] == leaf).all()

    rng = np.random.default_rng(1)
    image, _, _ = synthetic().render_sample(rng, 64)
    path = str(tmp_path / 'img.png')
    cv2.imwrite(path, image[..., ::-1])
    cfg = tmp_path / 'boat.py'
    cfg.write_text("model = dict(type='mmboat.BOATSwinTransformer', arch=dict(embed_dims=16, "
                   "depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4]), out_indices=(0, 1, 2, 3))\n")
    out = str(tmp_path / 'fsla.png')
    ids = fsla.main([path, '--config', str(cfg), '--img-size', '64', '--out', out])
    assert ids.shape[1:] == (16, 16)
    assert osp.isfile(out) and cv2.imread(out) is not None
    with pytest.raises(ValueError, match='out of range'):
        fsla.main([path, '--config', str(cfg), '--img-size', '64', '--fsla-index', '99'])
