"""Schedule base class: clock, warmup, noise, and the live controls (set_lr, set_decay).

A schedule is a pure function of the optimizer step plus a small amount of control
state (the LR rescale anchor, an LR hold, the decay-factor history and, for plateau, its
counters).
Keeping the function pure is what makes replay and ``preview`` exact: the training loop,
the server's preview and a resumed run all evaluate the same ``lr_at``.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .registry import no_decay_message


class NoDecayFactor(ValueError):
    """``set_decay`` on a schedule that has no decay factor."""


class DecayCannotAct(ValueError):
    """``set_decay`` at a step after which no decay happens (single cosine cycle, past the
    last milestone, LR held...): the factor would change nothing, so it is refused."""


class CommonParams(BaseModel):
    """Fields every schedule accepts (timm semantics for the warmup)."""

    model_config = ConfigDict(extra="forbid")

    per_step: bool = True
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_lr: float = Field(0.0, ge=0)
    warmup_prefix: bool = False


class NoiseParams(BaseModel):
    """timm's LR noise: ``lr * (1 + n)``, ``n`` drawn from a generator seeded with
    ``noise_seed + t`` (t = the step when per_step, else the epoch) so it is
    reproducible without any RNG state."""

    noise_range_t: Union[float, tuple[float, float], None] = None
    noise_type: Literal["normal", "uniform"] = "normal"
    noise_pct: float = Field(0.67, gt=0)
    noise_std: float = Field(1.0, gt=0)
    noise_seed: int = 42


def _positive_finite(what: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return value


class Schedule:
    name: ClassVar[str]
    params_model: ClassVar[type[CommonParams]]
    # Name of the params field that ``set_decay`` controls; None = no decay factor.
    decay_param: ClassVar[Optional[str]] = None
    # Inclusive upper bound for a decay factor (plateau needs < 1: see its class).
    decay_max: ClassVar[float] = 1.0
    decay_max_inclusive: ClassVar[bool] = True
    # cawb warms up per batch even when its cosine moves once per epoch (as upstream).
    per_batch_warmup: ClassVar[bool] = False

    def __init__(self, params: CommonParams, *, base_lr: float, steps_per_epoch: int, epochs: int) -> None:
        if not isinstance(params, self.params_model):
            raise TypeError(f"{type(self).__name__} needs {self.params_model.__name__}, got {type(params).__name__}")
        if not (isinstance(steps_per_epoch, int) and steps_per_epoch >= 1):
            raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        self.params = params
        self.base_lr = _positive_finite("base_lr", base_lr)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.warmup = float(params.warmup_epochs)
        # lr = _num * (u / _den) with u the unscaled schedule value; at the step where
        # set_lr anchored it u == _den, so the requested value comes back bit-exact.
        self._num = 1.0
        self._den = 1.0
        # (from_step, value): set_lr/scale_lr with hold pin the LR from that step on; a
        # later set_lr/scale_lr without hold releases it (the shape rule applies again).
        self._hold: Optional[tuple[int, float]] = None
        # [(n_from, gamma)]: gamma applies to the decays numbered after n_from.
        self._decay_history: list[tuple[float, float]] = (
            [(0.0, float(getattr(params, self.decay_param)))] if self.decay_param else []
        )

    # -- what a subclass provides ------------------------------------------------------

    def curve(self, t: float) -> float:
        """Unscaled LR at schedule time ``t`` (epochs, after the warmup prefix if any)."""
        raise NotImplementedError

    def decays_at(self, t: float) -> float:
        """How many decays have happened by schedule time ``t`` (fractional for a
        continuous decay). Only called when ``decay_param`` is set."""
        raise NotImplementedError

    def warmup_target(self) -> float:
        """The LR the linear warmup ramps to (timm: the base LR)."""
        return self.base_lr

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- clock -------------------------------------------------------------------------

    def epoch_time(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.params.per_step:
            return step / self.steps_per_epoch
        return float(step // self.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def in_warmup(self, step: int) -> bool:
        """Whether ``step`` is inside the linear warmup (monotone: True then False)."""
        if self.per_batch_warmup and not self.params.per_step:
            return step / self.steps_per_epoch < self.warmup
        return self.epoch_time(step) < self.warmup

    def schedule_time(self, t: float) -> float:
        p = self.params
        if p.warmup_prefix:
            return max(t - self.warmup, 0.0)
        return t

    # -- evaluation --------------------------------------------------------------------

    def unscaled_lr(self, step: int) -> float:
        return self.value_at(self.epoch_time(step), step)

    def value_at(self, t: float, step: int) -> float:
        """Unscaled LR at epoch time ``t``; ``step`` seeds the noise and times a per-batch warmup."""
        p = self.params
        if self.per_batch_warmup and not p.per_step:
            tw = step / self.steps_per_epoch
            if tw < self.warmup:
                t = tw
            elif t < self.warmup:
                # The warmup ended inside this epoch; the per-epoch curve only takes over at
                # the next epoch. Upstream (cawb's step_batch) leaves the LR alone once the
                # warmup is over, so it stays at the last warmup value until then.
                t = self._last_warmup_step() / self.steps_per_epoch
        if t < self.warmup:
            lr = p.warmup_lr + t * ((self.warmup_target() - p.warmup_lr) / self.warmup)
        else:
            lr = self.curve(self.schedule_time(t))
        return self._noise(lr, t, step)

    def _last_warmup_step(self) -> int:
        spe = self.steps_per_epoch
        k = max(math.ceil(self.warmup * spe) - 1, 0)
        while (k + 1) / spe < self.warmup:  # float rounding of warmup * spe, both ways
            k += 1
        while k > 0 and k / spe >= self.warmup:
            k -= 1
        return k

    def lr_at(self, step: int) -> float:
        hold = self._hold
        if hold is not None and step >= hold[0]:
            return hold[1]
        return self._num * (self.unscaled_lr(step) / self._den)

    def held(self, step: int) -> Optional[tuple[int, float]]:
        """(from_step, value) when a hold pins the LR at ``step``, else None."""
        hold = self._hold
        return hold if hold is not None and step >= hold[0] else None

    def _noise(self, lr: float, t: float, step: int) -> float:
        p = self.params
        rng = getattr(p, "noise_range_t", None)
        if rng is None:
            return lr
        on = rng[0] <= t < rng[1] if isinstance(rng, tuple) else t >= rng
        if not on:
            return lr
        from ._noise import timm_noise

        t_seed = step if p.per_step else int(t)
        return lr + lr * timm_noise(p.noise_seed + t_seed, p.noise_type, p.noise_pct, p.noise_std)

    def decay_multiplier(self, n: float) -> float:
        """Product of the decay factors of decays 1..n, each with the factor that was in
        force when it happened (fractional n: a continuous decay, gamma ** fraction)."""
        m = 1.0
        hist = self._decay_history
        for i, (start, gamma) in enumerate(hist):
            if n <= start:
                break
            end = hist[i + 1][0] if i + 1 < len(hist) else math.inf
            m *= gamma ** (min(n, end) - start)
        return m

    # -- controls ----------------------------------------------------------------------

    def set_lr(self, step: int, value: float, hold: bool = False) -> tuple[float, float]:
        """From ``step`` on the LR is ``value``: the whole remaining curve (warmup, floor
        values such as min_lr/eta_min included) is multiplied by ``value / lr_at(step)``
        so it keeps its shape. With ``hold`` the LR stays ``value`` from ``step`` to the
        end instead; a later set_lr without hold releases it."""
        value = _positive_finite("lr", value)
        old = self.lr_at(step)
        if hold:
            self._hold = (int(step), value)
            return old, value
        u = self.unscaled_lr(step)
        if u == 0.0:
            raise ValueError(
                f"the schedule's LR is 0 at step {step}, so it cannot be rescaled to {value}; "
                "apply the change at a later step"
            )
        self._num, self._den = value, u
        self._hold = None
        return old, self.lr_at(step)

    def scale_lr(self, step: int, factor: float, hold: bool = False) -> tuple[float, float]:
        factor = _positive_finite("lr scale factor", factor)
        return self.set_lr(step, self.lr_at(step) * factor, hold)

    @property
    def decay(self) -> float:
        if not self.decay_param:
            raise self._no_decay()
        return self._decay_history[-1][1]

    def _no_decay(self) -> NoDecayFactor:
        return NoDecayFactor(no_decay_message(self.name))

    def check_decay(self, gamma: float) -> float:
        gamma = float(gamma)
        hi_ok = gamma <= self.decay_max if self.decay_max_inclusive else gamma < self.decay_max
        if not math.isfinite(gamma) or gamma <= 0 or not hi_ok:
            bracket = "]" if self.decay_max_inclusive else ")"
            raise ValueError(
                f"{self.name} {self.decay_param} must be in (0, {self.decay_max:g}{bracket}, got {gamma!r}"
            )
        return gamma

    def decay_count(self, step: int) -> float:
        return self.decays_at(self.schedule_time(self.epoch_time(step)))

    def decay_ahead(self, step: int) -> str:
        """'' when a decay factor set at ``step`` changes the LR at some later step of the
        run; otherwise why it cannot (what set_decay refuses with)."""
        if not self.decay_param:
            return str(self._no_decay())
        held = self.held(step)
        if held is not None:
            return (f"the LR is held at {held[1]:.4g} since step {held[0]} (set_lr --hold), so no decay "
                    "acts; a set_lr/scale_lr without --hold releases the hold")
        last = self.total_steps - 1
        if step >= last:
            return f"step {step} is the run's last step ({last}): no decay follows it"
        return self._decay_ahead(step, last)

    def _decay_ahead(self, step: int, last: int) -> str:
        """Default: decays are counted by ``decay_count``; one must happen in (step, last]."""
        n = self.decay_count(step)
        if self.decay_count(last) > n:
            return ""
        return (f"{self.name}: no {self.decay_param} decay happens after step {step} "
                f"(the run ends at step {last} with {n:g} decays done), so the factor would change nothing")

    def set_decay(self, step: int, gamma: float) -> tuple[float, float]:
        """``gamma`` is the decay factor of every decay that happens after ``step``;
        decays already applied keep theirs, so the LR is continuous at ``step``.
        Raises DecayCannotAct when no decay happens after ``step``."""
        if not self.decay_param:
            raise self._no_decay()
        gamma = self.check_decay(gamma)
        why = self.decay_ahead(step)
        if why:
            raise DecayCannotAct(why)
        old = self.decay
        n = float(self.decay_count(step))
        # Entries at or after n describe decays that have not happened yet: replace them.
        kept = [h for h in self._decay_history if h[0] < n]
        self._decay_history = kept + [(n, gamma)] if kept else [(0.0, gamma)]
        return old, gamma

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """Called once after the last step of ``epoch``; only plateau uses it."""
        self.epoch_end_at(float(epoch + 1), metrics)

    def epoch_end_at(self, t_end: float, metrics: dict[str, float]) -> None:
        """An epoch ended at epoch time ``t_end`` (lets a wrapper shift the clock)."""

    # -- persistence -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr_num": self._num,
            "lr_den": self._den,
            "decay_history": [list(h) for h in self._decay_history],
            "hold": list(self._hold) if self._hold is not None else None,
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for schedule {state.get('name')!r}, not {self.name!r}")
        self._num = float(state["lr_num"])
        self._den = float(state["lr_den"])
        self._decay_history = [(float(a), float(b)) for a, b in state["decay_history"]]
        hold = state.get("hold")  # absent in checkpoints from before holds existed
        self._hold = (int(hold[0]), float(hold[1])) if hold else None
        self._load_extra_state(state)

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump(exclude={"name"}).items())
        s = f"{self.name}({fields}) base_lr={self.base_lr:g}, {self.epochs} epochs x {self.steps_per_epoch} steps"
        if self.decay_param:
            s += f"; set_lr_decay controls {self.decay_param} (now {self.decay:g})"
        return s
