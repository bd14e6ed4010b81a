"""What every kernel test shares: a norm-relative error and NaN-filled allocations."""

import torch


def norm_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def nan_filled(make):
    """Wraps torch.empty / empty_like so every float buffer starts as NaN."""

    def empty(*args, **kwargs):
        t = make(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    return empty
