"""``TorchOptimizer``: a functional optimizer of ``geofunc.optim`` behind ``torch.optim.Optimizer``'s
interface, for ``nn.Module`` code (geoopt's ``ManifoldParameter`` + ``RiemannianAdam``)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from .._errors import ManifoldError, describe
from ._base import Optimizer

__all__ = ["TorchOptimizer"]


# Note [A functional optimizer behind torch.optim]
# The module's parameters hold the points themselves (as geoopt's ManifoldParameter does), keyed by
# their names; `constraints` names the constrained ones. One functional state covers every parameter
# (so that a global transform, clip_by_global_norm, sees all of them), created at the first step. A
# parameter whose .grad is None at a step (unused by that loss) gets a zero gradient: its moments
# decay and momentum still moves it, where torch.optim skips it (one shared state cannot skip one
# entry). The learning rate is read from param_groups[0]["lr"] at every step (the functional
# optimizer is built with it as a schedule), so torch.optim.lr_scheduler drives it as any optimizer.
# The state_dict holds the functional state (NamedTuples of tensors, allowlisted for torch.load).
# step is never compiled (torch.compiler.disable: a compiled caller runs it eagerly). Dynamo traces a
# torch.optim.Optimizer's attributes as its own optimizer object and dropped the assignment of the new
# state: torch.compile(opt.step) re-initialized the state at every step (Adam's moments and count
# restarted: 1e-4 off eager after three float64 steps, silently). For a compiled step, compile the
# functional optimizer's update (its state is an explicit argument).
class TorchOptimizer(torch.optim.Optimizer):
    """A ``geofunc.optim`` optimizer stepping the parameters of an ``nn.Module`` in place.

    Args:
        named_parameters: ``module.named_parameters()`` (or any ``(name, tensor)`` pairs); those
            with ``requires_grad=False`` are left out.
        constraints: ``{name: space}`` for the parameters that hold points of a space (their
            values must be points: checked here); every other parameter is free.
        optimizer: a factory of ``geofunc.optim`` with the signature of :func:`~geofunc.optim.radam`
            (``optimizer(constraints, lr=..., **kwargs)``): ``rsgd``, ``radam``, ``radamw`` or your own.
        lr: the learning rate, ``param_groups[0]["lr"]`` (schedulers of ``torch.optim.lr_scheduler``
            change it between steps).
        **kwargs: passed to ``optimizer`` (``momentum``, ``betas``, ``weight_decay``, ...).

    ``step(closure=None)`` reads every parameter's ``.grad`` (a parameter without one gets a zero
    gradient: Note [A functional optimizer behind torch.optim]), takes one step of the functional
    optimizer and writes the new points into the parameters. ``zero_grad``, ``state_dict`` /
    ``load_state_dict`` and learning-rate schedulers work as for ``torch.optim`` optimizers; one
    parameter group.

    Example::

        >>> model = nn.Linear(8, 4, bias=True)
        >>> with torch.no_grad():
        ...     model.weight.copy_(gf.Stiefel().sample((4, 8)))
        >>> opt = gf.optim.TorchOptimizer(model.named_parameters(), {"weight": gf.Stiefel()}, gf.optim.radam, lr=1e-2)
        >>> loss = model(torch.randn(16, 8)).pow(2).sum()
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        constraints: Mapping[str, Any],
        optimizer: Callable[..., Optimizer],
        lr: float,
        **kwargs: Any,
    ) -> None:
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not named:
            raise ManifoldError("TorchOptimizer: expected parameters that require grad, got none.")
        names = [n for n, _ in named]
        if len(set(names)) != len(names):
            raise ManifoldError(f"TorchOptimizer: expected distinct parameter names, got {names}.")
        unknown = sorted(set(constraints) - set(names))
        if unknown:
            raise ManifoldError(f"TorchOptimizer: expected constraints for parameters that require grad "
                                f"({', '.join(names)}), got constraints for {', '.join(map(repr, unknown))}.")
        with torch.no_grad():
            for n, p in named:
                space = constraints.get(n)
                if space is not None and not bool(space.contains(p.detach()).all()):
                    raise ManifoldError(f"TorchOptimizer: expected parameter {n!r} to be a point of {space!r} "
                                        f"(assign one, e.g. space.sample(shape) or space.project(W)), got "
                                        f"{describe(p.detach())} off it.")
        super().__init__([p for _, p in named], {"lr": lr})
        self._names = names
        self._constraints = {n: constraints.get(n) for n in names}
        self._opt = optimizer(self._constraints, lr=self._current_lr, **kwargs)
        self._fstate: Optional[Any] = None

    def _current_lr(self, count: torch.Tensor) -> float:
        del count
        return self.param_groups[0]["lr"]

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_names", None) is not None:
            raise ManifoldError("TorchOptimizer: expected its one parameter group, got add_param_group; "
                                "use the functional optimizer's mask= or multi_transform for groups.")
        super().add_param_group(param_group)

    def _named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._names, self.param_groups[0]["params"]))

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        return _eager_step(self, closure)  # Note [A functional optimizer behind torch.optim]: never compiled

    @torch.no_grad()
    def _step(self, closure: Optional[Callable[[], Any]]) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._named()
        points = {n: p.detach() for n, p in params.items()}
        grads = {}
        for n, p in params.items():
            if p.grad is not None and p.grad.is_sparse:
                raise ManifoldError(f"TorchOptimizer: expected a dense gradient for {n!r}, got a sparse one.")
            grads[n] = torch.zeros_like(points[n]) if p.grad is None else p.grad.detach()
        if self._fstate is None:
            self._fstate = self._opt.init(points)
        new, self._fstate = self._opt.update(grads, self._fstate, points)
        for n, p in params.items():
            p.copy_(new[n])
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``{"param_groups": [...], "names": [...], "functional_state": state}`` (the state ``None``
        before the first step)."""
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(range(len(self._names)))}
                  for g in self.param_groups]
        return {"param_groups": groups, "names": list(self._names), "functional_state": self._fstate}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict.get("names", [])) != self._names:
            raise ManifoldError(f"TorchOptimizer.load_state_dict: expected a state for the parameters "
                                f"{self._names}, got one for {state_dict.get('names')}.")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self._fstate = state_dict["functional_state"]


@torch.compiler.disable  # (a plain function: on torch 2.6 the decorator does not bind as a method)
def _eager_step(opt: TorchOptimizer, closure: Optional[Callable[[], Any]]) -> Any:
    return opt._step(closure)
