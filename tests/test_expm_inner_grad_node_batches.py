"""Note [The op chain below the inner grad level] (geofunc/_expm.py): generators the node is not written for
(a batch of them per task) or batched at another dim below the vmap level; the meta-gradients are
matrix_exp's (two mutants of _below_inner_grad and _physical survived test_expm_inner_grad_node.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

from geofunc._expm import expm

ref_expm = torch.linalg.matrix_exp


def _rand(shape, generator):
    return torch.randn(shape, generator=generator, dtype=torch.float64) / math.sqrt(shape[-1])


@pytest.mark.parametrize("tasks", [3, 5])
@pytest.mark.parametrize("in_dims", [1, 2])
def test_a_generator_vmapped_at_another_dim(in_dims, tasks, generator):
    """The generator itself vmapped at a dim other than 0 (the inner loss reads expm(a) of the inner grad's
    own input): below the vmap level its batch dim is moved to the front (5 tasks of 5×5: a batch dim
    read in the wrong place is still a valid shape)."""
    A = _rand((tasks, 5, 5), generator)
    W = _rand((5, 5), generator)
    X = A.movedim(0, in_dims).contiguous()

    def meta(f):
        inner = lambda a: (f(a) * W).sum() + ((f(a) @ W) ** 2).sum()
        return grad(lambda X: vmap(lambda a: grad(inner)(a).pow(2).sum(), in_dims=in_dims)(X).sum())(X)

    ref = meta(ref_expm)
    torch.testing.assert_close(meta(expm), ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_a_batch_of_generators_per_task(generator):
    """Each task holds a batch of generators (the inner grad sees a (2, 5, 5) tensor): the node takes 2-D
    generators only, the meta-gradient equals matrix_exp's (it was 0.85 off with the node taken)."""
    X = _rand((3, 2, 5, 5), generator)
    W = _rand((5, 5), generator)

    def meta(f):
        inner = lambda a: (f(a - a.mT) * W).sum() + ((f(a - a.mT) @ W) ** 2).sum()

        def task(A):
            for _ in range(2):
                A = A - 0.1 * grad(inner)(A)
            return inner(A)

        return grad(lambda X: vmap(task)(X).sum())(X)

    ref = meta(ref_expm)
    torch.testing.assert_close(meta(expm), ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
