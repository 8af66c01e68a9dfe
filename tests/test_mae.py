"""fastvit.nn.MaskedAutoencoderViT against a transcription of the official MAE (facebookresearch/mae).

The oracle below (``OfficialMAE``) is a straightforward transcription of ``models_mae.py`` and
``util/pos_embed.py`` (He et al., 2022, arXiv:2111.06377), built from timm's ``Block`` and ``PatchEmbed`` as
the official code is. Two mechanical differences: timm 1.0's ``Block`` no longer takes ``qk_scale`` (the
official code passes ``None``, the default), and ``random_masking`` takes an optional ``noise`` so that both
models can be fed the same noise. Tiny models only: the machine is a shared 2-core CPU.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, PatchEmbed

import fastvit.nn.mae as mae_mod
from fastvit import ops
from fastvit.nn.mae import MaskedAutoencoderViT

TINY = dict(
    img_size=32,
    patch_size=8,
    in_chans=3,
    embed_dim=48,
    depth=2,
    num_heads=3,
    decoder_embed_dim=32,
    decoder_depth=2,
    decoder_num_heads=2,
    mlp_ratio=4.0,
)
B = 3
NUM_PATCHES = (32 // 8) ** 2


# --------------------------------------------------------------------------------------- the oracle
def oracle_1d_sincos(embed_dim, pos):
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def oracle_2d_sincos(embed_dim, grid_size, cls_token=False):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in the official code
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = oracle_1d_sincos(embed_dim // 2, grid[0])
    emb_w = oracle_1d_sincos(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


class OfficialMAE(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        norm_layer=nn.LayerNorm,
        norm_pix_loss=False,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches**0.5)
        pos_embed = oracle_2d_sincos(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        dpos = oracle_2d_sincos(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dpos).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
        h = w = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))

    def random_masking(self, x, mask_ratio, noise=None):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise=None):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# --------------------------------------------------------------------------------------- helpers
def make_pair(norm_pix_loss=False, seed=0):
    """An oracle with the official init and a fastvit model holding the oracle's weights."""
    torch.manual_seed(seed)
    oracle = OfficialMAE(**TINY, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=norm_pix_loss)
    ours = MaskedAutoencoderViT(**TINY, norm_pix_loss=norm_pix_loss, norm_eps=1e-6)
    # The official init leaves biases at zero and LayerNorm at (1, 0); perturb them so that a dropped or
    # mis-wired bias / norm parameter would show up in the comparison.
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if p.requires_grad and (name.endswith("bias") or "norm" in name):
                p.add_(0.1 * torch.randn_like(p))
    missing, unexpected = ours.load_state_dict(oracle.state_dict(), strict=True)
    assert not missing and not unexpected
    oracle.eval()
    ours.eval()
    return oracle, ours


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(B, 3, 32, 32, generator=g)
    noise = torch.rand(B, NUM_PATCHES, generator=g)
    return imgs, noise


def close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------- structure
def test_state_dict_keys_shapes_and_frozen_pos_embed():
    torch.manual_seed(0)
    oracle = OfficialMAE(**TINY, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    ours = MaskedAutoencoderViT(**TINY)
    ref_sd, our_sd = oracle.state_dict(), ours.state_dict()
    assert list(our_sd.keys()) == list(ref_sd.keys())
    for k in ref_sd:
        assert our_sd[k].shape == ref_sd[k].shape, k
        assert our_sd[k].dtype == ref_sd[k].dtype, k
    # the sin-cos tables: same values, frozen, still in the state_dict
    for name in ("pos_embed", "decoder_pos_embed"):
        p = getattr(ours, name)
        assert isinstance(p, nn.Parameter) and not p.requires_grad
        close(p.detach(), ref_sd[name], atol=1e-6, rtol=0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in oracle.named_parameters() if p.requires_grad}
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable


def test_norm_eps_is_used():
    ours = MaskedAutoencoderViT(**TINY, norm_eps=1e-3)
    eps = {m.eps for m in ours.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-3}, eps


def test_same_seed_gives_the_official_weights():
    """Construction and init draw from the global RNG in the reference's order: same seed, same weights."""
    torch.manual_seed(11)
    oracle = OfficialMAE(**TINY, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    torch.manual_seed(11)
    ours = MaskedAutoencoderViT(**TINY)
    ref_sd = oracle.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


def test_official_init():
    torch.manual_seed(0)
    ours = MaskedAutoencoderViT(**TINY)
    # xavier_uniform: |w| <= sqrt(6 / (fan_in + fan_out)), and the extreme values come close to that bound
    # (PyTorch's default Linear / Conv2d init has a smaller bound, 1/sqrt(fan_in), which fails the lower check).
    linears = {n: m for n, m in ours.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 4 * (TINY["depth"] + TINY["decoder_depth"]) + 2
    for name, m in linears.items():
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        amax = m.weight.abs().max().item()
        assert amax <= bound + 1e-7 and amax > 0.9 * bound, (name, amax, bound)
        assert m.bias is not None and torch.count_nonzero(m.bias) == 0, name
    w = ours.patch_embed.proj.weight
    fan_out, fan_in = w.shape[0], w[0].numel()
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert bound + 1e-7 >= w.abs().max().item() > 0.9 * bound
    for n, m in ours.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), n
    # normal(std=.02) for the cls and mask tokens: nonzero, and nowhere near the xavier scale
    for t in (ours.cls_token, ours.mask_token):
        assert torch.count_nonzero(t) == t.numel()
        assert 0.005 < t.std().item() < 0.05 and t.abs().max().item() < 0.12


# --------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_forward_matches_official(norm_pix_loss):
    oracle, ours = make_pair(norm_pix_loss=norm_pix_loss)
    imgs, noise = inputs()
    with torch.no_grad():
        ref = oracle(imgs, mask_ratio=0.75, noise=noise)
        out = ours(imgs, mask_ratio=0.75, noise=noise)
        ref_latent, ref_mask, ref_restore = oracle.forward_encoder(imgs, 0.75, noise)
        latent, mask, restore = ours.forward_encoder(imgs, 0.75, noise=noise)
    assert latent.shape == (B, 1 + NUM_PATCHES // 4, TINY["embed_dim"])
    close(latent, ref_latent)
    assert torch.equal(mask, ref_mask) and torch.equal(restore, ref_restore)
    loss, pred, mask = out
    assert pred.shape == (B, NUM_PATCHES, 8 * 8 * 3)
    assert mask.dtype == ref[2].dtype and torch.equal(mask, ref[2])
    assert mask.sum().item() == B * (NUM_PATCHES - NUM_PATCHES // 4)
    close(pred, ref[1])
    close(loss, ref[0])
    assert loss.dim() == 0
    # norm_pix_loss changes the loss (so the flag is really honoured)
    with torch.no_grad():
        other = MaskedAutoencoderViT(**TINY, norm_pix_loss=not norm_pix_loss)
        other.load_state_dict(ours.state_dict())
        assert not torch.allclose(other(imgs, 0.75, noise)[0], loss, rtol=1e-3)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.9])
def test_other_mask_ratios(mask_ratio):
    oracle, ours = make_pair(seed=3)
    imgs, noise = inputs(seed=4)
    with torch.no_grad():
        ref = oracle.forward_encoder(imgs, mask_ratio, noise)
        out = ours.forward_encoder(imgs, mask_ratio, noise=noise)
        pred_ref = oracle.forward_decoder(ref[0], ref[2])
        pred = ours.forward_decoder(out[0], out[2])
    assert out[0].shape[1] == 1 + int(NUM_PATCHES * (1 - mask_ratio))
    close(out[0], ref[0])
    assert torch.equal(out[1], ref[1])
    close(pred, pred_ref)


def test_random_noise_follows_the_global_generator():
    """Without ``noise`` both draw ``torch.rand(B, N)`` from the global generator: same seed, same mask."""
    oracle, ours = make_pair(seed=5)
    imgs, _ = inputs()
    with torch.no_grad():
        torch.manual_seed(123)
        ref = oracle(imgs)
        torch.manual_seed(123)
        out = ours(imgs)
        torch.manual_seed(124)
        out2 = ours(imgs)
    assert torch.equal(out[2], ref[2])
    close(out[1], ref[1])
    close(out[0], ref[0])
    assert not torch.equal(out2[2], out[2])


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_gradients_match_official(norm_pix_loss):
    oracle, ours = make_pair(norm_pix_loss=norm_pix_loss, seed=7)
    imgs, noise = inputs(seed=8)
    imgs_ref = imgs.clone().requires_grad_(True)
    imgs_our = imgs.clone().requires_grad_(True)
    oracle(imgs_ref, 0.75, noise)[0].backward()
    ours(imgs_our, 0.75, noise)[0].backward()
    ref_grads = {n: p.grad for n, p in oracle.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert ref_grads.keys() == our_grads.keys()
    for n, g in ref_grads.items():
        assert our_grads[n] is not None, n
        assert g.abs().max() > 0, n  # every trainable parameter really gets a gradient
        close(our_grads[n], g, atol=1e-6, rtol=1e-4)
    close(imgs_our.grad, imgs_ref.grad, atol=1e-7, rtol=1e-4)
    assert ours.pos_embed.grad is None and ours.decoder_pos_embed.grad is None


# --------------------------------------------------------------------------------------- masking path
def test_only_kept_patches_are_embedded(monkeypatch):
    _, ours = make_pair()
    imgs, noise = inputs()
    calls = []
    real = ops.patch_embed

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs.get("ids_keep"), out.shape))
        return out

    monkeypatch.setattr(ops, "patch_embed", spy)
    seen = []
    hook = ours.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    with torch.no_grad():
        ours(imgs, 0.75, noise)
    hook.remove()
    assert len(calls) == 1
    ids_keep, shape = calls[0]
    n_keep = NUM_PATCHES // 4
    assert ids_keep is not None and tuple(ids_keep.shape) == (B, n_keep)
    assert torch.equal(ids_keep, torch.argsort(noise, dim=1)[:, :n_keep])
    assert tuple(shape) == (B, 1 + n_keep, TINY["embed_dim"])
    assert seen == [torch.Size((B, 1 + n_keep, TINY["embed_dim"]))]


def test_decoder_uses_mae_unshuffle(monkeypatch):
    _, ours = make_pair()
    imgs, noise = inputs()
    calls = []
    real = ops.mae_unshuffle

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pos_embed") is ours.decoder_pos_embed)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "mae_unshuffle", spy)
    with torch.no_grad():
        ours(imgs, 0.75, noise)
    assert calls == [True]


def test_patchify_roundtrip_and_layout():
    oracle, ours = make_pair()
    imgs, _ = inputs()
    x = ours.patchify(imgs)
    assert x.shape == (B, NUM_PATCHES, 8 * 8 * 3)
    assert torch.equal(x, oracle.patchify(imgs))
    assert torch.equal(ours.unpatchify(x), imgs)
    y = torch.randn(B, NUM_PATCHES, 8 * 8 * 3)
    assert torch.equal(ours.patchify(ours.unpatchify(y)), y)


def test_forward_loss_matches_official():
    oracle, ours = make_pair(norm_pix_loss=True)
    imgs, noise = inputs()
    pred = torch.randn(B, NUM_PATCHES, 8 * 8 * 3)
    mask = (noise > 0.5).float()
    close(ours.forward_loss(imgs, pred, mask), oracle.forward_loss(imgs, pred, mask))


# --------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise():
    ours = MaskedAutoencoderViT(**TINY)
    imgs, noise = inputs()
    with pytest.raises(ValueError, match="imgs"):
        ours(torch.randn(B, 1, 32, 32))
    with pytest.raises(ValueError, match="imgs"):
        ours(torch.randn(B, 3, 40, 40))
    with pytest.raises(ValueError, match="imgs"):
        ours(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="imgs"):
        ours(np.zeros((B, 3, 32, 32), dtype=np.float32))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            ours(imgs, mask_ratio=bad)
    with pytest.raises(ValueError, match="noise"):
        ours(imgs, 0.75, noise=torch.rand(B, NUM_PATCHES + 1))
    with pytest.raises(ValueError, match="noise"):
        ours(imgs, 0.75, noise=torch.rand(B + 1, NUM_PATCHES))
    with pytest.raises(ValueError, match="x"):
        ours.unpatchify(torch.randn(B, NUM_PATCHES, 10))
    with pytest.raises(ValueError, match="ids_restore"):
        ours.forward_decoder(torch.randn(B, 5, TINY["embed_dim"]), torch.zeros(B, NUM_PATCHES + 2, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(embed_dim=50), "num_heads"),
        (dict(decoder_embed_dim=33), "decoder_num_heads"),
        (dict(img_size=30), "img_size"),
        (dict(embed_dim=42, num_heads=3), "embed_dim"),  # sin-cos needs a multiple of 4
        (dict(depth=-1), "depth"),
        (dict(mlp_ratio=0), "mlp_ratio"),
    ],
)
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MaskedAutoencoderViT(**{**TINY, **kwargs})


def test_docstrings():
    for obj in (
        MaskedAutoencoderViT,
        MaskedAutoencoderViT.forward,
        MaskedAutoencoderViT.forward_encoder,
        MaskedAutoencoderViT.forward_decoder,
        MaskedAutoencoderViT.forward_loss,
        MaskedAutoencoderViT.patchify,
        MaskedAutoencoderViT.unpatchify,
        MaskedAutoencoderViT.random_masking,
    ):
        assert obj.__doc__ and len(obj.__doc__.strip()) > 40, obj
    assert "2111.06377" in mae_mod.__doc__ + MaskedAutoencoderViT.__doc__


def test_rectangular_images():
    """Beyond the reference (square only): a (32, 48) image gives a 4 x 6 grid; patchify round-trips and the
    sin-cos table is the 2-D one for that grid (row r, column c -> [enc(c) | enc(r)])."""
    torch.manual_seed(0)
    ours = MaskedAutoencoderViT(**{**TINY, "img_size": (32, 48)})
    imgs = torch.randn(2, 3, 32, 48)
    assert torch.equal(ours.unpatchify(ours.patchify(imgs)), imgs)
    square = oracle_2d_sincos(48, 6, cls_token=False).reshape(6, 6, 48)  # rows x cols on a 6 x 6 grid
    close(ours.pos_embed[0, 1:].reshape(4, 6, 48), torch.from_numpy(square[:4]).float(), atol=1e-6, rtol=0)
    loss, pred, mask = ours(imgs, 0.75, torch.rand(2, 24))
    assert pred.shape == (2, 24, 8 * 8 * 3) and mask.sum().item() == 2 * 18 and torch.isfinite(loss)


def test_bfloat16_close_to_float32():
    _, ours = make_pair(seed=9)
    imgs, noise = inputs(seed=10)
    with torch.no_grad():
        loss32, pred32, mask32 = ours(imgs, 0.75, noise)
        half = ours.to(torch.bfloat16)
        loss16, pred16, mask16 = half(imgs.bfloat16(), 0.75, noise)
    assert pred16.dtype == torch.bfloat16 and loss16.dtype == torch.bfloat16
    assert torch.equal(mask16, mask32)
    torch.testing.assert_close(pred16.float(), pred32, atol=0.1, rtol=0.05)
    torch.testing.assert_close(loss16.float(), loss32, atol=0.02, rtol=0.02)
