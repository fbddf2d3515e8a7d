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


DINAT_CONFIG = ("model = dict(type='mmboat.DiNAT', arch=dict(embed_dims=16, depths=[2, 2, 2, "
                "2], num_heads=[1, 2, 2, 4], mlp_ratio=2.0), dilations=[[1, 4], [1, 2], [1, 1], "
                "[1, 1]], out_indices=(0, 1, 2, 3))\n")
BOAT_ARCH = 'dict(embed_dims={}, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])'
BOAT_CONFIG = ("model = dict(type='mmboat.BOATSwinTransformer', arch=" + BOAT_ARCH +
               ", out_indices=(0, 1, 2, 3))\n")


def _image(tmp_path, seed=1):
    image, _, _ = synthetic().render_sample(np.random.default_rng(seed), 64)
    path = str(tmp_path / 'img.png')
    cv2.imwrite(path, image[..., ::-1])
    return path


def _titles(monkeypatch, module):
    """Record the figure titles ``module`` draws (its text_header calls)."""
    titles = []
    real = module.text_header

    def spy(text, width):
        titles.append(text)
        return real(text, width)

    monkeypatch.setattr(module, 'text_header', spy)
    return titles


def _save_backbone(path, backbone_cfg, seed, official=False):
    """Random weights of ``backbone_cfg``: as a model checkpoint (``backbone.`` keys, mmengine
    layout) or, for BOAT-Swin, as an official release (Swin names under ``model``, with the
    final ``norm`` and the ``head`` instead of the output norms)."""
    from mmengine.registry import MODELS

    import mmboat.models  # noqa: F401
    torch.manual_seed(seed)
    weights = MODELS.build(backbone_cfg).state_dict()
    if official:
        release = {k: v for k, v in weights.items() if not k.split('.')[0][4:].isdigit()}
        last = weights['norm3.weight'].shape[0]
        release.update({'norm.weight': torch.ones(last), 'norm.bias': torch.zeros(last),
                        'head.weight': torch.randn(10, last), 'head.bias': torch.zeros(10)})
        torch.save({'model': release}, path)
    else:
        torch.save({'state_dict': {'backbone.' + k: v for k, v in weights.items()},
                    'meta': {}}, path)
    return str(path)


def test_na_receptive_field_says_when_weights_are_random(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / 'dinat.py'
    cfg.write_text(DINAT_CONFIG)
    image = _image(tmp_path)
    titles = _titles(monkeypatch, na_rf)
    mask = na_rf.main([image, '--pixel', '20', '20', '--config', str(cfg), '--block', '1',
                       '--out', str(tmp_path / 'rf.png')])
    printed = capsys.readouterr().out
    assert 'WARNING: no --checkpoint' in printed and 'RANDOM weights' in printed
    assert 'RANDOM WEIGHTS' in titles[-1] and 'k=7, d=4' in titles[-1]
    np.testing.assert_array_equal(mask, na_rf.na_window_mask((16, 16), (5, 5), 7, 4))
    # The NAT checkpoint of the same model is accepted and named in the title.
    ckpt = _save_backbone(tmp_path / 'dinat.pth', dict(
        type='mmboat.DiNAT', arch=dict(embed_dims=16, depths=[2, 2, 2, 2],
                                       num_heads=[1, 2, 2, 4], mlp_ratio=2.0),
        dilations=[[1, 4], [1, 2], [1, 1], [1, 1]], out_indices=(0, 1, 2, 3)), seed=0)
    na_rf.main([image, '--pixel', '20', '20', '--config', str(cfg), '--checkpoint', ckpt,
                '--out', str(tmp_path / 'rf.png')])
    assert 'WARNING' not in capsys.readouterr().out and 'weights: dinat.pth' in titles[-1]
    backbone, note, _ = na_rf.load_backbone(str(cfg), None)
    assert note is None and na_rf.backbone_window(backbone, 0, 1) == (7, 4)
    with pytest.raises(ValueError, match='no block 5 in stage 0'):
        na_rf.backbone_window(backbone, 0, 5)
    with pytest.raises(ValueError, match='--checkpoint needs --config'):
        na_rf.main([image, '--pixel', '0', '0', '--checkpoint', ckpt])
    # A BOAT-Swin checkpoint for the DiNAT config is refused, naming both families.
    boat = _save_backbone(tmp_path / 'boat.pth', dict(
        type='mmboat.BOATSwinTransformer', arch=dict(embed_dims=16, depths=[2, 2, 2, 2],
                                                     num_heads=[1, 2, 2, 4])), seed=0)
    with pytest.raises(ValueError, match='BOAT-Swin model, but the backbone is DiNAT'):
        na_rf.main([image, '--pixel', '0', '0', '--config', str(cfg), '--checkpoint', boat])


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

    path = _image(tmp_path)
    cfg = tmp_path / 'boat.py'
    cfg.write_text(BOAT_CONFIG.format(16))
    out = str(tmp_path / 'fsla.png')
    ids = fsla.main([path, '--config', str(cfg), '--img-size', '64', '--out', out])
    assert ids.shape[1:] == (16, 16)
    assert osp.isfile(out) and cv2.imread(out) is not None
    with pytest.raises(ValueError, match='out of range'):
        fsla.main([path, '--config', str(cfg), '--img-size', '64', '--fsla-index', '99'])


def test_fsla_clusters_weights(tmp_path, capsys, monkeypatch):
    fsla = load_tool('visualization/fsla_clusters.py', 'fsla_clusters')
    titles = _titles(monkeypatch, fsla)
    image = _image(tmp_path)
    cfg = tmp_path / 'boat.py'
    cfg.write_text(BOAT_CONFIG.format(16))
    backbone = dict(type='mmboat.BOATSwinTransformer', arch=dict(
        embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4]), out_indices=(0, 1, 2, 3))
    common = [image, '--config', str(cfg), '--img-size', '64', '--out', str(tmp_path / 'f.png')]

    def run(seed, *extra):
        torch.manual_seed(seed)
        return fsla.main(common + list(extra))

    # Random weights: said on the console and in the title; the clusters follow the seed.
    random_ids = [run(seed) for seed in (1, 2)]
    assert 'WARNING: no --checkpoint' in capsys.readouterr().out
    assert 'RANDOM WEIGHTS' in titles[-1]
    assert not np.array_equal(*random_ids)
    # A model checkpoint: the clusters follow the weights, not the seed.
    ckpt = _save_backbone(tmp_path / 'model.pth', backbone, seed=5)
    trained = [run(seed, '--checkpoint', ckpt) for seed in (1, 2)]
    np.testing.assert_array_equal(*trained)
    printed = capsys.readouterr().out
    assert 'WARNING' not in printed and 'RANDOM' not in titles[-1]
    assert 'weights: model.pth' in titles[-1]
    # The same weights as an official release are converted in memory (and said so): same
    # clusters. The release has no output norms, which the FSLA blocks do not use.
    release = _save_backbone(tmp_path / 'release.pth', backbone, seed=5, official=True)
    np.testing.assert_array_equal(run(3, '--checkpoint', release), trained[0])
    printed = capsys.readouterr().out
    assert 'converted in memory' in printed and 'boat_swin_to_mmboat.py' in printed
    assert 'norm0/norm1/norm2/norm3 left fresh' in printed
    # Without --config the default BOAT-Swin-T takes the checkpoint; these weights do not fit it.
    with pytest.raises(ValueError, match='another BOAT-Swin architecture'):
        fsla.main([image, '--checkpoint', ckpt, '--img-size', '64'])
    wide = _save_backbone(tmp_path / 'wide.pth', dict(backbone, arch=dict(
        backbone['arch'], embed_dims=32)), seed=0)
    with pytest.raises(ValueError, match=r'\(32, 3, 4, 4\) in the checkpoint vs \(16, 3, 4, 4\).*'
                       'another BOAT-Swin architecture'):
        run(0, '--checkpoint', wide)
    nat = _save_backbone(tmp_path / 'nat.pth', dict(
        type='mmboat.NAT', arch=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                                     mlp_ratio=2.0)), seed=0)
    with pytest.raises(ValueError, match='NAT/DiNAT model, but the backbone is BOATSwin'):
        run(0, '--checkpoint', nat)
    torch.save({'state_dict': {'fc.weight': torch.zeros(2, 2)}}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='holds no weights of BOATSwinTransformer.*'
                       'boat_swin_to_mmboat.py'):
        run(0, '--checkpoint', str(tmp_path / 'other.pth'))
