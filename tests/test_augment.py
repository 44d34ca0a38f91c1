"""Batch augmentation: shapes, determinism, flips, bounded translations."""

from __future__ import annotations

import pytest
import torch

from catsdogs.train.augment import augment_batch, random_hflip, random_translate


def batch(n: int = 6, size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_kept_and_seeded() -> None:
    x = batch()
    a = augment_batch(x, gen(1))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, augment_batch(x, gen(1)))
    assert not torch.equal(a, augment_batch(x, gen(2)))
    assert torch.equal(x, batch()), "input must not be modified in place"


def test_flip_twice_is_identity_and_flips_some_images() -> None:
    x = batch(n=32)
    once = random_hflip(x, gen(5))
    assert torch.equal(random_hflip(once, gen(5)), x)
    flipped = [not torch.equal(once[i], x[i]) for i in range(len(x))]
    assert 0 < sum(flipped) < len(x)
    for i, f in enumerate(flipped):
        assert torch.equal(once[i], x[i].flip(1) if f else x[i])


def _find_shift(out: torch.Tensor, src: torch.Tensor, s: int) -> tuple[int, int]:
    """Return the (dy, dx) with |.| <= s such that out's overlap equals src shifted by it."""
    h, w = src.shape[:2]
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            o = out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
            i = src[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            if torch.equal(o, i):
                return dy, dx
    raise AssertionError("output is not a bounded shift of the input")


@pytest.mark.parametrize("padding", ["reflect", "zero"])
def test_translation_is_a_bounded_shift(padding: str) -> None:
    x = batch(n=16)
    s = 3
    out = random_translate(x, gen(7), max_shift=s, padding=padding)
    shifts = set()
    for i in range(len(x)):
        dy, dx = _find_shift(out[i], x[i], s)
        shifts.add((dy, dx))
        if padding == "zero":
            h, w = x.shape[1:3]
            rows = list(range(dy)) if dy > 0 else list(range(h + dy, h))
            cols = list(range(dx)) if dx > 0 else list(range(w + dx, w))
            assert int(out[i][rows].sum()) == 0 and int(out[i][:, cols].sum()) == 0
        else:
            # Reflection only repeats pixels from the image's own rows/columns.
            pixels = {tuple(p) for p in x[i].reshape(-1, 3).tolist()}
            assert {tuple(p) for p in out[i].reshape(-1, 3).tolist()} <= pixels
    assert len(shifts) > 1


def test_reflect_padding_mirrors_without_repeating_the_edge() -> None:
    x = torch.arange(5, dtype=torch.uint8).view(1, 1, 5, 1).expand(1, 5, 5, 1).contiguous()
    g = gen(0)
    while True:  # find a draw with a horizontal shift of +2 and no vertical shift
        state = g.get_state()
        dy, dx = torch.randint(-2, 3, (2, 1), generator=g)[:, 0].tolist()
        if (dy, dx) == (0, 2):
            break
    g.set_state(state)
    out = random_translate(x, g, max_shift=2, padding="reflect")
    assert out[0, 0, :, 0].tolist() == [2, 1, 0, 1, 2]


def test_nchw_float_matches_nhwc_uint8() -> None:
    x = batch()
    a = augment_batch(x, gen(3), layout="NHWC")
    b = augment_batch(x.permute(0, 3, 1, 2).float(), gen(3), layout="NCHW")
    assert torch.equal(a.permute(0, 3, 1, 2).float(), b)


def test_zero_shift_is_identity_and_bad_padding_rejected() -> None:
    x = batch()
    assert torch.equal(random_translate(x, gen(), max_shift=0), x)
    with pytest.raises(ValueError, match="padding"):
        random_translate(x, gen(), padding="wrap")
